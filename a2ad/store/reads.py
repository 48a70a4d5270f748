"""What the SQLite store reads, on its reader connection (never waiting for writes)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import aiosqlite

from ..errors import StoreUnavailable
from .models import ITEM_COLUMNS, Item
from .sql import caller_query
from .writer import is_store_failure, on_thread

T = TypeVar("T")


class Reads:
    """The store's reads; `Store` adds the writes."""

    _reader: aiosqlite.Connection | None

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        reader = self._reader
        assert reader is not None, "store is not open"
        try:
            return await on_thread(reader, fn, reader._conn)
        except sqlite3.Error as exc:
            if is_store_failure(exc):
                raise StoreUnavailable(f"the store cannot be read: {exc}", retry_after=1) from exc
            raise

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

    async def last_delivered(self, workspaces: Iterable[str]) -> dict[str, float]:
        """{workspace: when its newest delivered item was delivered}, for the replay
        check; one look-up in an index per workspace, never a scan of the items."""

        def read(conn: sqlite3.Connection) -> dict[str, float]:
            out = {}
            for workspace in workspaces:
                row = conn.execute(
                    "SELECT MAX(finished_at) FROM items"
                    " WHERE workspace = ? AND state = 'delivered'",
                    (workspace,),
                ).fetchone()
                if row[0] is not None:
                    out[workspace] = float(row[0])
            return out

        return await self._read(read)

    async def agent_context(self, context_id: str, caller: str, workspace: str) -> str | None:
        """The agent's context id for a context id a2ad made, once the agent named one."""

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT agent_context_id FROM items WHERE context_id = ? AND caller = ?"
                " AND workspace = ? AND agent_context_id IS NOT NULL ORDER BY seq DESC LIMIT 1",
                (context_id, caller, workspace),
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
        """One caller's items of a workspace, most recently updated first (the newer
        item first among equals), those after the cursor `before` = (updated_at, seq)
        up to `limit`; and how many match leaving the cursor and limit aside. Read
        in the items_caller index: never a scan of other callers' or workspaces' items."""
        q = caller_query(
            "?",
            workspace,
            caller,
            context_id=context_id,
            states=states,
            updated_from=updated_from,
            before=before,
        )
        sql = (
            f"SELECT {ITEM_COLUMNS} FROM items WHERE {q.page_where}"
            " ORDER BY updated_at DESC, seq DESC LIMIT ?"
        )
        page_params = [*q.page_params, -1 if limit is None else limit]

        def read(conn: sqlite3.Connection) -> tuple[list[Item], int]:
            rows = conn.execute(sql, page_params).fetchall()
            total = conn.execute(f"SELECT COUNT(*) FROM items WHERE {q.where}", q.params).fetchone()
            return [Item.from_row(r) for r in rows], int(total[0])

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
