"""Once a2ad has answered 202, nothing is lost, whatever the agent does.

The real `a2ad serve` fronts fault_agent.py, which stalls, resets connections
mid-body, answers garbage, HTML and 503 storms, dribbles bodies, and is killed
and restarted once in the middle. A few hundred concurrent sends later, every
acknowledged item ends `delivered` (with that message's own answer, which the
agent's log shows it sent) or `failed` with a reason; none is lost or stuck."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import fault_agent
import pytest
from queue_drain import wait_drained

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher, Process

AGENT_SCRIPT = Path(__file__).with_name("fault_agent.py")
WORKSPACE = "faulty"
SEED = int(os.environ.get("A2AD_FAULT_SEED", "1234"))
SENDS = 300
DIRECT_PHASE = 40  # sent first by two senders only, so many find a free slot and go direct
SENDERS = 16
SEND_GAP = 0.2  # a sender waits up to this long between sends, so the load spreads out
KILL_AT = 120  # requests the agent has received when it is killed
OUTAGE = 0.8  # seconds the agent stays dead
MAX_ATTEMPTS = 3
REQUEST_TIMEOUT = 1.0  # a2ad's upstream timeout; the agent's stalls last longer
FAULTS = fault_agent.Faults(
    seed=SEED, fault_rate=0.3, poison_rate=0.04, storm_every=120, storm_length=3
)
AGENT_ARGS = [
    f"--seed={FAULTS.seed}",
    f"--fault-rate={FAULTS.fault_rate}",
    f"--poison-rate={FAULTS.poison_rate}",
    f"--storm-every={FAULTS.storm_every}",
    f"--storm-length={FAULTS.storm_length}",
    f"--stall={REQUEST_TIMEOUT * 2.5}",
    f"--slow={REQUEST_TIMEOUT * 0.3}",
]
CLIENT_TIMEOUT = 20.0  # one send, start to answer: a direct one takes REQUEST_TIMEOUT at most
KILL_DEADLINE = 30.0
# The drain fails only when it stops making progress for longer than any busy pause
# the faults can cause (or, as a last guard against hanging, at DRAIN_CAP).
DRAIN_STALL = 15.0
DRAIN_CAP = 120.0
LIVE_STATES = ("queued", "dispatching")


def start_agent(launcher: Launcher, port: int, log: Path, args: list[str]) -> Process:
    """fault_agent.py on `port`, logging to `log`; returns once it answers."""
    argv = [sys.executable, str(AGENT_SCRIPT), "--port", str(port), "--log", str(log), *args]
    process = launcher.spawn("fault-agent", argv, url=f"http://127.0.0.1:{port}")
    process.wait_until("/stats")
    return process


def read_items(store: Path) -> dict[str, dict[str, Any]]:
    """Every row of the items table, straight from the SQLite file, by id."""
    conn = sqlite3.connect(store, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT id, state, attempts, busy_answers, last_error, message_id, result FROM items"
        ).fetchall()
    finally:
        conn.close()
    return {row["id"]: dict(row) for row in rows}


@dataclass
class Send:
    """One message sent through a2ad, and what a2ad answered."""

    message_id: str
    rpc_id: str
    v1: bool
    status: int = 0
    body: Any = None
    error: str = ""

    @property
    def payload(self) -> dict[str, Any]:
        if self.v1:
            message: dict[str, Any] = {"role": "ROLE_USER", "parts": [{"text": "hi"}]}
            method = "SendMessage"
        else:
            message = {"kind": "message", "role": "user", "parts": [{"kind": "text", "text": "hi"}]}
            method = "message/send"
        message["messageId"] = self.message_id
        non_blocking = {"returnImmediately": True} if self.v1 else {"blocking": False}
        return {
            "jsonrpc": "2.0",
            "id": self.rpc_id,
            "method": method,
            # Not blocking: a queued send is answered 202 at once, with its queue id.
            "params": {"message": message, "configuration": non_blocking},
        }

    @property
    def queue_id(self) -> str | None:
        """The queue id of an acknowledged (202) send."""
        if self.status != 202:
            return None
        result = self.body["result"]
        task = result["task"] if self.v1 else result
        queue_id: str = task["id"]
        return queue_id


def new_send(n: int) -> Send:
    # From the seed, so a rerun with A2AD_FAULT_SEED meets the same faults per message.
    return Send(message_id=f"m-{SEED}-{n}", rpc_id=f"rpc-{n}", v1=n % 5 == 0)


async def post(session: aiohttp.ClientSession, base: str, send: Send, priority: str) -> None:
    headers = {"A2AD-Priority": priority}
    if send.v1:
        headers["A2A-Version"] = "1.0"
    try:
        async with session.post(
            f"{base}/workspaces/{WORKSPACE}/a2a", json=send.payload, headers=headers
        ) as resp:
            send.status = resp.status
            send.body = json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        send.error = f"{type(exc).__name__}: {exc}"


def agent_log_by_message(log: Path) -> dict[str, list[str]]:
    outcomes: dict[str, list[str]] = defaultdict(list)
    for entry in fault_agent.read_log(log):
        outcomes[entry["messageId"]].append(entry["outcome"])
    return outcomes


@pytest.mark.slow
async def test_nothing_acknowledged_is_lost_to_a_faulty_agent(
    launcher: Launcher, tmp_path: Path
) -> None:
    port = launcher.free_port()
    agent_log = tmp_path / "fault-agent.log"
    agent = await asyncio.to_thread(start_agent, launcher, port, agent_log, AGENT_ARGS)
    config: A2adConfig = launcher.config(
        workspaces=[
            {
                "id": WORKSPACE,
                "url": agent.url + "/",
                "heartbeat": False,
                "max_concurrent": 4,
                "request_timeout_seconds": REQUEST_TIMEOUT,
            }
        ],
        queue={
            "max_attempts": MAX_ATTEMPTS,
            "lease_seconds": 4 * REQUEST_TIMEOUT,
            "backoff_base_seconds": 0.1,
            "backoff_max_seconds": 0.4,
        },
        liveness={
            "probe_interval_seconds": 0.3,
            "recent_heartbeat_seconds": 1.0,
            "debounce_window_seconds": 2.0,
        },
    )
    a2ad: Process = await asyncio.to_thread(launcher.a2ad, config)
    base = config.url
    rng = random.Random(SEED)
    sends = [new_send(n) for n in range(SENDS)]
    priorities = [rng.choice(["critical", "task", "task", "info"]) for _ in sends]
    gaps = [rng.uniform(0, SEND_GAP) for _ in sends]

    async def sender(session: aiohttp.ClientSession, todo: asyncio.Queue[int]) -> None:
        while not todo.empty():
            n = todo.get_nowait()
            await post(session, base, sends[n], priorities[n])
            await asyncio.sleep(gaps[n])

    async def kill_and_restart_agent() -> None:
        """The agent dies in the middle of the run and comes back on the same port."""
        nonlocal agent
        end = time.monotonic() + KILL_DEADLINE
        while len(fault_agent.read_log(agent_log)) < KILL_AT:
            assert time.monotonic() < end, "the agent never got KILL_AT requests"
            await asyncio.sleep(0.02)
        await asyncio.to_thread(agent.kill)
        await asyncio.sleep(OUTAGE)
        agent = await asyncio.to_thread(start_agent, launcher, port, agent_log, AGENT_ARGS)

    async def send_all(session: aiohttp.ClientSession) -> None:
        for numbers, senders in ((range(DIRECT_PHASE), 2), (range(DIRECT_PHASE, SENDS), SENDERS)):
            todo: asyncio.Queue[int] = asyncio.Queue()
            for n in numbers:
                todo.put_nowait(n)
            await asyncio.gather(*(sender(session, todo) for _ in range(senders)))

    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(kill_and_restart_agent(), send_all(session))
        left = await wait_drained(config.store, stall=DRAIN_STALL, cap=DRAIN_CAP)
        items = await asyncio.to_thread(read_items, config.store)
        acked = {send.queue_id: send for send in sends if send.queue_id is not None}

        async def view(qid: str) -> tuple[int, dict[str, Any]]:
            async with session.get(f"{base}/queue/{qid}") as resp:
                return resp.status, await resp.json()

        views = dict(zip(acked, await asyncio.gather(*(view(q) for q in acked)), strict=True))

    outcomes = agent_log_by_message(agent_log)
    statuses = Counter(send.status for send in sends)
    states = Counter(items[q]["state"] for q in acked if q in items)
    print(
        f"\nseed {SEED}: answers {dict(statuses)}; acknowledged items {dict(states)};"
        f" agent requests {sum(map(len, outcomes.values()))}"
        f" {dict(Counter(o for per_message in outcomes.values() for o in per_message))}"
    )

    # Every send got an answer from a2ad, and never a 500 of its own.
    assert not [s for s in sends if s.error], [s.error for s in sends if s.error][:5]
    assert set(statuses) <= {200, 202, 500, 502, 504}, statuses
    for send in sends:
        if send.status == 500:  # only the agent's own 500 (http_500), relayed unchanged
            assert send.body["error"]["data"]["agent"] == fault_agent.AGENT_NAME, send.body
    assert acked, "no send was queued"

    # Nothing is left queued or dispatching, and nothing is stuck.
    assert not left, f"delivery stopped making progress, still live: {left}"
    stuck = {q: i for q, i in items.items() if i["state"] in LIVE_STATES}
    assert not stuck, stuck

    # None lost: each acknowledged id is in the store, delivered or failed with a
    # reason; and nothing is stored that a2ad did not acknowledge (a direct send that
    # failed went back to its caller).
    missing = sorted(set(acked) - set(items))
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged items lost: {missing[:5]}"
    assert set(items) == set(acked)
    for qid, send in acked.items():
        item = items[qid]
        assert item["message_id"] == send.message_id, item
        assert item["state"] in ("delivered", "failed"), item
        assert item["attempts"] <= MAX_ATTEMPTS, item
        seen = outcomes.get(send.message_id, [])
        if item["state"] == "failed":
            assert item["last_error"], item
            assert item["attempts"] == MAX_ATTEMPTS, item
            continue
        # Delivered: the agent's log shows it sent this message a final answer, and
        # the stored result is that answer to this very request.
        assert fault_agent.FINAL_OUTCOMES & set(seen), (item, seen)
        result = json.loads(item["result"])
        assert result["id"] == send.rpc_id, (item, result)
        assert send.message_id in item["result"].decode(), item
    # A poison message never gets a final answer: acknowledged, it ends failed.
    poison = [q for q, s in acked.items() if FAULTS.is_poison(s.message_id)]
    assert all(items[q]["state"] == "failed" for q in poison), [items[q] for q in poison]

    # The operator's view says the same as the file.
    for qid, (status, item_view) in views.items():
        assert status == 200, item_view
        assert item_view["state"] == items[qid]["state"], (item_view, items[qid])
        assert item_view["last_error"] == items[qid]["last_error"]

    # Direct answers (200, or the agent's 500 relayed) are deliveries too: the agent
    # sent this message that final answer.
    for send in sends:
        if send.status in (200, 500):
            assert send.body["id"] == send.rpc_id, send
            assert send.message_id in json.dumps(send.body), send
            assert fault_agent.FINAL_OUTCOMES & set(outcomes[send.message_id]), send
        elif send.status in (502, 504):
            assert send.body["error"]["data"]["code"] in ("upstream_failed", "upstream_timeout")

    # a2ad met no exception it did not expect.
    assert "Traceback" not in a2ad.stderr(), a2ad.stderr()[-4000:]
    assert a2ad.running()
