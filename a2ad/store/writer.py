"""Group commit for SQLite: every write runs whole in one go on the writer
connection, and writes that arrive together share one transaction and one commit.

Each write is a function of the connection alone (one thread hop, since each
extra await inside a transaction costs about 100 µs); its caller's future
resolves only after the commit. A small batch made only of short ops marked
`on_loop` (a new item, a claim, an outcome) runs its statements on the event
loop and hops to the writer thread only for the COMMIT, where the fsync waits:
a thread running SQLite statements costs the event loop more in GIL hand-offs
than the statements themselves (bench/README.md). Any other batch runs whole on
the thread. Ops that change the queue return `Counted`, and the writer applies
their moves to the depths after the commit, in commit order, before it
resolves any future of the batch. Each batch first asks whether another
process (the queue CLI) committed since the last one; if so, it reads the live
items again in the same transaction (on the thread), so no move is ever
applied to counts that miss another process's change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar, cast

import aiosqlite

from ..errors import StoreUnavailable
from .depth import Counted, Depths, Snapshot

log = logging.getLogger("a2ad.store")

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]


def is_store_failure(exc: BaseException) -> bool:
    # Disk full, I/O errors, a lock held past busy_timeout, a read-only file:
    # conditions of the store, not bugs. Constraint violations are bugs.
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError)


def _run_batch(
    conn: sqlite3.Connection, ops: list[Op[Any]], synchronous: str | None
) -> tuple[list[tuple[bool, Any]], bool]:
    """Run every op in one transaction, then commit once (at `synchronous`, when
    given: the connection keeps it for later batches). An op that raises fails
    only its own caller: the batch then runs again with each op in a savepoint,
    a cost paid only on that rare path. Ops are functions of the database alone,
    so running one again after a rollback is safe.

    Also says whether the commit wrote anything: one that changed no row
    succeeds even on a full disk, so it proves nothing about the store."""
    if synchronous is not None:
        conn.execute(f"PRAGMA synchronous={synchronous}")
    changes = conn.total_changes
    try:
        conn.execute("BEGIN IMMEDIATE")
        results = _run_ops(conn, ops, savepoints=False)
        if results is None:  # rolled back: again, each op in a savepoint
            conn.execute("BEGIN IMMEDIATE")
            results = _run_ops(conn, ops, savepoints=True)
            assert results is not None
        conn.execute("COMMIT")
    except BaseException:
        _roll_back(conn)
        raise
    return results, conn.total_changes != changes


def _run_ops(
    conn: sqlite3.Connection, ops: list[Op[Any]], *, savepoints: bool
) -> list[tuple[bool, Any]] | None:
    """Run the ops in the transaction begun; None (rolled back) when one failed
    without savepoints."""
    results: list[tuple[bool, Any]] = []
    for op in ops:
        if savepoints:
            conn.execute("SAVEPOINT op")
        try:
            results.append((True, op(conn)))
        except Exception as exc:
            if is_store_failure(exc):
                raise
            if not savepoints:
                conn.execute("ROLLBACK")
                return None
            conn.execute("ROLLBACK TO op")
            results.append((False, exc))
        if savepoints:
            conn.execute("RELEASE op")
    return results


# The most a batch may write to run on the event loop. Statements on the loop
# stop everything else a2ad does while they run (some 35 µs a new item, and SQLite
# writes pages out once a transaction outgrows its page cache): 50 sends of 1 MiB
# in one batch held the loop 60 ms. A bigger batch runs on the thread.
LOOP_MAX_ROWS = 64
LOOP_MAX_BYTES = 256 * 1024


def on_loop(op: Op[T], *, rows: int = 1, size: int = 0) -> Op[T]:
    """Mark `op` as short and bounded: it writes `rows` rows through an index and
    `size` bytes of payload. A batch of such ops within LOOP_MAX_ROWS and
    LOOP_MAX_BYTES runs its statements on the event loop and only its COMMIT on
    the writer thread. Anything that may scan or change many rows stays unmarked."""
    op.loop_cost = (rows, size)  # type: ignore[attr-defined]
    return op


def loop_part(ops: list[Op[Any]]) -> int:
    """How many of `ops`, from the first, make a batch to run on the event loop:
    all of them when they are marked and within the limits, the most that are
    within them when more are waiting, 0 when an op not marked (or one bigger
    than the limits alone) comes first: then the batch runs on the thread."""
    rows = size = 0
    for n, op in enumerate(ops):
        cost: tuple[int, int] | None = getattr(op, "loop_cost", None)
        if cost is None:
            return 0
        rows += cost[0]
        size += cost[1]
        if rows > LOOP_MAX_ROWS or size > LOOP_MAX_BYTES:
            return n
    return len(ops)


def _commit_or_roll_back(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("COMMIT")
    except BaseException:
        _roll_back(conn)
        raise


def _roll_back(conn: sqlite3.Connection) -> None:
    """After a failure: end the transaction, unless SQLite already did."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


async def on_thread(conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run one function on the connection's own thread: a whole transaction in one hop."""
    return cast(T, await conn._execute(fn, *args))  # type: ignore[no-untyped-call]


# An op waiting for its batch: the op, its caller's future, whether it is durable,
# and what to do with its committed result if the caller cancelled the future.
# (SQLite's ops take a sqlite3 connection, PostgreSQL's an async psycopg one.)
Pending = tuple[Callable[[Any], Any], "asyncio.Future[Any]", bool, Callable[[Any], None] | None]


class Settled(asyncio.Future[T]):
    """A write's future its waiter cannot cancel. A caller cancelled while it
    waits is told (CancelledError) only once the write is settled, so the code
    after its await sees the outcome either way: cheaper than a shield, which
    costs every write a second future and a turn of the event loop."""

    def cancel(self, msg: Any = None) -> bool:
        return False


class BatchLoop:
    """What both stores' writers share: ops queue up while a batch commits, and the
    next batch takes all of them. `_commit` is the store's own."""

    def __init__(self, depths: Depths) -> None:
        self.depths = depths
        self._pending: list[Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._committing = False
        self.closing = False
        self.last_error: str | None = None
        self.commits = 0  # transactions committed by this process, for tests and metrics

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="a2ad-store-writer")

    async def close(self) -> None:
        """Commit what was submitted, then stop (at once, if the writer stopped already)."""
        self.closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None and not task.done():
            await task

    @property
    def idle(self) -> bool:
        """Nothing waits for the writer and no batch is being committed."""
        return not self._pending and not self._committing

    def submit(
        self,
        op: Callable[[Any], Any],
        *,
        durable: bool = True,
        if_cancelled: Callable[[Any], None] | None = None,
        settled: bool = False,
    ) -> asyncio.Future[Any]:
        """Run `op` in the next batch; the future of its outcome (its value, for an
        op that returns Counted). A durable write (a new item, an operator's
        change) is committed at the configured `synchronous`; the rest, a
        delivery's steps (claims, leases, outcomes, expiry), need no flush to
        disk: a power cut (or a database server's crash) can only undo a suffix
        of commits, so it can undo a delivery's steps, and the item is delivered
        again, but never an acknowledged item. A process crash loses none of
        them either way. `settled`: the future is a `Settled`, which its waiter
        cannot cancel."""
        if self.closing:
            raise StoreUnavailable("the store is closed", retry_after=1)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = Settled(loop=loop) if settled else loop.create_future()
        self._pending.append((op, future, durable, if_cancelled))
        self._wake.set()
        return future

    async def _run(self) -> None:
        batch: list[Pending] = []
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._pending:
                    if self.closing:
                        return
                    continue
                batch = self._take()
                self._committing = True
                try:
                    await self._commit(batch)
                finally:
                    self._committing = False
                if self._pending:
                    self._wake.set()
                elif self.closing:
                    return
        except BaseException:
            # The writer stops for good (cancelled, or a bug): no caller may wait
            # for it forever, least of all one whose future it cannot cancel (a
            # Settled). The batch being committed may or may not have landed.
            self.closing = True
            error = StoreUnavailable("the store's writer stopped", retry_after=1)
            for _, future, _, _ in [*batch, *self._pending]:
                if not future.done():
                    future.set_exception(error)
            self._pending = []
            raise

    def _take(self) -> list[Pending]:
        """The next batch: all that waits."""
        batch, self._pending = self._pending, []
        return batch

    async def _commit(self, batch: list[Pending]) -> None:
        raise NotImplementedError


class Writer(BatchLoop):
    """SQLite's batch loop on the writer connection."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        synchronous: str,
        depths: Depths,
        live_snapshot: Callable[[sqlite3.Connection], Snapshot],
    ) -> None:
        super().__init__(depths)
        self._conn = conn
        self.synchronous = synchronous
        self._live_snapshot = live_snapshot
        self._seen_version: int | None = None  # PRAGMA data_version at the last commit
        self._level: str | None = synchronous  # the connection's synchronous, if known
        self._busy_ms: int | None = None  # the connection's busy_timeout, once read

    def _resync(self, conn: sqlite3.Connection) -> Counted[int]:
        """The first op of each batch: the live items read again when another
        connection committed since this one last did (data_version moves then)."""
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        if version == self._seen_version:
            return Counted(version)
        return Counted(version, snapshot=self._live_snapshot(conn))

    def _take(self) -> list[Pending]:
        """Small ops that fit on the event loop go in batches within its limits
        (a burst of 200 sends: four transactions on the loop, each committed on
        the thread, rather than one of 200 on the thread); anything else, and
        all that waits with it, in one batch on the thread."""
        n = loop_part([op for op, _, _, _ in self._pending]) or len(self._pending)
        batch, self._pending = self._pending[:n], self._pending[n:]
        return batch

    def _begin_on_loop(self, conn: sqlite3.Connection) -> bool:
        """BEGIN IMMEDIATE on the event loop, if the write lock is free this
        instant; else False with nothing begun, and the batch goes to the thread,
        which may wait for the lock (busy_timeout)."""
        if self._busy_ms is None:
            self._busy_ms = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
        conn.execute("PRAGMA busy_timeout=0")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:  # any BUSY_*
                raise
            return False
        finally:
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        return True

    def _run_on_loop(
        self, conn: sqlite3.Connection, ops: list[Op[Any]]
    ) -> list[tuple[bool, Any]] | None:
        """The batch's statements on the event loop, its transaction left open for
        the COMMIT; None (rolled back, or never begun) when the batch must run on
        the thread instead: the lock is taken, another process committed since
        this writer last did (the thread reads the live items again), or an op
        failed and the batch runs again with savepoints."""
        if not self._begin_on_loop(conn):
            return None
        try:
            # data_version moves only with other connections' commits (SQLite's
            # pragma docs); read under the write lock, none can come in between.
            if conn.execute("PRAGMA data_version").fetchone()[0] != self._seen_version:
                conn.execute("ROLLBACK")
                return None
            return _run_ops(conn, ops, savepoints=False)
        except BaseException:
            _roll_back(conn)
            raise

    async def _commit(self, batch: list[Pending]) -> None:
        ops: list[Op[Any]] = [op for op, _, _, _ in batch]
        wanted = self.synchronous if any(d for _, _, d, _ in batch) else "normal"
        change = wanted if wanted != self._level else None
        # Unknown until the batch has run: a batch that fails part way must
        # not leave a level the next durable batch would wrongly trust.
        self._level = None
        conn = self._conn._conn
        seen: tuple[bool, Any] | None = None  # the resync's outcome, on the thread
        try:
            results: list[tuple[bool, Any]] | None = None
            if loop_part(ops) == len(ops):
                if change is not None:
                    conn.execute(f"PRAGMA synchronous={change}")
                    change = None
                changes = conn.total_changes
                results = self._run_on_loop(conn, ops)
            if results is not None:
                await on_thread(self._conn, _commit_or_roll_back, conn)
                wrote = conn.total_changes != changes
            else:
                outcomes, wrote = await on_thread(
                    self._conn, _run_batch, conn, [self._resync, *ops], change
                )
                seen, *results = outcomes
            self._level = wanted
        except Exception as exc:
            error: BaseException = exc
            if is_store_failure(exc):
                if self.last_error is None:
                    log.error("the store cannot write: %s", exc)
                self.last_error = str(exc)
                error = StoreUnavailable(f"the store cannot write: {exc}", retry_after=1)
            for _, future, _, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.commits += 1
        if wrote and self.last_error is not None:
            log.warning("the store writes again")
            self.last_error = None
        if seen is not None and seen[0]:  # another process's commits first, then the batch's
            self._seen_version = seen[1].applied(self.depths)
        hand_out(batch, results, self.depths)


def hand_out(batch: list[Pending], outcomes: list[tuple[bool, Any]], depths: Depths) -> None:
    """A committed batch's outcomes to their callers. The queue's counts change
    first, in commit order, before any caller of the batch (or anyone they wake)
    can look at them; a caller that stopped waiting is told through its
    `if_cancelled`, since the write stands."""
    results = []
    for ok, value in outcomes:
        if ok and isinstance(value, Counted):
            value = value.applied(depths)
        results.append((ok, value))
    for (_, future, _, if_cancelled), (ok, value) in zip(batch, results, strict=True):
        if future.done():
            if ok and future.cancelled() and if_cancelled is not None:
                if_cancelled(value)
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
