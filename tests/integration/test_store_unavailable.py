"""A store another process holds locked past busy_timeout: sends are refused with
503 store_unavailable and Retry-After, /readyz says why, what was acknowledged
stays, and a2ad writes again by itself once the lock is gone."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from fakes import A2ad

A2adFactory = Callable[..., Awaitable[A2ad]]


async def test_a_store_locked_by_another_process(a2ad_factory: A2adFactory, tmp_path: Path) -> None:
    # Nothing listens at the agent's address: every send is queued.
    workspace = {"id": "w", "url": "http://127.0.0.1:9/", "heartbeat": False}
    a2ad = await a2ad_factory([workspace], store={"busy_timeout_seconds": 0.2})
    status, data = await a2ad.send("w", "before", message_id="m-before")
    assert status == 202, data
    before = data["result"]["id"]

    # Another process (the queue CLI, a backup tool) holds the write lock.
    holder = sqlite3.connect(tmp_path / "a2ad.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        status, data = await a2ad.send("w", "during", message_id="m-during")
        assert status == 503, data
        assert data["error"]["data"]["code"] == "store_unavailable"
        assert "cannot write" in data["error"]["message"]
        assert "locked" in data["error"]["message"]
        resp = await a2ad.client.get("/readyz")
        assert resp.status == 503
        assert "locked" in " ".join((await resp.json())["problems"])
        # Reads go on: the acknowledged item is there.
        assert (await a2ad.item(before))["state"] in ("queued", "dispatching")
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    # No request needed: a2ad notices by itself that it can write again.
    async def ready() -> bool:
        return (await a2ad.client.get("/readyz")).status == 200

    deadline = asyncio.get_running_loop().time() + 10
    while not await ready():
        assert asyncio.get_running_loop().time() < deadline, "a2ad never wrote again"
        await asyncio.sleep(0.1)
    status, data = await a2ad.send("w", "after", message_id="m-after")
    assert status == 202, data
    # The refused send left nothing behind; the two acknowledged ones are stored.
    counts = await a2ad.daemon.store.counts()
    assert sum(counts["w"].values()) == 2
