"""Soak: kill -9 a2ad at random moments under concurrent load, restart it on the same
store, again and again; then reconcile. Every send a2ad acknowledged (a 202 with a
queue id, or the agent's own answer relayed with a 200) is delivered in the end:
at least once (duplicates are allowed), never lost. Every other send carries a push
config: each of those acknowledged with a 202 also ends with its final update at
the test's webhook, whatever the kills fell between.

It runs on each store: the SQLite file, and a PostgreSQL server of its own, which
is also stopped at once (as a crash would) and started again under load in some
trials, while a2ad runs: sends then get 503 store_unavailable, and a2ad carries on
by itself once the server is back.

A2AD_SOAK_TRIALS sets the number of kills (3 here, 100 under `make soak`);
A2AD_SOAK_SEED replays a run's kill schedule (the seed is printed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import fault_agent
import pytest
from aiohttp import web
from local_server import served
from pgserver import PgServer
from queue_drain import PostgresRows, SqliteRows, StoreRows, wait_drained

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher, Process

AGENT_SCRIPT = Path(__file__).with_name("fault_agent.py")
WORKSPACE = "soak"
TRIALS = int(os.environ.get("A2AD_SOAK_TRIALS", "3"))
SEED = int(os.environ.get("A2AD_SOAK_SEED") or time.time_ns() % 2**32)
AGENT_DELAY = 0.02  # seconds per answer, two at a time: six senders fill the queue
AGENT_SLOTS = 2
SENDERS = 6
SENDS_PER_SENDER = 6  # per trial, so the backlog stays bounded over 100 trials
SEND_GAP = 0.1  # a sender waits up to this long between its sends
KILL_WINDOW = 0.8  # a2ad is killed this many seconds (at most) after the load starts
EARLY_KILL_SHARE = 0.2  # trials that kill a2ad while it starts, before it answers
EARLY_KILL_WINDOW = 0.5
CLIENT_TIMEOUT = 5.0
# The final drain fails only when it stops making progress (or, as a last guard
# against hanging, at DRAIN_CAP): the backlog after 100 kills is not a fixed size.
DRAIN_STALL = 15.0
DRAIN_CAP = 300.0
SERVER_RESTART_SHARE = 0.5  # PostgreSQL trials that also crash and restart the server
SERVER_DOWN = 0.5  # seconds the server stays down
PUSH_DEADLINE = 30.0  # after the drain, for the last final updates (leases of 7 s lapse)


@dataclass
class Send:
    """One message sent through a2ad, and what a2ad answered."""

    message_id: str
    rpc_id: str
    trial: int
    webhook: str = ""  # a push config's URL, for every other send
    status: int = 0
    body: Any = None
    error: str = ""

    @property
    def queue_id(self) -> str | None:
        if self.status != 202:
            return None
        queue_id: str = self.body["result"]["id"]
        return queue_id


def start_agent(launcher: Launcher, log: Path) -> Process:
    """fault_agent.py without faults: it answers every message after AGENT_DELAY."""
    port = launcher.free_port()
    argv = [sys.executable, str(AGENT_SCRIPT), "--port", str(port), "--log", str(log)]
    argv += ["--delay", str(AGENT_DELAY)]
    process = launcher.spawn("fault-agent", argv, url=f"http://127.0.0.1:{port}")
    process.wait_until("/stats")
    return process


def tracebacks(directory: Path) -> dict[str, str]:
    """The stderr of each a2ad process started in `directory` that logged a traceback."""
    found = {}
    for log in sorted(directory.glob("a2ad-*.err")):
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            found[log.name] = text[-4000:]
    return found


async def post(session: aiohttp.ClientSession, base: str, send: Send) -> None:
    message = {
        "kind": "message",
        "role": "user",
        "messageId": send.message_id,
        "parts": [{"kind": "text", "text": "soak"}],
    }
    configuration: dict[str, Any] = {"blocking": False}
    if send.webhook:
        configuration["pushNotificationConfig"] = {"url": send.webhook, "token": "soak"}
    payload = {
        "jsonrpc": "2.0",
        "id": send.rpc_id,
        "method": "message/send",
        "params": {"message": message, "configuration": configuration},
    }
    try:
        async with session.post(f"{base}/workspaces/{WORKSPACE}/a2a", json=payload) as resp:
            status, body = resp.status, json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        # Cut off by the kill: a2ad may or may not have stored it; no promise was made.
        send.error = f"{type(exc).__name__}: {exc}"
    else:
        send.status, send.body = status, body


class Webhook:
    """The callers' webhook: the queue ids whose final (completed) update arrived."""

    def __init__(self) -> None:
        self.completed: set[str] = set()
        self.url = ""
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        task = await request.json()  # registered in v0.3: the v0.3 Task itself
        if task["status"]["state"] == "completed":
            self.completed.add(task["id"])
            self.changed.set()
        return web.Response(status=200)

    async def missing(self, queue_ids: set[str], *, within: float) -> set[str]:
        """Those of `queue_ids` whose final update has not arrived within `within` s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while queue_ids - self.completed:
                    self.changed.clear()
                    await self.changed.wait()
        return queue_ids - self.completed


@contextlib.asynccontextmanager
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    async with served(app) as port:
        hook.url = f"http://127.0.0.1:{port}/hook"
        yield hook


@pytest.fixture(params=["sqlite", "postgres"])
def soak_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[dict[str, Any] | None, StoreRows, PgServer | None]]:
    """The store section of a2ad.toml, a reader of its rows, and the PostgreSQL
    server (one of this test's own, as it is stopped and started again)."""
    if request.param == "sqlite":
        yield None, SqliteRows(tmp_path / "var" / "a2ad.db"), None
        return
    with PgServer() as server:
        yield {"url": server.url, "schema": "soak"}, PostgresRows(server.url, "soak"), server


@pytest.mark.slow
async def test_sigkill_at_random_moments_loses_nothing(
    launcher: Launcher,
    tmp_path: Path,
    soak_store: tuple[dict[str, Any] | None, StoreRows, PgServer | None],
) -> None:
    store_section, rows, pg = soak_store
    print(f"\nA2AD_SOAK_SEED={SEED} ({'postgres' if pg else 'sqlite'}), {TRIALS} trials")
    async with webhook() as hook:
        await soak(launcher, tmp_path, store_section, rows, pg, hook)


async def soak(
    launcher: Launcher,
    tmp_path: Path,
    store_section: dict[str, Any] | None,
    rows: StoreRows,
    pg: PgServer | None,
    hook: Webhook,
) -> None:
    schedule = random.Random(SEED)  # which trials kill early, and when: replayable
    gaps = random.Random(SEED + 1)  # drawn by concurrent senders, so in no fixed order
    context = f"A2AD_SOAK_SEED={SEED} ({'postgres' if pg else 'sqlite'})"
    agent_log = tmp_path / "agent.log"
    agent = await asyncio.to_thread(start_agent, launcher, agent_log)
    config: A2adConfig = launcher.config(
        store=store_section,
        workspaces=[
            {
                "id": WORKSPACE,
                "url": agent.url + "/",
                "heartbeat": False,
                "max_concurrent": AGENT_SLOTS,
                "request_timeout_seconds": 5.0,
            }
        ],
        # A kill mid-delivery costs the item an attempt; it must never run out.
        queue={"max_attempts": 1000, "lease_seconds": 10.0},
        # A push taken by a killed a2ad is sent again once its lease lapses (on
        # PostgreSQL; SQLite's only process takes it back at start-up).
        push={"allowed_hosts": ["127.0.0.1"], "timeout_seconds": 2.0, "max_attempts": 1000},
    )
    if pg is not None:
        migrated = await asyncio.to_thread(launcher.run, "migrate", "--config", str(config.path))
        assert migrated.returncode == 0, migrated.stderr
    base = config.url
    sends: list[Send] = []
    kills = Counter[str]()

    async def sender(session: aiohttp.ClientSession, trial: int, stop: asyncio.Event) -> None:
        for _ in range(SENDS_PER_SENDER):
            if stop.is_set():
                return
            n = len(sends)
            send = Send(f"soak-{trial}-{n}-{uuid.uuid4().hex}", f"rpc-{n}", trial)
            send.webhook = hook.url if n % 2 else ""
            sends.append(send)
            await post(session, base, send)
            await asyncio.sleep(gaps.uniform(0, SEND_GAP))

    for trial in range(TRIALS):
        early = schedule.random() < EARLY_KILL_SHARE
        a2ad: Process = await asyncio.to_thread(launcher.a2ad, config, ready=not early)
        delay = schedule.uniform(0, EARLY_KILL_WINDOW if early else KILL_WINDOW)
        stop = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            load = [asyncio.create_task(sender(session, trial, stop)) for _ in range(SENDERS)]
            if pg is not None and not early and schedule.random() < SERVER_RESTART_SHARE:
                # The database crashes and comes back while a2ad runs under load.
                await asyncio.sleep(schedule.uniform(0, KILL_WINDOW / 2))
                await asyncio.to_thread(pg.kill)
                await asyncio.sleep(SERVER_DOWN)
                await asyncio.to_thread(pg.launch)
                kills["database restarted"] += 1
            await asyncio.sleep(delay)
            assert a2ad.running(), f"{context}: a2ad exited on its own:\n{a2ad.stderr()[-4000:]}"
            await asyncio.to_thread(a2ad.kill)
            stop.set()
            await asyncio.gather(*load)
        kills["while starting" if early else "under load"] += 1
        # Checkpoint, with a2ad dead: everything acknowledged so far is in the file.
        items = await asyncio.to_thread(rows.items)
        acked = [s.queue_id for s in sends if s.queue_id is not None]
        missing = [qid for qid in acked if qid not in items]
        assert not missing, f"{context}: trial {trial}: acknowledged but not stored: {missing}"

    # The last restart: a2ad recovers what the kills left and delivers it all.
    a2ad = await asyncio.to_thread(launcher.a2ad, config)
    left = await wait_drained(rows, stall=DRAIN_STALL, cap=DRAIN_CAP)
    items = await asyncio.to_thread(rows.items)
    outcomes = Counter(entry["messageId"] for entry in fault_agent.read_log(agent_log))
    statuses = Counter(s.status or "cut off" for s in sends)
    duplicates = sum(1 for n in outcomes.values() if n > 1)
    print(
        f"kills {dict(kills)}; sends {dict(statuses)}; items {len(items)};"
        f" agent requests {sum(outcomes.values())}, messages seen twice or more {duplicates}"
    )

    # 503: the database was down (store_unavailable); nothing was promised.
    allowed = {200, 202, "cut off", *([503] if pg is not None else [])}
    assert set(statuses) <= allowed, f"{context}: {statuses}"
    assert not left, f"{context}: delivery stopped making progress, still live: {left}"
    lost = []
    for send in sends:
        qid = send.queue_id
        if send.status == 200:
            # A direct answer: the agent's own, to this message.
            assert send.body["id"] == send.rpc_id, (context, send)
            assert send.message_id in json.dumps(send.body), (context, send)
            if not outcomes[send.message_id]:
                lost.append(send)
            continue
        if qid is None:
            continue
        item = items.get(qid)
        if item is None or item["state"] != "delivered" or not outcomes[send.message_id]:
            lost.append(send)
            continue
        assert item["message_id"] == send.message_id, (context, item)
        result = json.loads(item["result"])
        assert result["id"] == send.rpc_id, (context, item)
        assert f"ok {send.message_id}" in item["result"].decode(), (context, item)
    report = [(s.trial, s.queue_id, items.get(s.queue_id or "")) for s in lost[:5]]
    assert not lost, f"{context}: {len(lost)} acknowledged sends lost: {report}"
    assert any(s.queue_id for s in sends), f"{context}: nothing was ever queued"
    # Every acknowledged send with a push config: its final update at the webhook.
    pushed = {s.queue_id for s in sends if s.webhook and s.queue_id}
    unpushed = sorted(await hook.missing(pushed, within=PUSH_DEADLINE))
    assert not unpushed, f"{context}: {len(unpushed)} of {len(pushed)} never pushed: {unpushed[:5]}"
    print(f"pushes: {len(pushed)} tasks' final updates arrived")
    assert rows.healthy()
    # No a2ad process, killed or not, met an exception it did not expect.
    assert not tracebacks(tmp_path), f"{context}: {tracebacks(tmp_path)}"
    assert a2ad.running()
