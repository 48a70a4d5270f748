"""A store that cannot write: on SQLite another process holds the file locked past
busy_timeout; on PostgreSQL the server goes down (a server of this module's own,
killed and started again). Sends are refused with 503 store_unavailable and
Retry-After, /readyz says why, what was acknowledged stays, and a2ad writes again
by itself once the store is back."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fakes import A2ad, make_settings
from pgserver import PgServer

from a2ad import create_app
from a2ad.clock import Clock, ManualClock
from a2ad.daemon import DAEMON
from a2ad.store.postgres import PostgresStore

BOTH_STORES = True  # SQLite's lock here; PostgreSQL's outage below, on a server of its own

A2adFactory = Callable[..., Awaitable[A2ad]]


@pytest.mark.sqlite_only  # locks the SQLite file itself (PostgreSQL's way: the server down)
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


# -- PostgreSQL: the server goes down ------------------------------------------------

PgA2adFactory = Callable[..., Awaitable[A2ad]]


def up(server: PgServer) -> None:
    """Start the server again if a test left it down."""
    if server._proc is None or server._proc.poll() is not None:
        server.launch()


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PgServer]:
    """A PostgreSQL server of this module's own, to kill and start again (never the
    session's shared one, which other tests use meanwhile)."""
    with PgServer() as server:
        yield server


@pytest.fixture
async def pg_a2ad(
    own_pg: PgServer,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    tmp_path: Path,
) -> PgA2adFactory:
    """Make an a2ad on a fresh schema of own_pg; every send to its agent is queued."""
    await asyncio.to_thread(up, own_pg)

    async def make(clock: Clock | None = None) -> A2ad:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        async with PostgresStore(own_pg.url, schema=schema) as fresh:
            await fresh.migrate()  # as `a2ad migrate` would, before serve
        # Nothing listens at the agent's address: every send is queued.
        workspace = {"id": "w", "url": "http://127.0.0.1:9/", "heartbeat": False}
        store = {"url": own_pg.url, "schema": schema}
        app = create_app(make_settings(tmp_path, [workspace], store=store), clock=clock)
        return A2ad(await aiohttp_client(app), app[DAEMON])

    return make


async def send(a2ad: A2ad, text: str) -> tuple[int, dict[str, Any], str | None]:
    """A send that does not wait: status, body and Retry-After."""
    message = {"role": "user", "parts": [{"kind": "text", "text": text}], "messageId": text}
    params = {"message": message, "configuration": {"blocking": False}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": params}
    resp = await a2ad.client.post("/workspaces/w/a2a", json=body)
    return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def readyz(a2ad: A2ad) -> tuple[int, dict[str, Any]]:
    resp = await a2ad.client.get("/readyz")
    return resp.status, await resp.json()


async def ready_again(a2ad: A2ad, within: float = 10.0) -> None:
    """No request needed: a2ad finds by itself that the store writes again."""
    async with asyncio.timeout(within):
        while (await readyz(a2ad))[0] != 200:  # noqa: ASYNC110 - nothing to await
            await asyncio.sleep(0.1)


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """The outage is logged as a condition, never as a crash."""
    crashes = [r.getMessage() for r in caplog.records if r.exc_info]
    assert crashes == [], crashes
    assert "Traceback" not in caplog.text


async def test_postgresql_down_refuses_sends_then_a2ad_reconnects_by_itself(
    own_pg: PgServer, pg_a2ad: PgA2adFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    a2ad = await pg_a2ad()
    status, data, _ = await send(a2ad, "m-before")
    assert status == 202, data
    before = data["result"]["id"]

    await asyncio.to_thread(own_pg.kill)  # the database crashes
    try:
        status, data, retry_after = await send(a2ad, "m-during")
        assert status == 503, data
        assert data["error"]["data"]["code"] == "store_unavailable"
        assert retry_after is not None and int(retry_after) >= 1
        status, ready = await readyz(a2ad)
        assert status == 503, ready
        why = "the store cannot write: "
        assert any(p.startswith(why) and len(p) > len(why) for p in ready["problems"]), ready
    finally:
        await asyncio.to_thread(own_pg.launch)

    await ready_again(a2ad)
    status, data, _ = await send(a2ad, "m-after")
    assert status == 202, data
    # The acknowledged item outlived the crash; the refused send left nothing behind.
    assert (await a2ad.item(before))["state"] in ("queued", "dispatching")
    counts = await a2ad.daemon.store.counts()
    assert sum(counts["w"].values()) == 2, counts
    no_traceback(caplog)


async def test_a_postgresql_restart_while_a2ad_is_idle_costs_no_send(
    own_pg: PgServer, pg_a2ad: PgA2adFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The server restarts between two sends (a2ad's timers stand still: it writes
    nothing meanwhile). Its connections are dead; the listening one sees it first and
    the writer checks its own before the next send, which succeeds, as a read does
    (pg_reads.py runs it again on a fresh connection)."""
    caplog.set_level(logging.INFO)
    a2ad = await pg_a2ad(clock=ManualClock())
    status, data, _ = await send(a2ad, "m-before")
    assert status == 202, data
    before = data["result"]["id"]
    await asyncio.to_thread(own_pg.kill)
    await asyncio.to_thread(own_pg.launch)

    # A read first: it finds its pooled connection dead and runs again (no 503).
    assert (await a2ad.item(before))["state"] in ("queued", "dispatching")
    status, data, _ = await send(a2ad, "m-after")
    assert status == 202, data
    assert (await readyz(a2ad))[0] == 200
    no_traceback(caplog)
