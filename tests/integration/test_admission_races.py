"""Races found by attacking admission, the store's depths, delivery and the
workspace lifecycle against SPEC's invariants (a review of the first version of
one admission authority): each test here failed on that version."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fakes import A2ad, FakeAgent, store_query, store_write_lock, wait_until

from a2ad.clock import ManualClock

# On PostgreSQL "another process holds the write lock" is an EXCLUSIVE lock on a2ad's
# tables, and statement_timeout_seconds stands for SQLite's busy_timeout_seconds.
BOTH_STORES = True

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]


def waits(seconds: float) -> dict[str, float]:
    """How long a write waits for another process's lock, on either store."""
    return {"busy_timeout_seconds": seconds, "statement_timeout_seconds": seconds}


def row(a2ad: A2ad, qid: str) -> tuple[Any, ...]:
    """The item's row as another process reads it (a2ad may be stopped)."""
    statement = "SELECT state, attempts, workspace FROM items WHERE id = ?"
    found = store_query(a2ad.daemon.settings.store, statement, (qid,))
    assert found
    return tuple(found[0])


async def _runtime_workspace(a2ad: A2ad, url: str, **extra: Any) -> None:
    resp = await a2ad.client.put("/workspaces/rt", json={"url": url, "heartbeat": False, **extra})
    assert resp.status in (200, 201), await resp.text()


# -- 1. DELETE /workspaces/{id} races a send being written ---------------------------


async def test_delete_without_purge_during_an_enqueue_strands_an_acknowledged_item(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """DELETE checks `queued_total + dispatching` but not `admission.enqueuing`, and
    the workspace stays in the registry (taking sends) across the awaits of
    `unregister`. A send whose item is being written gets its 202 after the
    workspace is gone: its item stays `queued` with no pump, forever."""
    agent = await agent_factory(gate=asyncio.Event())
    assert agent.gate is not None
    a2ad = await a2ad_factory([], clock=ManualClock(), store=waits(3))
    await _runtime_workspace(a2ad, agent.url)
    blocker = asyncio.create_task(a2ad.send("rt", "direct", message_id="d"))
    await agent.wait_received(1)  # the one slot is taken: the next send is queued
    ws = a2ad.daemon.registry.get("rt")
    async with store_write_lock(a2ad.daemon.settings.store):
        send = asyncio.create_task(a2ad.send("rt", "queued", message_id="q"))
        await wait_until(lambda: ws.admission.enqueuing == 1)
        delete = asyncio.create_task(a2ad.client.delete("/workspaces/rt"))
        await asyncio.sleep(0.2)
    status, data = await send
    deleted = await delete
    agent.gate.set()
    await blocker
    assert status == 202, data
    qid = data["result"]["id"]
    state = row(a2ad, qid)
    # A 202 must end delivered or final; DELETE must refuse while items wait.
    assert deleted.status == 409 or state[0] != "queued", (deleted.status, state)
    assert a2ad.daemon.registry.find("rt") is not None  # refused: it still serves


async def test_a_send_during_a_purging_delete_is_acknowledged_and_never_delivered(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """With ?purge=true: the workspace still takes sends while the purge waits for
    the writer; an enqueue that commits after the purge's DELETE survives it, 202,
    for a workspace that no longer exists."""
    agent = await agent_factory(gate=asyncio.Event())
    assert agent.gate is not None
    a2ad = await a2ad_factory([], clock=ManualClock(), store=waits(3))
    await _runtime_workspace(a2ad, agent.url)
    blocker = asyncio.create_task(a2ad.send("rt", "direct", message_id="d"))
    await agent.wait_received(1)
    async with store_write_lock(a2ad.daemon.settings.store):
        delete = asyncio.create_task(a2ad.client.delete("/workspaces/rt?purge=true"))
        await asyncio.sleep(0.1)  # unregister: the pump is gone, the purge waits
        send = asyncio.create_task(a2ad.send("rt", "queued", message_id="q"))
        await asyncio.sleep(0.1)
    deleted = await delete
    status, data = await send
    agent.gate.set()
    await blocker
    assert deleted.status == 200
    assert a2ad.daemon.registry.find("rt") is None
    # Either the send was refused (unknown workspace) or its item is not left waiting.
    if status == 202:
        state = row(a2ad, data["result"]["id"])
        assert state[0] != "queued", state


# -- 2. a removed and re-added workspace forgets a2ad's running requests --------------


async def test_a_workspace_added_again_forgets_requests_still_running_at_its_agent(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """DELETE then PUT of the same id (same URL) makes a new Admission with
    in_flight = 0 while a2ad's request is still at the agent: a 1-slot agent gets
    two of a2ad's requests at once."""
    agent = await agent_factory(gate=asyncio.Event())
    assert agent.gate is not None
    a2ad = await a2ad_factory([], clock=ManualClock())
    await _runtime_workspace(a2ad, agent.url, max_concurrent=1)
    first = asyncio.create_task(a2ad.send("rt", "one", message_id="1"))
    await agent.wait_received(1)
    resp = await a2ad.client.delete("/workspaces/rt")
    assert resp.status == 200, await resp.text()
    await _runtime_workspace(a2ad, agent.url, max_concurrent=1)
    second = asyncio.create_task(a2ad.send("rt", "two", message_id="2"))
    with contextlib.suppress(TimeoutError):
        await agent.wait_received(2, within=0.5)
    running = agent.active
    agent.gate.set()
    await asyncio.gather(first, second)
    assert running <= 1, f"{running} of a2ad's requests at a 1-slot agent"


# -- 3. graceful stop with a claim whose outcome could not be written -----------------


async def test_graceful_stop_leaves_an_unrecorded_claim_dispatching(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """A delivery whose outcome hit StoreUnavailable keeps its claim (running =
    False) until its lease lapses. `Dispatcher.stop` only looks at delivery
    tasks, so a graceful stop (the store writable again) leaves the row
    `dispatching`; the next start charges it an attempt."""
    agent = await agent_factory(script=[(503, {"error": "busy"}, {"Retry-After": "1"})])
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "heartbeat": False}],
        clock=clock,
        queue={"lease_seconds": 30},
        store=waits(0.2),
    )
    status, data = await a2ad.send("w", "m", message_id="m")  # busy: queued, paused 1 s
    assert status == 202, data
    qid = data["result"]["id"]
    agent.gate = asyncio.Event()
    await clock.advance(2)  # the pause ends: the pump claims and delivers
    await agent.wait_received(2)
    async with store_write_lock(a2ad.daemon.settings.store):
        agent.gate.set()
        await asyncio.sleep(0.6)  # the outcome's write fails: the store is locked
    assert row(a2ad, qid)[0] == "dispatching"
    await a2ad.client.close()  # a graceful stop, the store writable again
    assert row(a2ad, qid)[:2] != ("dispatching", 0), (
        "a graceful stop left the claim dispatching (the next start charges an attempt)"
    )


# -- 4. a lapsed claim's delivery ends and takes the next claim's bookkeeping --------


class GatedAgent(FakeAgent):
    """Each message send waits for its own gate, in order of arrival."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gates: list[asyncio.Event] = []
        self.gating = False

    async def handle(self, request: Any) -> Any:
        if self.gating:
            gate = asyncio.Event()
            self.gates.append(gate)
            self.gate = gate
        return await super().handle(request)


async def test_a_store_outage_longer_than_the_lease_sends_a_running_item_again(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory
) -> None:
    """In one process a running delivery is alive by definition, yet the sweep
    releases its claim once renewals failed for a lease (the store locked for
    two thirds of it): an attempt is charged and the item goes to the agent a
    second time while the first request still runs."""
    agent = await agent_factory(script=[(503, {"error": "busy"}, {"Retry-After": "1"})])
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "heartbeat": False, "max_concurrent": 2}],
        clock=clock,
        queue={"lease_seconds": 30},
        store=waits(0.1),
    )
    status, data = await a2ad.send("w", "m", message_id="m")
    assert status == 202, data
    qid = data["result"]["id"]
    agent.gate = asyncio.Event()
    await clock.advance(2)
    await agent.wait_received(2)
    async with store_write_lock(a2ad.daemon.settings.store):
        for _ in range(4):
            await clock.advance(8)
            await asyncio.sleep(0.3)
    await a2ad.daemon._housekeeping()
    with contextlib.suppress(TimeoutError):
        await agent.wait_received(3, within=0.5)
    copies, state = len(agent.received) - 1, row(a2ad, qid)
    agent.gate.set()
    assert (copies, state[:2]) == (1, ("dispatching", 0)), (copies, state)


# -- 5. a queue CLI write between the start-up recount and the first data_version ----


async def test_a_cli_write_between_the_startup_recount_and_data_version_is_never_counted(
    agent_factory: AgentFactory, aiohttp_client: Any, tmp_path: Path
) -> None:
    """Daemon.start recounts (in Dispatcher.start), then awaits load_history and
    only then reads data_version as its baseline: a CLI retry that commits in
    between is in neither, so it is never recounted and its item waits unseen."""
    from fakes import make_settings

    from a2ad import create_app
    from a2ad.daemon import DAEMON
    from a2ad.store import NewItem, Store

    agent = await agent_factory()
    path = tmp_path / "a2ad.db"
    async with Store(str(path)) as store:
        await store.migrate()
        done = await store.enqueue(
            NewItem(
                workspace="w",
                method="message/send",
                body=b'{"jsonrpc":"2.0","id":1,'
                b'"method":"message/send","params":{"message":{"role":"user",'
                b'"parts":[{"kind":"text","text":"x"}]}}}',
            ),
            now=1_800_000_000.0,
            replay_window=60,
        )
    qid = done.item.id
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("UPDATE items SET state = 'failed', finished_at = 1 WHERE id = ?", (qid,))
    clock = ManualClock()
    settings = make_settings(tmp_path, [{"id": "w", "url": agent.url, "heartbeat": False}])
    app = create_app(settings, clock=clock)
    daemon = app[DAEMON]
    history = daemon.store.last_delivered

    async def cli_retry_meanwhile(workspaces: Any) -> Any:
        # `a2ad queue retry` commits from another process at this moment.
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute(
                "UPDATE items SET state = 'queued', finished_at = NULL, attempts = 0 WHERE id = ?",
                (qid,),
            )
        return await history(workspaces)

    daemon.store.last_delivered = cli_retry_meanwhile  # type: ignore[method-assign]
    client = await aiohttp_client(app)
    for _ in range(5):  # housekeeping: data_version, recount
        await clock.advance(1.1)
        await asyncio.sleep(0.05)
    await clock.advance(61)  # and the pump's idle re-check
    await asyncio.sleep(0.2)
    ws = daemon.registry.get("w")
    state = row(A2ad(client, daemon), qid)
    await client.close()
    assert (ws.queued_total, state[0]) != (0, "queued"), (ws.queued_total, state)


# -- 6. start-up recovery applies moves to counts that were never read --------------


async def test_startup_recovery_logs_negative_counts(tmp_path: Path, caplog: Any) -> None:
    """recover_dispatching runs before the first recount, so its moves
    (dispatching → queued) land on empty depths: dispatching goes to -1 and the
    "went negative" error (meant to expose a bug) is logged on every crash recovery."""
    import logging

    from a2ad.store import NewItem, Store

    path = tmp_path / "a2ad.db"
    async with Store(str(path)) as store:
        await store.migrate()
        await store.enqueue(
            NewItem(workspace="w", method="message/send", body=b"{}"), now=1.0, replay_window=60
        )
        await store.claim("w", now=2.0, lease_seconds=60, promote_after=120)
    caplog.set_level(logging.ERROR, logger="a2ad.store")
    async with Store(str(path)) as store:  # a new process, as Daemon.start does it
        await store.recover_dispatching(now=3.0, max_attempts=3)
    assert not [r for r in caplog.records if "negative" in r.getMessage()], caplog.text
