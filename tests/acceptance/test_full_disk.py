"""A store that cannot write: the real `serve` under a file-size limit (RLIMIT_FSIZE,
set on the running process with prlimit), the way a full disk looks to SQLite.

What an operator must see: sends answered 503 store_unavailable with Retry-After,
/readyz naming the problem, every item acknowledged before still there and
readable, and a2ad writing again by itself once the limit is lifted, without a
restart and without any request to nudge it."""

from __future__ import annotations

import resource
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from a2ad_http import http_call, http_json, send_body

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher, Process

PADDING = "x" * 20_000  # each message adds about this much to the WAL


def send(base: str, text: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    return http_call("POST", f"{base}/workspaces/w/a2a", send_body(text))


def get(url: str) -> tuple[int, dict[str, Any]]:
    return http_json("GET", url)


def largest_file(store: Path) -> int:
    files = [store, Path(f"{store}-wal"), Path(f"{store}-shm")]
    return max(f.stat().st_size for f in files if f.exists())


def limit_file_size(process: Process, limit: int) -> None:
    # Only the soft limit moves: raising a hard limit again needs privileges.
    _, hard = resource.prlimit(process.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, hard))


def test_a_store_that_cannot_write_refuses_clearly_and_recovers_by_itself(
    launcher: Launcher,
) -> None:
    # The agent is not there: the first refused delivery has a2ad probe it and
    # find it dead (it has no restart command), and then items wait without
    # delivery attempts, so nothing but a2ad itself would write to the store.
    agent_port = launcher.free_port()
    config: A2adConfig = launcher.config(
        workspaces=[{"id": "w", "url": f"http://127.0.0.1:{agent_port}/", "token": "hb-token"}],
        queue={"max_depth_per_workspace": 100_000},
        liveness={"heartbeat_timeout_seconds": 0.5},
    )
    a2ad = launcher.a2ad(config)
    base = config.url

    acknowledged: list[str] = []
    for i in range(5):
        status, data, _ = send(base, f"before {i} {PADDING}")
        assert status == 202, data
        acknowledged.append(data["result"]["id"])
    end = time.monotonic() + 10
    while get(f"{base}/workspaces/w")[1]["state"] != "dead":
        assert time.monotonic() < end, "the workspace was never found dead"
        time.sleep(0.05)

    # Writes past the current size of every store file now fail with EFBIG
    # (Python ignores SIGXFSZ), which SQLite reports as a full disk or I/O error.
    limit_file_size(a2ad, largest_file(config.store) + 64 * 1024)
    refused: dict[str, Any] | None = None
    headers: dict[str, str] = {}
    for i in range(400):
        status, data, headers = send(base, f"during {i} {PADDING}")
        if status == 202:
            acknowledged.append(data["result"]["id"])
            continue
        refused = data
        assert status == 503, data
        break
    assert refused is not None, "the file-size limit never stopped a write"
    assert refused["error"]["data"]["code"] == "store_unavailable"
    assert "cannot write" in refused["error"]["message"]
    assert int(headers["Retry-After"]) >= 1

    status, ready = get(f"{base}/readyz")
    assert status == 503
    assert any("cannot write" in p for p in ready["problems"]), ready
    # Reads still work: every acknowledged item is there.
    for qid in acknowledged:
        status, item = get(f"{base}/queue/{qid}")
        assert status == 200 and item["state"] == "queued", item

    # Lift the limit; send nothing. a2ad finds out by itself.
    limit_file_size(a2ad, resource.RLIM_INFINITY)
    end = time.monotonic() + 15
    while get(f"{base}/readyz")[0] != 200:
        assert time.monotonic() < end, "a2ad never noticed the store writes again"
        time.sleep(0.1)
    status, data, _ = send(base, "after")
    assert status == 202, data
    acknowledged.append(data["result"]["id"])

    # The agent comes up and heartbeats: everything acknowledged is delivered.
    argv = [sys.executable, "-m", "a2ad.demo_agent", "--port", str(agent_port), "--delay", "0"]
    argv += ["--slots", "4", "--a2ad", base, "--workspace", "w", "--token", "hb-token"]
    launcher.spawn("demo-agent", argv)
    for qid in acknowledged:
        status, item = get(f"{base}/queue/{qid}?wait=30")
        assert item["state"] == "delivered", item
    assert a2ad.running()
    a2ad.stop()
    with sqlite3.connect(config.store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        states = dict(db.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall())
    assert states == {"delivered": len(acknowledged)}
