"""Building a store ahead of a run: a2ad's own migrations (`a2ad migrate`), then
queued rows written with executemany in raw sqlite3, as fast as SQLite goes.

The rows are what a2ad's proxy writes for a queued message/send: a random
queue id, the JSON-RPC body, a messageId, a context id, priority `task`, the
default maximum age as expiry.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CHUNK = 50_000
MAX_AGE_SECONDS = 86_400.0

_INSERT = """
INSERT INTO items (id, workspace, caller, method, body, headers, message_id, context_id,
                   request_id, priority, ttl_seconds, expires_at, enqueued_at, updated_at)
VALUES (?, ?, '', 'message/send', ?, '{}', ?, ?, NULL, 50, ?, ?, ?, ?)
"""


def migrate(config: Path, cwd: Path) -> None:
    """Create the store's schema with `python -m a2ad migrate`."""
    subprocess.run(
        [sys.executable, "-m", "a2ad", "migrate", "--config", str(config)],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )


# A template rather than json.dumps per row: a million rows build in seconds.
_TEMPLATE = (
    b'{"jsonrpc": "2.0", "id": %d, "method": "message/send", "params": {"message": '
    b'{"role": "user", "messageId": "%s", "parts": [{"kind": "text", "text": "hello"}]}}}'
)


def pg_row(workspace: str, n: int, tag: str, now: float) -> tuple[object, ...]:
    """One queued item's values, in the order of _INSERT's (and pg_raw's) columns."""
    message_id = f"{tag}-{n}"
    return (
        "q-" + os.urandom(16).hex(),
        workspace,
        _TEMPLATE % (n, message_id.encode()),
        message_id,
        "ctx-" + os.urandom(16).hex(),
        MAX_AGE_SECONDS,
        now + MAX_AGE_SECONDS,
        now,
        now,
    )


def _rows(workspace: str, count: int, tag: str, now: float) -> Iterator[tuple[object, ...]]:
    for n in range(count):
        yield pg_row(workspace, n, tag, now)


def fill_postgres(url: str, schema: str, counts: dict[str, int], tag: str = "fill") -> float:
    """`fill` for a PostgreSQL schema a2ad migrated: one transaction, rows by COPY."""
    import psycopg  # the optional extra

    started = time.perf_counter()
    now = time.time()
    columns = (
        "id, workspace, method, body, message_id, context_id, ttl_seconds, expires_at,"
        " enqueued_at, updated_at"
    )
    with psycopg.connect(url, options=f"-c search_path={schema}") as conn:
        with conn.cursor().copy(f"COPY items ({columns}) FROM STDIN") as copy:
            for workspace, count in counts.items():
                for row in _rows(workspace, count, f"{tag}-{workspace}", now):
                    copy.write_row((*row[:2], "message/send", *row[2:]))
        conn.execute("ANALYZE items")
    return time.perf_counter() - started


def fill(db_path: Path, counts: dict[str, int], tag: str = "fill") -> float:
    """Add `counts[workspace]` queued items per workspace; return the seconds it took."""
    started = time.perf_counter()
    now = time.time()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        # A scratch store: no journal and a large cache while it is built, then
        # back to WAL, as a2ad runs it.
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-1000000")
        conn.execute("BEGIN")
        for workspace, count in counts.items():
            rows = _rows(workspace, count, f"{tag}-{workspace}", now)
            while True:
                chunk = [row for _, row in zip(range(CHUNK), rows, strict=False)]
                if not chunk:
                    break
                conn.executemany(_INSERT, chunk)
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()
    return time.perf_counter() - started
