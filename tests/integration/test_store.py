"""The SQLite store against real database files: migrations, claims, leases, group commit."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from fakes import write_lock
from pgserver import PgServer

from a2ad.errors import StoreUnavailable
from a2ad.store import (
    PRIORITIES,
    Item,
    Migration,
    NewItem,
    Released,
    State,
    Store,
    bundled_migrations,
)
from a2ad.store.lock import StoreLocked
from a2ad.store.postgres import PostgresStore
from a2ad.store.writer import on_loop

T = TypeVar("T")
T0 = 1_800_000_000.0
WS = "ws"
LEASE = 60.0
PROMOTE = 120.0
REPLAY = 3_600.0
MAX_ATTEMPTS = 5
CRITICAL, TASK, INFO = PRIORITIES["critical"], PRIORITIES["task"], PRIORITIES["info"]


# -- helpers -----------------------------------------------------------------


def new(workspace: str = WS, **fields: object) -> NewItem:
    fields.setdefault("method", "message/send")
    fields.setdefault("body", b'{"jsonrpc":"2.0","id":1,"method":"message/send"}')
    return NewItem(workspace=workspace, **fields)  # type: ignore[arg-type]


async def put(store: Store, now: float = T0, workspace: str = WS, **fields: object) -> Item:
    """Enqueue one new item and return its row."""
    result = await store.enqueue(new(workspace, **fields), now=now, replay_window=REPLAY)
    assert result.created
    return result.item


async def when_back(attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()` once the server takes it: StoreUnavailable meanwhile, for up to
    about 5 s (the last attempt's error is the test's)."""
    for _ in range(50):
        try:
            return await attempt()
        except StoreUnavailable:
            await asyncio.sleep(0.1)
    return await attempt()


async def claim(
    store: Store,
    now: float = T0,
    workspace: str = WS,
    *,
    limit: int = 1,
    lease: float = LEASE,
    promote_after: float = PROMOTE,
) -> list[Item]:
    return await store.claim(
        workspace, now=now, lease_seconds=lease, promote_after=promote_after, limit=limit
    )


async def claim_one(store: Store, now: float = T0, workspace: str = WS) -> Item:
    [item] = await claim(store, now, workspace)
    return item


async def state_of(store: Store, item_id: str) -> str:
    item = await store.get(item_id)
    assert item is not None
    return item.state


def sql_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the file directly, beside the store, the way an operator's sqlite3 shell would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "a2ad.db"


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[Store]:
    async with Store(str(db_path)) as s:
        await s.migrate()
        yield s


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Store]:
    """Each contract test runs on both stores: a SQLite file, and a schema of its own
    on the throwaway PostgreSQL server."""
    if request.param == "sqlite":
        opened: Store | PostgresStore = Store(str(db_path))
    else:
        server: PgServer = request.getfixturevalue("pg_server")
        opened = PostgresStore(server.url, schema=f"t_{uuid.uuid4().hex[:12]}")
    async with opened as s:
        await s.migrate()
        yield s  # type: ignore[misc]


# -- migrations --------------------------------------------------------------


BUNDLED = bundled_migrations()
LATEST = BUNDLED[-1].version


async def test_fresh_database_gets_every_bundled_migration(db_path: Path) -> None:
    async with Store(str(db_path)) as s:
        assert await s.schema_version() == 0
        applied = await s.migrate()
        assert [m.version for m in applied] == [m.version for m in BUNDLED]
        assert [m.version for m in BUNDLED] == list(range(1, LATEST + 1))
        assert await s.schema_version() == LATEST
    rows = sql_rows(db_path, "SELECT version, name FROM schema_migrations ORDER BY version")
    assert rows == [(m.version, m.name) for m in BUNDLED]
    assert rows[0] == (1, "items")


async def test_migrate_twice_applies_nothing_the_second_time(db_path: Path) -> None:
    async with Store(str(db_path)) as s:
        assert len(await s.migrate()) == len(BUNDLED)
        assert await s.migrate() == []
    async with Store(str(db_path)) as s:
        assert await s.migrate() == []
        assert await s.schema_version() == LATEST


async def test_migrations_apply_once_and_in_order_on_an_old_database(db_path: Path) -> None:
    async with Store(str(db_path)) as s:
        await s.migrate(BUNDLED[:1])  # a database from the first release, with a row
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute(
            "INSERT INTO items (id, workspace, method, body, message_id, enqueued_at, updated_at)"
            " VALUES ('q-old', ?, 'message/send', x'7b7d', 'kept', ?, ?)",
            (WS, T0, T0),
        )
    conn.close()
    [(first_applied_at,)] = sql_rows(db_path, "SELECT applied_at FROM schema_migrations")

    extra = [
        *BUNDLED,
        # Not idempotent on purpose: applying either twice, or 102 before 101, fails.
        Migration(101, "extra", "CREATE TABLE t2(x);"),
        Migration(102, "more", "ALTER TABLE t2 ADD COLUMN y;"),
    ]
    async with Store(str(db_path)) as s:
        applied = await s.migrate(extra)
        assert [m.version for m in applied] == [m.version for m in BUNDLED[1:]] + [101, 102]
        assert await s.schema_version() == 102
        assert await s.migrate(extra) == []
        [old] = await s.list_items()
        assert old.message_id == "kept"

    rows = sql_rows(db_path, "SELECT version, name, applied_at FROM schema_migrations")
    assert [v for v, _, _ in rows] == [m.version for m in BUNDLED] + [101, 102]
    assert rows[0][2] == first_applied_at  # migration 1 was not applied again
    columns = [r[1] for r in sql_rows(db_path, "PRAGMA table_info(t2)")]
    assert columns == ["x", "y"]


async def test_a_failing_migration_leaves_no_partial_change_and_raises(db_path: Path) -> None:
    good = Migration(101, "good", "CREATE TABLE t2(x);")
    bad = Migration(
        102, "bad", "CREATE TABLE t3(x);\nINSERT INTO t2 VALUES (1);\nCREATE TABL oops;"
    )
    async with Store(str(db_path)) as s:
        await s.migrate()
        with pytest.raises(sqlite3.OperationalError):
            await s.migrate([*BUNDLED, good, bad])
        # Each migration is all or nothing: 101 stands, nothing of 102 does.
        assert await s.schema_version() == 101
        tables = {r[0] for r in sql_rows(db_path, "SELECT name FROM sqlite_master")}
        assert "t2" in tables
        assert "t3" not in tables
        assert sql_rows(db_path, "SELECT COUNT(*) FROM t2") == [(0,)]

        # The store still works, and the fixed migration applies afterwards.
        await put(s)
        fixed = Migration(102, "bad", "CREATE TABLE t3(x);")
        assert await s.migrate([*BUNDLED, good, fixed]) == [fixed]
        assert await s.schema_version() == 102


async def test_migrate_applies_by_version_whatever_the_order_given(db_path: Path) -> None:
    async with Store(str(db_path)) as s:
        applied = await s.migrate(
            [
                Migration(102, "more", "ALTER TABLE t2 ADD COLUMN y;"),
                *BUNDLED,
                Migration(101, "extra", "CREATE TABLE t2(x);"),
            ]
        )
        assert [m.version for m in applied] == [m.version for m in BUNDLED] + [101, 102]


async def test_a_migration_name_with_a_quote_is_recorded(db_path: Path) -> None:
    async with Store(str(db_path)) as s:
        await s.migrate()
        await s.migrate([*BUNDLED, Migration(101, "o'brien", "CREATE TABLE t2(x);")])
        assert await s.schema_version() == 101


# -- claims ------------------------------------------------------------------


async def _drain(store: Store, limit: int, seen: list[str]) -> None:
    """Claim until nothing is left, settling each claim, like a dispatcher would."""
    while True:
        items = await claim(store, limit=limit)
        if not items:
            return
        for item in items:
            seen.append(item.id)
            assert item.claim_token is not None
            assert await store.settle(item.id, item.claim_token, state="delivered", now=T0 + 1)


async def test_sends_waiting_for_a_writer_that_stops_are_told_not_left_waiting(
    store: Store,
) -> None:
    """A send's future cannot be cancelled by its waiter (a Settled, so a caller
    that hangs up still learns its item's fate). Should the writer itself ever
    stop while writes wait (its task cancelled, or a bug), each waiting caller is
    told the store is unavailable instead of waiting forever, later writes are
    refused, and the store still closes."""
    writer = store._writer
    assert writer is not None and writer._task is not None
    writes = [store.submit_enqueue(new(), now=1.0, replay_window=60) for _ in range(3)]
    assert not writes[0].cancel()  # its waiter cannot cancel it
    writer._task.cancel()
    for write in writes:
        with pytest.raises(StoreUnavailable, match="writer stopped"):
            await asyncio.wait_for(asyncio.shield(write), 5)
    with pytest.raises(StoreUnavailable):
        store.submit_enqueue(new(), now=1.0, replay_window=60)
    await asyncio.wait_for(store.close(), 5)


async def test_concurrent_claimers_never_get_the_same_item(store: Store) -> None:
    ids = {(await put(store, T0 - 10 + i / 1000)).id for i in range(300)}
    seen: list[str] = []
    await asyncio.gather(*(_drain(store, 1 if n % 2 else 3, seen) for n in range(20)))

    assert Counter(seen) == Counter(ids)  # every item exactly once
    assert await store.counts() == {WS: {"delivered": 300}}


async def _claim_and_settle(store: Store, limit: int, seen: list[str]) -> int:
    items = await claim(store, limit=limit)
    for item in items:
        seen.append(item.id)
        assert item.claim_token is not None
        assert await store.settle(item.id, item.claim_token, state="delivered", now=T0 + 1)
    return len(items)


@pytest.fixture(params=["sqlite", "postgres"])
async def store_pair(
    request: pytest.FixtureRequest, db_path: Path
) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database: two writers, as two processes would have."""
    if request.param == "sqlite":
        a: Store | PostgresStore = Store(str(db_path))
        b: Store | PostgresStore = Store(str(db_path))
    else:
        server: PgServer = request.getfixturevalue("pg_server")
        schema = f"t_{uuid.uuid4().hex[:12]}"
        a, b = PostgresStore(server.url, schema=schema), PostgresStore(server.url, schema=schema)
    async with a, b:
        await a.migrate()
        yield a, b  # type: ignore[misc]


async def test_claims_are_exclusive_across_two_writer_connections(
    store_pair: tuple[Store, Store],
) -> None:
    a, b = store_pair
    ids = {(await put(a, T0 - 10 + i / 1000)).id for i in range(300)}
    seen_a: list[str] = []
    seen_b: list[str] = []
    # In rounds, so both writers race for the same rows every time rather than
    # one draining the queue while the other waits out its busy handler.
    while True:
        taken = await asyncio.gather(
            *(_claim_and_settle(a, 1 if n % 2 else 3, seen_a) for n in range(10)),
            *(_claim_and_settle(b, 3 if n % 2 else 1, seen_b) for n in range(10)),
        )
        if not any(taken):
            break
    # Both connections did real work, and no item went to both.
    assert seen_a
    assert seen_b
    assert Counter(seen_a + seen_b) == Counter(ids)
    assert await b.counts() == {WS: {"delivered": 300}}


async def test_a_claim_waits_its_turn_instead_of_passing_the_head_another_holds(
    pg_server: PgServer,
) -> None:
    """PostgreSQL, replicas: a claim holds the head of the queue locked while it
    asks for a slot. A second claim of the same workspace waits for the first to
    commit, then takes the head if the first did not (here it got no slot), never
    the item behind it: skipping locked rows alone let a 1-slot agent get a newer
    item before an older one."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    async with PostgresStore(pg_server.url, schema=schema) as store:
        await store.migrate()
        older, newer = await put(store, T0 - 2), await put(store, T0 - 1)
        options = f"-c search_path={schema}"
        async with await psycopg.AsyncConnection.connect(pg_server.url, options=options) as other:
            # Another replica's claim, at the moment it holds the workspace's turn
            # and the head row, before it learns there is no slot for it.
            await other.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || %s, 0))",
                (f":claim:{WS}",),
            )
            await other.execute("SELECT 1 FROM items WHERE id = %s FOR UPDATE", (older.id,))
            claiming = asyncio.create_task(
                store.claim(WS, now=T0, lease_seconds=LEASE, promote_after=PROMOTE, cap=1)
            )
            await asyncio.sleep(0.3)
            assert not claiming.done()  # its turn comes after the other's
            await other.rollback()
        assert [i.id for i in await asyncio.wait_for(claiming, 5)] == [older.id]
        assert newer.id != older.id


@pytest.mark.xfail(
    strict=True,
    reason="known gap: the claim statement reads the queue as it was when it began"
    " to wait for its turn, and the slot as it is after (a fix: the turn in a statement"
    " of its own; measured -10 % on the PostgreSQL deep backlog when pipelined)",
)
async def test_a_claim_that_waited_its_turn_sees_an_item_handed_back_meanwhile(
    pg_server: PgServer,
) -> None:
    """PostgreSQL, replicas (found by a helper's attack): one replica holds the
    older of two items of a 1-slot agent; a second replica's claim waits for its
    turn; the first hands its item back, unsent, which frees the slot. The waiting
    claim must take the older item, never the newer one: it should read the queue
    once its turn has come, not as it was when it began to wait."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    async with (
        PostgresStore(pg_server.url, schema=schema, replica="r1") as r1,
        PostgresStore(pg_server.url, schema=schema, replica="r2") as r2,
    ):
        await r1.migrate()
        older, newer = await put(r1, T0 - 2), await put(r1, T0 - 1)
        [held] = await r1.claim(WS, now=T0, lease_seconds=LEASE, promote_after=PROMOTE, cap=1)
        assert held.id == older.id and held.claim_token is not None
        options = f"-c search_path={schema}"
        async with await psycopg.AsyncConnection.connect(pg_server.url, options=options) as other:
            await other.execute(  # a third replica's claim, holding the turn
                "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || %s, 0))",
                (f":claim:{WS}",),
            )
            claiming = asyncio.create_task(
                r2.claim(WS, now=T0, lease_seconds=LEASE, promote_after=PROMOTE, cap=1)
            )
            await asyncio.sleep(0.3)
            assert await r1.hand_back(held.id, held.claim_token, now=T0)
            await other.rollback()
        assert [i.id for i in await asyncio.wait_for(claiming, 5)] == [older.id]
        assert newer.id != older.id


async def test_claim_gives_each_item_its_own_token_and_lease(store: Store) -> None:
    for i in range(3):
        await put(store, T0 + i)
    items = await claim(store, T0 + 10, limit=5, lease=30)
    assert len(items) == 3
    assert len({i.claim_token for i in items}) == 3
    for item in items:
        assert item.state == "dispatching"
        assert item.lease_until == T0 + 40
        assert item.updated_at == T0 + 10
    assert await claim(store, T0 + 10) == []


async def test_claim_takes_only_its_own_workspace(store: Store) -> None:
    mine = await put(store, workspace="a")
    await put(store, workspace="b")
    assert [i.id for i in await claim(store, workspace="a", limit=5)] == [mine.id]
    assert await claim(store, workspace="c") == []


async def test_order_is_priority_then_age(store: Store) -> None:
    # Everything within one promote_after, so no promotion.
    enqueued = [
        await put(store, T0 + 0, priority=INFO),
        await put(store, T0 + 1, priority=TASK),
        await put(store, T0 + 2, priority=CRITICAL),
        await put(store, T0 + 3, priority=INFO),
        await put(store, T0 + 4, priority=TASK),
        await put(store, T0 + 5, priority=CRITICAL),
    ]
    by_id = {i.id: i for i in enqueued}
    order = [i.id for i in await claim(store, T0 + 10, limit=10)]
    assert [(by_id[i].priority, by_id[i].enqueued_at) for i in order] == [
        (CRITICAL, T0 + 2),
        (CRITICAL, T0 + 5),
        (TASK, T0 + 1),
        (TASK, T0 + 4),
        (INFO, T0 + 0),
        (INFO, T0 + 3),
    ]


async def test_claims_one_by_one_keep_the_same_order(store: Store) -> None:
    """limit=1 calls, each seeing what the last left, agree with one limit=n claim."""
    priorities = [INFO, CRITICAL, TASK, TASK, INFO, CRITICAL, TASK]
    items = [await put(store, T0 + i, priority=p) for i, p in enumerate(priorities)]
    got = [(await claim_one(store, T0 + 10)).id for _ in items]
    expected = sorted(items, key=lambda i: (-i.priority, i.seq))
    assert got == [i.id for i in expected]


@pytest.mark.parametrize("limit", [1, 3, 7, 40])
async def test_one_claim_of_many_takes_what_claims_of_one_would(tmp_path: Path, limit: int) -> None:
    """Priorities and ages mixed across several promote_after periods: a claim of
    `limit` items takes the same items, in the same order, as `limit` claims of one."""
    plan = [((i * 7) % 3, T0 + (i * 37) % 500) for i in range(40)]  # (level, enqueued_at)
    levels = (INFO, TASK, CRITICAL)
    seen: list[list[tuple[int, float]]] = []
    for name, per_claim in (("many", limit), ("one", 1)):
        async with Store(str(tmp_path / f"{name}.db")) as s:
            await s.migrate()
            for level, at in sorted(plan, key=lambda p: p[1]):
                await put(s, at, priority=levels[level])
            now = T0 + 3 * PROMOTE + 50
            got: list[Item] = []
            while len(got) < limit:
                got += await claim(s, now, limit=per_claim)
            seen.append([(i.priority, i.enqueued_at) for i in got])
    assert seen[0] == seen[1]


async def test_a_task_item_waiting_promote_after_beats_a_newer_critical(store: Store) -> None:
    old_task = await put(store, T0, priority=TASK)
    critical = await put(store, T0 + 50, priority=CRITICAL)
    # Just short of one full promote_after: the critical item goes first.
    assert (await claim_one(store, T0 + PROMOTE - 0.5)).id == critical.id

    critical2 = await put(store, T0 + 60, priority=CRITICAL)
    # A full promote_after waited: task → critical, and the older one wins the tie.
    assert (await claim_one(store, T0 + PROMOTE)).id == old_task.id
    assert (await claim_one(store, T0 + PROMOTE)).id == critical2.id


async def test_an_info_item_moves_up_one_level_per_promote_after(store: Store) -> None:
    info = await put(store, T0, priority=INFO)
    task = await put(store, T0 + 1, priority=TASK)
    critical = await put(store, T0 + 2, priority=CRITICAL)
    now = T0 + PROMOTE  # info is now at the task level: older than the task item
    assert [i.id for i in await claim(store, now, limit=3)] == [critical.id, info.id, task.id]


async def test_an_info_item_waiting_two_promote_afters_beats_a_newer_critical(
    store: Store,
) -> None:
    info = await put(store, T0, priority=INFO)
    critical = await put(store, T0 + 10, priority=CRITICAL)
    assert (await claim_one(store, T0 + PROMOTE)).id == critical.id  # one level up only
    critical2 = await put(store, T0 + 20, priority=CRITICAL)
    # Two full periods: info → critical, and older than critical2.
    now = T0 + 2 * PROMOTE
    assert [i.id for i in await claim(store, now, limit=2)] == [info.id, critical2.id]


async def test_claim_respects_not_before(store: Store) -> None:
    item = await put(store, T0)
    claimed = await claim_one(store, T0)
    assert claimed.claim_token is not None
    assert await store.hand_back(item.id, claimed.claim_token, now=T0 + 1, not_before=T0 + 30)

    assert await claim(store, T0 + 29.9) == []
    assert await store.next_due(WS, now=T0 + 29.9) == T0 + 30
    assert (await claim_one(store, T0 + 30)).id == item.id


async def test_a_held_back_item_does_not_block_later_ones(store: Store) -> None:
    first = await put(store, T0, priority=CRITICAL)
    second = await put(store, T0 + 1, priority=CRITICAL)
    third = await put(store, T0 + 2, priority=TASK)
    token = (await claim_one(store, T0 + 3)).claim_token
    assert token is not None
    assert await store.hand_back(first.id, token, now=T0 + 3, not_before=T0 + 100)
    assert [i.id for i in await claim(store, T0 + 4, limit=5)] == [second.id, third.id]


async def test_claim_skips_expired_items(store: Store) -> None:
    expiring = await put(store, T0, priority=CRITICAL, expires_at=T0 + 10)
    other = await put(store, T0 + 1, priority=INFO)
    forever = await put(store, T0 + 2, priority=INFO)
    assert [i.id for i in await claim(store, T0 + 10, limit=5)] == [other.id, forever.id]
    assert await state_of(store, expiring.id) == "queued"  # expire_due's job, not claim's


async def test_claim_takes_an_item_before_it_expires(store: Store) -> None:
    item = await put(store, T0, expires_at=T0 + 10)
    assert (await claim_one(store, T0 + 9.999)).id == item.id


# -- leases ------------------------------------------------------------------


async def test_a_claim_whose_process_died_is_recovered_by_its_lease(
    store_pair: tuple[Store, Store],
) -> None:
    """A claimer's connection gone without a word: its claim is taken back once the
    stored lease runs out, by the other store, with an attempt counted."""
    a, b = store_pair
    item = await put(a, T0)
    [claimed] = await claim(a, T0)
    await a.close()  # its connections end, as a killed process's would
    assert await b.sweep_leases(now=T0 + LEASE - 1, max_attempts=MAX_ATTEMPTS) == []
    released = await b.sweep_leases(now=T0 + LEASE + 1, max_attempts=MAX_ATTEMPTS)
    assert released == [Released(item.id, WS, "queued")]
    [again] = await claim(b, T0 + LEASE + 2)
    assert again.id == item.id and again.attempts == 1
    assert again.claim_token != claimed.claim_token


async def test_a_renewed_lease_is_not_swept(store: Store) -> None:
    item = await put(store, T0)
    [claimed] = await claim(store, T0, lease=10)
    assert claimed.claim_token is not None
    assert (
        await store.renew({item.id: claimed.claim_token}, lease_until=T0 + 30, now=T0 + 3) == set()
    )

    assert await store.sweep_leases(now=T0 + 20, max_attempts=MAX_ATTEMPTS) == []
    row = await store.get(item.id)
    assert row is not None
    assert (row.state, row.lease_until, row.attempts) == ("dispatching", T0 + 30, 0)
    assert row.claim_token == claimed.claim_token
    # The owner can still settle it.
    assert await store.settle(item.id, claimed.claim_token, state="delivered", now=T0 + 25)


async def test_an_expired_lease_goes_back_to_queued_with_an_attempt(store: Store) -> None:
    item = await put(store, T0)
    other = await put(store, T0 + 1)
    [claimed, still_leased] = await claim(store, T0, limit=2, lease=10)
    assert still_leased.claim_token is not None
    assert (
        await store.renew({other.id: still_leased.claim_token}, lease_until=T0 + 60, now=T0)
        == set()
    )

    released = await store.sweep_leases(now=T0 + 20, max_attempts=MAX_ATTEMPTS)
    assert released == [Released(item.id, WS, "queued")]
    row = await store.get(item.id)
    assert row is not None
    assert (row.state, row.attempts, row.claim_token, row.lease_until) == ("queued", 1, None, None)
    assert row.last_error == "claim lease expired"
    assert row.finished_at is None
    assert await state_of(store, other.id) == "dispatching"
    # The old claimer has lost it.
    assert claimed.claim_token is not None
    assert not await store.settle(item.id, claimed.claim_token, state="delivered", now=T0 + 21)
    # And it can be claimed again.
    assert (await claim_one(store, T0 + 21)).id == item.id


async def test_a_lease_is_swept_only_once_it_has_run_out(store: Store) -> None:
    item = await put(store, T0)
    await claim(store, T0, lease=10)
    assert await store.sweep_leases(now=T0 + 10, max_attempts=MAX_ATTEMPTS) == []
    assert await store.sweep_leases(now=T0 + 10.001, max_attempts=MAX_ATTEMPTS) == [
        Released(item.id, WS, "queued")
    ]


async def test_a_sweep_spares_the_claims_it_is_told_are_running(store: Store) -> None:
    """The daemon names the claims its deliveries hold; a lapsed lease of any other
    (a claim that outlived its outcome in a server crash) goes back to the queue."""
    mine, stray = await put(store, T0), await put(store, T0 + 1)
    claimed = {i.id: i.claim_token for i in await claim(store, T0, limit=2, lease=10)}
    token = claimed[mine.id]
    assert token is not None
    released = await store.sweep_leases(
        now=T0 + 20, max_attempts=MAX_ATTEMPTS, except_tokens=[token]
    )
    assert released == [Released(stray.id, WS, "queued")]
    assert await state_of(store, mine.id) == "dispatching"
    assert await store.settle(mine.id, token, state="delivered", now=T0 + 21)


async def test_a_lease_running_out_on_the_last_attempt_ends_failed(store: Store) -> None:
    item = await put(store, T0)
    now = T0
    for attempt in range(1, 4):
        await claim(store, now, lease=10)
        now += 11
        expected: State = "failed" if attempt == 3 else "queued"
        assert await store.sweep_leases(now=now, max_attempts=3) == [
            Released(item.id, WS, expected)
        ]
    row = await store.get(item.id)
    assert row is not None
    assert (row.state, row.attempts, row.finished_at) == ("failed", 3, now)
    assert await claim(store, now + 1) == []


# -- tokens ------------------------------------------------------------------


async def test_a_wrong_or_stale_token_changes_nothing(store: Store) -> None:
    item = await put(store, T0)
    [first] = await claim(store, T0, lease=10)
    await store.sweep_leases(now=T0 + 11, max_attempts=MAX_ATTEMPTS)
    [second] = await claim(store, T0 + 12, lease=10)  # the same row, a new claim
    assert second.id == item.id
    stale, current = first.claim_token, second.claim_token
    assert stale is not None
    assert current is not None
    assert stale != current

    before = await store.get(item.id)
    now = T0 + 13
    for token in (stale, "0" * 32, ""):
        assert not await store.settle(
            item.id, token, state="delivered", now=now, result=b"{}", attempt_used=True
        )
        assert not await store.settle(item.id, token, state="failed", now=now)
        assert not await store.hand_back(
            item.id,
            token,
            now=now,
            not_before=now + 5,
            attempt_used=True,
            busy=True,
            last_error="busy",
        )
        assert await store.renew({item.id: token}, lease_until=now + 100, now=now) == {item.id}
        assert await store.get(item.id) == before

    # The right token on the wrong item does nothing either.
    other = await put(store, T0 + 14)
    other_before = await store.get(other.id)
    assert not await store.settle(other.id, current, state="delivered", now=now)
    assert await store.get(other.id) == other_before

    # The current token still works, once.
    assert await store.settle(item.id, current, state="delivered", now=now, result=b"ok")
    after = await store.get(item.id)
    assert after is not None
    assert not await store.settle(item.id, current, state="failed", now=now + 1)
    assert not await store.hand_back(item.id, current, now=now + 1)
    assert await store.renew({item.id: current}, lease_until=now + 100, now=now + 1) == {item.id}
    assert await store.get(item.id) == after


async def test_settle_records_the_answer(store: Store) -> None:
    item = await put(store, T0)
    claimed = await claim_one(store, T0)
    assert claimed.claim_token is not None
    assert await store.settle(
        item.id,
        claimed.claim_token,
        state="delivered",
        now=T0 + 2,
        result=b'{"r":1}',
        agent_task_id="t-1",
        agent_context_id="c-1",
    )
    row = await store.get(item.id)
    assert row is not None
    assert (row.state, row.result, row.agent_task_id, row.agent_context_id) == (
        "delivered",
        b'{"r":1}',
        "t-1",
        "c-1",
    )
    assert (row.finished_at, row.claim_token, row.lease_until, row.attempts) == (
        T0 + 2,
        None,
        None,
        0,
    )
    assert row.is_final


async def test_hand_back_keeps_the_row_and_counts_what_it_is_told(store: Store) -> None:
    item = await put(store, T0)
    token = (await claim_one(store, T0)).claim_token
    assert token is not None
    assert await store.hand_back(item.id, token, now=T0 + 1, busy=True)
    token = (await claim_one(store, T0 + 2)).claim_token
    assert token is not None
    assert await store.hand_back(
        item.id, token, now=T0 + 3, attempt_used=True, last_error="502 from agent"
    )
    row = await store.get(item.id)
    assert row is not None
    assert (row.seq, row.state, row.busy_answers, row.attempts) == (item.seq, "queued", 1, 1)
    assert row.last_error == "502 from agent"
    assert (row.claim_token, row.lease_until, row.finished_at) == (None, None, None)


# -- start-up recovery ---------------------------------------------------------


async def test_recover_dispatching_returns_every_claim_with_one_attempt(store: Store) -> None:
    for i in range(8):
        await put(store, T0 + i, workspace="a" if i % 2 else "b")
    claimed = await claim(store, T0 + 10, workspace="a", limit=3)
    claimed += await claim(store, T0 + 10, workspace="b", limit=3)
    # One of them has been tried before.
    tried = claimed[0]
    assert tried.claim_token is not None
    assert await store.hand_back(tried.id, tried.claim_token, now=T0 + 11, attempt_used=True)
    claimed[0] = await claim_one(store, T0 + 12, workspace=tried.workspace)
    assert claimed[0].id == tried.id
    # Final rows of every kind.
    done = claimed.pop()
    assert done.claim_token is not None
    await store.settle(done.id, done.claim_token, state="delivered", now=T0 + 13)
    failed = claimed.pop()
    assert failed.claim_token is not None
    await store.settle(failed.id, failed.claim_token, state="failed", now=T0 + 13)
    queued = await store.list_items(state="queued")
    assert await store.cancel(queued[0].id, now=T0 + 13)

    untouched = {i.id: i for i in await store.list_items() if i.state != "dispatching"}
    dispatching = {i.id: i for i in await store.list_items(state="dispatching")}
    assert set(dispatching) == {i.id for i in claimed}

    released = await store.recover_dispatching(now=T0 + 100, max_attempts=MAX_ATTEMPTS)
    assert sorted(r.id for r in released) == sorted(dispatching)
    assert {r.state for r in released} == {"queued"}
    for item_id, before in dispatching.items():
        row = await store.get(item_id)
        assert row is not None
        assert row.state == "queued"
        assert row.attempts == before.attempts + 1
        assert (row.claim_token, row.lease_until, row.finished_at) == (None, None, None)
        assert row.updated_at == T0 + 100
        assert row.seq == before.seq  # the same row, its place in line kept
    for item_id, before in untouched.items():
        assert await store.get(item_id) == before
    assert await store.list_items(state="dispatching") == []
    # Nothing left to recover the second time.
    assert await store.recover_dispatching(now=T0 + 101, max_attempts=MAX_ATTEMPTS) == []


async def test_recover_dispatching_fails_an_item_on_its_last_attempt(store: Store) -> None:
    item = await put(store, T0)
    token = (await claim_one(store, T0)).claim_token
    assert token is not None
    assert await store.hand_back(item.id, token, now=T0 + 1, attempt_used=True)
    await claim_one(store, T0 + 2)
    assert await store.recover_dispatching(now=T0 + 3, max_attempts=2) == [
        Released(item.id, WS, "failed")
    ]
    row = await store.get(item.id)
    assert row is not None
    assert (row.state, row.attempts, row.finished_at) == ("failed", 2, T0 + 3)


# -- idempotency -------------------------------------------------------------


async def test_the_same_message_id_answers_with_the_same_item(store: Store) -> None:
    first = await store.enqueue(new(caller="alice", message_id="m1"), now=T0, replay_window=REPLAY)
    again = await store.enqueue(
        new(caller="alice", message_id="m1", body=b"other"), now=T0 + 1, replay_window=REPLAY
    )
    assert first.created
    assert not again.created
    assert again.item == first.item

    # Still the same while it is being delivered.
    await claim_one(store, T0 + 2)
    during = await store.enqueue(
        new(caller="alice", message_id="m1"), now=T0 + 3, replay_window=REPLAY
    )
    assert not during.created
    assert during.item.id == first.item.id
    newest = await store.find_message(WS, "alice", "m1")
    assert newest is not None and newest.state == "dispatching"

    # Another caller, another workspace, or no messageId: a new item each time.
    bob = await store.enqueue(new(caller="bob", message_id="m1"), now=T0, replay_window=REPLAY)
    other_ws = await store.enqueue(
        new("other", caller="alice", message_id="m1"), now=T0, replay_window=REPLAY
    )
    assert bob.created
    assert other_ws.created
    assert len({first.item.id, bob.item.id, other_ws.item.id}) == 3
    anon = [await store.enqueue(new(), now=T0, replay_window=REPLAY) for _ in range(2)]
    assert all(a.created for a in anon)
    assert anon[0].item.id != anon[1].item.id


async def test_a_delivered_item_is_replayed_within_the_replay_window(store: Store) -> None:
    first = await put(store, T0, caller="alice", message_id="m1")
    token = (await claim_one(store, T0)).claim_token
    assert token is not None
    assert await store.settle(first.id, token, state="delivered", now=T0 + 10, result=b"r")

    replay = await store.enqueue(
        new(caller="alice", message_id="m1"), now=T0 + 10 + REPLAY, replay_window=REPLAY
    )
    assert not replay.created
    assert replay.item.id == first.id
    assert replay.item.result == b"r"
    newest = await store.find_message(WS, "alice", "m1")
    assert newest is not None and newest.state == "delivered"

    # Past the window, the same messageId is a new message.
    later = await store.enqueue(
        new(caller="alice", message_id="m1"), now=T0 + 10 + REPLAY + 1, replay_window=REPLAY
    )
    assert later.created
    assert later.item.id != first.id


@pytest.mark.parametrize("final", ["failed", "cancelled", "expired"])
async def test_an_item_that_did_not_deliver_is_not_replayed(store: Store, final: str) -> None:
    first = await put(store, T0, caller="alice", message_id="m1", expires_at=T0 + 5)
    if final == "failed":
        token = (await claim_one(store, T0)).claim_token
        assert token is not None
        assert await store.settle(first.id, token, state="failed", now=T0 + 1)
    elif final == "cancelled":
        assert await store.cancel(first.id, now=T0 + 1)
    else:
        assert await store.expire_due(now=T0 + 5) == [Released(first.id, WS, "expired")]
    assert await state_of(store, first.id) == final

    again = await store.enqueue(
        new(caller="alice", message_id="m1"), now=T0 + 6, replay_window=REPLAY
    )
    assert again.created
    assert again.item.id != first.id
    assert again.item.state == "queued"
    live = await store.find_message(WS, "alice", "m1")
    assert live is not None and live.state == "queued"
    assert live.id == again.item.id


async def test_concurrent_enqueues_of_one_message_id_make_one_item(store: Store) -> None:
    results = await asyncio.gather(
        *(
            store.enqueue(new(caller="alice", message_id="m1"), now=T0, replay_window=REPLAY)
            for _ in range(20)
        )
    )
    assert sum(r.created for r in results) == 1
    assert len({r.item.id for r in results}) == 1
    assert await store.counts() == {WS: {"queued": 1}}


# -- group commit ------------------------------------------------------------


async def test_concurrent_enqueues_share_commits_and_are_durable(db_path: Path) -> None:
    async with Store(str(db_path)) as s:
        await s.migrate()
        commits = s.commits
        results = await asyncio.gather(
            *(
                s.enqueue(new(message_id=f"m{i}"), now=T0 + i, replay_window=REPLAY)
                for i in range(200)
            )
        )
        used = s.commits - commits
        assert all(r.created for r in results)
        assert 1 <= used <= 10, f"{used} commits for 200 enqueues"
        ids = {r.item.id for r in results}
        assert len(ids) == 200

    async with Store(str(db_path)) as fresh:
        stored = await fresh.list_items(limit=1000)
        assert {i.id for i in stored} == ids
        by_id = {r.item.id: r.item for r in results}
        assert all(i == by_id[i.id] for i in stored)


async def writer_synchronous(store: Store) -> int:
    """The synchronous level the writer connection committed its last batch at."""
    writer = store._conn
    assert writer is not None
    level: int = await writer._execute(  # type: ignore[no-untyped-call]
        lambda: writer._conn.execute("PRAGMA synchronous").fetchone()[0]
    )
    return level


FULL, NORMAL = 2, 1


async def test_only_a_deliverys_steps_skip_the_fsync(sqlite_store: Store) -> None:
    """New items commit at FULL; claims, leases and outcomes at NORMAL (a power
    cut may undo them, making an item be delivered again, never lose one).
    SQLite's levels; PostgreSQL's synchronous_commit is set per transaction."""
    store = sqlite_store
    await put(store, T0)
    assert await writer_synchronous(store) == FULL
    item = await claim_one(store, T0)
    assert await writer_synchronous(store) == NORMAL
    assert await store.settle(item.id, item.claim_token or "", state="delivered", now=T0 + 1)
    assert await writer_synchronous(store) == NORMAL
    # A batch holding both is as durable as its most durable write.
    await asyncio.gather(put(store, T0 + 2), claim(store, T0 + 2))
    assert await writer_synchronous(store) == FULL
    assert await store.cancel((await put(store, T0 + 3)).id, now=T0 + 3)
    assert await writer_synchronous(store) == FULL


async def test_a_failed_batch_does_not_leave_the_next_durable_one_unsynced(
    db_path: Path,
) -> None:
    async with Store(str(db_path), busy_timeout=0.05) as s:
        await s.migrate()
        await put(s, T0)
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(StoreUnavailable):
                await claim(s, T0)  # set NORMAL, then could not begin
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await put(s, T0 + 1)
        assert await writer_synchronous(s) == FULL


async def test_synchronous_normal_applies_to_every_write(db_path: Path) -> None:
    async with Store(str(db_path), synchronous="normal") as s:
        await s.migrate()
        await put(s, T0)
        assert await writer_synchronous(s) == NORMAL


async def test_an_error_in_one_op_fails_only_its_caller(store: Store) -> None:
    existing = await put(store, T0)
    commits = store.commits
    results = await asyncio.gather(
        store.enqueue(new(message_id="a"), now=T0, replay_window=REPLAY),
        store.enqueue(new(message_id="a-dup", id=existing.id), now=T0, replay_window=REPLAY),
        store.enqueue(new(message_id="b"), now=T0, replay_window=REPLAY),
        store.cancel(existing.id, now=T0 + 1),
        return_exceptions=True,
    )
    assert store.commits - commits == 1  # one batch, one transaction
    ok_a, dup, ok_b, cancelled = results
    assert isinstance(dup, sqlite3.IntegrityError | psycopg.errors.IntegrityError)
    assert not isinstance(ok_a, BaseException)
    assert not isinstance(ok_b, BaseException)
    assert cancelled is True
    assert ok_a.created
    assert ok_b.created
    # The failed op left nothing; the others in its batch committed.
    assert await store.find_message(WS, "", "a-dup") is None
    assert await store.get(ok_a.item.id) == ok_a.item
    assert await store.get(ok_b.item.id) == ok_b.item
    assert await state_of(store, existing.id) == "cancelled"
    assert await store.counts() == {WS: {"queued": 2, "cancelled": 1}}


async def test_an_error_in_a_batch_run_on_the_event_loop_fails_only_its_caller(
    sqlite_store: Store,
) -> None:
    """New items alone make a batch whose statements run on the event loop; one
    that breaks a constraint sends the batch to the writer thread, which runs it
    again with savepoints: still one transaction, and only that caller fails."""
    store = sqlite_store
    existing = await put(store, T0)
    commits = store.commits
    ok_a, dup, ok_b = await asyncio.gather(
        store.enqueue(new(message_id="a"), now=T0, replay_window=REPLAY),
        store.enqueue(new(message_id="a-dup", id=existing.id), now=T0, replay_window=REPLAY),
        store.enqueue(new(message_id="b"), now=T0, replay_window=REPLAY),
        return_exceptions=True,
    )
    assert store.commits - commits == 1
    assert isinstance(dup, sqlite3.IntegrityError)
    assert not isinstance(ok_a, BaseException)
    assert not isinstance(ok_b, BaseException)
    assert await store.get(ok_a.item.id) == ok_a.item
    assert await store.get(ok_b.item.id) == ok_b.item
    assert await store.find_message(WS, "", "a-dup") is None
    assert await store.counts() == {WS: {"queued": 3}}


async def test_a_write_waiting_for_another_processs_lock_does_not_stop_the_event_loop(
    db_path: Path,
) -> None:
    """The event loop never waits on SQLite's busy handler: while another process
    holds the write lock, a new item waits for it on the writer thread (up to
    busy_timeout) and other work goes on meanwhile."""
    async with Store(str(db_path), busy_timeout=5.0) as s:
        await s.migrate()
        await put(s, T0)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            waiting = asyncio.ensure_future(put(s, T0 + 1))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            assert ticks >= 20  # the loop ran on while the write waited
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            ticker.cancel()
        item = await waiting
        assert await s.get(item.id) == item
        assert await s.counts() == {WS: {"queued": 2}}


def wal_size(db_path: Path) -> int:
    return os.path.getsize(f"{db_path}-wal")


@pytest.mark.parametrize(
    ("sizes", "runs_on_loop", "commits"),
    [
        ([100] * 64, True, 1),  # up to LOOP_MAX_ROWS small writes: one batch
        ([100] * 65, True, 2),  # more: batches of at most that many
        ([200 * 1024, 56 * 1024], True, 1),  # up to LOOP_MAX_BYTES of payload
        ([200 * 1024, 56 * 1024 + 1], True, 2),
        ([300 * 1024, 100], False, 1),  # one bigger alone: on the thread, with the rest
        ([100, None, 100], False, 1),  # one not marked: the same
    ],
)
async def test_only_small_batches_run_on_the_event_loop(
    sqlite_store: Store, sizes: list[int | None], runs_on_loop: bool, commits: int
) -> None:
    """A batch's statements run on the event loop only while they are few and
    small: a burst of small writes is cut into batches within the limits, while
    a big one (a 1 MiB send) and anything not marked run on the writer thread,
    so the loop never stops long for them."""
    store = sqlite_store
    await put(store, T0)  # the first batch reads the live items, on the thread
    threads: set[int] = set()

    def probe(size: int | None) -> Callable[[sqlite3.Connection], None]:
        def op(conn: sqlite3.Connection) -> None:
            threads.add(threading.get_ident())
            conn.execute("INSERT INTO write_probe (id, at) VALUES (1, ?)", (T0,))
            conn.execute("DELETE FROM write_probe")

        return op if size is None else on_loop(op, size=size)

    assert store._writer is not None and store._conn is not None
    before = store.commits
    await asyncio.gather(*(store._writer.submit(probe(size)) for size in sizes))
    loop_thread, writer_thread = threading.get_ident(), store._conn._thread.ident
    assert threads == ({loop_thread} if runs_on_loop else {writer_thread})
    assert store.commits - before == commits


async def test_a_statement_failing_on_the_event_loop_leaves_the_store_writable(
    sqlite_store: Store, db_path: Path
) -> None:
    """The file full while a batch's statements run on the loop: its callers are
    told the store cannot write, nothing stays locked or half written, the
    counts still match the rows, and the next write goes through."""
    store = sqlite_store
    for i in range(3):
        await put(store, T0 + i)
    conn = store._conn
    assert conn is not None
    pages = conn._conn.execute("PRAGMA page_count").fetchone()[0]
    conn._conn.execute(f"PRAGMA max_page_count={pages}")
    big = b"x" * 100_000
    results = await asyncio.gather(
        *(put(store, T0 + 5, message_id=f"big{i}", body=big) for i in range(2)),
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert "full" in (store.last_write_error or "")
    with write_lock(db_path):  # another process can take the lock: none is held
        pass
    assert await store.counts() == {WS: {"queued": 3}}
    assert depth_view(store, WS)[1] == 3
    conn._conn.execute("PRAGMA max_page_count=1073741823")
    await put(store, T0 + 6, message_id="after", body=big)
    assert store.last_write_error is None
    assert await store.counts() == {WS: {"queued": 4}}
    assert depth_view(store, WS)[1] == 4


async def test_a_commit_failing_on_the_writer_thread_leaves_the_store_writable(
    sqlite_store: Store, db_path: Path
) -> None:
    """The COMMIT of a batch run on the loop fails on the thread (the WAL cannot
    grow: a file size limit): the same as any failed write, and nothing stays open."""
    store = sqlite_store
    for i in range(3):
        await put(store, T0 + i)
    commits = store.commits
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    wal = wal_size(db_path)
    default = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (wal, limit[1]))
    try:
        results = await asyncio.gather(
            *(put(store, T0 + 5, message_id=f"m{i}") for i in range(3)), return_exceptions=True
        )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, default)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert store.commits == commits
    with write_lock(db_path):
        pass
    assert await store.counts() == {WS: {"queued": 3}}
    assert depth_view(store, WS)[1] == 3
    await put(store, T0 + 6, message_id="after")
    assert store.last_write_error is None
    assert await store.counts() == {WS: {"queued": 4}}


async def test_writes_after_close_are_refused(db_path: Path) -> None:
    s = Store(str(db_path))
    await s.open()
    await s.migrate()
    await s.close()
    with pytest.raises(StoreUnavailable):
        await s.enqueue(new(), now=T0, replay_window=REPLAY)


async def test_close_finishes_with_a_write_still_queued(db_path: Path) -> None:
    s = Store(str(db_path))
    await s.open()
    await s.migrate()
    # Both start in the same loop iteration: the enqueue is pending when close() begins.
    job = asyncio.gather(s.enqueue(new(), now=T0, replay_window=REPLAY), s.close())
    done, _ = await asyncio.wait({job}, timeout=1)
    if not done:
        # Unstick the writer (close() consumed its own wake-up) so the test cleans up.
        s._wake.set()
        await job
    assert done, "close() did not return"


# -- expiry, cancel, retention -----------------------------------------------


async def test_expire_due_expires_only_queued_items_past_their_time(store: Store) -> None:
    due = await put(store, T0, expires_at=T0 + 10)
    later = await put(store, T0, expires_at=T0 + 20)
    forever = await put(store, T0)
    running = await put(store, T0, workspace="other", expires_at=T0 + 5)
    await claim_one(store, T0, workspace="other")

    assert await store.expire_due(now=T0 + 9) == []
    assert await store.expire_due(now=T0 + 10) == [Released(due.id, WS, "expired")]
    row = await store.get(due.id)
    assert row is not None
    assert (row.state, row.finished_at) == ("expired", T0 + 10)
    assert row.last_error is not None
    assert await state_of(store, later.id) == "queued"
    assert await state_of(store, forever.id) == "queued"
    # A delivery already running finishes; expiry does not take it.
    assert await state_of(store, running.id) == "dispatching"
    assert await store.expire_due(now=T0 + 10) == []


async def test_cancel_only_a_queued_item(store: Store) -> None:
    queued = await put(store, T0)
    running = await put(store, T0 + 1)
    assert await store.cancel(queued.id, now=T0 + 2)
    await claim_one(store, T0 + 2)
    row = await store.get(queued.id)
    assert row is not None
    assert (row.state, row.finished_at) == ("cancelled", T0 + 2)

    before = await store.get(running.id)
    assert not await store.cancel(running.id, now=T0 + 3)  # dispatching
    assert await store.get(running.id) == before
    assert not await store.cancel(queued.id, now=T0 + 3)  # already final
    assert await store.get(queued.id) == row
    assert not await store.cancel("q-" + "0" * 32, now=T0 + 3)


async def test_delete_finished_removes_only_final_items_finished_before(store: Store) -> None:
    old_done = await put(store, T0)
    new_done = await put(store, T0 + 1)
    live = await put(store, T0 + 2)
    late = await put(store, T0 + 3)
    assert await store.cancel(old_done.id, now=T0 + 10)
    assert await store.cancel(new_done.id, now=T0 + 20)
    assert (await claim_one(store, T0 + 30)).id == live.id
    assert await store.cancel(late.id, now=T0 + 31)
    # Now: old_done (final at 10), new_done (20), late (31); live is dispatching.

    assert await store.delete_finished(before=T0 + 20) == 1
    assert await store.get(old_done.id) is None
    assert await store.get(new_done.id) is not None
    assert await store.delete_finished(before=T0 + 1_000) == 2
    assert [i.id for i in await store.list_items()] == [live.id]
    assert await store.delete_finished(before=T0 + 1_000) == 0


# -- reads -------------------------------------------------------------------


async def test_list_items_pages_by_cursor_and_filters(store: Store) -> None:
    items = [await put(store, T0 + i, workspace="a" if i % 3 else "b") for i in range(25)]
    pages: list[list[Item]] = []
    after = 0
    while page := await store.list_items(limit=10, after=after):
        pages.append(page)
        after = page[-1].seq
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [i.id for p in pages for i in p] == [i.id for i in items]

    only_b = await store.list_items(workspace="b")
    assert [i.id for i in only_b] == [i.id for i in items if i.workspace == "b"]

    await claim(store, T0 + 100, workspace="a", limit=2)
    dispatching = await store.list_items(workspace="a", state="dispatching")
    assert [i.id for i in dispatching] == [i.id for i in items if i.workspace == "a"][:2]
    second_half = await store.list_items(workspace="a", state="queued", after=items[12].seq)
    assert [i.id for i in second_half] == [
        i.id for i in items if i.workspace == "a" and i.seq > items[12].seq
    ]
    assert await store.list_items(after=items[-1].seq) == []


def depth_view(store: Store, workspace: str) -> tuple[dict[int, int], int, int]:
    depth = store.depths.of(workspace)
    return dict(depth.queued), depth.queued_total, depth.dispatching


async def test_counts_and_the_depths_kept_in_commit_order(store: Store) -> None:
    assert await store.counts() == {}
    for i, p in enumerate([CRITICAL, TASK, TASK, INFO]):
        await put(store, T0 + i, workspace="a", priority=p)
    await put(store, T0, workspace="b", priority=INFO)
    await put(store, T0, workspace="b", priority=INFO)
    [taken] = await claim(store, T0 + 10, workspace="a")  # the critical one
    assert taken.priority == CRITICAL
    b_items = await store.list_items(workspace="b")
    assert await store.cancel(b_items[0].id, now=T0 + 11)

    assert await store.counts() == {
        "a": {"dispatching": 1, "queued": 3},
        "b": {"cancelled": 1, "queued": 1},
    }
    # The depths the writer kept as it committed, and a recount from the rows, agree.
    kept = depth_view(store, "a"), depth_view(store, "b"), store.depths.live_total
    assert kept == (({TASK: 2, INFO: 1}, 3, 1), ({INFO: 1}, 1, 0), 5)
    await store.recount()
    assert (depth_view(store, "a"), depth_view(store, "b"), store.depths.live_total) == kept


async def test_an_item_round_trips_every_field(store: Store) -> None:
    stored = await put(
        store,
        T0,
        caller="alice",
        method="SendMessage",
        body=b"\x00\xffbytes",
        headers={"A2A-Version": "1.0", "Accept": "text/event-stream"},
        message_id="m",
        context_id="c",
        request_id="7",
        priority=CRITICAL,
        ttl_seconds=30.0,
        expires_at=T0 + 30,
    )
    assert stored.id.startswith("q-")
    assert len(stored.id) == 34
    got = await store.get(stored.id)
    assert got == stored
    assert (got.body, got.headers, got.state, got.enqueued_at) == (
        b"\x00\xffbytes",
        {"A2A-Version": "1.0", "Accept": "text/event-stream"},
        "queued",
        T0,
    )
    assert await store.get("q-" + "f" * 32) is None


async def test_delete_finished_works_in_chunks(store: Store) -> None:
    for i in range(5):
        item = await put(store, T0 + i)
        assert await store.cancel(item.id, now=T0 + i)
    await put(store, T0 + 10)  # still queued: kept
    assert await store.delete_finished(before=T0 + 100, chunk=2) == 5
    assert await store.counts() == {WS: {"queued": 1}}


async def test_a_retried_old_item_answers_for_its_message_id(store: Store) -> None:
    """m fails as A, then again as B; A is retried. A new send of m is A (live),
    not a third row, which the live-message index would refuse."""
    first = await put(store, T0, message_id="m")
    claimed = await claim_one(store, T0)
    assert await store.settle(claimed.id, claimed.claim_token or "", state="failed", now=T0)
    second = await put(store, T0 + 1, message_id="m")
    assert second.id != first.id
    claimed = await claim_one(store, T0 + 1)
    assert await store.settle(claimed.id, claimed.claim_token or "", state="failed", now=T0 + 1)
    assert await store.retry(first.id, now=T0 + 2, max_age=3600) == "retried"

    again = await store.enqueue(new(message_id="m"), now=T0 + 3, replay_window=REPLAY)
    assert not again.created
    assert again.item.id == first.id


async def test_a_claim_whose_caller_was_cancelled_reports_what_it_took(store: Store) -> None:
    """A claimer cancelled while its claim waits for the writer is not told what the
    claim took; the claim commits all the same, and `if_cancelled` hears of it, so
    the items can be handed back instead of staying dispatching."""
    await put(store, T0)
    heard: list[list[Item]] = []
    claim = store.submit_claim(
        WS, now=T0 + 1, lease_seconds=60, promote_after=120, if_cancelled=heard.append
    )
    claim.cancel()  # before the writer ran the batch
    await store.recount()  # one more batch: the claim's has committed by now
    assert [[item.state for item in items] for items in heard] == [["dispatching"]]
    (taken,) = heard[0]
    assert taken.claim_token and await store.hand_back(taken.id, taken.claim_token, now=T0 + 2)


async def test_postgres_lost_and_back_fails_writes_clearly_then_reconnects() -> None:
    """The server stops at once (as a crash would) and comes back: meanwhile a write
    is StoreUnavailable with a Retry-After, never a driver's exception; afterwards
    the store writes and reads again by itself, and nothing committed is lost."""
    with PgServer() as server:
        async with PostgresStore(server.url, schema="lost") as s:
            await s.migrate()
            kept = await put(s, T0)
            version = await s.data_version()
            server.kill()
            with pytest.raises(StoreUnavailable) as refused:
                await put(s, T0 + 1)
            assert refused.value.retry_after is not None
            assert s.last_write_error is not None
            server.launch()
            await when_back(lambda: put(s, T0 + 2))
            assert s.last_write_error is None
            # A commit whose answer was lost may have happened: the daemon counts again.
            assert await s.data_version() != version
            got = await when_back(lambda: s.get(kept.id))
            assert got is not None and got.state == "queued"
            assert (await s.counts())[WS]["queued"] == 2


async def test_postgres_tend_analyzes_a_table_that_grew_and_leaves_a_quiet_one(
    pg_server: PgServer,
) -> None:
    """Autovacuum analyzes at most once a minute; a queue table outgrows its
    statistics faster than that, so the store analyzes it once enough changed."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    stats = (
        "SELECT n_mod_since_analyze, last_analyze IS NOT NULL FROM pg_stat_user_tables"
        " WHERE relid = 'items'::regclass"
    )
    async with PostgresStore(pg_server.url, schema=schema) as s:
        await s.migrate()
        options = f"-c search_path={schema}"
        with psycopg.connect(pg_server.url, autocommit=True, options=options) as other:
            await s.tend()
            assert other.execute(stats).fetchone() == (0, False)  # nothing to do
            other.execute(
                "INSERT INTO items (id, workspace, method, body, enqueued_at, updated_at)"
                " SELECT 'i' || g, 'w', 'message/send', '\\x7b7d', 0, 0"
                " FROM generate_series(1, 1500) g"
            )
            other.execute("SELECT pg_stat_force_next_flush()")
            other.execute("SELECT 1")  # the statistics of the insert reach the server
            for _ in range(50):
                await s.tend()
                row = other.execute(stats).fetchone()
                if row is not None and row[1]:
                    break
                await asyncio.sleep(0.1)
            assert row == (0, True)


async def test_postgres_read_only_server_is_store_unavailable_not_a_crash() -> None:
    """A server that turned read-only (a standby after a failover, a storage guard)
    is a store that cannot write, with its reason, until it writes again."""
    with PgServer() as server:
        async with PostgresStore(server.url, schema="ro") as s:
            await s.migrate()
            await put(s, T0)
            with psycopg.connect(server.url, autocommit=True) as admin:
                admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
                admin.execute("SELECT pg_reload_conf()")
                await asyncio.sleep(0.5)
                with pytest.raises(StoreUnavailable, match="read-only") as refused:
                    await put(s, T0 + 1)
                assert refused.value.retry_after
                assert "read-only" in (s.last_write_error or "")
                admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
                admin.execute("SELECT pg_reload_conf()")
            await asyncio.sleep(0.5)
            await put(s, T0 + 2)
            assert s.last_write_error is None
            assert (await s.counts())[WS]["queued"] == 2


async def test_postgres_owner_lock_is_taken_again_after_a_restart_or_refused() -> None:
    """The owner's lock is a session lock, gone with its connection when the server
    restarts. The owner takes it again before it writes again, so a second a2ad is
    refused afterwards; and an owner that finds it taken in the meantime by another
    writes nothing (StoreUnavailable that says why) instead of delivering beside it."""
    with PgServer() as server:
        async with PostgresStore(server.url, schema="own") as first:
            await first.migrate()
            await first.take_ownership()
            await put(first, T0)
            server.kill()
            server.launch()
            await when_back(lambda: put(first, T0 + 1))
            async with PostgresStore(server.url, schema="own") as second:
                with pytest.raises(StoreLocked, match="held by another a2ad"):
                    await second.take_ownership()

            server.kill()
            server.launch()
            async with PostgresStore(server.url, schema="own") as usurper:
                await when_back(usurper.take_ownership)  # while the first is not writing
                refusal = None
                for _ in range(3):  # the first write may only learn the connection broke
                    try:
                        await put(first, T0 + 2)
                    except StoreUnavailable as exc:
                        refusal = exc
                        if "held by another a2ad" in str(exc):
                            break
                assert refusal is not None and "held by another a2ad" in str(refusal)
                assert refusal.retry_after
                assert "held by another a2ad" in (first.last_write_error or "")
                await put(usurper, T0 + 3)
            # The other one gone (its session ends a moment after it closes), the
            # first takes its lock back and writes again.
            await when_back(lambda: put(first, T0 + 4))
            assert first.last_write_error is None
            assert (await first.counts())[WS]["queued"] == 4


async def test_postgres_owner_hears_other_processes_commits_not_its_own(
    pg_server: PgServer,
) -> None:
    """SQLite's data_version on PostgreSQL: the daemon's store (the owner) is told
    by NOTIFY of each commit another process (the queue CLI) makes, not of its own."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    async with PostgresStore(pg_server.url, schema=schema) as daemon:
        await daemon.migrate()
        await daemon.take_ownership()
        before = await daemon.data_version()
        item = await put(daemon, T0)
        await asyncio.sleep(0.3)
        assert await daemon.data_version() == before
        async with PostgresStore(pg_server.url, schema=schema) as cli:
            assert await cli.cancel(item.id, now=T0 + 1)
        for _ in range(50):
            if await daemon.data_version() != before:
                break
            await asyncio.sleep(0.02)
        assert await daemon.data_version() != before


async def test_two_writers_enqueue_one_message_id_once(store_pair: tuple[Store, Store]) -> None:
    """Two processes' writers receive the same messageId at once: one item, and every
    send is answered with it (the database's unique index over live items decides)."""
    a, b = store_pair
    for round_ in range(5):
        sends = [
            s.enqueue(new(message_id=f"same-{round_}"), now=T0, replay_window=REPLAY)
            for s in (a, b, a, b, a, b)
        ]
        results = await asyncio.gather(*sends)
        assert sum(r.created for r in results) == 1, round_
        assert len({r.item.id for r in results}) == 1, round_
    assert await a.counts() == {WS: {"queued": 5}}
