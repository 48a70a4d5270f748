"""The raw SQLite reference: one-row INSERT transactions at synchronous=FULL, in WAL
mode, into a2ad's own schema, one after another for T seconds.

    python -m bench.sqlite_raw --db PATH --duration T

What a2ad would reach if every 202 paid for its own commit; group commit is
what must lift a2ad's durable enqueue above it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

from a2ad.store import bundled_migrations

_INSERT = """
INSERT INTO items (id, workspace, caller, method, body, headers, message_id, context_id,
                   request_id, priority, ttl_seconds, expires_at, enqueued_at, updated_at)
VALUES (?, 'raw', '', 'message/send', ?, '{}', ?, ?, ?, 50, 86400, ?, ?, ?)
"""


def run(db: Path, duration: float) -> dict[str, float | int]:
    conn = sqlite3.connect(db, isolation_level=None)  # autocommit: one transaction each
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for migration in bundled_migrations():
        conn.executescript(migration.sql)
    inserts = 0
    started = time.perf_counter()
    end = started + duration
    while time.perf_counter() < end:
        message_id = f"raw-{inserts}"
        body = (
            b'{"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message": '
            b'{"role": "user", "messageId": "' + message_id.encode() + b'", "parts": '
            b'[{"kind": "text", "text": "hello from the benchmark"}]}}}'
        )
        now = time.time()
        conn.execute(
            _INSERT,
            (
                "q-" + os.urandom(16).hex(),
                body,
                message_id,
                "ctx-" + os.urandom(16).hex(),
                os.urandom(8).hex(),
                now + 86400,
                now,
                now,
            ),
        )
        inserts += 1
    elapsed = time.perf_counter() - started
    conn.close()
    return {"inserts": inserts, "seconds": round(elapsed, 3), "rate": round(inserts / elapsed, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sqlite_raw")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--duration", "-d", type=float, default=5.0)
    args = parser.parse_args(argv)
    json.dump(run(args.db, args.duration), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
