"""The scenarios of issue 8, the replicas scenario (bench/replicas.py) and the push
scenario (bench/pushes.py). Each
starts the a2ad processes it needs, drives them with a generator in its own
process, and adds rows to the report."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fill, report, wrkdrive
from . import pushes as push_scenario
from . import replicas as replicas_scenario
from .procs import PYTHON, REPO, Proc, Procs, cpu_seconds, http_json, workspace

sys.path.insert(0, str(REPO / "tests"))
from pgserver import PgServer

from .report import Row, limit_row, ratio_row


@dataclass(frozen=True)
class Plan:
    """How much of everything one run does."""

    name: str
    duration: float  # seconds measured per load run
    warmup: float  # seconds before measuring (Python generator)
    rounds: int  # comparisons alternate their targets this many times ...
    round_seconds: float  # ... measuring each for this long per round
    concurrency: tuple[int, ...]
    drain_items: int
    backlog_items: int
    backlog_max_seconds: float
    store_sizes: tuple[int, int]
    workspace_counts: tuple[int, int]
    claim_items: int  # queued for the claim runs of the workspaces comparison
    scale_concurrency: int
    stream_concurrency: tuple[int, ...]
    stream_events: int
    raw_sqlite_seconds: float


FULL = Plan(
    name="full",
    duration=5.0,
    warmup=0.5,
    rounds=3,
    round_seconds=2.0,
    concurrency=(1, 50, 200),
    drain_items=500,
    backlog_items=100_000,
    backlog_max_seconds=150.0,
    store_sizes=(10_000, 1_000_000),
    workspace_counts=(10, 10_000),
    claim_items=30_000,
    scale_concurrency=50,
    stream_concurrency=(1, 50),
    stream_events=20,
    raw_sqlite_seconds=5.0,
)

QUICK = Plan(
    name="quick",
    duration=1.0,
    warmup=0.3,
    rounds=1,
    round_seconds=1.0,
    concurrency=(1, 50, 200),
    drain_items=200,
    backlog_items=5_000,
    backlog_max_seconds=30.0,
    store_sizes=(10_000, 100_000),
    workspace_counts=(10, 10_000),
    claim_items=10_000,
    scale_concurrency=50,
    stream_concurrency=(1, 50),
    stream_events=20,
    raw_sqlite_seconds=1.0,
)

SCENARIOS = (
    "proxy",
    "enqueue",
    "drain",
    "backlog",
    "scale",
    "stream",
    "postgres",
    "replicas",
    "push",
)
PG_BACKLOG_ITEMS = 30_000  # the PostgreSQL backlog: enough for a steady rate


def _tag(label: str) -> str:
    return f"{label}-{os.urandom(3).hex()}"


class Bench:
    """One run: the shared servers, the generator ceilings, the rows and the raw data."""

    def __init__(self, plan: Plan, procs: Procs, *, use_wrk: bool) -> None:
        self.plan = plan
        self.procs = procs
        self.use_wrk = use_wrk
        self.rows: list[Row] = []
        self.raw: dict[str, Any] = {"ceilings": {}}
        self._ceilings: dict[tuple[str, int], dict[str, Any]] = {}
        self.agent = procs.server("agent", "--events", str(plan.stream_events))
        self.proxy = procs.server("proxy", "--upstream", self.agent.url)
        self.accept = procs.server("accept")
        self.sink = procs.server("sink")
        self.busy = procs.server("busy")

    # -- generators ----------------------------------------------------------------

    def loadgen(
        self,
        url: str,
        concurrency: int,
        label: str,
        *,
        stream: bool = False,
        duration: float | None = None,
    ) -> Any:
        """The Python generator in its own process."""
        plan = self.plan
        seconds = duration or plan.duration
        cmd = [PYTHON, "-m", "bench.loadgen", "--url", url, "-c", str(concurrency)]
        cmd += ["-d", str(seconds), "--warmup", str(plan.warmup), "--tag", _tag(label)]
        if stream:
            cmd.append("--stream")
        timeout = seconds + plan.warmup + 120
        out = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=timeout
        )
        result = json.loads(out.stdout)
        result["generator"] = "loadgen"
        return result

    def compare(
        self, targets: list[tuple[str, str, Proc]], concurrency: int, *, stream: bool = False
    ) -> dict[str, Any]:
        """Load each (name, url, server) in turn, `rounds` times over, so that drift on a
        shared machine falls on every target alike; with the server's CPU per answer."""
        runs: dict[str, list[Any]] = {name: [] for name, _, _ in targets}
        for _ in range(self.plan.rounds):
            for name, url, server in targets:
                before = cpu_seconds(server.pid)
                result = self.loadgen(
                    url, concurrency, name, stream=stream, duration=self.plan.round_seconds
                )
                result["server_cpu_s"] = cpu_seconds(server.pid) - before
                runs[name].append(result)
        return {name: _merge(results) for name, results in runs.items()}

    def enqueue_load(
        self, url: str, concurrency: int, label: str, server: Proc | None = None
    ) -> Any:
        """wrk when it is there (so the 202 server is not generator-bound), else loadgen;
        with `server`, its CPU time per answer."""
        before = cpu_seconds(server.pid) if server is not None else 0.0
        main_before = cpu_seconds(server.pid, server.pid) if server is not None else 0.0
        if self.use_wrk:
            result = wrkdrive.run(url, concurrency, self.plan.duration, _tag(label))
        else:
            result = self.loadgen(url, concurrency, label)
        if server is not None:
            cpu = cpu_seconds(server.pid) - before
            main = cpu_seconds(server.pid, server.pid) - main_before
            answers = max(1, result.get("completed_total") or result["requests"])
            result["server_cpu_us_per_answer"] = round(cpu / answers * 1e6, 1)
            # The event loop's thread apart from the rest (a2ad: the SQLite threads).
            result["server_main_thread_cpu_us_per_answer"] = round(main / answers * 1e6, 1)
        return result

    def ceiling(self, tool: str, concurrency: int) -> Any:
        """What the generator reaches against the sink, a target that costs next to nothing."""
        key = (tool, concurrency)
        if key not in self._ceilings:
            if tool == "wrk":
                result = wrkdrive.run(self.sink.url, concurrency, self.plan.duration, _tag("sink"))
            else:
                result = self.loadgen(self.sink.url, concurrency, "sink")
            self._ceilings[key] = result
            self.raw["ceilings"][f"{tool} c={concurrency}"] = result
            self.rows.append(
                Row(
                    "generator ceiling",
                    f"{tool} → sink c={concurrency}",
                    result["rps"],
                    "req/s",
                    note=f"p50 {result['p50_ms']:.2f} ms",
                )
            )
        return self._ceilings[key]

    def enqueue_tool(self) -> str:
        return "wrk" if self.use_wrk else "loadgen"

    # -- helpers ---------------------------------------------------------------------

    def store(
        self, name: str, counts: dict[str, int], pg: PgServer | None = None
    ) -> Path | dict[str, str]:
        """A fresh store with a2ad's schema and `counts` queued items per workspace: a
        SQLite file, or with `pg` a schema of its own on that server."""
        folder = self.procs.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        db = folder / "a2ad.db"
        config = folder / "migrate.toml"
        if pg is not None:
            where = {"url": pg.url, "schema": "bench_" + name.replace("-", "_")}
            config.write_text(f'[store]\nurl = "{pg.url}"\nschema = "{where["schema"]}"\n')
        else:
            config.write_text(f'[store]\npath = "{db}"\n')
        fill.migrate(config, REPO)
        if counts:
            if pg is not None:
                seconds = fill.fill_postgres(pg.url, where["schema"], counts, tag=name)
            else:
                seconds = fill.fill(db, counts, tag=name)
            self.raw.setdefault("fills", {})[name] = {
                "items": sum(counts.values()),
                "seconds": round(seconds, 2),
            }
        return where if pg is not None else db

    @staticmethod
    def queue_counts(a2ad: Proc, ws_id: str) -> dict[str, int]:
        status, body = http_json(f"{a2ad.url}/workspaces/{ws_id}", timeout=120)
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"GET /workspaces/{ws_id} answered {status}: {body}")
        return dict(body["queue"])

    @staticmethod
    def prime_busy(a2ad: Proc, ws_id: str) -> None:
        """The first send meets the busy agent, so a2ad pauses the workspace for an hour
        and queues from then on."""
        body = b'{"jsonrpc":"2.0","id":0,"method":"message/send","params":{"message":'
        body += b'{"role":"user","messageId":"prime","parts":[{"kind":"text","text":"x"}]},'
        body += b'"configuration":{"blocking":false}}}'
        status, answer = http_json(f"{a2ad.url}/workspaces/{ws_id}/a2a", body)
        if status != 202:
            raise RuntimeError(f"priming {ws_id}: expected 202, got {status}: {answer}")

    @staticmethod
    def served(agent: Proc) -> dict[str, Any]:
        status, body = http_json(agent.url + "stats")
        assert status == 200 and isinstance(body, dict)
        return body

    # -- 1. proxy overhead ---------------------------------------------------------

    def proxy_overhead(self) -> None:
        """Non-streaming sends to an idle agent: direct vs bare proxy vs a2ad."""
        name = "proxy overhead"
        a2ad = self.procs.a2ad("proxy", [workspace("fast", self.agent.url, max_concurrent=1000)])
        raw: dict[str, Any] = {}
        try:
            targets = [
                ("direct", self.agent.url, self.agent),
                ("bare_proxy", self.proxy.url, self.proxy),
                ("a2ad", f"{a2ad.url}/workspaces/fast/a2a", a2ad),
            ]
            for c in self.plan.concurrency:
                ceiling = self.ceiling("loadgen", c)
                got = self.compare(targets, c)
                raw[f"c={c}"] = got
                direct, bare, mine = got["direct"], got["bare_proxy"], got["a2ad"]
                bound = {"reference_rate": bare["rps"], "ceiling_rate": ceiling["rps"]}
                scenario = f"{name} c={c}"
                cpu = "server_cpu_us_per_answer"
                self.rows += [
                    ratio_row(
                        scenario,
                        "a2ad p50",
                        mine["p50_ms"],
                        "ms",
                        "bare proxy",
                        bare["p50_ms"],
                        at_most=1.15,
                        **bound,
                    ),
                    ratio_row(
                        scenario,
                        "a2ad throughput",
                        mine["rps"],
                        "req/s",
                        "bare proxy",
                        bare["rps"],
                        at_least=0.9,
                        **bound,
                    ),
                    ratio_row(
                        scenario, "a2ad CPU per answer", mine[cpu], "µs", "bare proxy", bare[cpu]
                    ),
                    ratio_row(
                        scenario, "a2ad p50", mine["p50_ms"], "ms", "direct", direct["p50_ms"]
                    ),
                    ratio_row(
                        scenario, "bare proxy p50", bare["p50_ms"], "ms", "direct", direct["p50_ms"]
                    ),
                    ratio_row(
                        scenario,
                        "bare proxy throughput",
                        bare["rps"],
                        "req/s",
                        "direct",
                        direct["rps"],
                    ),
                ]
                self._check_answers(scenario, got, "200")
            if self.use_wrk:
                self._proxy_under_wrk(name, targets[1:], raw)
            counts = self.queue_counts(a2ad, "fast")
            raw["queue_after"] = counts
            queued = sum(counts.values())
            self.rows.append(
                limit_row(name, "items queued (must go direct)", queued, "items", at_most=0)
            )
        finally:
            a2ad.stop()
        self.raw["proxy"] = raw

    def _proxy_under_wrk(
        self, name: str, targets: list[tuple[str, str, Proc]], raw: dict[str, Any]
    ) -> None:
        """Throughput when wrk drives the proxies (info): wrk leaves nearly both cores
        to them, so the ratio is their CPU per answer, where the Python generator,
        sharing the cores, narrows it."""
        concurrency = 50
        runs: dict[str, list[float]] = {label: [] for label, _, _ in targets}
        for _ in range(self.plan.rounds):
            for label, url, _ in targets:
                result = wrkdrive.run(url, concurrency, self.plan.round_seconds, _tag(label))
                runs[label].append(result["rps"])
        rates = {label: statistics.median(rps) for label, rps in runs.items()}
        raw["wrk_c=50"] = runs
        self.rows.append(
            ratio_row(
                f"{name} c={concurrency}",
                "a2ad throughput, wrk",
                rates["a2ad"],
                "req/s",
                "bare proxy",
                rates["bare_proxy"],
            )
        )

    def _check_answers(self, scenario: str, got: dict[str, Any], expected: str) -> None:
        """A row that fails the scenario when any answer was an error or unexpected."""
        errors = sum(sum(r["errors"].values()) for r in got.values())
        wrong = sum(n for r in got.values() for s, n in r["statuses"].items() if s != expected)
        if errors or wrong:
            self.rows.append(
                Row(
                    scenario,
                    f"errors / answers other than {expected}",
                    errors + wrong,
                    "answers",
                    verdict=report.FAILS,
                )
            )

    # -- 2. durable enqueue ----------------------------------------------------------

    def durable_enqueue(self) -> None:
        """Agent busy, so every send is stored: FULL vs NORMAL vs raw SQLite vs the 202 server."""
        name = "durable enqueue"
        tool = self.enqueue_tool()
        folder = self.procs.workdir / "raw-sqlite"
        folder.mkdir(parents=True, exist_ok=True)
        seconds = str(self.plan.raw_sqlite_seconds)
        out = subprocess.run(
            [PYTHON, "-m", "bench.sqlite_raw", "--db", str(folder / "raw.db"), "-d", seconds],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        raw_sqlite = json.loads(out.stdout)
        raw: dict[str, Any] = {"raw_sqlite_full": raw_sqlite, "generator": tool}
        ws = [workspace("busy", self.busy.url)]
        full = self.procs.a2ad("enqueue-full", ws, synchronous="full")
        normal = self.procs.a2ad("enqueue-normal", ws, synchronous="normal")
        # The floor of a2ad's design: the same INSERTs, batched on a writer thread,
        # or on the event loop with only the COMMIT on the thread (a2ad's writer now).
        stored_202 = self.procs.server("stored", "--db", str(folder / "stored.db"))
        stored_loop_202 = self.procs.server(
            "stored", "--db", str(folder / "stored-loop.db"), "--on-loop"
        )
        acknowledged = {"full": 1, "normal": 1}
        try:
            for key, a2ad in (("full", full), ("normal", normal)):
                self.prime_busy(a2ad, "busy")
                if self.plan.name != "quick" and tool == "wrk":
                    url = f"{a2ad.url}/workspaces/busy/a2a"
                    acknowledged[key] += wrkdrive.run(url, 50, 1, _tag("warmup"))["requests"]
            for c in self.plan.concurrency:
                ceiling = self.ceiling(tool, c)
                got = {
                    "full": self.enqueue_load(f"{full.url}/workspaces/busy/a2a", c, "full", full),
                    "normal": self.enqueue_load(
                        f"{normal.url}/workspaces/busy/a2a", c, "normal", normal
                    ),
                    "accept_202": self.enqueue_load(self.accept.url, c, "accept", self.accept),
                    "stored_202": self.enqueue_load(stored_202.url, c, "stored", stored_202),
                    "stored_loop_202": self.enqueue_load(
                        stored_loop_202.url, c, "stored-loop", stored_loop_202
                    ),
                }
                raw[f"c={c}"] = got
                for key in ("full", "normal"):
                    acknowledged[key] += got[key]["requests"]
                scenario = f"{name} c={c}"
                judged = c >= 50
                f_rps, n_rps, a_rps = (got[k]["rps"] for k in ("full", "normal", "accept_202"))
                self.rows += [
                    ratio_row(
                        scenario,
                        "FULL rate",
                        f_rps,
                        "req/s",
                        "a2ad NORMAL",
                        n_rps,
                        at_least=0.8 if judged else None,
                        reference_rate=n_rps,
                        ceiling_rate=ceiling["rps"],
                    ),
                    ratio_row(
                        scenario,
                        "FULL rate",
                        f_rps,
                        "req/s",
                        "raw INSERT/FULL",
                        raw_sqlite["rate"],
                        at_least=1.0 if judged else None,
                    ),
                    ratio_row(
                        scenario,
                        "FULL rate",
                        f_rps,
                        "req/s",
                        "202 server",
                        a_rps,
                        note=(
                            f"202 server at {a_rps / ceiling['rps']:.0%} of {tool}'s ceiling"
                            if ceiling["rps"]
                            else ""
                        ),
                    ),
                    ratio_row(
                        scenario,
                        "FULL p50",
                        got["full"]["p50_ms"],
                        "ms",
                        "a2ad NORMAL",
                        got["normal"]["p50_ms"],
                        note=f"FULL p99 {got['full']['p99_ms']:.1f} ms",
                    ),
                ]
                full_cpu = got["full"]["server_cpu_us_per_answer"]
                full_loop = got["full"]["server_main_thread_cpu_us_per_answer"]
                cpu_references = (
                    (
                        "stored 202 server, on loop",
                        "stored_loop_202",
                        f"it stores {got['stored_loop_202']['rps']:,.0f}/s: a2ad's INSERTs on"
                        " the event loop, COMMIT on a writer thread, nothing else",
                    ),
                    (
                        "stored 202 server",
                        "stored_202",
                        f"it stores {got['stored_202']['rps']:,.0f}/s: a2ad's INSERTs on a"
                        " writer thread, nothing else",
                    ),
                    (
                        "202 server",
                        "accept_202",
                        f"event loop {full_loop:.0f} µs,"
                        f" SQLite threads {full_cpu - full_loop:.0f} µs",
                    ),
                )
                self.rows += [
                    ratio_row(
                        scenario,
                        "FULL CPU per 202",
                        full_cpu,
                        "µs",
                        reference,
                        got[label]["server_cpu_us_per_answer"],
                        note=note,
                    )
                    for reference, label, note in cpu_references
                ]
            for key, a2ad in (("full", full), ("normal", normal)):
                counts = self.queue_counts(a2ad, "busy")
                stored = counts.get("queued", 0)
                raw[f"stored_{key}"] = {"stored": stored, "acknowledged": acknowledged[key]}
                # The generator counts only answers it read before stopping; any
                # send in flight then may be stored without being counted.
                self.rows.append(
                    ratio_row(
                        name,
                        f"{key.upper()}: items stored",
                        stored,
                        "items",
                        "202s counted",
                        acknowledged[key],
                        at_least=1.0,
                    )
                )
        finally:
            full.stop()
            normal.stop()
            stored_202.stop()
            stored_loop_202.stop()
        self.raw["enqueue"] = raw

    # -- 3. drain latency -------------------------------------------------------------

    def drain_latency(self, pg: PgServer | None = None) -> None:
        """A one-slot agent that records when each request arrived and when its answer
        was written: the gap to the next arrival is how fast a freed slot is refilled."""
        name = "PostgreSQL drain latency" if pg else "drain latency"
        key = "pg_drain" if pg else "drain"
        n = self.plan.drain_items
        recorder = self.procs.server("recorder")
        db = self.store(key.replace("_", "-"), {"drain": n}, pg)
        a2ad = self.procs.a2ad(key, [workspace("drain", recorder.url)], store=db)
        try:
            deadline = time.monotonic() + 60 + n / 50
            while True:
                _, body = http_json(recorder.url + "records")
                spans = body["spans"] if isinstance(body, dict) else []
                if len(spans) >= n or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            busy = body["busy"] if isinstance(body, dict) else None
        finally:
            a2ad.stop()
            recorder.stop()
        gaps = sorted((spans[k + 1][0] - spans[k][1]) * 1000 for k in range(len(spans) - 1))
        cycles = [(spans[k + 1][0] - spans[k][0]) * 1000 for k in range(len(spans) - 1)]
        p50 = _pct(gaps, 0.5)
        p99 = _pct(gaps, 0.99)
        self.raw[key] = {
            "items": n,
            "delivered": len(spans),
            "busy_answers": busy,
            "gap_ms": {
                "p50": p50,
                "p90": _pct(gaps, 0.9),
                "p99": p99,
                "max": gaps[-1] if gaps else None,
            },
            "cycle_ms_p50": statistics.median(cycles) if cycles else None,
        }
        self.rows += [
            limit_row(name, "slot freed → next arrives, p50", p50, "ms", at_most=5),
            limit_row(name, "slot freed → next arrives, p99", p99, "ms", at_most=20),
            limit_row(
                name,
                "items delivered of " + str(n),
                len(spans),
                "items",
                at_least=n,
                note=f"{busy} busy answers" if busy else "",
            ),
        ]

    # -- 4. deep backlog ----------------------------------------------------------------

    def deep_backlog(self, pg: PgServer | None = None) -> None:
        """`backlog_items` queued before a2ad starts, for a fast agent with 16 slots
        (on PostgreSQL at most PG_BACKLOG_ITEMS, judged against the SQLite store)."""
        name = "PostgreSQL deep backlog" if pg else "deep backlog"
        key = "pg_backlog" if pg else "backlog"
        n = min(self.plan.backlog_items, PG_BACKLOG_ITEMS) if pg else self.plan.backlog_items
        agent = self.procs.server("agent")
        db = self.store(key.replace("_", "-"), {"backlog": n}, pg)
        a2ad = self.procs.a2ad(key, [workspace("backlog", agent.url, max_concurrent=16)], store=db)
        in_flight: list[int] = []
        cpu_before = cpu_seconds(a2ad.pid)
        main_before = cpu_seconds(a2ad.pid, a2ad.pid)
        try:
            deadline = time.monotonic() + self.plan.backlog_max_seconds
            polls = 0
            while True:
                stats = self.served(agent)
                if stats["served"] >= n or time.monotonic() > deadline:
                    break
                polls += 1
                if polls % 4 == 1:
                    # a2ad's own count of requests at the agent; seldom, since
                    # GET /workspaces/{id} counts the store's rows.
                    _, view = http_json(f"{a2ad.url}/workspaces/backlog")
                    if isinstance(view, dict):
                        in_flight.append(int(view["in_flight"]))
                time.sleep(0.5)
            memory = a2ad.memory()
            cpu = cpu_seconds(a2ad.pid) - cpu_before
            main = cpu_seconds(a2ad.pid, a2ad.pid) - main_before  # the event loop's thread
        finally:
            a2ad.stop()
            agent.stop()
        seconds = (stats["last"] or 0) - (stats["first"] or 0)
        rate = stats["served"] / seconds if seconds > 0 else None
        if pg is not None:
            self.raw[key] = {"items": n, "seconds": round(seconds, 3), "rate": rate}
            sqlite_rate = self.raw.get("backlog", {}).get("rate")
            note = f"a2ad CPU {cpu / seconds:.0%} of a core" if seconds > 0 else ""
            self.rows.append(
                ratio_row(
                    name,
                    f"delivered/s ({stats['served']:,} of {n:,})",
                    rate,
                    "items/s",
                    "SQLite store",
                    sqlite_rate,
                    note=note,
                )
            )
            return
        bare = self.raw.get("proxy", {}).get("c=50", {}).get("bare_proxy", {}).get("rps")
        if bare is None:  # the proxy scenario did not run: measure the reference here
            bare = self.loadgen(self.proxy.url, 50, "bare")["rps"]
        self.raw[key] = {
            "items": n,
            "delivered": stats["served"],
            "seconds": round(seconds, 3),
            "rate": rate,
            "in_flight_samples": in_flight,
            "a2ad_cpu_s": round(cpu, 2),
            "a2ad_event_loop_cpu_s": round(main, 2),
            "a2ad_memory_kib": memory,
            "bare_proxy_rps_c50": bare,
        }
        row = Row(
            name,
            f"delivered/s ({stats['served']:,} of {n:,})",
            rate,
            "items/s",
            "bare proxy c=50" if bare else "",
            bare,
            target="≥ 5,000/s or ≥ 1×",
        )
        ok = rate is not None and (rate >= 5000 or (bare is not None and rate >= bare))
        row.verdict = report.HOLDS if ok else report.FAILS
        notes = [
            f"a2ad CPU {cpu / seconds:.0%} of a core, its event loop {main / seconds:.0%}"
            if seconds > 0
            else ""
        ]
        if in_flight:
            notes.append(f"in flight: median {statistics.median(in_flight):g} of 16")
        row.note = "; ".join(n for n in notes if n)
        self.rows.append(row)

    # -- 7. PostgreSQL ------------------------------------------------------------------

    def postgres(self) -> None:
        """The same a2ad on a PostgreSQL server of its own (fsync on), each figure against
        its reference in this run: durable enqueue vs raw single-row INSERT transactions
        on the same server, drain latency, and the backlog vs the SQLite store's."""
        name = "PostgreSQL enqueue"
        with PgServer(fsync=True) as pg:
            raw_store = self.store("pg-raw", {}, pg)
            assert isinstance(raw_store, dict)
            out = subprocess.run(
                [
                    *(PYTHON, "-m", "bench.pg_raw", "--url", pg.url),
                    *("--schema", raw_store["schema"], "-d", str(self.plan.raw_sqlite_seconds)),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            )
            raw_pg = json.loads(out.stdout)
            store = self.store("pg-enqueue", {}, pg)
            a2ad = self.procs.a2ad("pg-enqueue", [workspace("busy", self.busy.url)], store=store)
            try:
                self.prime_busy(a2ad, "busy")
                raw: dict[str, Any] = {"raw_insert": raw_pg}
                for c in (1, 50):
                    got = self.enqueue_load(f"{a2ad.url}/workspaces/busy/a2a", c, "pg", a2ad)
                    raw[f"c={c}"] = got
                    self.rows += [
                        ratio_row(
                            f"{name} c={c}",
                            "FULL rate",
                            got["rps"],
                            "req/s",
                            "raw INSERT, same server",
                            raw_pg["rate"],
                            at_least=1.0 if c >= 50 else None,
                            note=f"p50 {got['p50_ms']:.1f} ms, p99 {got['p99_ms']:.1f} ms",
                        ),
                        Row(
                            f"{name} c={c}",
                            "CPU per 202",
                            got["server_cpu_us_per_answer"],
                            "µs",
                        ),
                    ]
            finally:
                a2ad.stop()
            self.raw["pg_enqueue"] = raw
            self.drain_latency(pg)
            self.deep_backlog(pg)

    # -- 8. replicas ---------------------------------------------------------------------

    def replicas(self) -> None:
        """Replicas on one PostgreSQL schema (fsync on): the direct path with global
        slots, throughput of 1, 2 and 3 replicas, a heartbeat to one freeing a slot
        another waits for (bench/replicas.py)."""
        with PgServer(fsync=True) as pg:
            replicas_scenario.run(self, pg)

    # -- 9. push notifications -----------------------------------------------------------

    def push(self) -> None:
        """Pushes per second draining a backlog after a restart, against the durable
        enqueue of the same sends; a delivery's answer to its push (bench/pushes.py)."""
        push_scenario.run(self)

    # -- 5. scale ------------------------------------------------------------------------

    def _enqueue_run(
        self, label: str, workspaces: list[dict[str, Any]], db: Path
    ) -> dict[str, Any]:
        """a2ad with `scale` pointing at the busy agent: the rate of durable enqueues."""
        a2ad = self.procs.a2ad(label, workspaces, store=db)
        try:
            startup = a2ad.extra["startup_s"]
            self.prime_busy(a2ad, "scale")
            url = f"{a2ad.url}/workspaces/scale/a2a"
            load = self.enqueue_load(url, self.plan.scale_concurrency, label)
            memory = a2ad.memory()
        finally:
            a2ad.stop()
        return {"load": load, "memory_kib": memory, "startup_s": startup}

    def _claim_run(
        self, label: str, workspaces: list[dict[str, Any]], db: Path, agent: Proc
    ) -> dict[str, Any]:
        """a2ad with `scale` pointing at the fast agent, 16 slots: deliveries per second."""
        a2ad = self.procs.a2ad(label, workspaces, store=db)
        try:
            time.sleep(self.plan.warmup)
            before, started = self.served(agent)["served"], time.monotonic()
            time.sleep(self.plan.duration)
            after, ended = self.served(agent)["served"], time.monotonic()
            memory = a2ad.memory()
        finally:
            a2ad.stop()
        return {
            "delivered": after - before,
            "rate": round((after - before) / (ended - started), 1),
            "memory_kib": memory,
            "startup_s": a2ad.extra["startup_s"],
        }

    def scale(self) -> None:
        """Enqueue and claim with few vs many items in the store, and few vs many workspaces."""
        name = "scale"
        agent = self.procs.server("agent")
        raw: dict[str, Any] = {"items": {}, "workspaces": {}}
        fast = [workspace("scale", agent.url, max_concurrent=16)]
        busy = [workspace("scale", self.busy.url, max_concurrent=16)]
        try:
            for size in self.plan.store_sizes:
                db = self.store(f"scale-items-{size}", {"scale": size})
                enqueue = self._enqueue_run(f"scale-items-{size}-enqueue", busy, db)
                claim = self._claim_run(f"scale-items-{size}-claim", fast, db, agent)
                raw["items"][size] = {"enqueue": enqueue, "claim": claim}
            for count in self.plan.workspace_counts:
                others = [workspace(f"w{i:05d}", agent.url) for i in range(count - 1)]
                db = self.store(f"scale-ws-{count}-enqueue", {})
                enqueue = self._enqueue_run(f"scale-ws-{count}-enqueue", busy + others, db)
                db = self.store(f"scale-ws-{count}", {"scale": self.plan.claim_items})
                claim = self._claim_run(f"scale-ws-{count}-claim", fast + others, db, agent)
                raw["workspaces"][count] = {"enqueue": enqueue, "claim": claim}
        finally:
            agent.stop()
        self.raw["scale"] = raw
        small, big = self.plan.store_sizes
        s, b = raw["items"][small], raw["items"][big]
        scenario = f"{name} {big:,} vs {small:,} items"
        self.rows += [
            ratio_row(
                scenario,
                "enqueue rate",
                b["enqueue"]["load"]["rps"],
                "req/s",
                f"{small:,} items",
                s["enqueue"]["load"]["rps"],
                at_least=0.8,
            ),
            ratio_row(
                scenario,
                "claim+deliver rate",
                b["claim"]["rate"],
                "items/s",
                f"{small:,} items",
                s["claim"]["rate"],
                at_least=0.8,
            ),
            ratio_row(
                scenario,
                "a2ad VmRSS",
                b["claim"]["memory_kib"]["VmRSS"] / 1024,
                "MiB",
                f"{small:,} items",
                s["claim"]["memory_kib"]["VmRSS"] / 1024,
                at_most=1.2,
                note=f"peak {b['claim']['memory_kib']['VmHWM'] / 1024:.0f} vs "
                f"{s['claim']['memory_kib']['VmHWM'] / 1024:.0f} MiB",
            ),
        ]
        few, many = self.plan.workspace_counts
        s, b = raw["workspaces"][few], raw["workspaces"][many]
        scenario = f"{name} {many:,} vs {few:,} workspaces"
        self.rows += [
            ratio_row(
                scenario,
                "enqueue rate",
                b["enqueue"]["load"]["rps"],
                "req/s",
                f"{few:,} workspaces",
                s["enqueue"]["load"]["rps"],
                at_least=0.8,
            ),
            ratio_row(
                scenario,
                "claim+deliver rate",
                b["claim"]["rate"],
                "items/s",
                f"{few:,} workspaces",
                s["claim"]["rate"],
                at_least=0.8,
            ),
            ratio_row(
                scenario,
                "a2ad VmRSS",
                b["claim"]["memory_kib"]["VmRSS"] / 1024,
                "MiB",
                f"{few:,} workspaces",
                s["claim"]["memory_kib"]["VmRSS"] / 1024,
            ),
            ratio_row(
                scenario,
                "start-up",
                b["claim"]["startup_s"],
                "s",
                f"{few:,} workspaces",
                s["claim"]["startup_s"],
            ),
        ]

    # -- 6. streaming relay ----------------------------------------------------------------

    def streaming(self) -> None:
        """message/stream relayed: time to the first event and events per second."""
        name = "streaming relay"
        a2ad = self.procs.a2ad("stream", [workspace("fast", self.agent.url, max_concurrent=1000)])
        raw: dict[str, Any] = {"events_per_stream": self.plan.stream_events}
        try:
            targets = [
                ("direct", self.agent.url, self.agent),
                ("bare_proxy", self.proxy.url, self.proxy),
                ("a2ad", f"{a2ad.url}/workspaces/fast/a2a", a2ad),
            ]
            for c in self.plan.stream_concurrency:
                got = self.compare(targets, c, stream=True)
                raw[f"c={c}"] = got
                direct, bare, mine = got["direct"], got["bare_proxy"], got["a2ad"]
                scenario = f"{name} c={c}"
                # No sink speaks SSE: sending straight to the agent is this generator's
                # ceiling for streams.
                bound = {"reference_rate": bare["rps"], "ceiling_rate": direct["rps"]}
                self.rows += [
                    ratio_row(
                        scenario,
                        "a2ad first event p50",
                        mine["first_event_p50_ms"],
                        "ms",
                        "bare proxy",
                        bare["first_event_p50_ms"],
                        at_most=1.15,
                        **bound,
                    ),
                    ratio_row(
                        scenario,
                        "a2ad events/s",
                        mine["events_per_s"],
                        "ev/s",
                        "bare proxy",
                        bare["events_per_s"],
                    ),
                    ratio_row(
                        scenario,
                        "a2ad first event p50",
                        mine["first_event_p50_ms"],
                        "ms",
                        "direct",
                        direct["first_event_p50_ms"],
                    ),
                ]
                self._check_answers(scenario, got, "200")
            counts = self.queue_counts(a2ad, "fast")
            raw["queue_after"] = counts
        finally:
            a2ad.stop()
        self.raw["stream"] = raw


def _merge(results: list[Any]) -> dict[str, Any]:
    """Rounds of one target as one result: rates over the total time, the median of
    the rounds' percentiles."""
    seconds = sum(r["duration_s"] for r in results)
    completed = sum(r["completed_total"] for r in results)

    def median(key: str) -> float | None:
        values = [r[key] for r in results if r.get(key) is not None]
        return statistics.median(values) if values else None

    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    merged: dict[str, Any] = {
        "requests": sum(r["requests"] for r in results),
        "rps": round(sum(r["requests"] for r in results) / seconds, 1),
        "p50_ms": median("p50_ms"),
        "p99_ms": median("p99_ms"),
        "statuses": statuses,
        "errors": errors,
        "server_cpu_us_per_answer": (
            round(sum(r["server_cpu_s"] for r in results) / completed * 1e6, 1)
            if completed
            else None
        ),
        "rounds": results,
    }
    if "events" in results[0]:
        merged["events_per_s"] = round(sum(r["events"] for r in results) / seconds, 1)
        merged["first_event_p50_ms"] = median("first_event_p50_ms")
    return merged


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[max(0, min(len(values) - 1, int(q * len(values) + 0.999999) - 1))]
