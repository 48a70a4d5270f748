"""Scenario 9, push notifications: a2ad POSTs each update of a queued task to the
webhook its send carried (`configuration.pushNotificationConfig`, v0.3).

1. Throughput, as a backlog drain, so that what is measured is the sender's own
   rate and not the rate the sends came in at: every send queues (the busy
   agent), its SUBMITTED push is refused (the webhook is not up yet) and waits
   in the outbox; then the webhook starts and a2ad restarts on the same store,
   where every pending push is due at once. Pushes per second from /readyz to
   the last task's push, against the durable enqueue rate of the same sends.
2. Delay from a delivery's answer to its push: sequential sends to the one-slot
   recorder; the webhook's receipt of the `completed` push of each, minus the
   time the recorder wrote the answer (both time.monotonic(): CLOCK_MONOTONIC is
   the machine's, so the two processes' readings compare).

    python -m bench.pushes send --url URL -n N -c C --push-url URL --token T --tag TAG

is the generator of part 1, in its own process as every generator: N sends with
the push config over C callers, one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import aiohttp

from . import report
from .procs import HOST, PYTHON, REPO, Proc, cpu_seconds, free_port, http_json, workspace
from .report import Row, limit_row, ratio_row

if TYPE_CHECKING:
    from .scenarios import Bench

NAME = "push"
TOKEN = "bench-push-token"
DRAIN_SENDS = {"full": 5_000, "quick": 1_000}
DELAY_SENDS = {"full": 300, "quick": 100}
CONCURRENCY = 50
# A webhook on 127.0.0.1 is refused unless allowed; the refused SUBMITTED pushes
# must not become dead letters before the webhook is up.
PUSH = {"allowed_hosts": [HOST], "max_attempts": 1000}
PUSH_WAIT_SECONDS = 10.0  # for one completed push, before it counts as not received


def run(bench: Bench) -> None:
    """Both parts; rows into bench.rows, figures into bench.raw["push"]."""
    raw: dict[str, Any] = {}
    bench.raw[NAME] = raw
    _drain(bench, raw)
    _delay(bench, raw)


def send_body(message_id: str, rpc_id: int, push_url: str | None, token: str) -> bytes:
    """A v0.3 message/send with a push config (none without `push_url`); non-blocking,
    so the 202 comes at once."""
    configuration: dict[str, Any] = {"blocking": False}
    if push_url is not None:
        configuration["pushNotificationConfig"] = {"url": push_url, "token": token}
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": rpc_id,
            "method": "message/send",
            "params": {
                "message": {
                    "role": "user",
                    "messageId": message_id,
                    "parts": [{"kind": "text", "text": "hello from the benchmark"}],
                },
                "configuration": configuration,
            },
        }
    ).encode()


# -- 1. throughput: a backlog of pushes drained after a restart ------------------------


def _drain(bench: Bench, raw: dict[str, Any]) -> None:
    n = DRAIN_SENDS.get(bench.plan.name, DRAIN_SENDS["full"])
    port = free_port()  # the webhook's, told to a2ad long before it listens
    hook_url = f"http://{HOST}:{port}/hook"
    plain = _plain_enqueue(bench, n)
    a2ad = bench.procs.a2ad("push-drain", [workspace("busy", bench.busy.url)], push=PUSH)
    webhook: Proc | None = None
    again: Proc | None = None
    try:
        bench.prime_busy(a2ad, "busy")
        url = f"{a2ad.url}/workspaces/busy/a2a"
        sent = _generate(url, n, hook_url, f"push-{bench.plan.name}-{time.time_ns()}", a2ad)
        accepted = sent["accepted"]
        # Stopped before the webhook starts: the first a2ad must not reach it as
        # its backoffs end, or the restart would find fewer pushes due.
        a2ad.stop()
        webhook = bench.procs.server("webhook", port=port)
        again = bench.procs.restart(a2ad)
        ready, startup = again.extra["ready_at"], again.extra["startup_s"]
        cpu_before = cpu_seconds(again.pid)  # pushes before /readyz answered are not in it
        drained = _wait_drained(webhook, accepted, timeout=120 + n / 50)
        cpu = cpu_seconds(again.pid) - cpu_before
    finally:
        for proc in (again, a2ad, webhook):
            if proc is not None:
                proc.stop()
    records = drained["records"]
    # From /readyz, or from the first push when the sender began before it answered.
    start = min([ready, *(r[0] for r in records[:1])])
    seconds = drained["done_at"] - start if drained["done_at"] is not None else None
    raw["drain"] = {
        "sends": n,
        "enqueue": sent,
        "enqueue_without_push_config": plain,
        "startup_s": startup,
        "first_push_after_ready_ms": (records[0][0] - ready) * 1000 if records else None,
        "received_before_ready": sum(1 for r in records if r[0] < ready),
        "seconds": seconds,
        "rate": accepted / seconds if seconds else None,
        "received": len(records),
        "tasks": drained["tasks"],
        "duplicates": drained["duplicates"],
        "states": dict(Counter(r[2] for r in records)),
        "wrong_token": sum(1 for r in records if r[3] != TOKEN),
        "a2ad_cpu_s_from_ready": round(cpu, 2),
    }
    _drain_rows(bench, raw["drain"])


def _drain_rows(bench: Bench, got: dict[str, Any]) -> None:
    scenario = f"{NAME}: backlog drain"
    sent, plain, rate = got["enqueue"], got["enqueue_without_push_config"], got["rate"]
    accepted, seconds = sent["accepted"], got["seconds"]
    notes = [f"enqueue p50 {sent['p50_ms']:.1f} ms"] if sent["p50_ms"] is not None else []
    if seconds:
        notes.insert(0, f"a2ad CPU {got['a2ad_cpu_s_from_ready'] / seconds:.0%} of a core")
    bench.rows += [
        ratio_row(
            scenario,
            f"pushed after a restart ({accepted:,} tasks)",
            rate,
            "tasks/s",
            "durable enqueue, same sends",
            sent["rate"],
            at_least=1.0,
            note="; ".join(notes),
        ),
        ratio_row(
            scenario,
            "durable enqueue, same sends",
            sent["rate"],
            "tasks/s",
            "sends without push config",
            plain["rate"],
            note=f"a2ad CPU {sent['a2ad_cpu_us_per_202']:.0f} vs "
            f"{plain['a2ad_cpu_us_per_202']:.0f} µs per 202, its sender's work included",
        ),
        ratio_row(
            scenario,
            "pushed after a restart",
            rate,
            "tasks/s",
            "sends without push config",
            plain["rate"],
        ),
        limit_row(
            scenario,
            f"tasks pushed of {accepted:,} accepted",
            got["tasks"],
            "tasks",
            at_least=accepted,
            note=f"{got['sends'] - accepted:,} sends not accepted"
            if accepted < got["sends"]
            else "",
        ),
        Row(
            scenario,
            "duplicates received",
            got["duplicates"],
            "pushes",
            note="at least once allows some",
        ),
    ]
    if got["wrong_token"]:
        bench.rows.append(
            Row(
                scenario,
                "pushes without the token",
                got["wrong_token"],
                "pushes",
                verdict=report.FAILS,
            )
        )


def _plain_enqueue(bench: Bench, n: int) -> dict[str, Any]:
    """The same sends without a push config to an a2ad of their own: what the push
    config costs the enqueue (its outbox row, and the sender's attempts beside it)."""
    a2ad = bench.procs.a2ad("push-plain", [workspace("busy", bench.busy.url)], push=PUSH)
    try:
        bench.prime_busy(a2ad, "busy")
        url = f"{a2ad.url}/workspaces/busy/a2a"
        return _generate(url, n, None, f"plain-{bench.plan.name}-{time.time_ns()}", a2ad)
    finally:
        a2ad.stop()


def _generate(url: str, n: int, push_url: str | None, tag: str, a2ad: Proc) -> dict[str, Any]:
    """The generator below, in its own process (sends without a push config when
    `push_url` is None); with a2ad's CPU time per 202."""
    before = cpu_seconds(a2ad.pid)
    cmd = [PYTHON, "-m", "bench.pushes", "send", "--url", url, "-n", str(n)]
    cmd += ["-c", str(CONCURRENCY), "--token", TOKEN, "--tag", tag]
    if push_url is not None:
        cmd += ["--push-url", push_url]
    out = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=120 + n / 20
    )
    result: dict[str, Any] = json.loads(out.stdout)
    result["a2ad_cpu_us_per_202"] = round(
        (cpu_seconds(a2ad.pid) - before) / max(1, result["accepted"]) * 1e6, 1
    )
    return result


def _wait_drained(webhook: Proc, expected: int, *, timeout: float) -> dict[str, Any]:
    """Until the webhook has a push of every accepted task (or the time is up); when
    the last task's first push came, and what else arrived (duplicates)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, stats = http_json(webhook.url + "stats")
        # Counting tasks reads every record: only once there may be enough.
        enough = isinstance(stats, dict) and stats["received"] >= expected
        if enough and _tasks(_records(webhook))[0] >= expected:
            break
        time.sleep(0.05)
    time.sleep(0.5)  # a duplicate still in flight is counted too
    records = _records(webhook)
    tasks, done_at = _tasks(records, expected)
    return {
        "records": records,
        "tasks": tasks,
        "done_at": done_at,
        "duplicates": len(records) - len({(r[1], r[2]) for r in records}),
    }


def _tasks(records: list[list[Any]], expected: int | None = None) -> tuple[int, float | None]:
    """Distinct tasks pushed, and when the `expected`-th first arrived (or None)."""
    seen: set[str] = set()
    done_at = None
    for at, task_id, _, _ in records:
        if task_id not in seen:
            seen.add(task_id)
            if len(seen) == expected:
                done_at = at
    return len(seen), done_at


def _records(webhook: Proc, after: int = 0, wait: float = 0.0) -> list[list[Any]]:
    url = f"{webhook.url}records?after={after}&wait={wait:g}"
    status, body = http_json(url, timeout=wait + 30)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"webhook GET /records answered {status}")
    return list(body["records"])


# -- 2. delay: a delivery's answer to its push at the webhook --------------------------


def _delay(bench: Bench, raw: dict[str, Any]) -> None:
    n = DELAY_SENDS.get(bench.plan.name, DELAY_SENDS["full"])
    scenario = f"{NAME}: answer → push"
    recorder = bench.procs.server("recorder")
    webhook = bench.procs.server("webhook")
    a2ad = bench.procs.a2ad("push-delay", [workspace("rec", recorder.url)], push=PUSH)
    hook_url = f"{webhook.url}hook"
    arrivals: list[float | None] = []
    submitted_ms: list[float] = []
    try:
        url = f"{a2ad.url}/workspaces/rec/a2a"
        seen = 0
        for i in range(n):
            qid, answered = _send_one(url, hook_url, f"push-delay-{time.time_ns()}-{i}")
            at, submitted, seen = _await_completed(webhook, qid, seen)
            arrivals.append(at)
            if submitted is not None:
                submitted_ms.append((submitted - answered) * 1000)
        _, body = http_json(recorder.url + "records")
    finally:
        a2ad.stop()
        webhook.stop()
        recorder.stop()
    spans = body["spans"] if isinstance(body, dict) else []
    paired = len(spans) == n  # one delivery per send, in order: span i is send i's
    delays = sorted(
        (at - span[1]) * 1000
        for at, span in zip(arrivals, spans if paired else [], strict=False)
        if at is not None
    )
    lost = sum(1 for at in arrivals if at is None)
    p50, p99 = _pct(delays, 0.5), _pct(delays, 0.99)
    submitted_ms.sort()
    raw["delay"] = {
        "sends": n,
        "spans": len(spans),
        "recorder_busy_answers": body.get("busy") if isinstance(body, dict) else None,
        "completed_not_received": lost,
        "delay_ms": {
            "p50": p50,
            "p90": _pct(delays, 0.9),
            "p99": p99,
            "max": delays[-1] if delays else None,
            "all": [round(d, 3) for d in delays],
        },
        "submitted_after_202_ms_p50": _pct(submitted_ms, 0.5),
    }
    bench.rows += [
        limit_row(
            scenario,
            "answer written → completed push received, p50",
            p50,
            "ms",
            at_most=20,
            note=f"sequential sends to the one-slot recorder; p90 {_pct(delays, 0.9) or 0:.1f} ms",
        ),
        limit_row(
            scenario,
            "answer written → completed push received, p99",
            p99,
            "ms",
            at_most=100,
            note=f"max {delays[-1]:.1f} ms" if delays else "",
        ),
    ]
    if lost or not paired:
        bench.rows.append(
            limit_row(
                scenario,
                f"sends measured of {n}",
                len(delays),
                "sends",
                at_least=n,
                note=f"{lost} completed pushes not received in {PUSH_WAIT_SECONDS:g} s; "
                f"{len(spans)} deliveries recorded",
            )
        )


def _send_one(url: str, push_url: str, message_id: str) -> tuple[str, float]:
    """One send; its queue id, and time.monotonic() when its 202 was read."""
    status, answer = http_json(url, send_body(message_id, 1, push_url, TOKEN))
    at = time.monotonic()
    if status != 202 or not isinstance(answer, dict):
        raise RuntimeError(f"a send with a push config: expected 202, got {status}: {answer}")
    return str(answer["result"]["id"]), at


def _await_completed(webhook: Proc, qid: str, seen: int) -> tuple[float | None, float | None, int]:
    """When the webhook received the task's `completed` push (None: not within
    PUSH_WAIT_SECONDS) and its `submitted` one; the records read so far. The webhook
    holds each request until a push comes, so the wait does not poll it."""
    deadline = time.monotonic() + PUSH_WAIT_SECONDS
    submitted = None
    while (left := deadline - time.monotonic()) > 0:
        got = _records(webhook, seen, wait=min(left, 5.0))
        seen += len(got)
        for at, task_id, state, _ in got:
            if task_id != qid:
                continue
            if state == "submitted" and submitted is None:
                submitted = at
            elif state == "completed":
                return at, submitted, seen
    return None, submitted, seen


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))]


# -- the generator of part 1 ------------------------------------------------------------


async def generate(
    url: str, n: int, concurrency: int, push_url: str | None, token: str, tag: str
) -> dict[str, Any]:
    """N sends over `concurrency` callers, each taking the next number until none is
    left; the rate: the 202s over the time to the last answer."""
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    numbers = iter(range(n))
    headers = {"Content-Type": "application/json"}

    async def caller(session: aiohttp.ClientSession) -> None:
        for i in numbers:
            body = send_body(f"{tag}-{i}", i, push_url, token)
            sent = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors[type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - sent)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        start = time.perf_counter()
        await asyncio.gather(*(caller(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    latencies.sort()

    def ms(q: float) -> float | None:
        value = _pct(latencies, q)
        return None if value is None else round(value * 1000, 3)

    return {
        "url": url,
        "sends": n,
        "accepted": statuses[202],
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "rate": round(statuses[202] / seconds, 1),  # durable enqueues per second
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(errors),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pushes")
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("send", help="N sends with a push config, as fast as they go")
    send.add_argument("--url", required=True)
    send.add_argument("-n", type=int, required=True)
    send.add_argument("--concurrency", "-c", type=int, default=CONCURRENCY)
    send.add_argument("--push-url", help="the webhook; without it, sends carry no push config")
    send.add_argument("--token", default=TOKEN)
    send.add_argument("--tag", default="push", help="messageId prefix, unique per run")
    args = parser.parse_args(argv)
    result = asyncio.run(
        generate(args.url, args.n, args.concurrency, args.push_url, args.token, args.tag)
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
