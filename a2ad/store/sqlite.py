"""The SQLite store: every SQL statement a2ad runs on SQLite, behind one class.

One writer connection and one reader connection, each on its own aiosqlite
thread. Writes go through the writer's group commit (writer.py); each op that
changes the queue returns its moves, which the writer applies to the depths
in commit order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any, Literal, TypeVar

import aiosqlite

from ..errors import StoreUnavailable
from . import sql
from .depth import Counted, Depths, Move, Snapshot
from .models import (
    FINAL_STATES,
    ITEM_COLUMNS,
    Enqueued,
    Item,
    NewItem,
    Released,
    State,
    answers_again,
)
from .outbox import Outbox
from .reads import Reads
from .schema import Migration, apply_migrations, bundled_migrations, connect, read_schema_version
from .writer import Op, Writer, on_loop, on_thread

log = logging.getLogger("a2ad.store")

T = TypeVar("T")


class Store(Reads, Outbox):
    """The SQLite store. `open()` it, `migrate()` it, use it, `close()` it."""

    is_server = False  # its writer is this process: it loses nothing while a2ad runs
    _ADD_UPDATE = (
        "INSERT INTO push_outbox (item_id, config_id, state, payload, next_at, created_at)"
        " SELECT items.id, json_extract(c.value, '$.id'), 'update', ?, ?, ?"
        " FROM items, json_each(items.push) AS c WHERE items.id = ?"
    )

    def __init__(self, path: str, *, synchronous: str = "full", busy_timeout: float = 5.0):
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._conn: aiosqlite.Connection | None = None  # the writer's
        self._reader: aiosqlite.Connection | None = None
        self._writer: Writer | None = None
        # Queue depths as committed, kept by the writer (depth.py).
        self.depths = Depths()

    @property
    def last_write_error(self) -> str | None:
        """Why the last write failed, while the store cannot write; else None."""
        return self._writer.last_error if self._writer is not None else None

    @property
    def commits(self) -> int:
        """Transactions committed by this process, for tests and metrics."""
        return self._writer.commits if self._writer is not None else 0

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            self._conn = await connect(self.path, self.synchronous, self.busy_timeout)
            self._reader = await connect(self.path, self.synchronous, self.busy_timeout)
        except sqlite3.Error as exc:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
            raise StoreUnavailable(f"cannot open the store {self.path}: {exc}") from None
        self._writer = Writer(self._conn, self.synchronous, self.depths, sql.live_snapshot)
        self._writer.start()

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
        for conn in (self._reader, self._conn):
            if conn is not None:
                await conn.close()
        self._reader = self._conn = None

    async def server_time(self) -> float | None:
        """None: the store's clock is this host's."""
        return None

    async def take_ownership(self, replica: str | None = None) -> None:
        """Nothing more to take: the owner of a SQLite store is whoever holds its
        file lock (StoreLock), taken before the store opens; it has no replicas."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the two hops --------------------------------------------------------

    async def _write(self, op: Op[T] | Op[Counted[T]], *, durable: bool = True) -> T:
        """Run `op` in the writer's next batch (see Writer.submit)."""
        return await self._submit(op, durable=durable)

    def _submit(
        self, op: Op[T] | Op[Counted[T]], *, durable: bool = True, settled: bool = False
    ) -> asyncio.Future[T]:
        """`_write` without the coroutine: the future of `op`'s outcome."""
        if self._writer is None or self._writer.closing:
            raise StoreUnavailable("the store is closed", retry_after=1)
        return self._writer.submit(op, durable=durable, settled=settled)

    async def _run_outbox(
        self, statement: str, params: tuple[Any, ...], *, rows: bool, durable: bool
    ) -> Any:
        def op(conn: sqlite3.Connection) -> Any:
            cursor = conn.execute(statement, params)
            return [tuple(row) for row in cursor.fetchall()] if rows else cursor.rowcount

        return await self._write(op, durable=durable)

    async def probe_write(self, now: float) -> None:
        """One small real write: succeeds once the store can write again."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO write_probe (id, at) VALUES (1, ?)", (now,))

        await self._write(op)

    # -- migrations --------------------------------------------------------

    async def schema_version(self) -> int:
        try:
            return await self._read(read_schema_version)
        except sqlite3.Error as exc:  # not a2ad's file, or not a database at all
            raise StoreUnavailable(f"{self.path}: {exc}") from None

    async def migrate(self, migrations: Iterable[Migration] | None = None) -> list[Migration]:
        """Apply the migrations the database has not seen, in order; return them."""
        pending = sorted(
            migrations if migrations is not None else bundled_migrations(),
            key=lambda m: m.version,
        )
        writer = self._conn
        assert writer is not None
        return await on_thread(writer, apply_migrations, writer._conn, pending, time.time())

    # -- writes ------------------------------------------------------------

    async def enqueue(self, new: NewItem, *, now: float, replay_window: float) -> Enqueued:
        """Store a new item, or answer with the live (or recently delivered) one
        that already has this messageId."""
        return await self.submit_enqueue(new, now=now, replay_window=replay_window)

    def submit_enqueue(
        self,
        new: NewItem,
        *,
        now: float,
        replay_window: float,
        caps: tuple[int, int] | None = None,
    ) -> asyncio.Future[Enqueued]:
        """`enqueue` as a future its waiter cannot cancel (a `Settled`): a caller
        cancelled while it waits is told once the item is written, or not.
        (`caps` is for a store replicas share: the one process that holds this
        file has checked them against the counts it keeps.)"""

        def op(conn: sqlite3.Connection) -> Counted[Enqueued]:
            if new.message_id is not None:
                row = conn.execute(
                    # The live row first: a retried old item can be live while a
                    # newer one with the same messageId has failed.
                    f"SELECT {ITEM_COLUMNS} FROM items"
                    " WHERE workspace = ? AND caller = ? AND message_id = ?"
                    " ORDER BY state IN ('queued', 'dispatching') DESC, seq DESC LIMIT 1",
                    (new.workspace, new.caller, new.message_id),
                ).fetchone()
                if row is not None and answers_again(
                    row["state"], row["finished_at"], now=now, replay_window=replay_window
                ):
                    return Counted(Enqueued(Item.from_row(row), created=False))
            values = new.row(now)
            seq = conn.execute(sql.INSERT, values).lastrowid
            assert seq is not None
            move = Move(new.workspace, new.id, new.priority, None, "queued", now)
            return Counted(Enqueued(Item.stored(new, seq, now), True), (move,), then=sql.place)

        return self._submit(on_loop(op, size=len(new.body)), settled=True)

    def submit_claim(
        self,
        workspace: str,
        *,
        now: float,
        lease_seconds: float,
        promote_after: float,
        limit: int = 1,
        cap: int | None = None,
        if_cancelled: Callable[[list[Item]], None] | None = None,
    ) -> asyncio.Future[list[Item]]:
        """Claim up to `limit` due items of one workspace, best first, each with its
        own token; a future. A claimer cancelled while it waits is not told what the
        claim took: `if_cancelled` is, once it committed, so it can be handed back.
        (`cap` is for a store replicas share: the one process that holds this file
        counts its slots in memory.)"""

        def op(conn: sqlite3.Connection) -> Counted[list[Item]]:
            where = {"workspace": workspace, "now": now, "promote_after": promote_after}
            seqs = [row[0] for row in conn.execute(sql.CLAIMABLE, {**where, "limit": limit})]
            if not seqs:
                return Counted([])
            statement = sql.CLAIM.format(marks=", ".join("?" * len(seqs)), columns=ITEM_COLUMNS)
            rows = conn.execute(statement, (now + lease_seconds, now, *seqs)).fetchall()
            rank = {seq: i for i, seq in enumerate(seqs)}  # RETURNING keeps no order
            items = sorted((Item.from_row(row) for row in rows), key=lambda i: rank[i.seq])
            moves = [Move(workspace, i.id, i.priority, "queued", "dispatching", now) for i in items]
            return Counted(items, moves)

        if self._writer is None or self._writer.closing:
            raise StoreUnavailable("the store is closed", retry_after=1)
        return self._writer.submit(
            on_loop(op, rows=limit), durable=False, if_cancelled=if_cancelled
        )

    async def claim(
        self,
        workspace: str,
        *,
        now: float,
        lease_seconds: float,
        promote_after: float,
        limit: int = 1,
        cap: int | None = None,
    ) -> list[Item]:
        """Claim up to `limit` due items of one workspace, best first, each with its own token."""
        return await self.submit_claim(
            workspace,
            now=now,
            lease_seconds=lease_seconds,
            promote_after=promote_after,
            limit=limit,
        )

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

        return await self._write(on_loop(op, rows=len(claims)), durable=False)

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
        return await self._move_claimed(
            "UPDATE items SET state = ?, result = ?, last_error = ?, agent_task_id = ?,"
            " agent_context_id = ?, attempts = attempts + ?, finished_at = ?, updated_at = ?,"
            " claim_token = NULL, lease_until = NULL"
            " WHERE id = ? AND claim_token = ? AND state = 'dispatching'"
            " RETURNING workspace, priority",
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
            item_id,
            state,
            now,
            size=len(result or b""),
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
        return await self._move_claimed(
            "UPDATE items SET state = 'queued', attempts = attempts + ?,"
            " busy_answers = busy_answers + ?, not_before = ?,"
            " last_error = COALESCE(?, last_error), claim_token = NULL, lease_until = NULL,"
            " updated_at = ? WHERE id = ? AND claim_token = ? AND state = 'dispatching'"
            " RETURNING workspace, priority",
            (int(attempt_used), int(busy), not_before, last_error, now, item_id, token),
            item_id,
            "queued",
            now,
            not_before,
        )

    async def _move_claimed(
        self,
        statement: str,
        params: tuple[Any, ...],
        item_id: str,
        new: State,
        now: float,
        not_before: float = 0.0,
        size: int = 0,
    ) -> bool:
        """One claimed item out of `dispatching`, when its token still holds it
        (`size`: the bytes of the answer it stores)."""

        def op(conn: sqlite3.Connection) -> Counted[bool]:
            row = conn.execute(statement, params).fetchone()
            if row is None:
                return Counted(False)
            workspace, priority = row
            return Counted(
                True, (Move(workspace, item_id, priority, "dispatching", new, now, not_before),)
            )

        return await self._write(on_loop(op, size=size), durable=False)

    async def _write_checked(
        self, statement: str, params: tuple[Any, ...], *, durable: bool = True
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute(statement, params).rowcount == 1

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

    async def sweep_leases(
        self, *, now: float, max_attempts: int, except_tokens: Collection[str] = ()
    ) -> list[Released]:
        """Items whose stored lease ran out go back to `queued`, counting an attempt
        (but not the claims `except_tokens`: those of deliveries still running)."""
        return await self._release(
            "AND lease_until < :now AND claim_token NOT IN (SELECT value FROM json_each(:keep))",
            {
                "now": now,
                "max_attempts": max_attempts,
                "reason": "claim lease expired",
                "keep": json.dumps(list(except_tokens)),
            },
        )

    async def release_claims(
        self, claims: dict[str, str], *, now: float, max_attempts: int
    ) -> list[Released]:
        """These claims (item id → token), whose holder's lease ran out on its own
        clock, go back to `queued`, counting an attempt."""

        def op(conn: sqlite3.Connection) -> Counted[list[Released]]:
            statement = sql.RELEASE_DISPATCHING.format(
                condition="AND id = :id AND claim_token = :token"
            )
            params = {"now": now, "max_attempts": max_attempts, "reason": "claim lease expired"}
            rows = []
            for item_id, token in claims.items():
                rows += conn.execute(
                    statement, {**params, "id": item_id, "token": token}
                ).fetchall()
            return sql.released(rows, "dispatching", now)

        return await self._write(op, durable=False)

    async def _release(self, condition: str, params: dict[str, Any]) -> list[Released]:
        statement = sql.RELEASE_DISPATCHING.format(condition=condition)

        def op(conn: sqlite3.Connection) -> Counted[list[Released]]:
            return sql.released(
                conn.execute(statement, params).fetchall(), "dispatching", params["now"]
            )

        return await self._write(op, durable=False)

    async def expire_due(self, *, now: float) -> list[Released]:
        """Queued items past their expiry become `expired`."""

        def op(conn: sqlite3.Connection) -> Counted[list[Released]]:
            rows = conn.execute(
                # By the expiry index, not the live-state one: only the due rows are read.
                "UPDATE items INDEXED BY items_expiry"
                " SET state = 'expired', finished_at = :now, updated_at = :now,"
                " last_error = 'expired before it could be delivered'"
                " || COALESCE(' (last: ' || last_error || ')', '')"
                " WHERE state = 'queued' AND expires_at <= :now"
                " RETURNING id, workspace, state, priority",
                {"now": now},
            ).fetchall()
            return sql.released(rows, "queued", now)

        return await self._write(op, durable=False)

    async def cancel(self, item_id: str, *, now: float) -> bool:
        """A queued item → `cancelled`; False when it is not queued."""

        def op(conn: sqlite3.Connection) -> Counted[bool]:
            row = conn.execute(
                "UPDATE items SET state = 'cancelled', finished_at = ?, updated_at = ?,"
                " last_error = 'cancelled' WHERE id = ? AND state = 'queued'"
                " RETURNING workspace, priority",
                (now, now, item_id),
            ).fetchone()
            if row is None:
                return Counted(False)
            return Counted(True, (Move(row[0], item_id, row[1], "queued", "cancelled", now),))

        return await self._write(op)

    async def retry(
        self, item_id: str, *, now: float, max_age: float
    ) -> Literal["retried", "not_final", "duplicate"]:
        """A failed or expired item → queued: attempts reset, a fresh expiry from its
        TTL counted from now. `duplicate`: a newer live item has its messageId."""

        def op(conn: sqlite3.Connection) -> Counted[Literal["retried", "not_final", "duplicate"]]:
            try:
                row = conn.execute(
                    "UPDATE items SET state = 'queued', attempts = 0, not_before = 0,"
                    " expires_at = ? + COALESCE(ttl_seconds, ?), finished_at = NULL,"
                    " updated_at = ? WHERE id = ? AND state IN ('failed', 'expired')"
                    " RETURNING workspace, priority",
                    (now, max_age, now, item_id),
                ).fetchone()
            except sqlite3.IntegrityError:
                return Counted("duplicate")
            if row is None:
                return Counted("not_final")
            return Counted("retried", (Move(row[0], item_id, row[1], "final", "queued", now),))

        return await self._write(op)

    async def retry_failed(self, workspace: str, *, now: float, max_age: float) -> int:
        """Every failed item of a workspace back to queued (those whose messageId has a
        newer live item stay failed)."""

        def op(conn: sqlite3.Connection) -> Counted[int]:
            rows = conn.execute(
                "UPDATE OR IGNORE items SET state = 'queued', attempts = 0, not_before = 0,"
                " expires_at = ? + COALESCE(ttl_seconds, ?), finished_at = NULL, updated_at = ?"
                " WHERE workspace = ? AND state = 'failed' RETURNING id, priority",
                (now, max_age, now, workspace),
            ).fetchall()
            moves = [Move(workspace, i, p, "final", "queued", now) for i, p in rows]
            return Counted(len(rows), moves)

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
            statement = "DELETE FROM items WHERE state = ? AND finished_at < ?"
            params: tuple[Any, ...] = (state, before)
            if workspace is not None:
                statement += " AND workspace = ?"
                params += (workspace,)
            return conn.execute(statement, params).rowcount

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

    async def recount(self) -> None:
        """Set the depths from the live rows, in the writer's order, so that no
        commit falls between this read and the counts it sets (after another
        process, the queue CLI, wrote to the file)."""

        def op(conn: sqlite3.Connection) -> Counted[None]:
            return Counted(None, snapshot=sql.live_snapshot(conn))

        done: asyncio.Future[None] = self._submit(op, durable=False)
        await done

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

        def op(conn: sqlite3.Connection) -> Counted[int]:
            conn.execute("DELETE FROM workspaces WHERE id = ?", (workspace_id,))
            if not purge:
                return Counted(0)
            n = conn.execute("DELETE FROM items WHERE workspace = ?", (workspace_id,)).rowcount
            return Counted(n, snapshot=Snapshot(frozenset([workspace_id])))

        return await self._write(op)

    async def load_workspaces(self) -> list[dict[str, Any]]:
        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute("SELECT config FROM workspaces ORDER BY id").fetchall()
            return [json.loads(row[0]) for row in rows]

        return await self._read(read)

    async def tend(self) -> None:
        """Nothing: SQLite needs no upkeep while a2ad runs."""

    async def data_version(self) -> int:
        """Changes when another process (the queue CLI) commits to the file."""
        writer = self._conn
        assert writer is not None
        row = await on_thread(
            writer, lambda: writer._conn.execute("PRAGMA data_version").fetchone()
        )
        return int(row[0])
