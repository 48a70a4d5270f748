"""Scenario 8, replicas: several `a2ad serve` on one PostgreSQL schema.

1. The direct path with global slots: every direct send of a PostgreSQL replica
   takes and returns a slot lease in the store; c=1 and c=50 sends to the idle
   fast agent, straight vs a2ad on SQLite (no shared slots) vs one replica.
2. Throughput of 1, 2 and 3 replicas on one schema: the same generators (six
   processes of 8 callers, one measured window) spread evenly over the replicas,
   with the machine's CPU use over the window, to say where the limit is.
3. A heartbeat to replica A frees the slot replica B waits for: B queues a
   send while the agent reports its one slot taken; the agent's heartbeat of
   `active_tasks = 0` to A, to the item's arrival at the agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from . import report
from .procs import PYTHON, REPO, Proc, cpu_seconds, http_json, workspace
from .report import Row, limit_row, ratio_row

if TYPE_CHECKING:
    from pgserver import PgServer

    from .scenarios import Bench

NAME = "replicas"
HB_TOKEN = "bench-heartbeat-token"
GENERATORS = 6  # processes, split evenly over 1, 2 or 3 replicas
TOTAL_CONCURRENCY = 48
HB_TRIALS = {"full": 30, "quick": 10}
LEARN_SECONDS = 0.1  # after the heartbeat that takes the slot, before the send to B
QUEUE_SECONDS = 0.05  # after the send to B, before the heartbeat that frees the slot


def run(bench: Bench, pg: PgServer) -> None:
    """All three parts on one PostgreSQL server; rows into bench.rows, figures into
    bench.raw["replicas"]."""
    raw: dict[str, Any] = {}
    bench.raw[NAME] = raw
    where = bench.store("replicas", {}, pg)
    assert isinstance(where, dict)
    recorder = bench.procs.server("recorder")
    workspaces = [
        workspace("fast", bench.agent.url, max_concurrent=1000),
        # Heartbeats on: the agent's reported load counts its one slot everywhere.
        {**workspace("hb", recorder.url), "heartbeat": True, "token": HB_TOKEN},
    ]
    replicas: list[Proc] = []
    try:
        sqlite = bench.procs.a2ad("replicas-sqlite", workspaces)
        try:
            replicas.append(_replica(bench, where, workspaces, 1))
            _direct_path(bench, sqlite, replicas[0], raw)
            _went_direct(bench, replicas[0], "direct path", raw)
        finally:
            sqlite.stop()
        replicas += [_replica(bench, where, workspaces, n) for n in (2, 3)]
        _throughput(bench, pg, replicas, raw)
        _went_direct(bench, replicas[0], "throughput", raw)
        _heartbeat_frees(bench, replicas[0], replicas[1], recorder, raw)
    finally:
        for proc in replicas:
            proc.stop()
        recorder.stop()


def _replica(bench: Bench, where: dict[str, str], workspaces: list[dict[str, Any]], n: int) -> Proc:
    return bench.procs.a2ad(f"replica-r{n}", workspaces, store={**where, "replica_id": f"r{n}"})


def _went_direct(bench: Bench, replica: Proc, part: str, raw: dict[str, Any]) -> None:
    """A row: the sends to `fast` (1000 slots, at most 50 callers) that took the queue
    in this part; the store's counts are every replica's."""
    counts = bench.queue_counts(replica, "fast")
    before = raw.get("fast_queue_counts", {})
    taken = sum(counts.values()) - sum(before.get("total", {}).values())
    raw.setdefault("fast_queue_counts", {})[part] = counts
    raw["fast_queue_counts"]["total"] = counts
    bench.rows.append(
        limit_row(
            f"{NAME}: {part}",
            "sends queued (must go direct)",
            taken,
            "items",
            at_most=0,
            note=", ".join(f"{k} {v}" for k, v in counts.items() if v),
        )
    )


# -- 1. the direct path ---------------------------------------------------------------


def _direct_path(bench: Bench, sqlite: Proc, replica: Proc, raw: dict[str, Any]) -> None:
    targets = [
        ("direct", bench.agent.url, bench.agent),
        ("sqlite", f"{sqlite.url}/workspaces/fast/a2a", sqlite),
        ("pg_replica", f"{replica.url}/workspaces/fast/a2a", replica),
    ]
    part: dict[str, Any] = {}
    raw["direct_path"] = part
    for c in (1, 50):
        got = bench.compare(targets if c == 1 else targets[1:], c)
        part[f"c={c}"] = got
        scenario = f"{NAME}: direct path c={c}"
        lite, pgr = got["sqlite"], got["pg_replica"]
        if c == 1:
            direct = got["direct"]
            added = _minus(pgr["p50_ms"], lite["p50_ms"])
            bench.rows += [
                limit_row(
                    scenario,
                    "global slots: replica p50 − SQLite p50",
                    added,
                    "ms",
                    at_most=1.0,
                    note=f"replica {pgr['p50_ms']:.2f} ms, SQLite {lite['p50_ms']:.2f} ms, "
                    f"agent straight {direct['p50_ms']:.2f} ms",
                ),
                ratio_row(
                    scenario, "PG replica p50", pgr["p50_ms"], "ms", "SQLite a2ad", lite["p50_ms"]
                ),
                ratio_row(
                    scenario, "PG replica p99", pgr["p99_ms"], "ms", "SQLite a2ad", lite["p99_ms"]
                ),
                ratio_row(
                    scenario, "SQLite a2ad p50", lite["p50_ms"], "ms", "direct", direct["p50_ms"]
                ),
            ]
        else:
            bench.rows += [
                ratio_row(
                    scenario, "PG replica p50", pgr["p50_ms"], "ms", "SQLite a2ad", lite["p50_ms"]
                ),
                ratio_row(
                    scenario,
                    "PG replica throughput",
                    pgr["rps"],
                    "req/s",
                    "SQLite a2ad",
                    lite["rps"],
                ),
            ]
        bench._check_answers(scenario, got, "200")


# -- 2. throughput of 1, 2, 3 replicas -----------------------------------------------


def _throughput(bench: Bench, pg: PgServer, replicas: list[Proc], raw: dict[str, Any]) -> None:
    part: dict[str, Any] = {}
    raw["throughput"] = part
    for n in (1, 2, 3):
        before = sum(bench.queue_counts(replicas[0], "fast").values())
        got = _spread(bench, pg, replicas[:n], replicas)
        got["queued"] = sum(bench.queue_counts(replicas[0], "fast").values()) - before
        part[f"{n} replicas"] = got
    one = part["1 replicas"]
    scenario = f"{NAME}: throughput c={TOTAL_CONCURRENCY}"
    for n in (1, 2, 3):
        got = part[f"{n} replicas"]
        note = _cpu_note(got)
        if got["queued"]:
            note = f"{got['queued']:,} sends took the queue; " + note
        if n == 1:
            bench.rows.append(
                Row(
                    scenario,
                    "1 replica",
                    got["rps"],
                    "req/s",
                    note=f"p50 {got['p50_ms']:.1f} ms; " + note,
                )
            )
            continue
        bench.rows.append(
            ratio_row(
                scenario,
                f"{n} replicas",
                got["rps"],
                "req/s",
                "1 replica",
                one["rps"],
                at_least=1.0 if n == 3 else None,
                note=f"p50 {got['p50_ms']:.1f} ms; " + note,
            )
        )
    errors = sum(got["errors"] + got["not_200"] for got in part.values())
    if errors:
        bench.rows.append(
            Row(
                scenario, "errors / answers other than 200", errors, "answers", verdict=report.FAILS
            )
        )


def _spread(bench: Bench, pg: PgServer, targets: list[Proc], every: list[Proc]) -> dict[str, Any]:
    """GENERATORS loadgen processes, round robin over `targets`, measuring one window;
    the machine's CPU over that window: ours by part (PostgreSQL: its server's
    processes), and the rest (processes of others)."""
    plan = bench.plan
    per = TOTAL_CONCURRENCY // GENERATORS
    # Six generators starting at once on two cores: time to import and connect.
    start_at = time.time() + max(1.5, plan.warmup)
    duration = plan.duration
    running: list[tuple[Proc, subprocess.Popen[str]]] = []
    for g in range(GENERATORS):
        target = targets[g % len(targets)]
        cmd = [PYTHON, "-m", "bench.loadgen", "--url", f"{target.url}/workspaces/fast/a2a"]
        cmd += ["-c", str(per), "-d", str(duration), "--start-at", str(start_at)]
        cmd += ["--tag", f"rep{len(targets)}-g{g}-{os.urandom(3).hex()}"]
        popen = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        running.append((target, popen))
    try:
        time.sleep(max(0.0, start_at - time.time()))
        before = _cpu_sample(bench, pg, every, running)
        time.sleep(max(0.0, start_at + duration - time.time()))
        after = _cpu_sample(bench, pg, every, running)
        results = []
        for _, popen in running:
            out, _ = popen.communicate(timeout=duration + 120)
            if popen.returncode:
                raise RuntimeError(f"loadgen exited {popen.returncode}")
            results.append(json.loads(out))
    finally:
        for _, popen in running:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
    wall = after["wall"] - before["wall"]
    capacity = wall * (os.cpu_count() or 1)
    busy = after["busy"] - before["busy"]
    parts = ("replicas", "generators", "agent", "postgres")
    shares = {key: (after[key] - before[key]) / capacity for key in parts}
    ours = sum(after[k] - before[k] for k in parts)
    shares["others"] = max(0.0, busy - ours) / capacity
    per_replica: dict[str, float] = {}
    for (target, _), result in zip(running, results, strict=True):
        per_replica[target.name] = per_replica.get(target.name, 0.0) + result["rps"]
    p50s = [r["p50_ms"] for r in results if r["p50_ms"] is not None]
    return {
        "replicas": [t.name for t in targets],
        "rps": round(sum(r["rps"] for r in results), 1),
        "rps_by_replica": per_replica,
        "p50_ms": statistics.median(p50s) if p50s else None,
        "p99_ms": max((r["p99_ms"] for r in results if r["p99_ms"] is not None), default=None),
        "errors": sum(sum(r["errors"].values()) for r in results),
        "not_200": sum(v for r in results for k, v in r["statuses"].items() if k != "200"),
        "machine": {
            "busy_share": round(busy / capacity, 3),
            "steal_share": round((after["steal"] - before["steal"]) / capacity, 3),
            **{f"{k}_share": round(v, 3) for k, v in shares.items()},
            "by_replica_cpu_s": {
                name: round(after["each"][name] - before["each"][name], 2)
                for name in before["each"]
            },
        },
        "generators": results,
    }


def _cpu_sample(
    bench: Bench,
    pg: PgServer,
    every: list[Proc],
    running: list[tuple[Proc, subprocess.Popen[str]]],
) -> dict[str, Any]:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _, _, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    each = {proc.name: _cpu(proc.pid) for proc in every}
    return {
        "wall": time.monotonic(),
        "busy": (user + nice + system + irq + softirq) / tick,
        "steal": steal / tick,
        "each": each,
        "replicas": sum(each.values()),
        "generators": sum(_cpu(p.pid) for _, p in running),
        "agent": _cpu(bench.agent.pid),
        "postgres": sum(_cpu(pid) for pid in _family(pg)),
    }


def _family(pg: PgServer) -> list[int]:
    """The PostgreSQL server's processes: its postmaster and the postmaster's children
    (backends, writers); a backend that has exited takes its CPU time with it."""
    proc = pg._proc
    if proc is None:
        return []
    pids = [proc.pid]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            if ppid == proc.pid:
                pids.append(int(entry))
    return pids


def _cpu(pid: int) -> float:
    with contextlib.suppress(OSError):
        return cpu_seconds(pid)
    return 0.0


def _cpu_note(got: dict[str, Any]) -> str:
    m = got["machine"]
    return (
        f"machine {m['busy_share']:.0%} busy: generators {m['generators_share']:.0%}, "
        f"replicas {m['replicas_share']:.0%}, PostgreSQL {m['postgres_share']:.0%}, "
        f"agent {m['agent_share']:.0%}, other processes {m['others_share']:.0%}"
    )


# -- 3. a heartbeat to A frees B's slot ----------------------------------------------


def _heartbeat_frees(bench: Bench, a: Proc, b: Proc, recorder: Proc, raw: dict[str, Any]) -> None:
    trials = HB_TRIALS.get(bench.plan.name, 30)
    scenario = f"{NAME}: heartbeat to A frees B's slot"
    latencies: list[float] = []
    early = 0
    lost = 0
    statuses: dict[str, int] = {}
    _heartbeat(a, 0)  # online everywhere, its one slot free
    time.sleep(0.2)
    for trial in range(trials):
        _heartbeat(a, 1)  # someone else holds the agent's one slot
        time.sleep(LEARN_SECONDS)
        seen = len(_spans(recorder))
        status = _send_nonblocking(b, "hb", f"hb-{trial}-{os.urandom(3).hex()}")
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        time.sleep(QUEUE_SECONDS)
        if len(_spans(recorder)) > seen:
            early += 1  # delivered before the slot was freed: not a trial
            continue
        t0 = time.monotonic()  # the recorder's clock, on the same host
        _heartbeat(a, 0)
        deadline = t0 + 5.0
        spans = _spans(recorder)
        while len(spans) <= seen and time.monotonic() < deadline:
            time.sleep(0.002)
            spans = _spans(recorder)
        if len(spans) <= seen:
            lost += 1
            continue
        latencies.append((spans[seen][0] - t0) * 1000)
        time.sleep(0.02)  # the answer is written; a2ad closes the item
    ordered = sorted(latencies)
    p50 = _pct(ordered, 0.5)
    p99 = _pct(ordered, 0.99)
    raw["heartbeat_frees"] = {
        "trials": trials,
        "latencies_ms": [round(v, 3) for v in latencies],
        "p50_ms": p50,
        "p90_ms": _pct(ordered, 0.9),
        "p99_ms": p99,
        "max_ms": ordered[-1] if ordered else None,
        "delivered_before_freed": early,
        "not_delivered_in_5s": lost,
        "send_statuses": statuses,
        "recorder_busy_answers": _records(recorder).get("busy"),
    }
    bench.rows += [
        limit_row(scenario, "heartbeat → item arrives, p50", p50, "ms", at_most=20),
        limit_row(
            scenario,
            "heartbeat → item arrives, p99",
            p99,
            "ms",
            note=f"max {ordered[-1]:.1f} ms" if ordered else "",
        ),
        limit_row(
            scenario,
            f"trials measured of {trials}",
            len(latencies),
            "trials",
            at_least=trials,
            note=", ".join(
                s
                for s in (
                    f"{early} delivered before the slot was freed" if early else "",
                    f"{lost} not delivered in 5 s" if lost else "",
                    f"send statuses {statuses}" if set(statuses) != {"202"} else "",
                )
                if s
            ),
        ),
    ]


def _heartbeat(a2ad: Proc, active: int) -> None:
    body = json.dumps({"active_tasks": active}).encode()
    status, answer = _post(
        f"{a2ad.url}/workspaces/hb/heartbeat", body, {"Authorization": f"Bearer {HB_TOKEN}"}
    )
    if status != 200:
        raise RuntimeError(f"heartbeat to {a2ad.name} answered {status}: {answer!r}")


def _send_nonblocking(a2ad: Proc, ws_id: str, message_id: str) -> int:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "message/send",
            "params": {
                "message": {
                    "role": "user",
                    "messageId": message_id,
                    "parts": [{"kind": "text", "text": "x"}],
                },
                "configuration": {"blocking": False},
            },
        }
    ).encode()
    status, _ = _post(f"{a2ad.url}/workspaces/{ws_id}/a2a", body, {})
    return status


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    for key, value in headers.items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _records(recorder: Proc) -> dict[str, Any]:
    _, body = http_json(recorder.url + "records")
    return body if isinstance(body, dict) else {}


def _spans(recorder: Proc) -> list[list[float]]:
    return list(_records(recorder).get("spans", []))


# -- helpers ------------------------------------------------------------------------------


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[max(0, min(len(values) - 1, int(q * len(values) + 0.999999) - 1))]
