"""Waiting, from outside, for a2ad's store to drain: nothing queued or dispatching."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path


def live_counts(store: Path) -> dict[str, int]:
    """Items queued and dispatching, by state, read straight from the file."""
    conn = sqlite3.connect(f"file:{store}?mode=rw", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT state, COUNT(*) FROM items WHERE state IN ('queued', 'dispatching')"
            " GROUP BY state"
        ).fetchall()
    finally:
        conn.close()
    return dict(rows)


async def wait_drained(store: Path, *, stall: float, cap: float) -> dict[str, int]:
    """Poll the store until nothing is queued or dispatching, or until the number
    left has not gone down for `stall` seconds (or, as a last guard against
    hanging, `cap` seconds have passed); what was left at the end."""
    start = last_progress = time.monotonic()
    fewest: int | None = None
    while True:
        live = await asyncio.to_thread(live_counts, store)
        now = time.monotonic()
        if fewest is None or sum(live.values()) < fewest:
            fewest, last_progress = sum(live.values()), now
        if not live or now - last_progress > stall or now - start > cap:
            return live
        await asyncio.sleep(0.2)
