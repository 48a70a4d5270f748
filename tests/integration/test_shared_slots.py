"""Slots that replicas share on one PostgreSQL store: the store's contract.

Several PostgresStore instances stand for replicas (each its own connections and
name). What must hold: no two takers ever share a slot, however their statements
interleave; the count equals the live leases; a dead replica's slots come back
when its leases lapse, a restarted one's at once; and a direct send never passes
an item queued before it."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator

import pytest
from pgserver import PgServer

from a2ad.store import NewItem
from a2ad.store.lock import StoreLocked
from a2ad.store.postgres import PostgresStore

T0 = 1_800_000_000.0
WS = "ws"
LEASE = 60.0


def new(text: str = "m") -> NewItem:
    body = f'{{"jsonrpc":"2.0","id":1,"method":"message/send","t":"{text}"}}'.encode()
    return NewItem(workspace=WS, method="message/send", body=body)


@pytest.fixture
async def replicas(pg_server: PgServer) -> AsyncIterator[list[PostgresStore]]:
    """Three replicas of one fresh schema."""
    schema = f"s_{uuid.uuid4().hex[:12]}"
    stores = [PostgresStore(pg_server.url, schema=schema, replica=f"r{i}") for i in range(3)]
    for store in stores:
        await store.open()
    await stores[0].migrate()
    for store in stores:
        await store.take_ownership(store.replica)
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


async def slot_rows(store: PostgresStore) -> tuple[int, int]:
    """(slots.in_use, live leases) of the workspace."""
    [(in_use,)] = await store._rows("SELECT in_use FROM slots WHERE workspace = %s", (WS,))
    [(leases,)] = await store._rows("SELECT count(*) FROM slot_leases WHERE workspace = %s", (WS,))
    return in_use, leases


async def take(store: PostgresStore, *, cap: int, now: float = T0, arrived: float = T0) -> str:
    """A direct send's slot: its token, or '' when refused."""
    token = uuid.uuid4().hex
    taken = await store.take_slot(
        WS, token=token, cap=cap, arrived=arrived, now=now, lease_until=now + LEASE
    )
    return token if taken else ""


async def test_takers_on_three_replicas_never_share_a_slot(
    replicas: list[PostgresStore],
) -> None:
    """Direct takes and claims of items, on three replicas at once, 2 slots: at
    no moment do more than 2 hold one (counted by the takers, who hold a slot only
    between the store's yes and their return of it), and in the end the count is
    back at 0 with no lease left."""
    cap = 2
    held = 0
    most = 0
    rng = random.Random(7)
    for i in range(60):
        await replicas[i % 3].enqueue(new(f"m{i}"), now=T0 - 10, replay_window=0)

    async def hold_for_a_moment() -> None:
        nonlocal held, most
        held += 1
        most = max(most, held)
        await asyncio.sleep(rng.random() * 0.005)
        held -= 1

    async def direct(store: PostgresStore) -> None:
        for _ in range(15):
            token = await take(store, cap=cap, arrived=T0 - 20)  # before every item
            if token:
                await hold_for_a_moment()
                await store.submit_free_slots([token])

    async def deliver(store: PostgresStore) -> None:
        for _ in range(15):
            items = await store.claim(
                WS, now=T0, lease_seconds=LEASE, promote_after=120.0, limit=2, cap=cap
            )
            for item in items:
                await hold_for_a_moment()
                assert item.claim_token is not None
                if rng.random() < 0.5:
                    await store.settle(item.id, item.claim_token, state="delivered", now=T0)
                else:
                    await store.hand_back(item.id, item.claim_token, now=T0)

    await asyncio.gather(*(job(s) for s in replicas for job in (direct, deliver, direct)))
    assert 1 <= most <= cap
    assert await slot_rows(replicas[0]) == (0, 0)


async def test_a_lowered_capacity_admits_nothing_until_enough_return(
    replicas: list[PostgresStore],
) -> None:
    a, b, _ = replicas
    first, second = await take(a, cap=2), await take(b, cap=2)
    assert first and second and not await take(a, cap=2)
    # The agent's heartbeat says 1 now: 2 still run, so none is free until 2 return.
    await a.submit_free_slots([first])
    assert not await take(b, cap=1)
    await b.submit_free_slots([second])
    assert await take(b, cap=1)
    assert await slot_rows(a) == (1, 1)


async def test_a_dead_replicas_slots_and_claims_come_back_when_their_leases_lapse(
    replicas: list[PostgresStore],
) -> None:
    """Replica a takes a direct slot and claims an item, then stops answering
    (its leases are never renewed or returned): b gets neither slot until the
    leases lapse; then b's sweep returns both, the item with an attempt counted."""
    a, b, _ = replicas
    item = (await a.enqueue(new(), now=T0, replay_window=0)).item
    assert await take(a, cap=2, arrived=T0 - 1)
    [claimed] = await a.claim(WS, now=T0, lease_seconds=5.0, promote_after=120.0, limit=1, cap=2)
    assert claimed.id == item.id
    assert await slot_rows(b) == (2, 2)
    assert not await take(b, cap=2, now=T0 + 1)
    assert await b.sweep_leases(now=T0 + 4, max_attempts=5) == []
    swept = await b.sweep_leases(now=T0 + LEASE + 1, max_attempts=5)
    assert [(r.id, r.state) for r in swept] == [(item.id, "queued")]
    assert await slot_rows(b) == (0, 0)
    again = await b.get(item.id)
    assert again is not None and again.state == "queued" and again.attempts == 1


async def test_a_restarted_replica_takes_back_claims_only_when_their_leases_lapse(
    pg_server: PgServer, replicas: list[PostgresStore]
) -> None:
    """A replica that starts again under its name cannot tell a dead earlier run
    from one cut off from the server that still delivers: its claims, like any
    other replica's, come back when their leases lapse, not at once."""
    a, b = replicas[0], replicas[1]
    mine = (await a.enqueue(new("a"), now=T0, replay_window=0)).item
    theirs = (await b.enqueue(new("b"), now=T0, replay_window=0)).item
    await a.claim(WS, now=T0, lease_seconds=LEASE, promote_after=120.0, limit=1, cap=5)
    await b.claim(WS, now=T0, lease_seconds=LEASE, promote_after=120.0, limit=1, cap=5)
    assert await take(a, cap=5)
    await a.close()  # killed: nothing returned

    async with PostgresStore(pg_server.url, schema=a.schema, replica="r0") as again:
        await again.take_ownership("r0")
        assert await again.recover_dispatching(now=T0 + 1, max_attempts=5) == []
        assert await slot_rows(again) == (3, 3)
        recovered = await again.recover_dispatching(now=T0 + LEASE + 1, max_attempts=5)
        assert {r.id for r in recovered} == {mine.id, theirs.id}
        assert await slot_rows(again) == (0, 0)


async def test_a_lost_slot_row_is_made_again_by_the_next_take(
    replicas: list[PostgresStore],
) -> None:
    """A workspace's slot row can be undone by a server crash (a take commits
    without waiting for the flush): the next take or claim makes it again."""
    a, _, _ = replicas
    token = await take(a, cap=1)
    assert token
    await a.submit_free_slots([token])
    await a._read(lambda conn: conn.execute("DELETE FROM slots"))
    assert await take(a, cap=1)
    await a.enqueue(new(), now=T0 + 5, replay_window=0)
    assert await a.claim(WS, now=T0 + 10, lease_seconds=LEASE, promote_after=120.0, limit=1, cap=2)
    assert await slot_rows(a) == (2, 2)


async def test_one_name_one_replica_and_migrate_waits_for_all(
    pg_server: PgServer, replicas: list[PostgresStore]
) -> None:
    schema = replicas[0].schema
    async with PostgresStore(pg_server.url, schema=schema, replica="r1") as twin:
        with pytest.raises(StoreLocked, match="running replica named 'r1'"):
            await twin.take_ownership("r1")
    async with PostgresStore(pg_server.url, schema=schema) as migrate:
        with pytest.raises(StoreLocked, match="held by another a2ad"):
            await migrate.take_ownership()
    async with PostgresStore(pg_server.url, schema=schema, replica="r9") as fourth:
        await fourth.take_ownership("r9")  # a new name joins


async def test_a_direct_send_does_not_pass_an_item_queued_before_it(
    replicas: list[PostgresStore],
) -> None:
    a, b, _ = replicas
    await a.enqueue(new(), now=T0, replay_window=0)
    assert not await take(b, cap=4, now=T0 + 1, arrived=T0 + 1)  # queued before it: wait
    assert await take(b, cap=4, now=T0 + 1, arrived=T0)  # queued with it or later: go
    # An item not due yet (a backoff) or expired holds nothing back.
    items = await a.claim(WS, now=T0, lease_seconds=LEASE, promote_after=120.0, cap=4)
    assert items[0].claim_token is not None
    await a.hand_back(items[0].id, items[0].claim_token, now=T0, not_before=T0 + 100)
    assert await take(b, cap=4, now=T0 + 2, arrived=T0 + 2)


async def test_a_replicas_counts_stop_at_zero_for_items_another_queued(
    replicas: list[PostgresStore], caplog: pytest.LogCaptureFixture
) -> None:
    """b delivers what a queued, which b never counted: b's counts stay at zero
    (its recount sets them right), and nothing is logged as an error."""
    a, b, _ = replicas
    await a.enqueue(new(), now=T0, replay_window=0)
    await a.enqueue(
        NewItem(workspace=WS, method="m", body=b"{}", priority=10), now=T0, replay_window=0
    )
    depth = b.depths.of(WS)
    items = await b.claim(WS, now=T0, lease_seconds=LEASE, promote_after=120.0, limit=2)
    assert (depth.queued_total, depth.dispatching, depth.queued) == (0, 2, {})
    for item in items:
        assert item.claim_token is not None
        await b.settle(item.id, item.claim_token, state="delivered", now=T0)
    assert (depth.queued_total, depth.dispatching, b.depths.live_total) == (0, 0, 0)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_two_replicas_batches_over_two_workspaces_never_deadlock(
    replicas: list[PostgresStore],
) -> None:
    """Each replica's writer batches takes of two workspaces' slots, in opposite
    orders, with a send beside them: a take runs as a statement of its own, so
    no batch holds one workspace's row while it waits for the other's, and no
    send fails (in one transaction, most rounds deadlocked)."""
    a, b, _ = replicas

    async def taken(store: PostgresStore, workspace: str) -> bool:
        token = uuid.uuid4().hex
        return await store.take_slot(
            workspace, token=token, cap=10**6, arrived=T0, now=T0, lease_until=T0 + LEASE
        )

    for round_ in range(30):
        results = await asyncio.gather(
            *(taken(a, w) for w in ("w1", "w2", "w1", "w2")),
            *(taken(b, w) for w in ("w2", "w1", "w2", "w1")),
            a.enqueue(new(f"a{round_}"), now=T0, replay_window=0),
            b.enqueue(new(f"b{round_}"), now=T0, replay_window=0),
        )
        assert all(results[:8])
