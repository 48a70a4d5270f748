"""Driving Debian's `wrk` with bench/post.lua; results in loadgen's shape."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("post.lua")


def available() -> bool:
    return shutil.which("wrk") is not None


def version() -> str | None:
    if not available():
        return None
    # `wrk --version` prints its banner and usage, and exits 1.
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else ""


def run(url: str, concurrency: int, duration: float, tag: str) -> dict[str, Any]:
    """One wrk run: `concurrency` connections on one thread for `duration` seconds."""
    seconds = max(1, math.ceil(duration))
    cmd = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(SCRIPT),
        url,
        "--",
        tag,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    measured = raw["duration_us"] / 1e6
    errors = {
        key: raw[key]
        for key in ("connect_errors", "read_errors", "write_errors", "timeouts")
        if raw[key]
    }
    return {
        "url": url,
        "concurrency": concurrency,
        "duration_s": round(measured, 3),
        "requests": raw["requests"],
        "rps": round(raw["requests"] / measured, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "statuses": {"4xx/5xx": raw["status_errors"]} if raw["status_errors"] else {},
        "errors": errors,
        "generator": "wrk",
    }
