"""A closed-loop load generator: N concurrent callers for T seconds.

    python -m bench.loadgen --url URL --concurrency N --duration T [--warmup W]
                            [--stream] [--tag TAG] [--start-at EPOCH]

Each caller sends a JSON-RPC message/send (message/stream with --stream) with
a messageId of its own, waits for the whole answer, and sends the next. Only
answers that complete inside the measured window count; the result is one JSON
object on stdout: requests, rps, latency percentiles in ms, statuses, errors,
and for streams the time to the first event and events per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

HEADERS = {"Content-Type": "application/json"}


def message_body(method: str, message_id: str, rpc_id: int) -> bytes:
    """A small A2A send, as a typical caller posts it."""
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": rpc_id,
            "method": method,
            "params": {
                "message": {
                    "role": "user",
                    "messageId": message_id,
                    "parts": [{"kind": "text", "text": "hello from the benchmark"}],
                }
            },
        }
    ).encode()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted `values`."""
    if not values:
        return None
    rank = max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))
    return values[rank]


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    first_events: list[float] = field(default_factory=list)
    events: int = 0
    completed: int = 0  # every answer read, warm-up included (for CPU per request)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


async def caller(
    session: aiohttp.ClientSession,
    url: str,
    name: str,
    *,
    stream: bool,
    start: float,
    end: float,
    tally: Tally,
) -> None:
    method = "message/stream" if stream else "message/send"
    n = 0
    while True:
        sent = time.perf_counter()
        if sent >= end:
            return
        n += 1
        body = message_body(method, f"{name}-{n}", n)
        first: float | None = None
        events = 0
        try:
            async with session.post(url, data=body, headers=HEADERS) as resp:
                if stream:
                    async for line in resp.content:
                        if line.startswith(b"data:"):
                            events += 1
                            if first is None:
                                first = time.perf_counter()
                else:
                    await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            done = time.perf_counter()
            if start <= done <= end:
                tally.errors[type(exc).__name__] += 1
            await asyncio.sleep(0.01)  # a refused connection must not spin
            continue
        done = time.perf_counter()
        tally.completed += 1
        if start <= done <= end:
            tally.latencies.append(done - sent)
            tally.statuses[status] += 1
            if stream:
                tally.events += events
                if first is not None:
                    tally.first_events.append(first - sent)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


async def run(
    url: str,
    concurrency: int,
    duration: float,
    warmup: float,
    stream: bool,
    tag: str,
    start_at: float | None = None,
) -> dict[str, Any]:
    """`start_at` (time.time()): measure from then instead of after `warmup`, so that
    generators started side by side measure the same window."""
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    cpu_before = os.times()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if start_at is not None:
            start = time.perf_counter() + max(0.0, start_at - time.time())
        else:
            start = time.perf_counter() + warmup
        end = start + duration
        await asyncio.gather(
            *(
                caller(session, url, f"{tag}-{i}", stream=stream, start=start, end=end, tally=tally)
                for i in range(concurrency)
            )
        )
    cpu_after = os.times()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    latencies = sorted(tally.latencies)
    firsts = sorted(tally.first_events)
    result: dict[str, Any] = {
        "url": url,
        "concurrency": concurrency,
        "duration_s": duration,
        "requests": len(latencies),
        "completed_total": tally.completed,
        "rps": round(len(latencies) / duration, 1),
        "p50_ms": _ms(percentile(latencies, 0.50)),
        "p90_ms": _ms(percentile(latencies, 0.90)),
        "p99_ms": _ms(percentile(latencies, 0.99)),
        "max_ms": _ms(latencies[-1] if latencies else None),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "errors": dict(tally.errors),
        "generator_cpu_s": round(cpu, 2),
    }
    if stream:
        result |= {
            "first_event_p50_ms": _ms(percentile(firsts, 0.50)),
            "first_event_p99_ms": _ms(percentile(firsts, 0.99)),
            "events": tally.events,
            "events_per_s": round(tally.events / duration, 1),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", "-c", type=int, default=1)
    parser.add_argument("--duration", "-d", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--stream", action="store_true", help="message/stream, count SSE events")
    parser.add_argument("--tag", default="lg", help="messageId prefix, unique per run")
    parser.add_argument(
        "--start-at", type=float, help="time.time() to measure from (instead of --warmup)"
    )
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(
            args.url,
            args.concurrency,
            args.duration,
            args.warmup,
            args.stream,
            args.tag,
            args.start_at,
        )
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
