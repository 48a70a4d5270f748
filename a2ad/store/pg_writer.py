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
for that transaction. A store that does not own the database (the queue CLI)
also sends a NOTIFY with each batch, so the daemon listening there learns of its
commits, as SQLite's `data_version` tells it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from ..errors import StoreUnavailable
from .writer import Pending, hand_out

log = logging.getLogger("a2ad.store")

T = TypeVar("T")
PgOp = Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]


def is_store_failure(exc: BaseException) -> bool:
    """The server is gone, refuses, or is out of room: conditions of the store, not
    bugs (a constraint violation is a bug, or an op's own answer)."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


class _Retry(Exception):
    """An op failed without savepoints: the batch runs again with them."""


class PgWriter:
    """The batch loop on the writer connection."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]],
        *,
        synchronous: str,
        depths: Any,
        channel: str,
        instance: str,
    ) -> None:
        self._connect = connect
        self.synchronous = synchronous
        self.depths = depths
        self.channel = channel
        self.instance = instance
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._pending: list[Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._committing = False
        self.announce = True  # NOTIFY with each batch (off for the owning daemon)
        self.closing = False
        self.last_error: str | None = None
        self.commits = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="a2ad-store-writer")

    async def close(self) -> None:
        self.closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def idle(self) -> bool:
        """Nothing waits for the writer and no batch is being committed."""
        return not self._pending and not self._committing

    def submit(
        self,
        op: PgOp[Any],
        *,
        durable: bool = True,
        if_cancelled: Callable[[Any], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Run `op` in the next batch; the future of its outcome (of its value, for
        an op that returns Counted)."""
        if self.closing:
            raise StoreUnavailable("the store is closed", retry_after=1)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future, durable, if_cancelled))
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                if self.closing:
                    return
                continue
            batch, self._pending = self._pending, []
            self._committing = True
            try:
                await self._commit(batch)
            finally:
                self._committing = False
            if self._pending:
                self._wake.set()
            elif self.closing:
                return

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                await self._conn.close()
            self._conn = None
            self._conn = await self._connect()
        return self._conn

    async def _commit(self, batch: list[Pending]) -> None:
        durable = self.synchronous == "full" and any(d for _, _, d, _ in batch)
        try:
            conn = await self._connection()
            try:
                outcomes = await self._run_ops(conn, batch, durable, savepoints=False)
            except _Retry:
                outcomes = await self._run_ops(conn, batch, durable, savepoints=True)
        except Exception as exc:
            error: BaseException = exc
            if is_store_failure(exc):
                if self.last_error is None:
                    log.error("the store cannot write: %s", str(exc).strip())
                self.last_error = str(exc).strip()
                error = StoreUnavailable(
                    f"the store cannot write: {self.last_error}", retry_after=1
                )
            for _, future, _, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.commits += 1
        if self.last_error is not None:
            log.warning("the store writes again")
            self.last_error = None
        hand_out(batch, outcomes, self.depths)

    async def _run_ops(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: list[Pending],
        durable: bool,
        *,
        savepoints: bool,
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        async with conn.transaction():
            if durable:
                # A 202 waits for the flush; a delivery's steps need none (the
                # connection's default): a server crash can undo them, and the
                # item is delivered again, never lose an acknowledged one.
                await conn.execute("SET LOCAL synchronous_commit = on")
            for op, _, _, _ in batch:
                try:
                    if savepoints:
                        async with conn.transaction():
                            outcomes.append((True, await op(conn)))
                    else:
                        outcomes.append((True, await op(conn)))
                except Exception as exc:
                    if is_store_failure(exc):
                        raise
                    if not savepoints:
                        raise _Retry from exc
                    outcomes.append((False, exc))
            if self.announce:
                await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, self.instance))
        return outcomes
