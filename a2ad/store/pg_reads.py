"""What the PostgreSQL store reads, from its pool (never waiting for the writer)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from ..errors import StoreUnavailable
from .depth import Snapshot
from .models import ITEM_COLUMNS, Item
from .pg_writer import is_store_failure
from .sql import caller_query

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]


class PgReads:
    """The store's reads; `PostgresStore` adds the writes."""

    _pool: AsyncConnectionPool[Conn] | None
    schema: str

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        pool = self._pool
        assert pool is not None, "store is not open"
        for attempt in (1, 2):
            conn: Conn | None = None
            try:
                async with pool.connection() as conn:
                    return await fn(conn)
            except (psycopg.Error, TimeoutError) as exc:
                if not (isinstance(exc, TimeoutError) or is_store_failure(exc)):
                    raise
                if attempt == 1 and conn is not None and conn.broken:
                    # A connection left idle over a server restart: the pool drops
                    # the others like it, and a read can simply run again.
                    await pool.check()
                    continue
                raise StoreUnavailable(
                    f"the store cannot be read: {str(exc).strip()}", retry_after=1
                ) from exc
        raise AssertionError("unreachable")

    async def _rows(self, statement: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        async def read(conn: Conn) -> list[Any]:
            return await (await conn.execute(statement, params)).fetchall()

        return await self._read(read)

    async def server(self) -> tuple[str, bool]:
        """The server's version, and whether this role can write a2ad's schema there
        (not a standby, and allowed to create in the schema or the database)."""

        async def read(conn: Conn) -> tuple[str, bool]:
            row = await (
                await conn.execute(
                    "SELECT current_setting('server_version'), NOT pg_is_in_recovery() AND"
                    " (CASE WHEN to_regnamespace(%s) IS NULL"
                    "  THEN has_database_privilege(current_database(), 'CREATE')"
                    "  ELSE has_schema_privilege(%s, 'CREATE') END)",
                    (self.schema, self.schema),
                )
            ).fetchone()
            assert row is not None
            return str(row[0]), bool(row[1])

        return await self._read(read)

    async def server_time(self) -> float | None:
        """The server's wall clock (clock.py keeps stored times on it)."""

        async def read(conn: Conn) -> float:
            cursor = await conn.execute("SELECT extract(epoch FROM clock_timestamp())")
            row = await cursor.fetchone()
            assert row is not None
            return float(row[0])

        return await self._read(read)

    async def schema_version(self) -> int:
        async def read(conn: Conn) -> int:
            found = await (
                await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            ).fetchone()
            if not found or not found[0]:
                return 0
            row = await (
                await conn.execute("SELECT MAX(version) FROM schema_migrations")
            ).fetchone()
            return int(row[0] or 0) if row else 0

        return await self._read(read)

    async def load_workspaces(self) -> list[dict[str, Any]]:
        rows = await self._rows("SELECT config FROM workspaces ORDER BY id")
        return [json.loads(row[0]) for row in rows]

    async def get(self, item_id: str) -> Item | None:
        rows = await self._rows(f"SELECT {ITEM_COLUMNS} FROM items WHERE id = %s", (item_id,))
        return Item.from_row(rows[0]) if rows else None

    async def find_message(self, workspace: str, caller: str, message_id: str) -> Item | None:
        rows = await self._rows(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE workspace = %s AND caller = %s"
            " AND message_id = %s ORDER BY seq DESC LIMIT 1",
            (workspace, caller, message_id),
        )
        return Item.from_row(rows[0]) if rows else None

    async def last_delivered(self, workspaces: Iterable[str]) -> dict[str, float]:
        names = list(workspaces)
        rows = await self._rows(
            "SELECT w, (SELECT MAX(finished_at) FROM items WHERE workspace = w"
            " AND state = 'delivered') FROM unnest(%s::text[]) AS w",
            (names,),
        )
        return {w: float(at) for w, at in rows if at is not None}

    async def agent_context(self, context_id: str, caller: str, workspace: str) -> str | None:
        rows = await self._rows(
            "SELECT agent_context_id FROM items WHERE context_id = %s AND caller = %s"
            " AND workspace = %s AND agent_context_id IS NOT NULL ORDER BY seq DESC LIMIT 1",
            (context_id, caller, workspace),
        )
        return str(rows[0][0]) if rows else None

    async def list_items(
        self,
        *,
        workspace: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: int = 0,
        newest_first: bool = False,
    ) -> list[Item]:
        clauses, params = ["seq > %s"], [after]
        if workspace is not None:
            clauses.append("workspace = %s")
            params.append(workspace)  # type: ignore[arg-type]
        if state is not None:
            clauses.append("state = %s")
            params.append(state)  # type: ignore[arg-type]
        order = "seq DESC" if newest_first else "seq"
        rows = await self._rows(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE {' AND '.join(clauses)}"
            f" ORDER BY {order} LIMIT %s",
            (*params, limit),
        )
        return [Item.from_row(r) for r in rows]

    async def caller_items(
        self,
        workspace: str,
        caller: str,
        *,
        context_id: str | None = None,
        states: Sequence[str] | None = None,
        updated_from: float | None = None,
        before: tuple[float, int] | None = None,
        limit: int | None = None,
    ) -> tuple[list[Item], int]:
        q = caller_query(
            "%s",
            workspace,
            caller,
            context_id=context_id,
            states=states,
            updated_from=updated_from,
            before=before,
        )

        async def read(conn: Conn) -> tuple[list[Item], int]:
            rows = await (
                await conn.execute(
                    f"SELECT {ITEM_COLUMNS} FROM items WHERE {q.page_where}"
                    " ORDER BY updated_at DESC, seq DESC LIMIT %s",
                    [*q.page_params, limit],
                )
            ).fetchall()
            total = await (
                await conn.execute(f"SELECT COUNT(*) FROM items WHERE {q.where}", q.params)
            ).fetchone()
            return [Item.from_row(r) for r in rows], int(total[0]) if total else 0

        return await self._read(read)

    async def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for ws, state, n in await self._rows(
            "SELECT workspace, state, COUNT(*) FROM items GROUP BY workspace, state"
        ):
            out.setdefault(ws, {})[state] = n
        return out

    async def next_due(self, workspace: str, *, now: float) -> float | None:
        rows = await self._rows(
            "SELECT MIN(not_before) FROM items"
            " WHERE workspace = %s AND state = 'queued' AND not_before > %s",
            (workspace, now),
        )
        return float(rows[0][0]) if rows and rows[0][0] is not None else None


async def live_snapshot(conn: Conn) -> Snapshot:
    """Every workspace's live items, as one transaction sees them: each state by its
    own partial index (queued, and dispatching by the lease index), never a scan of
    the final rows retention keeps."""
    queued: dict[str, dict[int, int]] = {}
    dispatching: dict[str, int] = {}
    waiting: dict[str, dict[str, float]] = {}
    counted = await conn.execute(
        "SELECT workspace, priority, COUNT(*) FROM items WHERE state = 'queued'"
        " GROUP BY workspace, priority"
    )
    for workspace, priority, n in await counted.fetchall():
        queued.setdefault(workspace, {})[priority] = n
    running = await conn.execute(
        "SELECT workspace, COUNT(*) FROM items WHERE state = 'dispatching' GROUP BY workspace"
    )
    for workspace, n in await running.fetchall():
        dispatching[workspace] = n
    backoff = await conn.execute(
        "SELECT workspace, id, not_before FROM items WHERE state = 'queued' AND not_before > 0"
    )
    for workspace, item_id, not_before in await backoff.fetchall():
        waiting.setdefault(workspace, {})[item_id] = not_before
    return Snapshot(None, queued, dispatching, waiting)
