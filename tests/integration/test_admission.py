"""Admission and the queue's counts, one defect at a time: each test here failed
before admission became one authority and the counts moved with the commits."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import A2ad, FakeAgent, wait_until, write_lock

from a2ad.clock import ManualClock
from a2ad.store import NewItem, Store

BOTH_STORES = True  # delivery behaves the same on SQLite and PostgreSQL

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]


def ws(agent: FakeAgent, **extra: Any) -> dict[str, Any]:
    return {"id": "w", "url": agent.url, "heartbeat": False, **extra}


def store_live(path: Path, workspace: str = "w") -> tuple[dict[int, int], int]:
    """The workspace's queued items by priority and its dispatching ones, in the file."""
    queued: dict[int, int] = {}
    dispatching = 0
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for state, priority, n in conn.execute(
            "SELECT state, priority, COUNT(*) FROM items WHERE workspace = ?"
            " AND state IN ('queued', 'dispatching') GROUP BY 1, 2",
            (workspace,),
        ):
            if state == "queued":
                queued[priority] = n
            else:
                dispatching += n
    return queued, dispatching


async def test_concurrent_sends_after_a_queue_episode_never_exceed_one_slot(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """After anything went through the queue, a send reads the store (the replay
    check) before it goes direct; concurrent sends all passed the slot check
    during that read, and a 1-slot agent got all ten at once."""
    agent = await agent_factory(gate=asyncio.Event())
    assert agent.gate is not None
    a2ad = await a2ad_factory([ws(agent, max_concurrent=1)], clock=ManualClock())
    # A queue episode: one send holds the slot, two more are queued; all drain.
    first = asyncio.create_task(a2ad.send("w", "a", message_id="a"))
    await agent.wait_received(1)
    for m in ("b", "c"):
        assert (await a2ad.send("w", m, message_id=m))[0] == 202
    agent.gate.set()
    assert (await first)[0] == 200
    await agent.wait_received(3)
    await wait_until(lambda: a2ad.daemon.registry.get("w").depth.live == 0)

    agent.gate = asyncio.Event()
    sends = [asyncio.create_task(a2ad.send("w", f"n{i}", message_id=f"n{i}")) for i in range(10)]
    await agent.wait_received(4)
    await asyncio.sleep(0.1)  # time for any more to arrive
    assert agent.active == 1 and agent.max_active == 1
    agent.gate.set()
    statuses = sorted(status for status, _ in await asyncio.gather(*sends))
    assert statuses == [200] + [202] * 9
    await agent.wait_received(13)
    assert agent.max_active == 1


@pytest.mark.sqlite_only  # reads, or locks, the SQLite file beside the store
async def test_counts_stay_equal_to_the_store_through_concurrent_enqueues_and_recounts(
    a2ad_factory: A2adFactory, tmp_path: Path
) -> None:
    """A recount read the store in several statements and overwrote the counts;
    an enqueue that committed in between was lost from them, and its item
    stranded (the pump sees no queued item, and new sends overtake it)."""
    # Nothing listens at the agent's address: every send is queued.
    a2ad = await a2ad_factory([{"id": "w", "url": "http://127.0.0.1:9/", "heartbeat": False}])
    workspace = a2ad.daemon.registry.get("w")
    for round_ in range(15):
        sends = [a2ad.send("w", f"{round_}-{i}", message_id=f"{round_}-{i}") for i in range(6)]
        recounts = [a2ad.daemon.dispatcher.recount() for _ in range(3)]
        await asyncio.gather(*sends, *recounts)
        assert a2ad.daemon.store._writer is not None and a2ad.daemon.store._writer.idle
        live = (dict(workspace.depth.queued), workspace.depth.dispatching)
        assert live == store_live(tmp_path / "a2ad.db"), round_
    assert workspace.queued_total == 90


@pytest.mark.sqlite_only  # reads, or locks, the SQLite file beside the store
async def test_a_claim_in_the_writer_at_shutdown_is_handed_back_without_an_attempt(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, tmp_path: Path
) -> None:
    """Shutdown cancelled a pump that waited for its claim; the claim committed all
    the same, its row stayed `dispatching` with a token no delivery held, and the
    next start charged it an attempt (with max_attempts = 1: failed, never sent)."""
    agent = await agent_factory(script=[(503, {"error": "busy"}, {"Retry-After": "5"})])
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [ws(agent)], clock=clock, queue={"max_attempts": 1}, store={"busy_timeout_seconds": 2}
    )
    status, data = await a2ad.send("w", "m", message_id="m")  # busy: queued, paused 5 s
    assert status == 202, data
    qid = data["result"]["id"]
    daemon = a2ad.daemon
    with write_lock(tmp_path / "a2ad.db"):
        await clock.advance(6)  # the pause ends: the pump claims, and waits for the lock
        await asyncio.sleep(0.1)
        assert daemon.registry.get("w").admission.reserved == 1  # the claim is in the writer
        daemon.begin_shutdown()
        await asyncio.sleep(0.05)
    await daemon.dispatcher.stop(grace=1)
    with contextlib.closing(sqlite3.connect(tmp_path / "a2ad.db")) as conn:
        row = conn.execute("SELECT state, attempts FROM items WHERE id = ?", (qid,)).fetchone()
    assert row == ("queued", 0)
    assert len(agent.received) == 1  # only the direct try; the claimed item was never sent


async def test_housekeeping_and_recovery_read_items_through_indexes(tmp_path: Path) -> None:
    """The sweep, the recount, start-up recovery and the replay history each use an
    index: no full scan of items, however many final rows retention keeps."""
    seen: list[str] = []
    async with Store(str(tmp_path / "a2ad.db")) as store:
        await store.migrate()
        now = 1_800_000_000.0
        for _ in range(3):  # something to claim
            await store.enqueue(NewItem("w", "message/send", b"{}"), now=now, replay_window=60)
        for conn in (store._conn, store._reader):
            assert conn is not None
            await conn._execute(conn._conn.set_trace_callback, seen.append)  # type: ignore[no-untyped-call]
        await store.expire_due(now=now)
        await store.release_claims({"q-1": "t"}, now=now, max_attempts=3)
        await store.sweep_leases(now=now, max_attempts=3)
        await store.recover_dispatching(now=now, max_attempts=3)
        await store.recount()
        await store.last_delivered(["w"])
        await store.claim("w", now=now, lease_seconds=60, promote_after=120, limit=4)
        for conn in (store._conn, store._reader):
            assert conn is not None
            await conn._execute(conn._conn.set_trace_callback, None)  # type: ignore[no-untyped-call]
        statements = [s for s in seen if "items" in s and not s.startswith(("BEGIN", "COMMIT"))]
        assert len(statements) >= 8, statements
        reader = store._reader
        assert reader is not None

        def plans(conn: sqlite3.Connection) -> dict[str, list[str]]:
            return {
                sql: [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
                for sql in statements
            }

        found = await reader._execute(plans, reader._conn)  # type: ignore[no-untyped-call]
    for sql, steps in found.items():
        scans = [step for step in steps if step.startswith("SCAN items")]
        assert not scans, (sql, steps)
        # Nor a search that reads every queued row: these find theirs directly.
        words = " ".join(sql.split())
        if words.startswith("UPDATE items SET state = 'dispatching'"):
            assert any("INTEGER PRIMARY KEY" in step for step in steps), (sql, steps)
        if "SET state = 'expired'" in words:
            assert any("items_expiry" in step for step in steps), (sql, steps)


async def test_a_step_of_the_wall_clock_does_not_take_a_running_delivery_for_a_dead_one(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """Leases followed the wall clock: a step forward swept every running lease,
    and the items went back to the queue while their deliveries ran."""
    agent = await agent_factory(gate=asyncio.Event(), slots=1)
    assert agent.gate is not None
    clock = ManualClock()
    a2ad = await a2ad_factory([ws(agent)], clock=clock, queue={"lease_seconds": 60})
    blocker = asyncio.create_task(a2ad.send("w", "direct", message_id="d"))
    await agent.wait_received(1)
    status, data = await a2ad.send("w", "queued", message_id="q")
    assert status == 202
    qid = data["result"]["id"]
    held, agent.gate = agent.gate, asyncio.Event()  # the next request waits for this one
    held.set()
    await blocker
    await agent.wait_received(2)  # the queued item is being delivered
    await wait_until(lambda: a2ad.daemon.registry.get("w").dispatching == 1)

    clock.step_wall(3600)  # an NTP correction, an operator's date -s
    await a2ad.daemon._housekeeping()
    assert (await a2ad.item(qid))["state"] == "dispatching"
    agent.gate.set()
    done = await a2ad.final(qid)
    assert (done["state"], done["attempts"]) == ("delivered", 0)
    assert len(agent.received) == 2  # delivered once


@pytest.mark.sqlite_only  # reads, or locks, the SQLite file beside the store
async def test_an_outcome_the_store_cannot_record_keeps_its_claim_until_the_lease_lapses(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, tmp_path: Path
) -> None:
    """When the answer cannot be written, the item stays `dispatching` in the store
    and in the counts alike, and comes back when its lease lapses."""
    agent = await agent_factory(gate=asyncio.Event(), slots=1)
    assert agent.gate is not None
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [ws(agent)],
        clock=clock,
        queue={"lease_seconds": 30},
        store={"busy_timeout_seconds": 0.2},
    )
    blocker = asyncio.create_task(a2ad.send("w", "direct", message_id="d"))
    await agent.wait_received(1)
    _, data = await a2ad.send("w", "queued", message_id="q")
    qid = data["result"]["id"]
    agent.gate.set()
    await blocker
    await agent.wait_received(2)
    workspace = a2ad.daemon.registry.get("w")
    with write_lock(tmp_path / "a2ad.db"):
        await asyncio.sleep(0.6)  # the outcome's write fails: the store is locked
    assert workspace.in_flight == 0  # the slot is free all the same
    assert (dict(workspace.depth.queued), workspace.dispatching) == ({}, 1)
    assert store_live(tmp_path / "a2ad.db") == ({}, 1)
    await clock.advance(31)  # the lease lapses on a2ad's own clock
    await a2ad.daemon._housekeeping()
    done = await a2ad.final(qid)
    assert done["state"] == "delivered"
    assert done["attempts"] == 1  # the lapsed lease counted one
    assert (dict(workspace.depth.queued), workspace.dispatching) == ({}, 0)
