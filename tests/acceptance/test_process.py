"""The process as systemd and an operator see it: graceful SIGTERM, notify, the unit."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from a2ad_http import http_json, send_body

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher

ROOT = Path(__file__).resolve().parents[2]


def send(base: str, text: str) -> tuple[int, dict[str, Any]]:
    return http_json("POST", f"{base}/workspaces/w/a2a", send_body(text))


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=20) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def wait_for_state(base: str, qid: str, state: str, deadline: float = 10.0) -> dict[str, Any]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        item = get(f"{base}/queue/{qid}")
        if item["state"] == state:
            return item
        time.sleep(0.02)
    raise AssertionError(f"{qid} never became {state}: {item}")


@pytest.mark.parametrize(("grace", "expected"), [(0.2, "queued"), (5.0, "delivered")])
def test_sigterm_with_a_delivery_in_flight(launcher: Launcher, grace: float, expected: str) -> None:
    """Short grace: the delivery goes back to queued, its attempts unchanged. Long
    grace: it finishes. Either way a restart delivers everything, nothing is lost."""
    agent = launcher.demo_agent(delay=1.5)
    config: A2adConfig = launcher.config(
        workspaces=[{"id": "w", "url": agent.url + "/", "heartbeat": False}],
        server={"shutdown_grace_seconds": grace},
    )
    a2ad = launcher.a2ad(config)
    base = config.url
    # Keep the agent's one slot busy from outside a2ad, so every send is queued.
    blocker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import urllib.request as u, json; u.urlopen(u.Request("
            f"'{agent.url}/', data=json.dumps({{'jsonrpc':'2.0','id':0,'method':'message/send',"
            f"'params':{{'message':{{'role':'user','parts':[]}}}}}}).encode(), "
            f"headers={{'Content-Type':'application/json'}}), timeout=10).read()",
        ],
    )
    try:
        end = time.monotonic() + 10
        while get(f"{agent.url}/stats")["active"] == 0:
            assert time.monotonic() < end, "the blocking request never reached the agent"
            time.sleep(0.01)
        qids = []
        for i in range(3):
            status, data = send(base, f"m{i}")
            assert status in (200, 202)
            if status == 202:
                qids.append(data["result"]["id"])
        assert qids
        # Once the blocker is done only a2ad talks to the agent, so an active
        # request there is a2ad's delivery of the first item, not an attempt
        # that is about to be answered busy and handed back.
        blocker.wait(timeout=10)
        end = time.monotonic() + 10
        while get(f"{agent.url}/stats")["active"] == 0:
            assert time.monotonic() < end, "a2ad never delivered the first item"
            time.sleep(0.01)
        first = wait_for_state(base, qids[0], "dispatching")
        assert first["attempts"] == 0
        started = time.monotonic()
        assert a2ad.stop(signal.SIGTERM, timeout=15) == 0
        assert time.monotonic() - started < grace + 5
    finally:
        blocker.wait(timeout=10)
    # What the stopped process left in the store: the first item finished, or was
    # handed back without using an attempt; nothing else was claimed meanwhile.
    db = sqlite3.connect(config.store)
    try:
        rows = dict(
            db.execute(
                f"SELECT id, state || ':' || attempts FROM items WHERE id IN"
                f" ({','.join('?' * len(qids))})",
                qids,
            ).fetchall()
        )
    finally:
        db.close()
    assert rows[qids[0]] == f"{expected}:0"
    assert all(rows[qid] == "queued:0" for qid in qids[1:])
    launcher.a2ad(config)
    for qid in qids:
        item = get(f"{base}/queue/{qid}?wait=15")
        assert item["state"] == "delivered" and item["attempts"] == 0, item


def test_ready_then_watchdog_on_the_notify_socket(launcher: Launcher, tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    try:
        config = launcher.config()
        launcher.a2ad(
            config, ready=False, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        )
        first = sock.recv(256).decode()
        assert first == "READY=1"
        # READY comes once the port answers.
        assert get(f"{config.url}/healthz") == {"status": "ok"}
        assert sock.recv(256).decode() == "WATCHDOG=1"
        assert sock.recv(256).decode() == "WATCHDOG=1"
    finally:
        sock.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "a2ad.service").read_text()
    assert "Type=notify" in unit and "NoNewPrivileges=yes" in unit
    # The unit names /opt/a2ad/bin/a2ad; verify it against this checkout's a2ad.
    a2ad = shutil.which("a2ad", path=str(Path(sys.executable).parent))
    assert a2ad is not None
    copy = tmp_path / "a2ad.service"
    copy.write_text(unit.replace("/opt/a2ad/bin/a2ad", a2ad))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in result.stderr.splitlines() if "a2ad.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
