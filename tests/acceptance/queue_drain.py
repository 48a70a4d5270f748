"""Reading a2ad's store from outside, as an operator's shell would, whichever store
it is: its rows, its live counts, its health; and waiting for it to drain."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any, Protocol

ITEM_FIELDS = "id, state, attempts, last_error, message_id, result"
LIVE = "SELECT state, COUNT(*) FROM items WHERE state IN ('queued', 'dispatching') GROUP BY state"


class StoreRows(Protocol):
    def items(self) -> dict[str, dict[str, Any]]: ...
    def live(self) -> dict[str, int]: ...
    def healthy(self) -> bool: ...


class SqliteRows:
    """The SQLite file, read beside a2ad."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=10)

    def items(self) -> dict[str, dict[str, Any]]:
        """Every item by id (none while a2ad has not made the file yet)."""
        if not self.path.exists():
            return {}
        conn = self._connect()
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute(f"SELECT {ITEM_FIELDS} FROM items").fetchall()
        finally:
            conn.close()
        return {row["id"]: dict(row) for row in rows}

    def live(self) -> dict[str, int]:
        conn = self._connect()
        try:
            return dict(conn.execute(LIVE).fetchall())
        finally:
            conn.close()

    def healthy(self) -> bool:
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            return conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            conn.close()


class PostgresRows:
    """a2ad's schema on a PostgreSQL server, read over a connection of its own."""

    def __init__(self, url: str, schema: str) -> None:
        self.url, self.schema = url, schema

    def _query(self, statement: str) -> list[Any]:
        import psycopg
        from psycopg.rows import dict_row

        options = f"-c search_path={self.schema}"
        with psycopg.connect(self.url, options=options, row_factory=dict_row) as conn:
            return conn.execute(statement).fetchall()

    def items(self) -> dict[str, dict[str, Any]]:
        return {row["id"]: row for row in self._query(f"SELECT {ITEM_FIELDS} FROM items")}

    def live(self) -> dict[str, int]:
        return {row["state"]: row["count"] for row in self._query(LIVE)}

    def healthy(self) -> bool:
        return True  # the server keeps its own consistency; the rows are compared above


async def wait_drained(store: Path | StoreRows, *, stall: float, cap: float) -> dict[str, int]:
    """Poll the store until nothing is queued or dispatching, or until the number
    left has not gone down for `stall` seconds (or, as a last guard against
    hanging, `cap` seconds have passed); what was left at the end."""
    rows = SqliteRows(store) if isinstance(store, Path) else store
    start = last_progress = time.monotonic()
    fewest: int | None = None
    while True:
        live = await asyncio.to_thread(rows.live)
        now = time.monotonic()
        if fewest is None or sum(live.values()) < fewest:
            fewest, last_progress = sum(live.values()), now
        if not live or now - last_progress > stall or now - start > cap:
            return live
        await asyncio.sleep(0.2)
