"""SQLite store: every SQL statement a2ad runs, behind one class.

One writer connection and one reader connection, each on its own aiosqlite
thread. Every write is a function that runs whole on the writer thread (one
hop, since each extra await inside a transaction costs about 100 µs), and
writes that arrive together share one transaction and one commit (group
commit): each caller's future resolves only after that commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import aiosqlite

from .errors import StoreUnavailable
from .ids import random_hex

log = logging.getLogger("a2ad.store")

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]

LIVE_STATES = ("queued", "dispatching")
FINAL_STATES = ("delivered", "failed", "expired", "cancelled")
STATES = LIVE_STATES + FINAL_STATES
State = Literal["queued", "dispatching", "delivered", "failed", "expired", "cancelled"]

PRIORITIES = {"critical": 100, "task": 50, "info": 10}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}
# Promotion moves an item up one level per full promote_after_seconds waited.
_LEVEL = "(CASE priority WHEN 100 THEN 2 WHEN 50 THEN 1 ELSE 0 END)"


def new_queue_id() -> str:
    """`q-` + 32 hex digits: 13 of a microsecond timestamp, then 76 random bits. Ids
    that grow with time land at the end of the id index, so inserts and look-ups
    stay on hot pages however many items the store holds."""
    return f"q-{time.time_ns() // 1000:013x}{random_hex(76)}"


@dataclass(frozen=True, slots=True)
class NewItem:
    """What the proxy hands the store to enqueue."""

    workspace: str
    method: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    caller: str = ""
    message_id: str | None = None
    context_id: str | None = None
    request_id: str | None = None
    priority: int = 50
    ttl_seconds: float | None = None
    expires_at: float | None = None
    busy_answers: int = 0  # the agent already said busy on the direct path
    id: str = field(default_factory=new_queue_id)


@dataclass(frozen=True, slots=True)
class Item:
    """One stored row."""

    seq: int
    id: str
    workspace: str
    caller: str
    method: str
    body: bytes
    headers: dict[str, str]
    message_id: str | None
    context_id: str | None
    request_id: str | None
    priority: int
    state: State
    attempts: int
    busy_answers: int
    ttl_seconds: float | None
    not_before: float
    expires_at: float | None
    lease_until: float | None
    claim_token: str | None
    result: bytes | None
    last_error: str | None
    agent_task_id: str | None
    agent_context_id: str | None
    enqueued_at: float
    updated_at: float
    finished_at: float | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Item:
        """An item from a row selected as ITEM_COLUMNS. By position, not by name:
        a third of the time, and claims build thousands a second."""
        values = list(row)
        values[_HEADERS] = json.loads(values[_HEADERS])
        values[_BODY] = bytes(values[_BODY])
        if values[_RESULT] is not None:
            values[_RESULT] = bytes(values[_RESULT])
        return cls(*values)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


ITEM_FIELDS = tuple(f.name for f in fields(Item))
ITEM_COLUMNS = ", ".join(ITEM_FIELDS)  # what every query that builds an Item selects
_HEADERS, _BODY, _RESULT = (ITEM_FIELDS.index(name) for name in ("headers", "body", "result"))


@dataclass(frozen=True, slots=True)
class Enqueued:
    item: Item
    created: bool  # False: an existing item answered for this messageId


@dataclass(frozen=True, slots=True)
class Released:
    """An item a sweep moved out of `dispatching` or `queued`."""

    id: str
    workspace: str
    state: State


class StoreLocked(Exception):
    """Another process owns this store."""


class StoreLock:
    """The exclusive lock on `<store.path>.lock` that makes one process the owner."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.path = Path(f"{os.fspath(db_path)}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(
                f"{self.path} is held by another a2ad (pid {holder}); "
                "stop it first, or give this one another store.path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def bundled_migrations() -> list[Migration]:
    """The numbered migrations shipped in a2ad/migrations, in order."""
    folder = resources.files("a2ad") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def _is_store_failure(exc: BaseException) -> bool:
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
        results = _run_ops(conn, ops, savepoints=False)
        if results is None:
            results = _run_ops(conn, ops, savepoints=True)
            assert results is not None
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return results, conn.total_changes != changes


def _run_ops(
    conn: sqlite3.Connection, ops: list[Op[Any]], *, savepoints: bool
) -> list[tuple[bool, Any]] | None:
    """Begin and run the ops; None (rolled back) when one failed without savepoints."""
    results: list[tuple[bool, Any]] = []
    conn.execute("BEGIN IMMEDIATE")
    for op in ops:
        if savepoints:
            conn.execute("SAVEPOINT op")
        try:
            results.append((True, op(conn)))
        except Exception as exc:
            if _is_store_failure(exc):
                raise
            if not savepoints:
                conn.execute("ROLLBACK")
                return None
            conn.execute("ROLLBACK TO op")
            results.append((False, exc))
        if savepoints:
            conn.execute("RELEASE op")
    return results


async def _on_thread(conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run one function on the connection's own thread: a whole transaction in one hop."""
    return cast(T, await conn._execute(fn, *args))  # type: ignore[no-untyped-call]


async def _connect(path: str, synchronous: str, busy_timeout: float) -> aiosqlite.Connection:
    def configure() -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        # The WAL file shrinks back to this after a checkpoint instead of keeping
        # the size of the largest burst.
        conn.execute("PRAGMA journal_size_limit=16777216")
        return conn

    conn = aiosqlite.Connection(configure, iter_chunk_size=64)
    try:
        return await conn
    except BaseException:
        # aiosqlite stops its thread on a failed connect without waiting for it;
        # wait here, or the thread reports to an event loop that may be gone.
        await asyncio.get_running_loop().run_in_executor(None, conn._thread.join, 5.0)
        raise


# The best `limit` due items of one workspace: each priority's oldest `limit`, ordered
# by the level they have risen to by waiting, then age. Within a priority an older
# item has risen at least as far, so each priority's oldest `limit` hold its best.
_CLAIM_HEAD = """
    SELECT * FROM (SELECT seq, priority, enqueued_at FROM items
        WHERE workspace = :workspace AND state = 'queued' AND priority = {priority}
          AND not_before <= :now AND (expires_at IS NULL OR expires_at > :now)
        ORDER BY seq LIMIT :limit)"""

_CLAIMABLE = f"""
SELECT seq FROM ({" UNION ALL ".join(_CLAIM_HEAD.format(priority=p) for p in (100, 50, 10))})
ORDER BY MIN(2, {_LEVEL} + CAST((:now - enqueued_at) / :promote_after AS INTEGER)) DESC, seq
LIMIT :limit
"""

# All of them in one statement, each with its own token (a claim of 8 items took
# 250 µs as 8 claims of one, which each ran the best-of-three lookup, and 208 µs so).
_CLAIM = """
UPDATE items
SET state = 'dispatching', claim_token = lower(hex(randomblob(16))), lease_until = ?,
    updated_at = ?
WHERE seq IN ({marks}) AND state = 'queued'
RETURNING {columns}
"""

_INSERT = """
INSERT INTO items (id, workspace, caller, method, body, headers, message_id, context_id,
                   request_id, priority, ttl_seconds, expires_at, busy_answers,
                   enqueued_at, updated_at)
VALUES (:id, :workspace, :caller, :method, :body, :headers, :message_id, :context_id,
        :request_id, :priority, :ttl_seconds, :expires_at, :busy_answers, :now, :now)
"""

# Items whose claimer is gone go back to queued with an attempt counted, or
# end in failed once the attempts are spent, so an agent that crashes on a
# message cannot loop on it forever.
_RELEASE_DISPATCHING = """
UPDATE items
SET attempts = attempts + 1,
    state = CASE WHEN attempts + 1 >= :max_attempts THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN attempts + 1 >= :max_attempts THEN :now END,
    last_error = :reason, claim_token = NULL, lease_until = NULL, updated_at = :now
WHERE state = 'dispatching' {condition}
RETURNING id, workspace, state
"""


class Store:
    """The SQLite store. `open()` it, `migrate()` it, use it, `close()` it."""

    def __init__(self, path: str, *, synchronous: str = "full", busy_timeout: float = 5.0):
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._pending: list[tuple[Op[Any], asyncio.Future[Any], bool]] = []
        self._writer_synchronous: str | None = synchronous
        self._wake = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False
        self.last_write_error: str | None = None
        self.commits = 0  # transactions committed by this process, for tests and metrics

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            self._writer = await _connect(self.path, self.synchronous, self.busy_timeout)
            self._reader = await _connect(self.path, self.synchronous, self.busy_timeout)
        except sqlite3.Error as exc:
            if self._writer is not None:
                await self._writer.close()
                self._writer = None
            raise StoreUnavailable(f"cannot open the store {self.path}: {exc}") from None
        self._writer_task = asyncio.create_task(self._run_writer(), name="a2ad-store-writer")

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._writer_task is not None:
            await self._writer_task
            self._writer_task = None
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the two hops --------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        reader = self._reader
        assert reader is not None, "store is not open"
        try:
            return await _on_thread(reader, fn, reader._conn)
        except sqlite3.Error as exc:
            if _is_store_failure(exc):
                raise StoreUnavailable(f"the store cannot be read: {exc}", retry_after=1) from exc
            raise

    async def _write(self, op: Op[T], *, durable: bool = True) -> T:
        """Run `op` in the next batch. A durable write (a new item, an operator's
        change) is committed at the configured `synchronous`; the rest, a
        delivery's steps (claims, leases, outcomes, expiry), need no fsync: a
        power cut can only undo a suffix of commits (the WAL is written in
        order and every durable commit syncs all before it), so it can undo a
        delivery's steps, and the item is delivered again, but never an
        acknowledged item. A process crash loses none of them either way."""
        return await self._submit(op, durable=durable)

    def _submit(self, op: Op[T], *, durable: bool = True) -> asyncio.Future[T]:
        """`_write` without the coroutine: the future of `op`'s outcome."""
        if self._closing or self._writer is None:
            raise StoreUnavailable("the store is closed", retry_after=1)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future, durable))
        self._wake.set()
        return future

    async def _run_writer(self) -> None:
        writer = self._writer
        assert writer is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                if self._closing:
                    return
                continue
            batch, self._pending = self._pending, []
            ops = [op for op, _, _ in batch]
            durable = any(d for _, _, d in batch)
            wanted = self.synchronous if durable else "normal"
            change = wanted if wanted != self._writer_synchronous else None
            # Unknown until the batch has run: a batch that fails part way must
            # not leave a level the next durable batch would wrongly trust.
            self._writer_synchronous = None
            try:
                outcomes, wrote = await _on_thread(writer, _run_batch, writer._conn, ops, change)
                self._writer_synchronous = wanted
            except Exception as exc:
                error: BaseException = exc
                if _is_store_failure(exc):
                    if self.last_write_error is None:
                        log.error("the store cannot write: %s", exc)
                    self.last_write_error = str(exc)
                    error = StoreUnavailable(f"the store cannot write: {exc}", retry_after=1)
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                self.commits += 1
                if wrote and self.last_write_error is not None:
                    log.warning("the store writes again")
                    self.last_write_error = None
                for (_, future, _), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
            if self._pending:
                self._wake.set()
            elif self._closing:
                return

    async def probe_write(self, now: float) -> None:
        """One small real write: succeeds once the store can write again."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO write_probe (id, at) VALUES (1, ?)", (now,))

        await self._write(op)

    # -- migrations --------------------------------------------------------

    async def schema_version(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            ).fetchone()
            if not exists:
                return 0
            row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            return int(row[0] or 0)

        return await self._read(read)

    async def migrate(self, migrations: Iterable[Migration] | None = None) -> list[Migration]:
        """Apply the migrations the database has not seen, in order; return them."""
        pending = sorted(
            migrations if migrations is not None else bundled_migrations(),
            key=lambda m: m.version,
        )
        writer = self._writer
        assert writer is not None

        def apply(conn: sqlite3.Connection, now: float) -> list[Migration]:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            applied = []
            for migration in pending:
                if migration.version in done:
                    continue
                try:
                    # The transaction around the file's statements makes each
                    # migration all or nothing, its record included.
                    conn.executescript(f"BEGIN IMMEDIATE;\n{migration.sql}\n;")
                    conn.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                        (migration.version, migration.name, now),
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                applied.append(migration)
            return applied

        return await _on_thread(writer, apply, writer._conn, time.time())

    # -- writes ------------------------------------------------------------

    async def enqueue(self, new: NewItem, *, now: float, replay_window: float) -> Enqueued:
        """Store a new item, or answer with the live (or recently delivered) one
        that already has this messageId."""
        return await self.submit_enqueue(new, now=now, replay_window=replay_window)

    def submit_enqueue(
        self, new: NewItem, *, now: float, replay_window: float
    ) -> asyncio.Future[Enqueued]:
        """`enqueue` as a future, which a caller can shield without a task of its own."""

        def op(conn: sqlite3.Connection) -> Enqueued:
            if new.message_id is not None:
                row = conn.execute(
                    # The live row first: a retried old item can be live while a
                    # newer one with the same messageId has failed.
                    f"SELECT {ITEM_COLUMNS} FROM items"
                    " WHERE workspace = ? AND caller = ? AND message_id = ?"
                    " ORDER BY state IN ('queued', 'dispatching') DESC, seq DESC LIMIT 1",
                    (new.workspace, new.caller, new.message_id),
                ).fetchone()
                if row is not None:
                    state, finished = row["state"], row["finished_at"]
                    replayable = state == "delivered" and finished >= now - replay_window
                    if state in LIVE_STATES or replayable:
                        return Enqueued(Item.from_row(row), created=False)
            values = {
                "id": new.id,
                "workspace": new.workspace,
                "caller": new.caller,
                "method": new.method,
                "body": new.body,
                "headers": json.dumps(new.headers),
                "message_id": new.message_id,
                "context_id": new.context_id,
                "request_id": new.request_id,
                "priority": new.priority,
                "ttl_seconds": new.ttl_seconds,
                "expires_at": new.expires_at,
                "busy_answers": new.busy_answers,
                "now": now,
            }
            seq = conn.execute(_INSERT, values).lastrowid
            assert seq is not None
            # The row as stored, built here rather than read back: the hot path.
            item = Item(
                seq=seq,
                id=new.id,
                workspace=new.workspace,
                caller=new.caller,
                method=new.method,
                body=new.body,
                headers=dict(new.headers),
                message_id=new.message_id,
                context_id=new.context_id,
                request_id=new.request_id,
                priority=new.priority,
                state="queued",
                attempts=0,
                busy_answers=new.busy_answers,
                ttl_seconds=new.ttl_seconds,
                not_before=0.0,
                expires_at=new.expires_at,
                lease_until=None,
                claim_token=None,
                result=None,
                last_error=None,
                agent_task_id=None,
                agent_context_id=None,
                enqueued_at=now,
                updated_at=now,
                finished_at=None,
            )
            return Enqueued(item, created=True)

        return self._submit(op)

    async def claim(
        self,
        workspace: str,
        *,
        now: float,
        lease_seconds: float,
        promote_after: float,
        limit: int = 1,
    ) -> list[Item]:
        """Claim up to `limit` due items of one workspace, best first, each with its own token."""

        def op(conn: sqlite3.Connection) -> list[Item]:
            where = {"workspace": workspace, "now": now, "promote_after": promote_after}
            seqs = [row[0] for row in conn.execute(_CLAIMABLE, {**where, "limit": limit})]
            if not seqs:
                return []
            sql = _CLAIM.format(marks=", ".join("?" * len(seqs)), columns=ITEM_COLUMNS)
            rows = conn.execute(sql, (now + lease_seconds, now, *seqs)).fetchall()
            rank = {seq: i for i, seq in enumerate(seqs)}  # RETURNING keeps no order
            return sorted((Item.from_row(row) for row in rows), key=lambda i: rank[i.seq])

        return await self._write(op, durable=False)

    async def renew(self, claims: dict[str, str], *, lease_until: float, now: float) -> set[str]:
        """Extend the leases of these claims (item id → token) in one transaction;
        the ids whose claim is no longer theirs."""

        def op(conn: sqlite3.Connection) -> set[str]:
            lost = set()
            for item_id, token in claims.items():
                changed = conn.execute(
                    "UPDATE items SET lease_until = ?, updated_at = ?"
                    " WHERE id = ? AND claim_token = ? AND state = 'dispatching'",
                    (lease_until, now, item_id, token),
                ).rowcount
                if not changed:
                    lost.add(item_id)
            return lost

        return await self._write(op, durable=False)

    async def settle(
        self,
        item_id: str,
        token: str,
        *,
        state: State,
        now: float,
        result: bytes | None = None,
        last_error: str | None = None,
        agent_task_id: str | None = None,
        agent_context_id: str | None = None,
        attempt_used: bool = False,
    ) -> bool:
        """End a claim in a final state; False (and nothing written) for a stale token."""
        assert state in FINAL_STATES
        return await self._write_checked(
            "UPDATE items SET state = ?, result = ?, last_error = ?, agent_task_id = ?,"
            " agent_context_id = ?, attempts = attempts + ?, finished_at = ?, updated_at = ?,"
            " claim_token = NULL, lease_until = NULL"
            " WHERE id = ? AND claim_token = ? AND state = 'dispatching'",
            (
                state,
                result,
                last_error,
                agent_task_id,
                agent_context_id,
                int(attempt_used),
                now,
                now,
                item_id,
                token,
            ),
            durable=False,
        )

    async def hand_back(
        self,
        item_id: str,
        token: str,
        *,
        now: float,
        not_before: float = 0.0,
        attempt_used: bool = False,
        busy: bool = False,
        last_error: str | None = None,
    ) -> bool:
        """Return a claimed item to `queued` (the same row); False for a stale token."""
        return await self._write_checked(
            "UPDATE items SET state = 'queued', attempts = attempts + ?,"
            " busy_answers = busy_answers + ?, not_before = ?,"
            " last_error = COALESCE(?, last_error), claim_token = NULL, lease_until = NULL,"
            " updated_at = ? WHERE id = ? AND claim_token = ? AND state = 'dispatching'",
            (int(attempt_used), int(busy), not_before, last_error, now, item_id, token),
            durable=False,
        )

    async def _write_checked(
        self, sql: str, params: tuple[Any, ...], *, durable: bool = True
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute(sql, params).rowcount == 1

        return await self._write(op, durable=durable)

    async def recover_dispatching(self, *, now: float, max_attempts: int) -> list[Released]:
        """At start-up, under the owner's lock: every `dispatching` row belongs to a
        dead process; back to `queued` with an attempt counted."""
        return await self._release(
            "",
            {
                "now": now,
                "max_attempts": max_attempts,
                "reason": "a2ad stopped while delivering (recovered at start-up)",
            },
        )

    async def sweep_leases(self, *, now: float, max_attempts: int) -> list[Released]:
        """Items whose lease ran out go back to `queued`, counting an attempt."""
        return await self._release(
            "AND lease_until < :now",
            {"now": now, "max_attempts": max_attempts, "reason": "claim lease expired"},
        )

    async def _release(self, condition: str, params: dict[str, Any]) -> list[Released]:
        sql = _RELEASE_DISPATCHING.format(condition=condition)

        def op(conn: sqlite3.Connection) -> list[Released]:
            return [Released(*row) for row in conn.execute(sql, params).fetchall()]

        return await self._write(op, durable=False)

    async def expire_due(self, *, now: float) -> list[Released]:
        """Queued items past their expiry become `expired`."""

        def op(conn: sqlite3.Connection) -> list[Released]:
            rows = conn.execute(
                "UPDATE items SET state = 'expired', finished_at = :now, updated_at = :now,"
                " last_error = 'expired before it could be delivered'"
                " || COALESCE(' (last: ' || last_error || ')', '')"
                " WHERE state = 'queued' AND expires_at <= :now RETURNING id, workspace, state",
                {"now": now},
            ).fetchall()
            return [Released(*row) for row in rows]

        return await self._write(op, durable=False)

    async def cancel(self, item_id: str, *, now: float) -> bool:
        """A queued item → `cancelled`; False when it is not queued."""
        return await self._write_checked(
            "UPDATE items SET state = 'cancelled', finished_at = ?, updated_at = ?,"
            " last_error = 'cancelled' WHERE id = ? AND state = 'queued'",
            (now, now, item_id),
        )

    async def retry(
        self, item_id: str, *, now: float, max_age: float
    ) -> Literal["retried", "not_final", "duplicate"]:
        """A failed or expired item → queued: attempts reset, a fresh expiry from its
        TTL counted from now. `duplicate`: a newer live item has its messageId."""

        def op(conn: sqlite3.Connection) -> Literal["retried", "not_final", "duplicate"]:
            try:
                changed = conn.execute(
                    "UPDATE items SET state = 'queued', attempts = 0, not_before = 0,"
                    " expires_at = ? + COALESCE(ttl_seconds, ?), finished_at = NULL,"
                    " updated_at = ? WHERE id = ? AND state IN ('failed', 'expired')",
                    (now, max_age, now, item_id),
                ).rowcount
            except sqlite3.IntegrityError:
                return "duplicate"
            return "retried" if changed else "not_final"

        return await self._write(op)

    async def retry_failed(self, workspace: str, *, now: float, max_age: float) -> int:
        """Every failed item of a workspace back to queued (those whose messageId has a
        newer live item stay failed)."""

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE OR IGNORE items SET state = 'queued', attempts = 0, not_before = 0,"
                " expires_at = ? + COALESCE(ttl_seconds, ?), finished_at = NULL, updated_at = ?"
                " WHERE workspace = ? AND state = 'failed'",
                (now, max_age, now, workspace),
            ).rowcount

        return await self._write(op)

    async def delete(self, item_id: str) -> bool:
        """Delete a final item's row; False when it is not final."""
        return await self._write_checked(
            "DELETE FROM items WHERE id = ? AND state IN"
            " ('delivered', 'failed', 'expired', 'cancelled')",
            (item_id,),
        )

    async def purge(self, *, state: str, before: float, workspace: str | None = None) -> int:
        """Delete final items in `state` that became final before `before`."""
        assert state in FINAL_STATES

        def op(conn: sqlite3.Connection) -> int:
            sql = "DELETE FROM items WHERE state = ? AND finished_at < ?"
            params: tuple[Any, ...] = (state, before)
            if workspace is not None:
                sql += " AND workspace = ?"
                params += (workspace,)
            return conn.execute(sql, params).rowcount

        return await self._write(op)

    async def delete_finished(self, *, before: float, chunk: int = 2000) -> int:
        """Retention: delete final items that became final before `before`, a chunk
        per transaction, so sends never wait behind one long delete."""

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM items WHERE seq IN"
                " (SELECT seq FROM items WHERE finished_at < ? LIMIT ?)",
                (before, chunk),
            ).rowcount

        deleted = 0
        while True:
            n = await self._write(op, durable=False)
            deleted += n
            if n < chunk:
                return deleted

    # -- run-time workspaces ------------------------------------------------

    async def save_workspace(
        self, workspace_id: str, config: dict[str, Any], *, now: float
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO workspaces (id, config, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET config = excluded.config,"
                " updated_at = excluded.updated_at",
                (workspace_id, json.dumps(config), now),
            )

        await self._write(op)

    async def remove_workspace(self, workspace_id: str, *, purge: bool) -> int:
        """Forget a run-time workspace; with `purge`, delete its items too (their count)."""

        def op(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM workspaces WHERE id = ?", (workspace_id,))
            if not purge:
                return 0
            return conn.execute("DELETE FROM items WHERE workspace = ?", (workspace_id,)).rowcount

        return await self._write(op)

    async def load_workspaces(self) -> list[dict[str, Any]]:
        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute("SELECT config FROM workspaces ORDER BY id").fetchall()
            return [json.loads(row[0]) for row in rows]

        return await self._read(read)

    # -- reads -------------------------------------------------------------

    async def get(self, item_id: str) -> Item | None:
        def read(conn: sqlite3.Connection) -> Item | None:
            row = conn.execute(
                f"SELECT {ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)
            ).fetchone()
            return Item.from_row(row) if row is not None else None

        return await self._read(read)

    async def find_message(self, workspace: str, caller: str, message_id: str) -> Item | None:
        """The newest item with this messageId, if any."""

        def read(conn: sqlite3.Connection) -> Item | None:
            row = conn.execute(
                f"SELECT {ITEM_COLUMNS} FROM items"
                " WHERE workspace = ? AND caller = ? AND message_id = ?"
                " ORDER BY seq DESC LIMIT 1",
                (workspace, caller, message_id),
            ).fetchone()
            return Item.from_row(row) if row is not None else None

        return await self._read(read)

    async def last_enqueued(self) -> dict[str, float]:
        """{workspace: when its newest item was enqueued}."""

        def read(conn: sqlite3.Connection) -> dict[str, float]:
            rows = conn.execute("SELECT workspace, MAX(enqueued_at) FROM items GROUP BY workspace")
            return {ws: float(at) for ws, at in rows}

        return await self._read(read)

    async def agent_context(self, context_id: str, caller: str) -> str | None:
        """The agent's context id for a context id a2ad made, once the agent named one."""

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT agent_context_id FROM items WHERE context_id = ? AND caller = ?"
                " AND agent_context_id IS NOT NULL ORDER BY seq DESC LIMIT 1",
                (context_id, caller),
            ).fetchone()
            return str(row[0]) if row is not None else None

        return await self._read(read)

    async def list_items(
        self,
        *,
        workspace: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: int = 0,
        newest_first: bool = False,
    ) -> list[Item]:
        """Items in insertion order, paged by `seq` (the cursor); with
        `newest_first`, the newest `limit` items, newest first (no cursor)."""
        clauses, params = ["seq > ?"], [after]
        if workspace is not None:
            clauses.append("workspace = ?")
            params.append(workspace)  # type: ignore[arg-type]
        if state is not None:
            clauses.append("state = ?")
            params.append(state)  # type: ignore[arg-type]
        order = "seq DESC" if newest_first else "seq"
        sql = (
            f"SELECT {ITEM_COLUMNS} FROM items WHERE {' AND '.join(clauses)}"
            f" ORDER BY {order} LIMIT ?"
        )

        def read(conn: sqlite3.Connection) -> list[Item]:
            rows = conn.execute(sql, (*params, limit)).fetchall()
            return [Item.from_row(r) for r in rows]

        return await self._read(read)

    async def counts(self) -> dict[str, dict[str, int]]:
        """{workspace: {state: n}} for every workspace with items."""

        def read(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for ws, state, n in conn.execute(
                "SELECT workspace, state, COUNT(*) FROM items GROUP BY workspace, state"
            ):
                out.setdefault(ws, {})[state] = n
            return out

        return await self._read(read)

    async def queued_by_priority(self) -> dict[str, dict[int, int]]:
        """{workspace: {priority: queued count}}, for the in-memory depth counters."""

        def read(conn: sqlite3.Connection) -> dict[str, dict[int, int]]:
            out: dict[str, dict[int, int]] = {}
            for ws, priority, n in conn.execute(
                "SELECT workspace, priority, COUNT(*) FROM items WHERE state = 'queued'"
                " GROUP BY workspace, priority"
            ):
                out.setdefault(ws, {})[priority] = n
            return out

        return await self._read(read)

    async def next_due(self, workspace: str, *, now: float) -> float | None:
        """The earliest future not-before among the workspace's queued items."""

        def read(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(not_before) FROM items"
                " WHERE workspace = ? AND state = 'queued' AND not_before > ?",
                (workspace, now),
            ).fetchone()
            return float(row[0]) if row[0] is not None else None

        return await self._read(read)

    async def data_version(self) -> int:
        """Changes when another process (the queue CLI) commits to the file."""
        writer = self._writer
        assert writer is not None
        row = await _on_thread(
            writer, lambda: writer._conn.execute("PRAGMA data_version").fetchone()
        )
        return int(row[0])
