"""Liveness end to end: a real demo agent process that the test kills (SIGKILL), a
real restart_command, and the operator endpoints for run-time workspaces.

a2ad runs in-process with a ManualClock, so its own timers (busy pauses, the
probe loop, restart backoff, the booting window, the hourly budget) move only
when a test moves them. The agent processes, their start-up and the restart
command run in real time: those are polled with deadlines, never slept on.

The restart command is liveness_scripts/restart_agent.py: it appends
$A2AD_WORKSPACE to a file (one line per restart) and starts the demo agent
again on the same port, in the background, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes import A2ad, FakeAgent

from a2ad.clock import ManualClock

BOTH_STORES = True  # liveness and run-time workspaces behave the same on either store

A2adFactory = Callable[..., Awaitable[A2ad]]
AgentFactory = Callable[..., Awaitable[FakeAgent]]

RESTART_SCRIPT = Path(__file__).parent / "liveness_scripts" / "restart_agent.py"
BOOT_WITHIN = 15.0  # a demo agent answers within a second or two of starting
WITHIN = 10.0  # anything else a2ad does in real time
POLL = 0.02

PROBE_INTERVAL = 5.0
RECENT = 1.0  # recent_heartbeat_seconds
WINDOW = 30.0  # debounce_window_seconds
BOOTING = 2.0  # restart_timeout_seconds: not-running probes ignored this long after a restart
BACKOFF = 10.0  # restart_backoff_seconds


def liveness(**overrides: float) -> dict[str, float]:
    return {
        "probe_interval_seconds": PROBE_INTERVAL,
        "recent_heartbeat_seconds": RECENT,
        "debounce_window_seconds": WINDOW,
        "restart_timeout_seconds": BOOTING,
        "restart_backoff_seconds": BACKOFF,
        "restart_budget_per_hour": 2,
        **overrides,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, within: float = WITHIN
) -> None:
    """Poll `check` until it holds; fail naming `what` after `within` real seconds."""
    try:
        async with asyncio.timeout(within):
            while not await check():  # noqa: ASYNC110 - other processes: nothing to await
                await asyncio.sleep(POLL)
    except TimeoutError:
        raise AssertionError(f"not within {within:g} s: {what}") from None


async def settle() -> None:
    """Give a2ad's tasks a moment to act (for asserting that nothing happens)."""
    for _ in range(10):
        await asyncio.sleep(0.01)


class Agent:
    """The demo agent as a real process on a fixed port; restarted by a2ad through
    the restart script, killed by the test, every process of it killed at teardown."""

    def __init__(self, directory: Path, args: list[str], restart_args: list[str]) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.args = args
        self.restart_args = restart_args
        self._own: list[subprocess.Popen[bytes]] = []
        self._killed: set[int] = set()

    @property
    def restart_command(self) -> list[str]:
        port = ["--port", str(self.port)]
        return [sys.executable, str(RESTART_SCRIPT), str(self.directory), *port, *self.restart_args]

    def add_restart_args(self, args: list[str]) -> None:
        """More arguments for agents the restart command starts (after a2ad exists)."""
        (self.directory / "more-args").write_text("".join(f"{a}\n" for a in args))

    def hold(self, held: bool) -> None:
        """While held, the restart command starts no agent (one that fails to boot)."""
        marker = self.directory / "hold"
        if held:
            marker.touch()
        else:
            marker.unlink()

    def restarts(self) -> list[str]:
        """One line per run of the restart command: the A2AD_WORKSPACE it was given."""
        path = self.directory / "restarts"
        return path.read_text().splitlines() if path.exists() else []

    def start(self) -> None:
        """Start the agent as the test (not as a restart)."""
        n = len(self._own)
        with (self.directory / f"agent-{n}.log").open("wb") as log:
            self._own.append(
                subprocess.Popen(
                    [sys.executable, "-m", "a2ad.demo_agent", "--port", str(self.port), *self.args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def _pids(self) -> list[int]:
        path = self.directory / "pids"
        started = [int(line) for line in path.read_text().split()] if path.exists() else []
        return [p.pid for p in self._own] + started

    async def stats(self) -> dict[str, Any] | None:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{self.url}stats", timeout=aiohttp.ClientTimeout(total=2)) as resp,
            ):
                if resp.status != 200:
                    return None
                data: dict[str, Any] = await resp.json()
                return data
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def wait_up(self) -> None:
        async def up() -> bool:
            return await self.stats() is not None

        await eventually(up, f"the demo agent answers on port {self.port}", BOOT_WITHIN)

    async def wait_down(self) -> None:
        async def refused() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return True
            writer.close()
            await writer.wait_closed()
            return False

        await eventually(refused, f"port {self.port} refuses connections")

    async def kill(self) -> None:
        """SIGKILL every agent process still running; return once the port refuses."""
        self._kill_all()
        await self.wait_down()

    def _kill_all(self) -> None:
        for pid in self._pids():
            if pid in self._killed:
                continue
            self._killed.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self._own:
            process.wait(timeout=10)

    def close(self) -> None:
        """Kill every agent; a restart command still running starts none after this."""
        with (self.directory / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (self.directory / "closed").touch()
        self._kill_all()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """Make demo agents (`args` for the test's start, `restart_args` for restarts);
    every process of theirs is killed when the test ends."""
    made: list[Agent] = []

    def make(args: list[str], restart_args: list[str] | None = None) -> Agent:
        directory = tmp_path / f"agent-{len(made)}"
        directory.mkdir()
        agent = Agent(directory, args, args if restart_args is None else restart_args)
        made.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in made:
            agent.close()


@pytest.fixture
def a2ad_factory(agents: Callable[..., Agent], a2ad_factory: A2adFactory) -> A2adFactory:
    """conftest's a2ad_factory, set up after `agents`, so each a2ad stops before the
    agents are killed at teardown (a live a2ad would restart them)."""
    return a2ad_factory


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="a2ad")
    return caplog


def count_logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


async def wait_logged(caplog: pytest.LogCaptureFixture, text: str, times: int = 1) -> None:
    async def logged() -> bool:
        return count_logged(caplog, text) >= times

    await eventually(logged, f"{text!r} logged {times} time(s)")


SECOND_OBSERVATION = "a second observation decides"


async def view(a2ad: A2ad, workspace: str = "w") -> dict[str, Any]:
    resp = await a2ad.client.get(f"/workspaces/{workspace}")
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def wait_view(
    a2ad: A2ad, what: str, check: Callable[[dict[str, Any]], bool], within: float = WITHIN
) -> dict[str, Any]:
    """Poll GET /workspaces/w until `check` holds; the view that passed."""
    seen: dict[str, Any] = {}

    async def holds() -> bool:
        seen.update(await view(a2ad))
        return check(seen)

    try:
        await eventually(holds, what, within)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}") from None
    return seen


async def queued_send(a2ad: A2ad, text: str) -> str:
    """A send that a2ad queues (202: the agent is full, refusing or dead); its queue id."""
    status, data = await a2ad.send("w", text)
    assert status == 202, data
    qid: str = data["result"]["id"]
    return qid


async def final(a2ad: A2ad, qid: str) -> dict[str, Any]:
    """The item once it is final. Polled: with a ManualClock a2ad's ?wait= never ends."""
    seen: dict[str, Any] = {}

    async def is_final() -> bool:
        seen.update(await a2ad.item(qid))
        return seen["state"] not in ("queued", "dispatching")

    try:
        await eventually(is_final, f"{qid} final")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}") from None
    return seen


async def restarted(agent: Agent, caplog: pytest.LogCaptureFixture, n: int) -> None:
    """The n-th restart has run to its end and the agent it started answers."""

    async def ran() -> bool:
        return len(agent.restarts()) >= n

    await eventually(ran, f"restart {n} ran")
    # Logged when the command returned: a2ad's restart is over, the booting window set.
    await wait_logged(caplog, f"restart {n} of w: demo agent started")
    await agent.wait_up()


def workspace(agent: Agent, **extra: Any) -> dict[str, Any]:
    return {
        "id": "w",
        "url": agent.url,
        "heartbeat": False,
        "restart_command": agent.restart_command,
        **extra,
    }


# -- restarts ------------------------------------------------------------------


async def occupy(agent: Agent, session: aiohttp.ClientSession) -> asyncio.Task[Any]:
    """Someone else's request, sent straight to the agent, that holds one of its slots."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "message/send",
        "params": {"message": {"role": "user", "parts": [{"kind": "text", "text": "x"}]}},
    }
    task = asyncio.create_task(session.post(agent.url, json=body))

    async def active() -> bool:
        return (await agent.stats() or {}).get("active") == 1

    await eventually(active, "the agent works on someone else's request")
    return task


async def test_fifty_concurrent_failing_requests_run_the_restart_once_then_all_are_delivered(
    a2ad_factory: A2adFactory, agents: Callable[..., Agent], logs: pytest.LogCaptureFixture
) -> None:
    # One slot, taken by someone else: a2ad's first send is answered busy (503).
    agent = agents(["--delay", "60", "--slots", "1"], ["--delay", "0", "--slots", "50"])
    agent.start()
    await agent.wait_up()
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [workspace(agent, max_concurrent=50)], clock=clock, liveness=liveness()
    )
    async with aiohttp.ClientSession() as session:
        elsewhere = await occupy(agent, session)
        # Busy: the workspace pauses, and all 50 wait in the queue.
        qids = [await queued_send(a2ad, f"m{i}") for i in range(50)]
        ws = await view(a2ad)
        assert (ws["queue"]["queued"], ws["in_flight"]) == (50, 0)
        assert ws["paused_until"] is not None

        await agent.kill()
        with contextlib.suppress(aiohttp.ClientError):
            (await elsewhere).release()

    # The pause ends: 50 deliveries go out at once and all 50 are refused.
    await clock.advance(RECENT + 1)
    refusals = "; workspace w paused until"  # a delivery answered busy: here, refused
    await wait_logged(logs, refusals, times=50)
    await restarted(agent, logs, 1)
    await settle()
    ws = await view(a2ad)
    assert (ws["state"], ws["restarts"]) == ("restarting", 1)
    assert agent.restarts() == ["w"]  # once, and with A2AD_WORKSPACE set
    assert count_logged(logs, refusals) == 50
    assert count_logged(logs, "cannot connect") >= 50
    refused = [await a2ad.item(qid) for qid in qids]
    assert all(i["state"] == "queued" and i["busy_answers"] >= 1 for i in refused), refused

    # The busy pauses run out, the periodic probe finds the agent back: all go out.
    await clock.advance(31)
    ws = await wait_view(a2ad, "all 50 delivered", lambda v: v["queue"]["delivered"] == 50)
    assert ws["state"] == "online"
    assert (await agent.stats() or {})["served"] == 50
    items = [await a2ad.item(qid) for qid in qids]
    assert {(i["state"], i["attempts"]) for i in items} == {("delivered", 0)}
    assert [i["result"]["result"]["parts"][0]["text"] for i in items] == [
        f"echo: m{i}" for i in range(50)
    ]
    assert agent.restarts() == ["w"]
    assert ws["restarts"] == 1


def has_restarted(n: int, view: dict[str, Any]) -> bool:
    return bool(view["restarts"] == n)


@pytest.mark.sqlite_only  # store-independent: restart and probe timing of real agent processes
async def test_restarts_back_off_doubling_and_the_budget_ends_in_failed(
    a2ad_factory: A2adFactory, agents: Callable[..., Agent], logs: pytest.LogCaptureFixture
) -> None:
    agent = agents(["--delay", "0"])
    agent.start()
    await agent.wait_up()
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [workspace(agent)], clock=clock, liveness=liveness(restart_budget_per_hour=3)
    )
    delivered = 0

    async def dies() -> str:
        """Kill the agent; the next send finds it dead (its last answer is not recent)."""
        await agent.kill()
        await clock.advance(RECENT + 1)
        return await queued_send(a2ad, "hello")

    async def comes_back(n: int) -> None:
        nonlocal delivered
        await restarted(agent, logs, n)
        await clock.advance(PROBE_INTERVAL)  # the periodic probe: running, online
        delivered += 1
        await wait_view(
            a2ad, f"{delivered} delivered", lambda v: v["queue"]["delivered"] == delivered
        )

    # The first restart runs at once.
    await dies()
    await comes_back(1)

    # Then restart_backoff_seconds, doubling: 10 s, then 20 s.
    for n, backoff in ((2, BACKOFF), (3, 2 * BACKOFF)):
        await dies()
        await wait_view(a2ad, "dead", lambda v: v["state"] == "dead")
        await clock.advance(backoff - 0.5)
        await settle()
        ws = await view(a2ad)
        assert (ws["state"], ws["restarts"]) == ("dead", n - 1), f"restart {n} came early"
        assert len(agent.restarts()) == n - 1
        await clock.advance(1)
        await wait_view(a2ad, f"restart {n}", partial(has_restarted, n))
        await comes_back(n)

    # restart_budget_per_hour = 3 is spent: failed, no fourth restart.
    await dies()
    ws = await wait_view(a2ad, "failed", lambda v: v["state"] == "failed")
    assert ws["restarts"] == 3
    await wait_logged(logs, "restart_budget_per_hour")
    assert await queued_send(a2ad, "while failed")
    for _ in range(3):
        await clock.advance(4 * BACKOFF)
        await settle()
    ws = await view(a2ad)
    assert (ws["state"], ws["restarts"]) == ("failed", 3)
    assert ws["queue"]["queued"] == 2
    assert agent.restarts() == ["w"] * 3


@pytest.mark.sqlite_only  # store-independent: restart and probe timing of real agent processes
async def test_reset_leaves_failed_clears_the_budget_and_delivery_resumes(
    a2ad_factory: A2adFactory, agents: Callable[..., Agent], logs: pytest.LogCaptureFixture
) -> None:
    agent = agents(["--delay", "0"])
    agent.start()
    await agent.wait_up()
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [workspace(agent)], clock=clock, liveness=liveness(restart_budget_per_hour=1)
    )

    await agent.kill()
    first = await queued_send(a2ad, "one")
    await restarted(agent, logs, 1)
    await clock.advance(PROBE_INTERVAL)
    assert (await final(a2ad, first))["state"] == "delivered"

    await agent.kill()
    await clock.advance(RECENT + 1)
    waiting = await queued_send(a2ad, "two")
    await wait_view(a2ad, "failed", lambda v: v["state"] == "failed")

    # The operator fixes the agent; a2ad neither probes nor delivers until the reset.
    agent.start()
    await agent.wait_up()
    await clock.advance(2 * PROBE_INTERVAL)
    await settle()
    ws = await view(a2ad)
    assert (ws["state"], ws["queue"]["queued"]) == ("failed", 1)
    served_before = (await agent.stats() or {})["served"]
    assert served_before == 0

    resp = await a2ad.client.post("/workspaces/w/reset")
    assert resp.status == 200, await resp.text()
    # It left failed; the waiting item may already be on its way (then: online).
    assert (await resp.json())["state"] in ("unknown", "online")
    item = await final(a2ad, waiting)
    assert (item["state"], item["attempts"]) == ("delivered", 0)
    assert item["result"]["result"]["parts"][0]["text"] == "echo: two"
    assert (await view(a2ad))["state"] == "online"

    # The budget and the backoff start over: the next death restarts at once.
    await agent.kill()
    await clock.advance(RECENT + 1)
    await queued_send(a2ad, "three")
    await restarted(agent, logs, 2)  # with the clock standing still: no backoff
    assert (await view(a2ad))["restarts"] == 2


@pytest.mark.sqlite_only  # store-independent: restart and probe timing of real agent processes
async def test_not_running_while_booting_is_ignored_then_it_is_dead_again(
    a2ad_factory: A2adFactory, agents: Callable[..., Agent], logs: pytest.LogCaptureFixture
) -> None:
    """For restart_timeout_seconds after the command returns a not-running probe is
    ignored; the workspace stays `restarting` until a sign of life, and an agent that
    never comes up is dead again once that time is over."""
    agent = agents(["--delay", "0"])
    agent.start()
    await agent.wait_up()
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [workspace(agent)], clock=clock, liveness=liveness(restart_timeout_seconds=12)
    )
    agent.hold(True)
    await agent.kill()
    qid = await queued_send(a2ad, "hello")
    await wait_logged(logs, "restart 1 of w: held")

    await clock.advance(PROBE_INTERVAL)  # 5 s after the restart: still booting
    await wait_logged(logs, "still booting")
    await settle()
    ws = await view(a2ad)
    assert (ws["state"], ws["restarts"]) == ("restarting", 1)

    await clock.advance(2 * PROBE_INTERVAL)  # 15 s: past the booting time, still not running
    await wait_view(a2ad, "dead again", lambda v: v["state"] == "dead")
    assert agent.restarts() == ["w"]  # and the second restart waits out its backoff
    agent.hold(False)
    await clock.advance(BACKOFF)
    await restarted(agent, logs, 2)
    await clock.advance(PROBE_INTERVAL)
    assert (await final(a2ad, qid))["state"] == "delivered"
    ws = await view(a2ad)
    assert (ws["state"], ws["restarts"]) == ("online", 2)


# -- found dead, or not --------------------------------------------------------


@pytest.mark.sqlite_only  # store-independent: restart and probe timing of real agent processes
async def test_a_silent_death_with_queued_items_is_found_by_the_periodic_probe(
    a2ad_factory: A2adFactory, agents: Callable[..., Agent], logs: pytest.LogCaptureFixture
) -> None:
    """Items wait (the agent's heartbeat says it is full), nothing is in flight, and
    the agent dies: no request fails, its heartbeats just stop.

    recent_heartbeat_seconds is above heartbeat_timeout_seconds here, so the probe
    asked for by going offline sees it not running only once (the debounce waits
    for a second look): only the periodic probe can find it dead."""
    clock = ManualClock()
    token = "hb-token-w"
    agent = agents(["--delay", "60"], ["--delay", "0"])  # and heartbeats, below
    a2ad = await a2ad_factory(
        [workspace(agent, token=token, heartbeat=True)],
        clock=clock,
        liveness=liveness(
            heartbeat_timeout_seconds=3,
            recent_heartbeat_seconds=30,
            probe_interval_seconds=10,
        ),
    )
    a2ad_url = str(a2ad.client.make_url("/")).rstrip("/")
    beats = ["--a2ad", a2ad_url, "--workspace", "w", "--token", token]
    beats += ["--heartbeat-interval", "0.1"]
    agent.args += beats
    agent.add_restart_args(beats)
    agent.start()
    await agent.wait_up()

    # Someone else's request fills the agent's one slot; its heartbeats say so.
    async with aiohttp.ClientSession() as session:
        elsewhere = await occupy(agent, session)
        await wait_view(a2ad, "the agent reports itself full", lambda v: v["active_tasks"] == 1)
        qids = [await queued_send(a2ad, f"m{i}") for i in range(3)]
        ws = await view(a2ad)
        assert (ws["state"], ws["in_flight"], ws["queue"]["queued"]) == ("online", 0, 3)

        await agent.kill()
        with contextlib.suppress(aiohttp.ClientError):
            (await elsewhere).release()

    # Offline: a probe sees it not running, once; not yet dead.
    await clock.advance(3.5)
    await wait_logged(logs, SECOND_OBSERVATION)
    ws = await view(a2ad)
    assert (ws["state"], ws["restarts"]) == ("offline", 0)
    assert agent.restarts() == []

    # The periodic probe looks again within the window: dead, restarted.
    await clock.advance(7)
    await restarted(agent, logs, 1)
    assert agent.restarts() == ["w"]
    # The restarted agent's heartbeat is a sign of life: the items go out.
    for qid in qids:
        assert (await final(a2ad, qid))["state"] == "delivered"
    ws = await view(a2ad)
    assert (ws["state"], ws["restarts"]) == ("online", 1)


@pytest.mark.sqlite_only  # store-independent: restart and probe timing of real agent processes
async def test_one_missed_probe_right_after_an_answer_does_not_restart(
    a2ad_factory: A2adFactory, agents: Callable[..., Agent], logs: pytest.LogCaptureFixture
) -> None:
    """A workspace without heartbeats, whose sign of life is its last answer: one
    not-running probe right after it needs a second look before a restart."""
    agent = agents(["--delay", "0"])
    agent.start()
    await agent.wait_up()
    clock = ManualClock()
    a2ad = await a2ad_factory([workspace(agent)], clock=clock, liveness=liveness())
    status, _ = await a2ad.send("w", "answered")
    assert status == 200

    # It goes away for a moment, just after answering: the probe misses it once.
    await agent.kill()
    qid = await queued_send(a2ad, "during the blip")
    await wait_logged(logs, SECOND_OBSERVATION)
    await settle()
    ws = await view(a2ad)
    assert (ws["state"], ws["restarts"]) == ("online", 0)
    assert agent.restarts() == []

    # Back before the next periodic probe, which finds it running: delivered.
    agent.start()
    await agent.wait_up()
    await clock.advance(PROBE_INTERVAL)
    assert (await final(a2ad, qid))["state"] == "delivered"

    # The running probe reset the count: the next single miss again waits for a
    # second look, although it falls in the window of the first.
    await agent.kill()
    await queued_send(a2ad, "second blip")
    await wait_logged(logs, SECOND_OBSERVATION, times=2)
    await settle()
    ws = await view(a2ad)
    assert (ws["state"], ws["restarts"]) == ("online", 0)
    assert agent.restarts() == []


# -- run-time workspaces -------------------------------------------------------


async def put(a2ad: A2ad, workspace_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await a2ad.client.put(f"/workspaces/{workspace_id}", json=body)
    data: dict[str, Any] = await resp.json()
    return resp.status, data


async def delete(a2ad: A2ad, path: str) -> tuple[int, dict[str, Any]]:
    resp = await a2ad.client.delete(path)
    data: dict[str, Any] = await resp.json()
    return resp.status, data


async def test_put_registers_a_runtime_workspace_that_a_new_a2ad_still_has(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory
) -> None:
    fake = await agent_factory()
    a2ad = await a2ad_factory([])
    status, created = await put(a2ad, "rt", {"url": fake.url, "heartbeat": False})
    assert status == 201, created
    assert created["id"] == "rt" and created["url"] == fake.url
    assert (created["state"], created["source"], created["capacity"]) == ("unknown", "runtime", 1)
    status, data = await a2ad.send("rt", "hi")
    assert status == 200 and data["result"]["parts"][0]["text"] == "echo: hi"

    status, updated = await put(
        a2ad, "rt", {"id": "rt", "url": fake.url, "heartbeat": False, "max_concurrent": 3}
    )
    assert status == 200, updated
    assert updated["capacity"] == 3

    await a2ad.client.close()  # stops that a2ad and lets go of the store
    again = await a2ad_factory([])
    ws = await view(again, "rt")
    assert (ws["url"], ws["capacity"], ws["source"]) == (fake.url, 3, "runtime")
    status, data = await again.send("rt", "still there")
    assert status == 200 and data["result"]["parts"][0]["text"] == "echo: still there"


@pytest.mark.parametrize("field", ["restart_command", "status_command"])
async def test_put_refuses_commands(a2ad_factory: A2adFactory, field: str) -> None:
    a2ad = await a2ad_factory([])
    body = {"url": "http://127.0.0.1:9/", "heartbeat": False, field: ["touch", "/tmp/pwned"]}
    status, data = await put(a2ad, "rt", body)
    assert status == 400, data
    assert field in data["error"]["message"]
    resp = await a2ad.client.get("/workspaces/rt")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "unknown_workspace"

    # Nor may an update of a run-time workspace add one.
    status, _ = await put(a2ad, "rt", {"url": "http://127.0.0.1:9/", "heartbeat": False})
    assert status == 201
    status, data = await put(a2ad, "rt", body)
    assert status == 400, data


async def test_config_file_workspaces_are_read_only_at_run_time(
    a2ad_factory: A2adFactory,
) -> None:
    url = "http://127.0.0.1:9/"
    a2ad = await a2ad_factory([{"id": "cfg", "url": url, "heartbeat": False}])
    status, data = await put(a2ad, "cfg", {"url": "http://127.0.0.1:10/", "heartbeat": False})
    assert status == 409, data
    assert data["error"]["code"] == "conflict"
    status, data = await delete(a2ad, "/workspaces/cfg")
    assert status == 409, data
    assert data["error"]["code"] == "conflict"
    status, data = await delete(a2ad, "/workspaces/cfg?purge=true")
    assert status == 409, data
    ws = await view(a2ad, "cfg")
    assert (ws["url"], ws["source"]) == (url, "config")


async def test_delete_is_refused_while_items_wait_unless_purged(
    a2ad_factory: A2adFactory,
) -> None:
    clock = ManualClock()
    a2ad = await a2ad_factory([], clock=clock, liveness=liveness())
    down = f"http://127.0.0.1:{free_port()}/"  # nothing listens: sends are queued
    assert (await put(a2ad, "rt", {"url": down, "heartbeat": False}))[0] == 201
    status, data = await a2ad.send("rt", "waits")
    assert status == 202, data
    qid = data["result"]["id"]

    status, data = await delete(a2ad, "/workspaces/rt")
    assert status == 409, data
    assert data["error"]["code"] == "conflict"
    assert (await view(a2ad, "rt"))["queue"]["queued"] == 1
    assert (await a2ad.item(qid))["state"] == "queued"

    status, data = await delete(a2ad, "/workspaces/rt?purge=true")
    assert status == 200, data
    assert data == {"id": "rt", "deleted": True, "items_deleted": 1}
    assert (await a2ad.client.get("/workspaces/rt")).status == 404
    assert (await a2ad.client.get(f"/queue/{qid}")).status == 404

    # With nothing waiting no purge is needed; and a new a2ad has neither.
    assert (await put(a2ad, "empty", {"url": down, "heartbeat": False}))[0] == 201
    status, data = await delete(a2ad, "/workspaces/empty")
    assert status == 200, data
    assert data["items_deleted"] == 0
    await a2ad.client.close()
    again = await a2ad_factory([])
    resp = await again.client.get("/workspaces")
    assert (await resp.json())["workspaces"] == []
