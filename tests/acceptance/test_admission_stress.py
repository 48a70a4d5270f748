"""Admission under stress, against the real `a2ad serve` (issue 14's process-level test).

Two agents, real aiohttp servers on loopback in the test's own event loop, answer
message/send after 0.1-0.2 s and count the requests they hold at once: one behind a
workspace with max_concurrent = 1, one behind max_concurrent = 3. Heartbeats are off
(heartbeat = false), so a workspace's capacity is exactly its max_concurrent, with no
outside load to subtract, and the agent's own count must never pass it. A third
workspace points at a closed port: items sent to it with A2AD-TTL: 1 expire all
through the load, so the sweeper expires items (and does whatever it does after an
expiry) while sends arrive. The store is prefilled with a quarter of a million
delivered rows, retained and within the replay window, so every housekeeping query
runs against a big table and any send may be a replay.

The load, on both agents at once: a wave of concurrent sends, each on its own
connection, to idle agents; at once, while the queue it left drains, steady senders
(one more per workspace than it has slots, each one send at a time) and another wave;
then, once everything has drained, the same again (the case where every send used to
go straight through at once); after the last wave, a tail of steady sends while the
last TTL items expire, and for a while after, with no expiry left to set anything
right. What a user would check:
- an agent never holds more requests than its slots;
- every send is answered 200 (the agent's own answer) or 202 (a queued Task); every
  202 is delivered within seconds of the load ending; the agent received every
  messageId answered 200 or 202;
- no queued item waits while its agent sits idle.

The second test sends SIGTERM, with a short shutdown grace, while a 1-slot agent's
backlog drains: in the middle of a request (which outlasts the grace), or straight
from the agent's handler as its answer leaves (when a2ad frees the slot and its next
claim is on the way), or a moment after. After each graceful exit the store file,
opened read-only, has no row `dispatching` and no item charged an attempt; a restart
on the same store delivers everything.

Bigger runs: A2AD_STRESS_ROUNDS (rounds of waves before and after a drain; 2 here),
A2AD_STRESS_ROWS (prefilled rows; 240000 here), A2AD_STRESS_SIGTERMS (4 here).
A2AD_STRESS_SEED replays the agents' delays and the SIGTERM timings (it is printed)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher, Process

SEED = int(os.environ.get("A2AD_STRESS_SEED") or time.time_ns() % 2**32)
ROUNDS = int(os.environ.get("A2AD_STRESS_ROUNDS", "2"))
ROWS = int(os.environ.get("A2AD_STRESS_ROWS", "240000"))
SIGTERMS = int(os.environ.get("A2AD_STRESS_SIGTERMS", "4"))

ADMIN_TOKEN = "stress-admin-token"
SLOTS = {"one": 1, "three": 3}
WAVE = {"one": 12, "three": 24}  # concurrent sends per wave: 36 connections at once
STEADY_SENDS = 4  # per steady sender, slots + 1 senders per workspace
# Seconds a steady sender waits between its sends: together a little faster than the
# agents drain (one: 2 senders, about 10 a second; it serves about 7).
STEADY_GAP = 0.2
TAIL_SECONDS = 3.0  # steady sends after the last wave, while the last TTL items expire
GONE = "gone"  # the workspace whose agent is a closed port
AGENT_DELAY = (0.1, 0.2)  # seconds an agent works on each request
TTL_EVERY = 0.2  # seconds between the A2AD-TTL: 1 sends to GONE
TTL_DEADLINE = 10.0  # for those to be expired after the load (SPEC: within about a second)
# A due item may wait this long while its agent is idle before it counts as stranded:
# a2ad starts the next delivery within milliseconds of a slot freeing, so this only
# absorbs a loaded machine's hiccups.
IDLE_GRACE = 3.0
WATCH_EVERY = 0.1
# Between waves: stop waiting for a drain that has made no progress for this long
# (it is reported, and the final checks fail on what is left).
DRAIN_STALL = 8.0
# After the load: the backlog at the agents' slowest pace, plus this.
DELIVERY_SLACK = 10.0
CLIENT_TIMEOUT = 60.0
PREFILL_LIMIT = 30.0  # seconds: a few on an idle machine; a guard, not a benchmark

SLOW = "slow"
SLOW_DELAY = 0.3  # the SIGTERM test's agent: one request at a time, this long each
GRACE = 0.1  # server.shutdown_grace_seconds there: shorter than a request
HANDOFF_JITTER = 0.002  # or SIGTERM up to this long after the answer went out
BACKLOG = max(16, 4 * SIGTERMS)
STOP_DEADLINE = 20.0  # for a2ad to exit after SIGTERM

FINAL_STATES = {"delivered", "failed", "expired", "cancelled"}


# -- the agents ----------------------------------------------------------------


class CountingAgent:
    """An A2A agent on loopback that answers message/send after a delay, counting the
    requests it holds at once and every messageId it receives."""

    def __init__(self, name: str, delays: tuple[float, float], rng: random.Random) -> None:
        self.name = name
        self.delays = delays
        self.rng = rng
        self.active = 0  # requests held right now
        self.peak = 0  # the most held at once since the last `reset_peak`
        self.highest = 0  # the most held at once, ever
        self.requests = 0
        self.answered = 0
        self.received: Counter[str] = Counter()
        self.url = ""
        # Called once, right after the next answer is written out (then cleared).
        self.after_answer: Callable[[], object] | None = None
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/", self.handle)
        app.router.add_get("/.well-known/agent-card.json", self.card)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port: int = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def reset_peak(self) -> int:
        """The peak since the last reset; the next one starts from what is held now."""
        peak, self.peak = self.peak, self.active
        return peak

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, done: Callable[[], bool], what: str, within: float) -> None:
        """Until `done()` holds, woken by each request and answer; fails after `within` s."""
        try:
            async with asyncio.timeout(within):
                while not done():
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"agent {self.name}: {what}, not within {within} s") from None

    async def wait_request(self, within: float) -> None:
        """Until the agent receives its next request."""
        seen = self.requests
        await self.wait_for(lambda: self.requests > seen, "no request", within)

    async def wait_answer(self, within: float) -> None:
        """Until the agent has sent its next answer."""
        done = self.answered
        await self.wait_for(lambda: self.answered > done, "no answer", within)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rpc_id = body.get("id") if isinstance(body, dict) else None
        try:
            message_id = str(body["params"]["message"]["messageId"])
        except (KeyError, TypeError):
            error = {"code": -32602, "message": "a message/send with a messageId, please"}
            return web.json_response({"jsonrpc": "2.0", "id": rpc_id, "error": error})
        self.requests += 1
        self.received[message_id] += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.highest = max(self.highest, self.active)
        self._notify()
        try:
            await asyncio.sleep(self.rng.uniform(*self.delays))
        finally:
            # Free before the answer leaves: a2ad cannot free its slot before this,
            # so the count here never runs ahead of a2ad's own.
            self.active -= 1
        reply = {
            "kind": "message",
            "role": "agent",
            "messageId": f"reply-{message_id}",
            "parts": [{"kind": "text", "text": f"ok {message_id}"}],
        }
        response = web.json_response({"jsonrpc": "2.0", "id": rpc_id, "result": reply})
        try:
            # Sent here rather than after return, so `answered` moves once it is out.
            with contextlib.suppress(ConnectionError):  # a2ad gave up on it (shutdown)
                await response.prepare(request)
                await response.write_eof()
        finally:
            self.answered += 1
            self._notify()
        hook, self.after_answer = self.after_answer, None
        if hook is not None:
            hook()
        return response

    async def card(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": f"counting agent {self.name}",
                "description": "answers message/send after a delay",
                "version": "1.0.0",
                "url": self.url,
                "protocolVersion": "0.3.0",
                "capabilities": {"streaming": False},
                "defaultInputModes": ["text/plain"],
                "defaultOutputModes": ["text/plain"],
                "skills": [],
            }
        )


StartAgent = Callable[[str, tuple[float, float]], Awaitable[CountingAgent]]


@pytest.fixture
async def start_agent() -> AsyncIterator[StartAgent]:
    """Start counting agents in this test's loop; all are closed when it ends."""
    started: list[CountingAgent] = []

    async def start(name: str, delays: tuple[float, float]) -> CountingAgent:
        agent = CountingAgent(name, delays, random.Random(f"{SEED}-{name}"))
        started.append(agent)
        await agent.start()
        return agent

    try:
        yield start
    finally:
        for agent in started:
            await agent.close()


# -- sends ---------------------------------------------------------------------


@dataclass
class Send:
    """One message/send through a2ad, and what a2ad answered."""

    workspace: str
    phase: str
    message_id: str
    status: int = 0
    body: Any = None
    error: str = ""

    @property
    def rpc_id(self) -> str:
        return f"rpc-{self.message_id}"

    @property
    def acknowledged(self) -> bool:
        return self.status in (200, 202) and self.problem() is None

    @property
    def queue_id(self) -> str | None:
        if self.status != 202 or not isinstance(self.body, dict):
            return None
        try:
            qid = self.body["result"]["metadata"]["a2ad"]["queue_id"]
        except (KeyError, TypeError):
            return None
        return qid if isinstance(qid, str) else None

    def problem(self) -> str | None:
        """What a caller would find wrong with the answer; None for a 200 that is the
        agent's own answer to this message, or a 202 with its queued Task."""
        if self.error:
            return self.error
        body = self.body if isinstance(self.body, dict) else {}
        result: Any = body.get("result")
        if self.status == 200:
            try:
                text = result["parts"][0]["text"]
            except (KeyError, IndexError, TypeError):
                return f"200 without the agent's answer: {self.body!r:.300}"
            if text != f"ok {self.message_id}" or body.get("id") != self.rpc_id:
                return f"200 with another message's answer: {self.body!r:.300}"
            return None
        if self.status == 202:
            qid = self.queue_id
            try:
                queued = (
                    qid is not None
                    and qid.startswith("q-")
                    and result["id"] == qid
                    and result["status"]["state"] == "submitted"
                    and result["metadata"]["a2ad"]["queued"] is True
                )
            except (KeyError, TypeError):
                queued = False
            return None if queued else f"202 without a queued Task: {self.body!r:.300}"
        return f"HTTP {self.status}: {self.body!r:.300}"


def send_payload(send: Send) -> dict[str, Any]:
    """A v0.3 message/send that does not block: a queued one is answered 202 at once."""
    return {
        "jsonrpc": "2.0",
        "id": send.rpc_id,
        "method": "message/send",
        "params": {
            "message": {
                "kind": "message",
                "role": "user",
                "messageId": send.message_id,
                "parts": [{"kind": "text", "text": f"stress {send.phase}"}],
            },
            "configuration": {"blocking": False},
        },
    }


async def post(
    session: aiohttp.ClientSession,
    base: str,
    send: Send,
    headers: Mapping[str, str] | None = None,
) -> None:
    url = f"{base}/workspaces/{send.workspace}/a2a"
    try:
        async with session.post(url, json=send_payload(send), headers=headers) as resp:
            send.status = resp.status
            send.body = json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        send.error = f"{type(exc).__name__}: {exc}"


async def wave(
    session: aiohttp.ClientSession, base: str, phase: str, sizes: Mapping[str, int]
) -> list[Send]:
    """Concurrent sends, each on its own connection (the pool opens one per send in
    flight); returns once every one is answered."""
    sends = [
        Send(ws, phase, f"{phase}-{ws}-{n}-{uuid.uuid4().hex[:12]}")
        for ws, count in sizes.items()
        for n in range(count)
    ]
    await asyncio.gather(*(post(session, base, send) for send in sends))
    return sends


async def final_items(
    session: aiohttp.ClientSession, base: str, qids: Sequence[str], deadline: float
) -> dict[str, dict[str, Any]]:
    """GET /queue/{qid}, long-polled until each item is final or the (monotonic)
    deadline passes; after it, each item still open is read once more."""
    gate = asyncio.Semaphore(32)

    async def one(qid: str) -> dict[str, Any]:
        async with gate:
            while True:
                remaining = deadline - time.monotonic()
                wait = max(0.1, min(5.0, remaining))
                async with session.get(f"{base}/queue/{qid}?wait={wait:.2f}") as resp:
                    status, text = resp.status, await resp.text()
                if status != 200:
                    return {"id": qid, "state": f"HTTP {status}", "last_error": text[:300]}
                view: dict[str, Any] = json.loads(text)
                if view["state"] in FINAL_STATES or remaining <= 0:
                    return view

    views = await asyncio.gather(*(one(qid) for qid in qids))
    return dict(zip(qids, views, strict=True))


# -- the store, read from outside ---------------------------------------------------


def read_store(store: Path, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """Rows from the store file, opened read-only."""
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def due_queued(store: Path, workspaces: Sequence[str]) -> dict[str, int]:
    """Queued items that are due now (not waiting out a backoff), by workspace."""
    marks = ", ".join("?" for _ in workspaces)
    rows = read_store(
        store,
        "SELECT workspace, COUNT(*) FROM items WHERE state = 'queued' AND not_before <= ?"
        f" AND workspace IN ({marks}) GROUP BY workspace",
        (time.time(), *workspaces),
    )
    return {ws: n for ws, n in rows}


def live_items(store: Path, workspaces: Sequence[str]) -> dict[str, int]:
    """Items queued or dispatching, by workspace."""
    marks = ", ".join("?" for _ in workspaces)
    rows = read_store(
        store,
        "SELECT workspace, COUNT(*) FROM items WHERE state IN ('queued', 'dispatching')"
        f" AND workspace IN ({marks}) GROUP BY workspace",
        tuple(workspaces),
    )
    return {ws: n for ws, n in rows}


_FILL = """
INSERT INTO items (id, workspace, caller, method, body, headers, message_id, context_id,
                   priority, state, attempts, ttl_seconds, expires_at, result,
                   enqueued_at, updated_at, finished_at)
VALUES (?, ?, '', 'message/send', ?, '{}', ?, ?, 50, 'delivered', 0, 86400.0, ?, ?, ?, ?, ?)
"""
_FILL_BODY = (
    b'{"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message":'
    b' {"role": "user", "messageId": "%s", "parts": [{"kind": "text", "text": "old"}]}}}'
)
_FILL_RESULT = (
    b'{"jsonrpc": "2.0", "id": 1, "result": {"kind": "message", "role": "agent",'
    b' "messageId": "reply", "parts": [{"kind": "text", "text": "ok"}]}}'
)
RETAINED_SPAN = 6 * 86400.0  # within the default seven days' retention


def prefill(store: Path, counts: Mapping[str, int]) -> float:
    """Add delivered (final, retained) items to a migrated store, finished over the
    last six days; the seconds it took. One transaction of executemany, with no
    journal while the scratch store is built, then back to WAL as a2ad runs it."""
    started = time.perf_counter()
    now = time.time()
    tag = os.urandom(4).hex()

    def rows(k: int, workspace: str, count: int) -> Iterator[tuple[object, ...]]:
        for n in range(count):
            message_id = f"old-{workspace}-{n}"
            finished = now - RETAINED_SPAN + RETAINED_SPAN * (n + 1) / count
            # Ascending ids (still q- and 32 hex digits) go in at the end of the index.
            hexid = f"{tag}{k:04x}{n:020x}"
            yield (
                f"q-{hexid}",
                workspace,
                _FILL_BODY % message_id.encode(),
                message_id,
                f"ctx-{hexid}",
                finished - 1 + 86400.0,
                _FILL_RESULT,
                finished - 1,
                finished,
                finished,
            )

    conn = sqlite3.connect(store, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-500000")
        conn.execute("BEGIN")
        for k, (workspace, count) in enumerate(counts.items()):
            conn.executemany(_FILL, rows(k, workspace, count))
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()
    return time.perf_counter() - started


def tracebacks(directory: Path) -> dict[str, str]:
    """The end of each a2ad stderr in `directory` that logged a traceback."""
    found = {}
    for log in sorted(directory.glob("a2ad-*.err")):
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            found[log.name] = text[-3000:]
    return found


# -- watching for stranded items ---------------------------------------------------


@dataclass
class Stranded:
    """The longest a due item waited while its agent was idle and received nothing."""

    seconds: float = 0.0
    queued: int = 0
    at: float = 0.0  # seconds into the run


async def watch_idle(
    store: Path,
    agents: Mapping[str, CountingAgent],
    stop: asyncio.Event,
    worst: dict[str, Stranded],
    started: float,
) -> None:
    """Sample the store and the agents until `stop`: for each workspace, how long due
    items have been queued while its agent held nothing and received nothing new."""
    since: dict[str, tuple[float, int] | None] = dict.fromkeys(agents)
    while not stop.is_set():
        due = await asyncio.to_thread(due_queued, store, list(agents))
        now = time.monotonic()
        for ws, agent in agents.items():
            mark = since[ws]
            if not due.get(ws) or agent.active:
                since[ws] = None
            elif mark is None or mark[1] != agent.requests:
                since[ws] = (now, agent.requests)
            elif now - mark[0] > worst[ws].seconds:
                worst[ws] = Stranded(now - mark[0], due[ws], now - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), WATCH_EVERY)


async def wait_drained(store: Path, agents: Mapping[str, CountingAgent]) -> dict[str, int]:
    """Poll until nothing is queued or dispatching for the agents' workspaces and the
    agents hold nothing, or until that has made no progress for DRAIN_STALL seconds;
    what was left ({} when drained)."""
    fewest: int | None = None
    last_progress = time.monotonic()
    while True:
        left = await asyncio.to_thread(live_items, store, list(agents))
        now = time.monotonic()
        if not left and not any(agent.active for agent in agents.values()):
            return {}
        if fewest is None or sum(left.values()) < fewest:
            fewest, last_progress = sum(left.values()), now
        if now - last_progress > DRAIN_STALL:
            return left
        await asyncio.sleep(0.05)


async def steady_sends(
    session: aiohttp.ClientSession, base: str, phase: str, seconds: float | None = None
) -> list[Send]:
    """Sends from slots + 1 senders per workspace, each sender one at a time with
    STEADY_GAP between (more senders than slots, so a queue builds): STEADY_SENDS
    each, or as many as fit in `seconds`."""
    sends: list[Send] = []
    until = None if seconds is None else time.monotonic() + seconds

    def more(n: int) -> bool:
        return n < STEADY_SENDS if until is None else time.monotonic() < until

    async def sender(ws: str, k: int) -> None:
        n = 0
        while more(n):
            send = Send(ws, phase, f"{phase}-{ws}-steady{k}-{n}-{uuid.uuid4().hex[:12]}")
            sends.append(send)
            await post(session, base, send)
            await asyncio.sleep(STEADY_GAP)
            n += 1

    await asyncio.gather(*(sender(ws, k) for ws, slots in SLOTS.items() for k in range(slots + 1)))
    return sends


async def wait_backlog(store: Path, steady: asyncio.Task[list[Send]]) -> dict[str, int]:
    """Until items are live for every agent's workspace, or the steady sends are over;
    the live items then."""
    while True:
        live = await asyncio.to_thread(live_items, store, list(SLOTS))
        if all(live.get(ws) for ws in SLOTS) or steady.done():
            return live
        await asyncio.sleep(0.02)


async def ttl_trickle(
    session: aiohttp.ClientSession, base: str, stop: asyncio.Event, sends: list[Send]
) -> None:
    """Until `stop`: a send with A2AD-TTL: 1 to the workspace no agent answers for."""
    n = 0
    while not stop.is_set():
        send = Send(GONE, "ttl", f"ttl-{n}-{uuid.uuid4().hex[:12]}")
        sends.append(send)
        await post(session, base, send, {"A2AD-TTL": "1"})
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), TTL_EVERY)


def examples(items: Sequence[Any], n: int = 3) -> str:
    return "; ".join(str(item)[:300] for item in items[:n])


# -- the tests -------------------------------------------------------------------


@pytest.mark.slow
async def test_admission_holds_under_concurrent_waves(
    launcher: Launcher, start_agent: StartAgent, tmp_path: Path
) -> None:
    context = f"A2AD_STRESS_SEED={SEED}"
    print(f"\n{context}, {ROUNDS} rounds, {ROWS} prefilled rows")
    agents = {ws: await start_agent(ws, AGENT_DELAY) for ws in SLOTS}
    gone_port = launcher.free_port()  # nothing listens there
    config: A2adConfig = launcher.config(
        auth={"admin_token": ADMIN_TOKEN},
        workspaces=[
            *(
                {
                    "id": ws,
                    "url": agents[ws].url,
                    "max_concurrent": slots,
                    "heartbeat": False,
                    "request_timeout_seconds": CLIENT_TIMEOUT,
                }
                for ws, slots in SLOTS.items()
            ),
            {
                "id": GONE,
                "url": f"http://127.0.0.1:{gone_port}/",
                "heartbeat": False,
                "request_timeout_seconds": 5.0,
            },
        ],
    )
    migrated = await asyncio.to_thread(launcher.run, "migrate", "--config", str(config.path))
    assert migrated.returncode == 0, migrated.stderr
    share = ROWS * 5 // 12
    fill_seconds = await asyncio.to_thread(
        prefill, config.store, {"one": share, "three": share, GONE: ROWS - 2 * share}
    )
    print(f"prefilled {ROWS} delivered rows in {fill_seconds:.1f} s")
    assert fill_seconds < PREFILL_LIMIT, f"prefill took {fill_seconds:.1f} s"

    a2ad: Process = await asyncio.to_thread(launcher.a2ad, config)
    base = config.url
    started = time.monotonic()
    problems: list[str] = []
    sends: list[Send] = []
    ttl_sends: list[Send] = []
    peaks: list[tuple[str, str, int]] = []  # (phase, workspace, most held at once)
    backlog_at: dict[str, dict[str, int]] = {}  # phase → live items when its wave began
    began: dict[str, float] = {}  # phase → seconds into the run
    worst = {ws: Stranded() for ws in agents}
    stop_watch, stop_ttl = asyncio.Event(), asyncio.Event()

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession(timeout=timeout, headers=admin_headers) as admin,
    ):
        watcher = asyncio.create_task(watch_idle(config.store, agents, stop_watch, worst, started))
        trickle = asyncio.create_task(ttl_trickle(session, base, stop_ttl, ttl_sends))
        try:
            phase = ""

            def next_phase(name: str) -> None:
                nonlocal phase
                if phase:  # a phase's peak covers the drain after it too
                    peaks.extend((phase, ws, agent.reset_peak()) for ws, agent in agents.items())
                phase = name
                began[name] = time.monotonic() - started

            for r in range(ROUNDS + 1):
                left = await wait_drained(config.store, agents)
                name = "idle" if r == 0 else f"after-drain-{r}"
                if left:
                    problems.append(
                        f"before wave {name}: the queue stopped draining with {left} live"
                        f" (no progress for {DRAIN_STALL} s)"
                    )
                next_phase(name)
                backlog_at[name] = await asyncio.to_thread(live_items, config.store, list(SLOTS))
                sends.extend(await wave(session, base, name, WAVE))
                if r == ROUNDS:
                    break
                # At once, while the queue drains: steady sends, one at a time per
                # sender (a queue builds behind them even if the wave went straight
                # through), and another wave once items wait.
                name = f"during-{r + 1}"
                next_phase(name)
                steady = asyncio.create_task(steady_sends(session, base, name))
                backlog_at[name] = await wait_backlog(config.store, steady)
                sends.extend(await wave(session, base, name, WAVE))
                sends.extend(await steady)
            # The tail: steady sends go on while the last A2AD-TTL: 1 items expire, and
            # for a while after, when nothing expires any more.
            next_phase("tail")
            backlog_at["tail"] = await asyncio.to_thread(live_items, config.store, list(SLOTS))
            stop_ttl.set()
            sends.extend(await steady_sends(session, base, "tail", TAIL_SECONDS))
            load_ended = time.monotonic()
            await trickle

            # Every 202 is delivered within seconds: the backlog at the agents'
            # slowest pace, plus slack.
            left = await asyncio.to_thread(live_items, config.store, list(SLOTS))
            work = max((n * AGENT_DELAY[1] / SLOTS[ws] for ws, n in left.items()), default=0.0)
            deadline = load_ended + work + DELIVERY_SLACK
            acked = [s for s in sends if s.queue_id is not None]
            views = await final_items(admin, base, [s.queue_id or "" for s in acked], deadline)
            delivered_after = time.monotonic() - load_ended
            ttl_acked = [s for s in ttl_sends if s.queue_id is not None]
            ttl_views = await final_items(
                admin,
                base,
                [s.queue_id or "" for s in ttl_acked],
                time.monotonic() + TTL_DEADLINE,
            )
            peaks.extend((phase, ws, agent.reset_peak()) for ws, agent in agents.items())
        finally:
            stop_ttl.set()
            stop_watch.set()
            await asyncio.gather(trickle, watcher, return_exceptions=True)
        await watcher  # its own failure, if any, surfaces here

    # -- the report ------------------------------------------------------------------
    answers = Counter((s.phase, s.workspace, s.status or "cut off") for s in sends)
    print(f"phases began (s into the run): { {k: round(v, 1) for k, v in began.items()} }")
    print(f"backlog (live items) when each wave began: {backlog_at}")
    print(f"answers by phase: {dict(sorted(answers.items(), key=str))}")
    print(f"agent peaks by phase: {peaks}")
    print(
        "highest concurrency: "
        + ", ".join(f"{ws} {a.highest}/{SLOTS[ws]}" for ws, a in agents.items())
    )
    print(f"longest wait of a due item beside an idle agent: {worst}")
    states = Counter(view["state"] for view in views.values())
    print(
        f"202s: {len(acked)}, final states {dict(states)}, settled {delivered_after:.1f} s"
        f" after the load (deadline {deadline - load_ended:.1f} s);"
        f" TTL sends {len(ttl_sends)}, their states"
        f" {dict(Counter(v['state'] for v in ttl_views.values()))}"
    )

    # -- what a user would check ---------------------------------------------------------
    bad = [s for s in [*sends, *ttl_sends] if s.problem() is not None]
    if bad:
        problems.append(
            f"{len(bad)} sends not answered 200 (the agent's answer) or 202 (a queued Task):"
            f" {examples([(s.phase, s.workspace, s.problem()) for s in bad])}"
        )
    over = [(p, ws, peak) for p, ws, peak in peaks if peak > SLOTS[ws]]
    if over:
        problems.append(
            "an agent held more requests than its slots: "
            + ", ".join(
                f"{ws} ({SLOTS[ws]} slot{'s' if SLOTS[ws] > 1 else ''}) held {peak}"
                f" during/after wave {p}"
                for p, ws, peak in over
            )
        )
    undelivered = {qid: view for qid, view in views.items() if view["state"] != "delivered"}
    if undelivered:
        problems.append(
            f"{len(undelivered)} of {len(acked)} acknowledged (202) items not delivered"
            f" {deadline - load_ended:.1f} s after the load ended:"
            f" {dict(Counter(v['state'] for v in undelivered.values()))}; e.g. "
            + examples(
                [
                    {k: v.get(k) for k in ("id", "workspace", "state", "attempts", "last_error")}
                    for v in undelivered.values()
                ]
            )
        )
    wrong_answer = [
        send.queue_id
        for send in acked
        if views[send.queue_id or ""]["state"] == "delivered"
        and f"ok {send.message_id}" not in json.dumps(views[send.queue_id or ""].get("result"))
    ]
    if wrong_answer:
        problems.append(f"delivered items whose result is not their own answer: {wrong_answer[:3]}")
    lost = [s for s in sends if s.acknowledged and not agents[s.workspace].received[s.message_id]]
    if lost:
        problems.append(
            f"{len(lost)} messageIds answered 200/202 never reached their agent:"
            f" {dict(Counter((s.workspace, s.status) for s in lost))}"
        )
    stranded = {ws: w for ws, w in worst.items() if w.seconds > IDLE_GRACE}
    if stranded:

        def phase_at(at: float) -> str:
            return max((p for p, t in began.items() if t <= at), key=began.__getitem__, default="")

        problems.append(
            "queued items waited while their agent sat idle: "
            + ", ".join(
                f"{ws}: {w.queued} due item(s) for {w.seconds:.1f} s, from"
                f" {w.at - w.seconds:.1f} s into the run (phase {phase_at(w.at - w.seconds)})"
                for ws, w in stranded.items()
            )
        )
    if not all(any(s.queue_id and s.workspace == ws for s in sends) for ws in SLOTS):
        problems.append("the waves made no queue episode (no 202) on some agent: nothing queued")
    not_expired = [v for v in ttl_views.values() if v["state"] != "expired"]
    if not ttl_acked or not_expired:
        problems.append(
            f"the A2AD-TTL: 1 items did not all expire during the load ({len(ttl_acked)} sent,"
            f" {dict(Counter(v['state'] for v in not_expired))} not expired)"
        )
    if tracebacks(tmp_path):
        problems.append(f"a2ad logged tracebacks: {tracebacks(tmp_path)}")
    if not a2ad.running():
        problems.append(f"a2ad exited with {a2ad.popen.returncode}")
    assert not problems, f"{context}:\n- " + "\n- ".join(problems)


@dataclass
class Stop:
    """One SIGTERM: when it was sent, and the store as the exit left it."""

    cycle: int
    moment: str
    exit_code: int | None
    states: dict[str, int]
    dispatching: list[str]
    charged: list[tuple[Any, ...]]  # id, state, attempts, last_error


def after_exit(store: Path) -> tuple[dict[str, int], list[str], list[tuple[Any, ...]]]:
    """The store file after a2ad exited, opened read-only: states, the ids of rows
    left dispatching, and every item charged an attempt."""
    states = dict(read_store(store, "SELECT state, COUNT(*) FROM items GROUP BY state"))
    rows = read_store(store, "SELECT id FROM items WHERE state = 'dispatching'")
    dispatching = [str(row[0]) for row in rows]
    charged = read_store(
        store, "SELECT id, state, attempts, last_error FROM items WHERE attempts > 0"
    )
    return states, dispatching, [tuple(row) for row in charged]


@pytest.mark.slow
async def test_sigterm_mid_drain_leaves_no_claim_and_charges_no_attempt(
    launcher: Launcher, start_agent: StartAgent, tmp_path: Path
) -> None:
    context = f"A2AD_STRESS_SEED={SEED}"
    print(f"\n{context}, {SIGTERMS} SIGTERMs, backlog {BACKLOG}")
    timing = random.Random(f"{SEED}-sigterm")
    agent = await start_agent(SLOW, (SLOW_DELAY, SLOW_DELAY))
    config: A2adConfig = launcher.config(
        server={"shutdown_grace_seconds": GRACE},
        auth={"admin_token": ADMIN_TOKEN},
        # No lease may lapse in this test: an attempt charged here is one the
        # shutdown charged.
        queue={"lease_seconds": 60.0},
        workspaces=[
            {
                "id": SLOW,
                "url": agent.url,
                "max_concurrent": 1,
                "heartbeat": False,
                "request_timeout_seconds": CLIENT_TIMEOUT,
            }
        ],
    )
    a2ad: Process = await asyncio.to_thread(launcher.a2ad, config)
    base = config.url
    problems: list[str] = []
    stops: list[Stop] = []
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session,
        aiohttp.ClientSession(timeout=timeout, headers=admin_headers) as admin,
    ):
        # The backlog: one send takes the agent's only slot, the rest queue behind it.
        holder = Send(SLOW, "holder", f"holder-{uuid.uuid4().hex[:12]}")
        holding = asyncio.create_task(post(session, base, holder))
        await agent.wait_for(lambda: agent.requests >= 1, "the first send", 10.0)
        sends = [holder, *await wave(session, base, "backlog", {SLOW: BACKLOG})]
        await holding
        queued = sum(1 for s in sends if s.queue_id)
        assert queued >= BACKLOG // 2, f"{context}: only {queued} of {len(sends)} sends queued"

        for cycle in range(SIGTERMS):
            live = await asyncio.to_thread(live_items, config.store, [SLOW])
            if live.get(SLOW, 0) < 2:
                break  # the backlog ran out; the cycles so far are checked below
            terminate = functools.partial(a2ad.send_signal, signal.SIGTERM)
            if cycle % 3 == 0:
                # In the middle of a request: it outlasts the grace, so it is cut off.
                await agent.wait_request(30.0)
                await asyncio.sleep(SLOW_DELAY / 2)
                terminate()
                moment = f"{SLOW_DELAY / 2:.2f} s into a request"
            else:
                # As the agent's answer leaves, straight from its handler, or a moment
                # later: a2ad frees the slot and its next claim is on the way.
                lag = 0.0 if cycle % 3 == 1 else timing.uniform(0, HANDOFF_JITTER)
                loop = asyncio.get_running_loop()
                agent.after_answer = (
                    functools.partial(loop.call_later, lag, terminate) if lag else terminate
                )
                await agent.wait_answer(30.0)
                moment = f"{lag * 1000:.1f} ms after an answer"
            try:
                code: int | None = await asyncio.to_thread(a2ad.wait, STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                code = None
                await asyncio.to_thread(a2ad.kill)
            states, dispatching, charged = await asyncio.to_thread(after_exit, config.store)
            stops.append(Stop(cycle, moment, code, states, dispatching, charged))
            # The agent finishes what a2ad gave up on before the next a2ad starts, so
            # its count is of one a2ad's requests at a time.
            await agent.wait_for(lambda: agent.active == 0, "idle", 30.0)
            a2ad = await asyncio.to_thread(launcher.a2ad, config)

        acked = [s for s in sends if s.queue_id is not None]
        left = await asyncio.to_thread(live_items, config.store, [SLOW])
        deadline = time.monotonic() + left.get(SLOW, 0) * SLOW_DELAY * 2 + DELIVERY_SLACK
        views = await final_items(admin, base, [s.queue_id or "" for s in acked], deadline)

    for stop in stops:
        print(
            f"SIGTERM {stop.cycle} {stop.moment}: exit {stop.exit_code}, states {stop.states},"
            f" dispatching {len(stop.dispatching)}, charged {len(stop.charged)}"
        )
    print(
        f"items: {dict(Counter(v['state'] for v in views.values()))};"
        f" agent requests {agent.requests} for {len(sends)} messages, highest {agent.highest}"
    )
    if len(stops) < 2:
        problems.append(f"only {len(stops)} SIGTERMs fell while the backlog drained")
    reported: set[str] = set()
    for stop in stops:
        when = f"after SIGTERM {stop.cycle} ({stop.moment})"
        if stop.exit_code != 0:
            problems.append(f"{when}: a2ad exited with {stop.exit_code} (None: it hung)")
        if stop.dispatching:
            problems.append(
                f"{when}: {len(stop.dispatching)} row(s) left dispatching: {stop.dispatching}"
            )
        charged = [row for row in stop.charged if row[0] not in reported]
        reported.update(row[0] for row in charged)
        if charged:  # by this exit, or by the start before it
            problems.append(f"{when}: {len(charged)} item(s) charged an attempt: {charged[:3]}")
    undelivered = {qid: v for qid, v in views.items() if v["state"] != "delivered"}
    if undelivered:
        problems.append(
            f"{len(undelivered)} of {len(acked)} acknowledged items not delivered after the"
            f" last restart: {examples(list(undelivered.values()))}"
        )
    charged_in_the_end = [v for v in views.values() if v.get("attempts")]
    if charged_in_the_end:
        problems.append(
            f"{len(charged_in_the_end)} items delivered with attempts charged:"
            f" {examples([(v['id'], v['attempts'], v['last_error']) for v in charged_in_the_end])}"
        )
    bad = [s for s in sends if s.problem() is not None]
    if bad:
        problems.append(f"sends not answered 200/202: {examples([s.problem() for s in bad])}")
    lost = [s for s in sends if s.acknowledged and not agent.received[s.message_id]]
    if lost:
        problems.append(f"{len(lost)} acknowledged messageIds never reached the agent")
    if agent.highest > 1:
        problems.append(f"the 1-slot agent held {agent.highest} requests at once")
    if tracebacks(tmp_path):
        problems.append(f"a2ad logged tracebacks: {tracebacks(tmp_path)}")
    assert not problems, f"{context}:\n- " + "\n- ".join(problems)
