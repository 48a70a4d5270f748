"""The raw PostgreSQL reference: single-row INSERT transactions into a2ad's items
table, one connection, synchronous_commit on, as fast as they go. What a durable
202 on PostgreSQL would cost with no batching at all.

    python -m bench.pg_raw --url URL --schema S -d SECONDS   → JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import time

import psycopg

from .fill import pg_row

INSERT = (
    "INSERT INTO items (id, workspace, caller, method, body, headers, message_id, context_id,"
    " request_id, priority, ttl_seconds, expires_at, enqueued_at, updated_at)"
    " VALUES (%s, %s, '', 'message/send', %s, '{}', %s, %s, NULL, 50, %s, %s, %s, %s)"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    args = parser.parse_args()
    options = f"-c search_path={args.schema} -c synchronous_commit=on"
    with psycopg.connect(args.url, autocommit=True, options=options) as conn:
        n = 0
        tag = os.urandom(3).hex()
        end = time.perf_counter() + args.duration
        started = time.perf_counter()
        while time.perf_counter() < end:
            conn.execute(INSERT, pg_row("raw", n, f"raw-{tag}", time.time()))
            n += 1
        seconds = time.perf_counter() - started
    print(json.dumps({"inserts": n, "seconds": round(seconds, 3), "rate": n / seconds}))


if __name__ == "__main__":
    main()
