"""A SQLite store file: its connections and its numbered migrations."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from importlib import resources

import aiosqlite


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def bundled_migrations(kind: str = "migrations") -> list[Migration]:
    """The numbered migrations shipped in a2ad/migrations (SQLite's) or
    a2ad/migrations_pg (PostgreSQL's), in order."""
    folder = resources.files("a2ad") / kind
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def connect(path: str, synchronous: str, busy_timeout: float) -> aiosqlite.Connection:
    def configure() -> sqlite3.Connection:
        # Not only this thread: the writer runs short batches' statements on the
        # event loop (writer.on_loop), one user at a time.
        conn = sqlite3.connect(
            path, isolation_level=None, timeout=busy_timeout, check_same_thread=False
        )
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


def read_schema_version(conn: sqlite3.Connection) -> int:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def apply_migrations(
    conn: sqlite3.Connection, pending: list[Migration], now: float
) -> list[Migration]:
    """Apply those of `pending` the database has not seen, each in its own
    transaction; the ones applied."""
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
