"""Group commit for PostgreSQL: writes that arrive together share one transaction
and one COMMIT on the writer connection.

The same contract as SQLite's writer (writer.py): each op is a function of the
connection, its caller's future resolves only after the commit, and the moves
of ops that change the queue are applied to the depths after the commit, in
commit order, before any future of the batch resolves. An op that fails (a
constraint) fails only its own caller: the batch runs again with each op in a
savepoint, a cost paid only on that rare path. A lost connection fails the
batch with StoreUnavailable and the next batch connects again.

The writer connection's own default is `synchronous_commit = off`: a delivery's
steps (claims, outcomes, leases) commit without waiting for the flush, and only
a batch holding a durable write (a new item, an operator's change) sets it on,
for that transaction. The queue CLI, and a replica while others are live, sends a
NOTIFY with a batch that made items due, freed slots or finished items, naming
them, so the processes listening there learn of its commits, as SQLite's
`data_version` tells.

One-statement ops that need no flush (claims, outcomes, slots taken and
returned) run each on its own, outside the batch's transaction: a replica's
batch then never holds one workspace's slot row while it waits for another's,
which another replica's batch may hold in the other order (a deadlock).

The advisory locks a writer needs (a replica's shared one and its name's, or a
sole owner's) live on the writer connection itself: a connection that writes
is one that holds them. When the connection is lost (a server restart) they go
with it, and the next connection takes them again before its first write; if
another process took one in between, this one writes nothing (StoreUnavailable,
and /readyz says why) rather than run beside it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import psycopg
import psycopg.errors

from ..errors import StoreUnavailable
from .depth import Counted, Depths
from .models import FINAL_STATES
from .pg_slots import FreeSlots, TakeSlot, free_slots, take_slots
from .pg_sql import Enqueue, enqueue_many, past_caps
from .writer import BatchLoop, Pending, hand_out

log = logging.getLogger("a2ad.store")

T = TypeVar("T")
PgOp = Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]


# Conditions of the server that an operator mends, not bugs (a constraint
# violation is a bug, or an op's own answer): gone, refusing, out of room, read-only
# (a standby after a failover, a storage guard), or the role's rights taken away.
STORE_FAILURES = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.InsufficientPrivilege,
)


def is_store_failure(exc: BaseException) -> bool:
    return isinstance(exc, STORE_FAILURES)


def recount_elsewhere(op: PgOp[T]) -> PgOp[T]:
    """Mark `op` as changing the queue in a way its result does not say (a delete,
    a purge): the processes listening count the queue again."""
    op.recount_elsewhere = True  # type: ignore[attr-defined]
    return op


def one_statement(op: PgOp[T]) -> PgOp[T]:
    """Mark `op` as a single statement: alone in its batch it runs without a
    transaction around it (PostgreSQL makes the statement one), which saves the
    BEGIN and COMMIT round trips of a claim or an outcome under a deep backlog."""
    op.one_statement = True  # type: ignore[attr-defined]
    return op


class OwnerLost(StoreUnavailable):
    """Another process holds a lock this writer needs."""


@dataclass(frozen=True, slots=True)
class AdvisoryLock:
    """A session advisory lock the writer connection holds while it writes."""

    key: str
    shared: bool
    refusal: str  # what to say when another process holds it


IDLE_CHECK_SECONDS = 1.0  # a connection idle longer is checked before a batch
DEADLOCK_TRIES = 3  # a write PostgreSQL undid to break a deadlock runs again
MAX_PAYLOAD = 7000  # NOTIFY's payload is under 8000 bytes
# Marks in a note (a workspace id cannot start with either): an item id, and a
# workspace whose queue changed (not only its slots).
FINISHED = "="
CHANGED = "+"


def change_note(
    instance: str, changed: Iterable[str], freed: Iterable[str], finished: Iterable[str]
) -> str:
    """The payload of a commit's NOTIFY: its sender, the workspaces whose queue
    it changed (marked CHANGED), those where it only freed slots, the items it
    finished (marked FINISHED); what does not fit is left out (a listener told
    nothing counts again, and a waiter reads again within a second)."""
    named = [*(CHANGED + w for w in sorted(changed)), *sorted(freed)]
    payload = " ".join([instance, *named, *(FINISHED + i for i in finished)])
    if len(payload) > MAX_PAYLOAD:
        payload = " ".join([instance, *named])
    if len(payload) > MAX_PAYLOAD:
        payload = instance
    return payload


class _Retry(Exception):
    """An op failed without savepoints: the batch runs again with them."""


class PgWriter(BatchLoop):
    """PostgreSQL's batch loop on the writer connection."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]],
        *,
        synchronous: str,
        depths: Depths,
        channel: str,
        instance: str,
    ) -> None:
        super().__init__(depths)
        self._connect = connect
        self.synchronous = synchronous
        self.channel = channel
        self.instance = instance
        self.announce = True  # NOTIFY with each batch (off for a sole owner)
        # Advisory locks the connection must hold before it writes: (key, shared,
        # what to say when another process holds it).
        self.locks: list[AdvisoryLock] = []
        self.touched: set[str] = set()  # workspaces where a batch freed slots (NOTIFY)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._holds_lock = False
        self.recoveries = 0  # times it wrote again after failing
        self._used = 0.0  # monotonic time the connection last ran a batch
        self.suspect = False  # another connection saw the server go: check this one

    async def close(self) -> None:
        await super().close()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        idle = time.monotonic() - self._used > IDLE_CHECK_SECONDS
        if self._conn is not None and (self.suspect or idle):
            # The server may have restarted while it sat idle, and psycopg only
            # learns that from a failed statement: a cheap one, not a send's.
            self.suspect = False
            with contextlib.suppress(psycopg.Error):  # broken now: connect again below
                await self._conn.execute("SELECT 1")
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                await self._conn.close()
            self._conn = None
            self._holds_lock = False
            self._conn = await self._connect()
        if self.locks and not self._holds_lock:
            for lock in self.locks:
                take = "pg_try_advisory_lock_shared" if lock.shared else "pg_try_advisory_lock"
                cursor = await self._conn.execute(
                    f"SELECT {take}(hashtextextended(%s, 0))", (lock.key,)
                )
                row = await cursor.fetchone()
                if not (row and row[0]):
                    # Those taken already go with the connection.
                    await self._conn.close()
                    self._conn = None
                    raise OwnerLost(lock.refusal, retry_after=5)
            self._holds_lock = True
        self._used = time.monotonic()
        return self._conn

    async def _commit(self, batch: list[Pending]) -> None:
        """Run a batch: each one-statement op that needs no flush (a claim, an
        outcome, a slot taken or returned) on its own, as PostgreSQL commits a
        lone statement, so it holds its row locks for that statement only (two
        replicas' batches could otherwise take two workspaces' slot rows in
        opposite orders and deadlock); the rest in one transaction, and one COMMIT
        for all the batch's durable writes. Ops that ran are answered even when a
        later one finds the server gone. Outcomes apply to the counts in the order
        the ops committed: the lone ones first (a recount in the transaction has
        counted them already)."""
        alone = [
            i
            for i, (op, _, durable, _) in enumerate(batch)
            if getattr(op, "one_statement", False) and not durable
        ]
        together = [i for i in range(len(batch)) if i not in set(alone)]
        outcomes: list[tuple[bool, Any] | None] = [None] * len(batch)
        try:
            conn = await self._connection()
            await self._run_alone_ops(conn, batch, alone, outcomes)
            if together:

                async def announce(part_outcomes: list[tuple[bool, Any]]) -> None:
                    # Inside the transaction: sent with its COMMIT, no round trip more.
                    merged = list(outcomes)
                    for i, outcome in zip(together, part_outcomes, strict=True):
                        merged[i] = outcome
                    await self._announce(conn, batch, merged)

                part = [batch[i] for i in together]
                done = await self._run_together(conn, part, announce)
                for i, outcome in zip(together, done, strict=True):
                    outcomes[i] = outcome
            else:
                await self._announce(conn, batch, outcomes)
        except Exception as exc:
            self._failed(batch, outcomes, exc, alone + together)
            return
        self._committed()
        order = alone + together
        hand_out([batch[i] for i in order], [outcomes[i] for i in order], self.depths)  # type: ignore[misc]

    def _committed(self) -> None:
        self.commits += 1
        if self.last_error is not None:
            log.warning("the store writes again")
            self.last_error = None
            self.recoveries += 1

    def _failed(
        self,
        batch: list[Pending],
        outcomes: list[tuple[bool, Any] | None],
        exc: Exception,
        order: list[int],
    ) -> None:
        """The ops that ran are answered, in the order they committed; the others
        fail with `exc`, as StoreUnavailable when the server is the cause."""
        ran = [i for i in order if outcomes[i] is not None]
        if ran:
            self._committed()
            hand_out([batch[i] for i in ran], [outcomes[i] for i in ran], self.depths)  # type: ignore[misc]
        error: BaseException = exc
        cause = str(exc).strip()
        if is_store_failure(exc):
            error = StoreUnavailable(f"the store cannot write: {cause}", retry_after=1)
        if isinstance(exc, OwnerLost) and not self.commits:
            pass  # refused at start-up: take_ownership's caller says so
        elif isinstance(error, StoreUnavailable):
            if self.last_error != cause:  # once per cause, not once per batch
                log.error("the store cannot write: %s", cause)
            self.last_error = cause
        for i, (_, future, _, _) in enumerate(batch):
            if outcomes[i] is None and not future.done():
                future.set_exception(error)

    async def _run_together(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: list[Pending],
        before_commit: Callable[[list[tuple[bool, Any]]], Awaitable[None]],
    ) -> list[tuple[bool, Any]]:
        """Ops in one transaction (savepoints when one fails), again after a
        deadlock with another replica's transaction (PostgreSQL undid this one)."""
        durable = self.synchronous == "full" and any(d for _, _, d, _ in batch)
        for attempt in range(1, DEADLOCK_TRIES + 1):
            try:
                try:
                    return await self._run_ops(
                        conn, batch, durable, before_commit, savepoints=False
                    )
                except _Retry:
                    return await self._run_ops(conn, batch, durable, before_commit, savepoints=True)
            except psycopg.errors.DeadlockDetected:
                if attempt == DEADLOCK_TRIES:
                    raise
                log.info("a write deadlocked with another replica's; running it again")
        raise AssertionError("unreachable")

    async def _run_alone_ops(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: list[Pending],
        alone: list[int],
        outcomes: list[tuple[bool, Any] | None],
    ) -> None:
        """The batch's one-statement ops: slot returns first, all in one statement
        (a slot they free can serve the takes), then the takes of each workspace
        in one statement, then the others one by one, in order."""
        frees: list[FreeSlots] = []
        takes: dict[Any, list[TakeSlot]] = {}
        others: list[tuple[int, PgOp[Any]]] = []
        place: dict[int, int] = {}  # id(op) → its index in the batch
        for i in alone:
            op = batch[i][0]
            place[id(op)] = i
            if isinstance(op, FreeSlots):
                frees.append(op)
            elif isinstance(op, TakeSlot):
                takes.setdefault(op.key, []).append(op)
            else:
                others.append((i, op))
        if frees:
            done = await self._run_alone(partial(free_slots, conn, frees))
            for free in frees:
                outcomes[place[id(free)]] = done
        for group in takes.values():
            ok, taken = await self._run_alone(partial(take_slots, conn, group))
            for take in group:
                outcomes[place[id(take)]] = (True, take.token in taken) if ok else (False, taken)
        for i, op in others:
            outcomes[i] = await self._run_alone(partial(op, conn))

    async def _run_alone(self, run: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """One statement on its own, committed by PostgreSQL as it runs (the
        connection is in autocommit; its default synchronous_commit is off); again
        when PostgreSQL undid it to break a deadlock."""
        for attempt in range(1, DEADLOCK_TRIES + 1):
            try:
                return (True, await run())
            except psycopg.errors.DeadlockDetected as exc:
                if attempt == DEADLOCK_TRIES:
                    cause = f"the store cannot write: {str(exc).strip()}"
                    return (False, StoreUnavailable(cause, retry_after=1))
            except Exception as exc:
                if is_store_failure(exc):
                    raise
                return (False, exc)
        raise AssertionError("unreachable")

    async def _announce(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: list[Pending],
        outcomes: list[tuple[bool, Any] | None],
    ) -> None:
        """Tell the processes listening there of what the batch committed: the
        queue CLI's to the daemon, a replica's to the others. It names the
        workspaces whose queue changed (they count again) or where only a slot was
        freed, so their pumps look at once, and the items it finished, so whoever
        waits for one there answers at once; one with an op that changed the
        queue in a way moves do not say (a delete, a purge) makes them count
        again. Claims, renewals and the like tell nothing."""
        if not self.announce:
            return
        freed = self.touched
        self.touched = set()
        changed: set[str] = set()
        finished = []
        recount = False
        for (op, _, _, _), outcome in zip(batch, outcomes, strict=True):
            if outcome is None or not outcome[0]:
                continue
            recount = recount or getattr(op, "recount_elsewhere", False)
            if isinstance(outcome[1], Counted):
                for move in outcome[1].moves:
                    if move.new != "dispatching":  # a claim frees nothing, adds no work
                        changed.add(move.workspace)
                    if move.new in FINAL_STATES:
                        finished.append(move.item_id)
        if not (changed or freed or recount):
            return
        payload = change_note(self.instance, changed, freed - changed, finished)
        await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))

    async def _run_ops(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: list[Pending],
        durable: bool,
        before_commit: Callable[[list[tuple[bool, Any]]], Awaitable[None]],
        *,
        savepoints: bool,
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(batch)
        async with conn.transaction():
            if durable:
                # A 202 waits for the flush; a delivery's steps need none (the
                # connection's default): a server crash can undo them, and the
                # item is delivered again, never lose an acknowledged one.
                await conn.execute("SET LOCAL synchronous_commit = on")
            capped = [
                (i, p[0])
                for i, p in enumerate(batch)
                if isinstance(p[0], Enqueue) and p[0].caps != (None, None)
            ]
            refused = await past_caps(conn, capped) if capped else {}
            for index, error in refused.items():
                outcomes[index] = (False, error)
            # Without savepoints, a batch's sends go in one statement, where the last
            # of them stands in the batch (ops before it do not see them, ops after
            # it see them all, so the moves apply in order).
            sends = [
                i
                for i, p in enumerate(batch)
                if isinstance(p[0], Enqueue) and i not in refused and not savepoints
            ]
            last_send = sends[-1] if sends else -1
            deferred = set(sends[:-1]) | set(refused)
            group: list[Enqueue] = [batch[i][0] for i in sends]  # type: ignore[misc]
            for index, (op, _, _, _) in enumerate(batch):
                if index in deferred:
                    continue
                try:
                    if index == last_send:
                        answers = await enqueue_many(conn, group)
                        for i, answer in zip(sends, answers, strict=True):
                            outcomes[i] = (True, answer)
                    elif savepoints:
                        async with conn.transaction():
                            outcomes[index] = (True, await op(conn))
                    else:
                        outcomes[index] = (True, await op(conn))
                except Exception as exc:
                    if is_store_failure(exc):
                        raise
                    if not savepoints:
                        raise _Retry from exc
                    outcomes[index] = (False, exc)
            await before_commit(outcomes)
        return outcomes
