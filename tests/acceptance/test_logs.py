"""The log as an operator reads it: one line per event, plain or JSON, and a request
id that follows a queued message from the proxy request to its delivery."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from a2ad_http import http_call, send_body

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher, Process

PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) [\w.]+: \S")


def send(base: str, request_id: str) -> dict[str, Any]:
    status, data, headers = http_call(
        "POST", f"{base}/workspaces/w/a2a", send_body("hello"), {"X-Request-Id": request_id}
    )
    assert status in (200, 202), data
    assert headers["X-Request-Id"] == request_id
    return dict(data)


def queue_two_and_deliver(config: A2adConfig) -> str:
    """Send two messages to a one-slot agent so the second is queued; wait until it
    is delivered; the queue id of the second."""
    first = threading.Thread(target=send, args=(config.url, "first-req"))
    first.start()
    end = time.monotonic() + 10
    while not agent_busy(config):
        assert time.monotonic() < end, "the first request never reached the agent"
        time.sleep(0.02)
    queued = send(config.url, "second-req")
    first.join(timeout=10)
    qid: str = queued["result"]["id"]
    with urllib.request.urlopen(f"{config.url}/queue/{qid}?wait=20", timeout=30) as resp:
        assert json.loads(resp.read())["state"] == "delivered"
    return qid


def agent_busy(config: A2adConfig) -> bool:
    with urllib.request.urlopen(f"{config.url}/workspaces/w", timeout=10) as resp:
        return bool(json.loads(resp.read())["in_flight"])


def lines_until(process: Process, text: str) -> list[str]:
    end = time.monotonic() + 10
    while text not in process.stderr():
        assert time.monotonic() < end, f"never logged {text!r}:\n{process.stderr()}"
        time.sleep(0.05)
    return process.stderr().splitlines()


def test_json_logs_carry_the_request_id_to_the_delivery(launcher: Launcher) -> None:
    agent = launcher.demo_agent(delay=0.5)
    config = launcher.config(workspaces=[{"id": "w", "url": agent.url + "/", "heartbeat": False}])
    argv = [sys.executable, "-m", "a2ad", "serve", "--config", str(config.path)]
    argv += ["--log-format", "json"]
    argv += ["--log-level", "debug"]  # per-message lines are DEBUG
    a2ad = launcher.spawn("a2ad", argv, url=config.url)
    a2ad.wait_until("/healthz")
    qid = queue_two_and_deliver(config)

    events = [json.loads(line) for line in lines_until(a2ad, f"{qid} delivered")]
    for event in events:
        assert {"time", "level", "logger", "message"} <= set(event)
        assert event["time"].endswith("Z")
    about = [e for e in events if e.get("request_id") == "second-req"]
    messages = " | ".join(e["message"] for e in about)
    assert any("queued as " + qid in e["message"] for e in about), messages
    delivered = [e for e in about if "delivered" in e["message"]]
    assert delivered, messages
    assert delivered[0]["item"] == qid and delivered[0]["workspace"] == "w"
    assert delivered[0]["logger"] == "a2ad.delivery"


def test_plain_logs_are_one_line_per_event(launcher: Launcher) -> None:
    """At the default level a busy a2ad logs state changes, not a line per message
    (thousands a second would swamp journald, which drops lines past its limit)."""
    agent = launcher.demo_agent(delay=0.5)
    config = launcher.config(workspaces=[{"id": "w", "url": agent.url + "/", "heartbeat": False}])
    a2ad = launcher.a2ad(config)
    qid = queue_two_and_deliver(config)
    a2ad.stop()
    lines = a2ad.stderr().splitlines()
    assert any("a2ad stopped" in line for line in lines)
    for line in lines:
        assert PLAIN_LINE.match(line), line
        assert qid not in line and "DEBUG" not in line, line
