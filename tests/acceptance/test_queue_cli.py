"""`a2ad queue ls|show|retry|purge` and `a2ad workspaces` on the store of a running
`a2ad serve`: tables a person reads, --json for scripts, one-line errors, and a
daemon that notices a CLI retry by itself (SPEC, Process)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest
from a2ad_http import HB_TOKEN, WORKSPACE, heartbeat, http_json, item, send_body

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher, Process

ITEM_DEADLINE = 10.0  # seconds for an item to reach the state a test waits for
NOTICE_WITHIN = 3.0  # the daemon looks at the file about once a second
STATES = ("queued", "dispatching", "delivered", "failed", "expired", "cancelled")


# -- HTTP ----------------------------------------------------------------------


def send(base: str, text: str, headers: dict[str, str] | None = None) -> str:
    """message/send that a2ad must queue; the queue id."""
    body = send_body(text, message_id=f"m-{text}")
    status, data = http_json("POST", f"{base}/workspaces/{WORKSPACE}/a2a", body, headers)
    assert status == 202, data
    qid: str = data["result"]["id"]
    return qid


def wait_for_state(base: str, qid: str, state: str) -> dict[str, Any]:
    """Long-poll GET /queue/{qid}?wait= until the item is in `state` (bounded)."""
    end = time.monotonic() + ITEM_DEADLINE
    while True:
        view = item(base, qid, wait=max(0.1, end - time.monotonic()))
        if view["state"] == state or time.monotonic() > end:
            assert view["state"] == state, view
            return view
        if view["state"] not in ("queued", "dispatching"):
            raise AssertionError(f"{qid} ended {view['state']}, not {state}: {view}")


def seconds(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


# -- a daemon with items in every state a CLI test needs ------------------------


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never answers: every request to it times
    out, a failed attempt (a closed port would be a busy answer instead)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@dataclass
class Live:
    """`a2ad serve` on a store holding an expired item and two failed ones."""

    launcher: Launcher
    config: A2adConfig
    daemon: Process
    agent_port: int
    expired: str
    failed: list[str]

    @property
    def base(self) -> str:
        return self.config.url

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`a2ad ARGS --config …` beside the running daemon."""
        return self.launcher.run(*args, "--config", str(self.config.path))

    def ok(self, *args: str) -> str:
        done = self.cli(*args)
        assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr}"
        assert "Traceback" not in done.stderr
        return done.stdout


def start_live(launcher: Launcher, agent_port: int) -> Live:
    config = launcher.config(
        workspaces=[
            {
                "id": WORKSPACE,
                "url": f"http://127.0.0.1:{agent_port}/",
                "token": HB_TOKEN,
                "request_timeout_seconds": 0.5,
            }
        ],
        queue={"max_attempts": 1},
    )
    daemon = launcher.a2ad(config)
    base = config.url
    # Someone else's work fills the only slot: sends are queued.
    heartbeat(base, 1)
    expired = send(base, "short-lived", {"A2AD-TTL": "0.5", "A2AD-Priority": "info"})
    failed = [send(base, "first"), send(base, "second")]
    # The slot frees. The task items go first; each delivery times out (0.5 s) and,
    # with max_attempts = 1, fails. By then the info item is past its TTL, so it is
    # never claimed: it expires.
    heartbeat(base, 0)
    for qid in failed:
        wait_for_state(base, qid, "failed")
    wait_for_state(base, expired, "expired")
    return Live(launcher, config, daemon, agent_port, expired, failed)


@pytest.fixture
def live(launcher: Launcher) -> Iterator[Live]:
    with black_hole() as port:
        yield start_live(launcher, port)


def table(stdout: str) -> tuple[str, list[str]]:
    lines = stdout.rstrip("\n").splitlines()
    assert lines, "no output"
    return lines[0], lines[1:]


def column(header: str, row: str, name: str) -> str:
    """The cell of `row` under `name` in an aligned table."""
    names = header.split("  ")
    names = [n.strip() for n in names if n.strip()]
    start = header.index(name)
    following = [header.index(n) for n in names if header.index(n) > start]
    end = min(following) if following else None
    return row[start:end].strip()


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    return lines[0]


# -- reading ---------------------------------------------------------------------


def test_queue_ls_is_a_table_and_json(live: Live) -> None:
    header, rows = table(live.ok("queue", "ls"))
    for name in ("ID", "WORKSPACE", "STATE", "PRIORITY", "ATTEMPTS", "AGE", "LAST ERROR"):
        assert name in header, header
    assert len(rows) == 3, rows
    by_id = {column(header, row, "ID"): row for row in rows}
    assert set(by_id) == {live.expired, *live.failed}
    expired = by_id[live.expired]
    assert column(header, expired, "STATE") == "expired"
    assert column(header, expired, "PRIORITY") == "info"
    assert column(header, expired, "WORKSPACE") == WORKSPACE
    for qid in live.failed:
        row = by_id[qid]
        assert column(header, row, "STATE") == "failed"
        assert column(header, row, "ATTEMPTS") == "1"
        assert "no answer within" in column(header, row, "LAST ERROR")

    listed = json.loads(live.ok("queue", "ls", "--state", "failed", "--json"))
    assert [i["id"] for i in listed] == live.failed
    assert {i["state"] for i in listed} == {"failed"}
    assert all(i["workspace"] == WORKSPACE and i["attempts"] == 1 for i in listed)

    header, rows = table(live.ok("queue", "ls", "--workspace", WORKSPACE, "--state", "expired"))
    assert [column(header, r, "ID") for r in rows] == [live.expired]
    assert live.ok("queue", "ls", "--workspace", "nobody").strip() == "no items"
    assert json.loads(live.ok("queue", "ls", "--state", "delivered", "--json")) == []


def test_queue_show_as_text_and_json(live: Live) -> None:
    qid = live.failed[0]
    text = live.ok("queue", "show", qid)
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.isidentifier() and key not in fields:
            fields[key] = value.strip()
    assert fields["id"] == qid
    assert fields["state"] == "failed"
    assert fields["workspace"] == WORKSPACE
    assert fields["priority"] == "task"
    assert "no answer within" in fields["last_error"]
    assert '"text": "first"' in text  # the stored request, readable
    assert "result:" in text

    shown = json.loads(live.ok("queue", "show", qid, "--json"))
    assert shown["id"] == qid and shown["state"] == "failed"
    assert shown["body"]["params"]["message"]["parts"][0]["text"] == "first"
    # What the daemon's own API says of it.
    api = item(live.base, qid)
    for key in ("id", "workspace", "state", "priority", "attempts", "expires_at", "last_error"):
        assert shown[key] == api[key], key


def test_workspaces_is_a_table_and_json(live: Live) -> None:
    header, rows = table(live.ok("workspaces"))
    assert header.split()[:2] == ["ID", "URL"]
    for state in STATES:
        assert state.upper() in header
    assert len(rows) == 1
    row = rows[0]
    assert column(header, row, "ID") == WORKSPACE
    assert column(header, row, "URL") == f"http://127.0.0.1:{live.agent_port}/"
    assert column(header, row, "FAILED") == "2"
    assert column(header, row, "EXPIRED") == "1"
    assert column(header, row, "QUEUED") == "0"

    listed = json.loads(live.ok("workspaces", "--json"))
    assert listed == [
        {
            "id": WORKSPACE,
            "url": f"http://127.0.0.1:{live.agent_port}/",
            "queue": {s: {"failed": 2, "expired": 1}.get(s, 0) for s in STATES},
        }
    ]


def test_workspaces_lists_run_time_workspaces(live: Live) -> None:
    url = f"http://127.0.0.1:{live.agent_port}/other"
    status, data = http_json("PUT", f"{live.base}/workspaces/rt", {"url": url, "heartbeat": False})
    assert status == 201, data
    listed = {w["id"]: w for w in json.loads(live.ok("workspaces", "--json"))}
    assert set(listed) == {WORKSPACE, "rt"}
    assert listed["rt"]["url"] == url
    assert listed["rt"]["queue"] == dict.fromkeys(STATES, 0)
    header, rows = table(live.ok("workspaces"))
    assert {column(header, r, "ID"): column(header, r, "URL") for r in rows}["rt"] == url


# -- changing ----------------------------------------------------------------------


def test_purge_deletes_final_items_beside_the_running_daemon(live: Live) -> None:
    out = live.ok("queue", "purge", "--state", "expired", "--older-than", "0s")
    assert one_line(out) == "deleted 1 expired items older than 0s"
    status, data = http_json("GET", f"{live.base}/queue/{live.expired}")
    assert status == 404, data
    # Items younger than --older-than stay.
    out = live.ok("queue", "purge", "--state", "failed", "--older-than", "1h", "--json")
    assert json.loads(out) == {"state": "failed", "deleted": 0}
    assert [i["id"] for i in json.loads(live.ok("queue", "ls", "--json"))] == live.failed
    # The daemon's counts follow.
    status, view = http_json("GET", f"{live.base}/workspaces/{WORKSPACE}")
    assert status == 200
    assert view["queue"]["expired"] == 0 and view["queue"]["failed"] == 2


def test_a_cli_retry_is_delivered_without_any_other_trigger(launcher: Launcher) -> None:
    with black_hole() as port:
        live = start_live(launcher, port)
    # The agent is back, on the same address: a demo agent that sends no heartbeats.
    agent = launcher.demo_agent(delay=0.0, port=live.agent_port)
    first, second = live.failed

    out = live.ok("queue", "retry", first)
    retried_at = time.monotonic()
    assert first in one_line(out) and "queued again" in out
    view = wait_for_state(live.base, first, "delivered")
    assert time.monotonic() - retried_at < NOTICE_WITHIN
    assert view["attempts"] == 0
    assert view["result"]["result"]["parts"][0]["text"].endswith("first")

    out = live.ok("queue", "retry", "--failed", "--workspace", WORKSPACE)
    assert one_line(out) == f"1 failed items of {WORKSPACE} queued again"
    wait_for_state(live.base, second, "delivered")
    status, stats = http_json("GET", f"{agent.url}/stats")
    assert status == 200 and stats["served"] == 2

    out = live.ok("queue", "retry", "--failed", "--workspace", WORKSPACE, "--json")
    assert json.loads(out) == {"workspace": WORKSPACE, "retried": 0}
    listed = json.loads(live.ok("queue", "ls", "--json"))
    assert {i["id"]: i["state"] for i in listed} == {
        live.expired: "expired",
        first: "delivered",
        second: "delivered",
    }


def test_a_cli_retry_of_an_expired_item_is_queued_with_a_fresh_expiry(live: Live) -> None:
    heartbeat(live.base, 1)  # the slot is taken again, so it stays queued
    before = time.time()
    out = json.loads(live.ok("queue", "retry", live.expired, "--json"))
    assert (out["id"], out["state"]) == (live.expired, "queued")
    shown = json.loads(live.ok("queue", "show", live.expired, "--json"))
    assert shown["attempts"] == 0 and out["expires_at"] == shown["expires_at"]
    # Its TTL (A2AD-TTL: 0.5) counted from the retry.
    assert before + 0.5 - 0.001 <= seconds(shown["expires_at"]) <= time.time() + 0.5 + 0.001


def test_a_cli_retry_names_the_expiry_it_set(live: Live) -> None:
    heartbeat(live.base, 1)
    out = live.ok("queue", "retry", live.expired)
    printed = out.split("expires ", 1)[1].split(")", 1)[0]
    shown = json.loads(live.ok("queue", "show", live.expired, "--json"))
    assert printed == shown["expires_at"]


# -- errors --------------------------------------------------------------------------


def test_cli_errors_are_one_line_and_exit_non_zero(live: Live) -> None:
    unknown = "q-" + "0" * 32
    cases = {
        ("queue", "show", unknown): ["no queue item", unknown],
        ("queue", "retry", unknown): ["no queue item", unknown],
        ("queue", "retry", "--failed"): ["--failed", "--workspace"],
    }
    # An item that is neither failed nor expired is not retried.
    heartbeat(live.base, 1)
    queued = send(live.base, "waiting")
    cases[("queue", "retry", queued)] = [queued, "queued", "failed or expired"]
    for args, names in cases.items():
        done = live.cli(*args)
        assert done.returncode != 0, (args, done.stdout)
        assert "Traceback" not in done.stderr
        line = one_line(done.stderr)
        assert line.startswith("a2ad: "), line
        for name in names:
            assert name in line, (args, line)
    assert item(live.base, queued)["state"] == "queued"
    assert live.daemon.running()


def test_cli_on_a_missing_store_is_one_line_and_exit_non_zero(launcher: Launcher) -> None:
    config = launcher.config()  # never served: no store yet
    for args in (("queue", "ls"), ("queue", "show", "q-" + "0" * 32), ("workspaces",)):
        done = launcher.run(*args, "--config", str(config.path))
        assert done.returncode != 0, done.stdout
        assert "Traceback" not in done.stderr
        line = one_line(done.stderr)
        assert "no store" in line and str(config.store) in line
    assert not config.store.exists()
