"""Push notifications from a real `a2ad serve` to a real webhook: updates made while
the receiver is down reach it after a kill -9 and a restart, and dead letters are
listed and delivered again from the CLI (`a2ad queue pushes`, `push-retry`)."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from a2ad_http import http_json, item, send_body

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher

WORKSPACE = "w"
DEADLINE = 20.0


class Receiver:
    """A webhook on 127.0.0.1:`port`, in a thread: records each push."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: list[tuple[dict[str, Any], str | None]] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @contextlib.contextmanager
    def up(self) -> Iterator[None]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver._lock:
                    receiver.got.append((body, self.headers.get("X-A2A-Notification-Token")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield
        finally:
            server.shutdown()
            server.server_close()

    def states(self) -> dict[str, list[str]]:
        """Each task's pushed states, in the order they came."""
        with self._lock:
            seen: dict[str, list[str]] = {}
            for body, _ in self.got:
                seen.setdefault(body["id"], []).append(body["status"]["state"])
            return seen

    def wait_for(self, expected: dict[str, list[str]]) -> None:
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            if all(self.states().get(k, [])[-len(v) :] == v for k, v in expected.items()):
                return
            time.sleep(0.05)
        assert self.states() == expected


def send(base: str, webhook: str, text: str) -> str:
    """A non-blocking v0.3 send with a push config; its queue id."""
    body = send_body(text)
    config = {"url": webhook, "token": f"tok-{text}"}
    body["params"]["configuration"]["pushNotificationConfig"] = config
    status, data = http_json("POST", f"{base}/workspaces/{WORKSPACE}/a2a", body)
    assert status == 202, data
    qid: str = data["result"]["id"]
    return qid


def configure(launcher: Launcher, agent_url: str, **push: Any) -> A2adConfig:
    return launcher.config(
        workspaces=[{"id": WORKSPACE, "url": agent_url, "heartbeat": False, "max_concurrent": 2}],
        push={"allowed_hosts": ["127.0.0.1"], **push},
    )


def test_updates_made_while_the_receiver_is_down_arrive_after_a_kill_and_restart(
    launcher: Launcher,
) -> None:
    agent = launcher.demo_agent(delay=0.05, slots=2)
    config = configure(launcher, agent.url, max_attempts=100)
    receiver = Receiver(launcher.free_port())
    expected: dict[str, list[str]] = {}
    for trial in range(3):
        a2ad = launcher.a2ad(config)
        qids = [send(config.url, receiver.url, f"t{trial}-{n}") for n in range(5)]
        for qid in qids:  # delivered, their pushes refused by the receiver that is down
            assert item(config.url, qid, wait=10)["state"] == "delivered"
            expected[qid] = ["submitted", "completed"]
        a2ad.kill()
        with receiver.up():
            restarted = launcher.a2ad(config)
            receiver.wait_for(expected)
            restarted.stop()
    tokens = {token for _, token in receiver.got}
    assert tokens == {f"tok-t{t}-{n}" for t in range(3) for n in range(5)}


def test_dead_letters_are_listed_and_delivered_again_from_the_cli(launcher: Launcher) -> None:
    agent = launcher.demo_agent(delay=0.05, slots=2)
    config = configure(launcher, agent.url, max_attempts=2)
    receiver = Receiver(launcher.free_port())
    launcher.a2ad(config)
    qid = send(config.url, receiver.url, "lost")
    assert item(config.url, qid, wait=10)["state"] == "delivered"
    end = time.monotonic() + DEADLINE
    while True:
        status, listing = http_json("GET", f"{config.url}/queue/pushes")
        assert status == 200, listing
        if len(listing["pushes"]) == 2 or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert [p["update"] for p in listing["pushes"]] == ["delivered", "queued"]
    assert all(p["url"] == receiver.url and p["item_id"] == qid for p in listing["pushes"])
    shown = launcher.run("queue", "pushes", "--config", str(config.path))
    assert shown.returncode == 0, shown.stderr
    assert qid in shown.stdout and "cannot reach the receiver" in shown.stdout
    assert "tok-lost" not in shown.stdout
    with receiver.up():
        retried = launcher.run("queue", "push-retry", "--all", "--config", str(config.path))
        assert retried.returncode == 0, retried.stderr
        assert "2 push updates due again" in retried.stdout
        receiver.wait_for({qid: ["submitted", "completed"]})
    assert receiver.states() == {qid: ["submitted", "completed"]}
    again = launcher.run("queue", "push-retry", "7777", "--config", str(config.path))
    assert again.returncode != 0 and "no dead push update 7777" in again.stderr
