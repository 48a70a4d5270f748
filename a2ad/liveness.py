"""Liveness: failure signals, probes, the debounce, and restarts without storms.

A failure signal (a refused connection, a timeout, busy answers for longer
than the debounce window, going offline) asks for a probe. At most one probe
runs per workspace; signals meanwhile share its result. A not-running result
goes through the debounce, and a workspace declared dead is restarted: one
restart at a time, with a doubling backoff and an hourly budget.

With replicas, one of them acts for each agent (a duty it holds in the store):
it alone probes and restarts it, counting every replica's restarts; the others
hand it their failure signals and follow its decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Protocol, TypeVar

import aiohttp

from .cards import card_urls
from .clock import Clock
from .settings import LivenessSettings
from .upstream import Upstream
from .workspaces import Registry, State, Workspace

log = logging.getLogger("a2ad.liveness")
T = TypeVar("T")

PROBE_TIMEOUT_SECONDS = 10.0
MAX_RESTART_BACKOFF_SECONDS = 600.0
HOUR = 3600.0
MAX_LOGGED_OUTPUT = 4000


class Observation(Enum):
    RUNNING = "running"
    NOT_RUNNING = "not running"
    UNKNOWN = "unknown"  # counts as alive: a flaky probe must never restart an agent


class Debounce:
    """When is a not-running observation enough to declare a workspace dead?

    Not running, with a sign of life within `recent` seconds: only on a second
    observation within `window` seconds of the first. Without one: at once.
    Running resets the count; unknown changes nothing."""

    def __init__(self, recent: float, window: float) -> None:
        self.recent = recent
        self.window = window
        self._first: dict[str, float] = {}

    def observe(
        self, workspace_id: str, seen: Observation, *, now: float, last_sign_of_life: float | None
    ) -> bool:
        """Record an observation; True when the workspace is now dead."""
        if seen is Observation.RUNNING:
            self._first.pop(workspace_id, None)
            return False
        if seen is Observation.UNKNOWN:
            return False
        recent = last_sign_of_life is not None and now - last_sign_of_life <= self.recent
        if not recent:
            self._first.pop(workspace_id, None)
            return True
        first = self._first.get(workspace_id)
        if first is None or now - first > self.window:
            self._first[workspace_id] = now  # the first observation, or a fresh start
            return False
        del self._first[workspace_id]
        return True

    def forget(self, workspace_id: str) -> None:
        self._first.pop(workspace_id, None)

    def __len__(self) -> int:
        return len(self._first)


class RestartHistory(Protocol):
    """Restarts as the replicas share them, as monotonic times of this process."""

    async def load(self, workspace_id: str) -> list[float]: ...
    async def add(self, workspace_id: str) -> bool: ...  # False: not this one's to run


class Liveness:
    """Probes and restarts for every workspace."""

    def __init__(self, settings: LivenessSettings, registry: Registry, clock: Clock) -> None:
        self.settings = settings
        self.registry = registry
        self.clock = clock
        self.debounce = Debounce(
            settings.recent_heartbeat_seconds, settings.debounce_window_seconds
        )
        self._upstream: Upstream | None = None
        self._probes: dict[str, asyncio.Task[Observation]] = {}
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self._history: dict[str, deque[float]] = {}  # restart times within the last hour
        self._booting_until: dict[str, float] = {}
        # Replicas: whether this one acts for an agent; where the others' signals
        # go; who is told of a decision (a state it set); the shared history.
        self.acts_for: Callable[[Workspace], bool] = lambda ws: True
        self.hand_over: Callable[[Workspace, str], None] = lambda ws, reason: None
        self.decided: Callable[[Workspace], None] = lambda ws: None
        self.shared_history: RestartHistory | None = None

    async def start(self, upstream: Upstream) -> None:
        self._upstream = upstream

    async def stop(self) -> None:
        tasks = [*self._probes.values(), *self._restarts.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- signals and probes ----------------------------------------------------

    def signal(self, ws: Workspace, reason: str) -> None:
        """A failure signal: probe the workspace, unless a probe or restart runs
        (or another replica acts for it: it is handed over)."""
        if not self.acts_for(ws):
            self.hand_over(ws, reason)
            return
        if ws.state is State.FAILED or ws.id in self._restarts:
            return
        if ws.id in self._probes:
            return  # the running probe answers for this signal too
        log.info("workspace %s: %s; probing", ws.id, reason)
        task = asyncio.create_task(self._probe_and_judge(ws), name=f"a2ad-probe-{ws.id}")
        _track(self._probes, ws.id, task)

    async def tick(self) -> None:
        """Probe every workspace whose queued items nothing else would notice stuck:
        offline, dead or restarting, or without heartbeats at all."""
        for ws in self.registry:
            quiet = not ws.config.heartbeat or ws.state in (
                State.OFFLINE,
                State.DEAD,
                State.RESTARTING,
            )
            acts = self.acts_for(ws)
            if acts and ws.queued_total > 0 and quiet and ws.state is not State.FAILED:
                self.signal(ws, f"{ws.queued_total} items wait ({ws.state.value})")

    async def _probe_and_judge(self, ws: Workspace) -> Observation:
        seen = await self.probe(ws)
        self.judge(ws, seen)
        return seen

    def judge(self, ws: Workspace, seen: Observation) -> None:
        """Act on a probe's result."""
        now = self.clock.monotonic()
        if seen is Observation.RUNNING:
            was = ws.state
            ws.sign_of_life(now)
            self.debounce.forget(ws.id)
            if ws.state is not was:
                self.decided(ws)
            return
        if seen is Observation.NOT_RUNNING and now < self._booting_until.get(ws.id, 0.0):
            log.info("workspace %s: not running yet; still booting after its restart", ws.id)
            return
        dead = self.debounce.observe(ws.id, seen, now=now, last_sign_of_life=ws.last_sign_of_life)
        if seen is Observation.NOT_RUNNING and not dead:
            log.info(
                "workspace %s: not running once, after a recent sign of life; "
                "a second observation decides",
                ws.id,
            )
        if dead:
            self.declare_dead(ws)

    async def probe(self, ws: Workspace) -> Observation:
        """Ask whether the agent runs: its status_command, else a GET of its card."""
        if ws.config.status_command:
            return await self._probe_command(ws)
        return await self._probe_card(ws)

    async def _probe_command(self, ws: Workspace) -> Observation:
        code, _ = await run_command(ws.config.status_command, ws.id, PROBE_TIMEOUT_SECONDS)
        return {0: Observation.RUNNING, 1: Observation.NOT_RUNNING}.get(
            code if code is not None else -1, Observation.UNKNOWN
        )

    async def _probe_card(self, ws: Workspace) -> Observation:
        assert self._upstream is not None
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS)
        try:
            # Through upstream, so a probe carries the agent's credentials as sends do.
            async with self._upstream.get(ws.config, card_urls(ws.config.url)[0], timeout) as resp:
                ws.sign_of_life(self.clock.monotonic())  # any answer is one
                return Observation.RUNNING if resp.status < 300 else Observation.UNKNOWN
        except aiohttp.ClientConnectorError:
            return Observation.NOT_RUNNING
        except (aiohttp.ClientError, TimeoutError):
            return Observation.UNKNOWN

    # -- dead, restart, failed ----------------------------------------------------

    def declare_dead(self, ws: Workspace) -> None:
        if ws.state is State.FAILED or ws.id in self._restarts:
            return
        log.warning("workspace %s is dead", ws.id)
        ws.state = State.DEAD
        self.decided(ws)
        self.debounce.forget(ws.id)
        if ws.config.restart_command:
            task = asyncio.create_task(self._restart(ws), name=f"a2ad-restart-{ws.id}")
            _track(self._restarts, ws.id, task)

    def restarts_last_hour(self, workspace_id: str) -> int:
        history = self._history.setdefault(workspace_id, deque())
        while history and history[0] <= self.clock.monotonic() - HOUR:
            history.popleft()
        return len(history)

    def backoff(self, workspace_id: str) -> float:
        """restart_backoff_seconds, doubling with each restart in the last hour."""
        count = self.restarts_last_hour(workspace_id)
        if count == 0:
            return 0.0
        base = self.settings.restart_backoff_seconds
        return float(min(MAX_RESTART_BACKOFF_SECONDS, base * 2 ** (count - 1)))

    async def _restart(self, ws: Workspace) -> None:
        if self.shared_history is not None:
            self._history[ws.id] = deque(await self.shared_history.load(ws.id))
        if self.restarts_last_hour(ws.id) >= self.settings.restart_budget_per_hour:
            ws.state = State.FAILED
            self.decided(ws)
            log.error(
                "workspace %s failed: %d restarts in the last hour (restart_budget_per_hour);"
                " POST /workspaces/%s/reset once it is fixed",
                ws.id,
                self.restarts_last_hour(ws.id),
                ws.id,
            )
            return
        wait = self.backoff(ws.id)
        if wait:
            log.info("workspace %s: restarting in %.0f s (backoff)", ws.id, wait)
            await self.clock.sleep(wait)
            if ws.state is not State.DEAD or not self.acts_for(ws):
                return  # it came back by itself meanwhile, or another acts for it now
        if self.shared_history is not None and not await self.shared_history.add(ws.id):
            log.info("workspace %s: another replica acts for it now; it restarts it", ws.id)
            return
        self._history.setdefault(ws.id, deque()).append(self.clock.monotonic())
        ws.restarts += 1
        ws.state = State.RESTARTING
        self.decided(ws)
        timeout = self.settings.restart_timeout_seconds
        log.warning("workspace %s: running its restart_command (restart %d)", ws.id, ws.restarts)
        code, output = await run_command(ws.config.restart_command, ws.id, timeout)
        for line in output.splitlines()[-50:]:
            log.info("workspace %s restart: %s", ws.id, line)
        if code != 0:
            log.error(
                "workspace %s: restart_command %s",
                ws.id,
                "timed out" if code is None else f"exited {code}",
            )
        # The agent is booting: a not-running probe means nothing for a while.
        self._booting_until[ws.id] = self.clock.monotonic() + timeout

    def reset(self, ws: Workspace) -> None:
        """Leave failed: the budget, the debounce and the backoff start over (an
        operator's reset; with replicas, the one it reached tells the others)."""
        self._history.pop(ws.id, None)
        self._booting_until.pop(ws.id, None)
        self.debounce.forget(ws.id)
        task = self._restarts.pop(ws.id, None)
        if task is not None:
            task.cancel()
        ws.state = State.UNKNOWN
        ws.wakeup.set()

    def forget(self, workspace_id: str) -> None:
        """A workspace removed at run time leaves nothing behind."""
        self._history.pop(workspace_id, None)
        self._booting_until.pop(workspace_id, None)
        self.debounce.forget(workspace_id)
        for tasks in (self._probes, self._restarts):
            task = tasks.pop(workspace_id, None)
            if task is not None:
                task.cancel()


def _track(tasks: dict[str, asyncio.Task[T]], key: str, task: asyncio.Task[T]) -> None:
    """Keep `task` under `key` until it ends; log what it raised (nothing dies silently)."""
    tasks[key] = task

    def done(finished: asyncio.Task[T]) -> None:
        if tasks.get(key) is finished:
            del tasks[key]
        if not finished.cancelled() and finished.exception() is not None:
            log.error("%s failed", finished.get_name(), exc_info=finished.exception())

    task.add_done_callback(done)


async def run_command(
    argv: list[str], workspace_id: str, limit_seconds: float
) -> tuple[int | None, str]:
    """Run argv (no shell) with A2AD_WORKSPACE set; (exit code or None on timeout, output)."""
    env = {**os.environ, "A2AD_WORKSPACE": workspace_id}
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own session: an agent it starts does not get the Ctrl-C meant for a2ad.
            start_new_session=True,
        )
    except OSError as exc:
        return 127, f"cannot run {argv[0]!r}: {exc.strerror}"
    try:
        async with asyncio.timeout(limit_seconds):
            out, _ = await process.communicate()
    except TimeoutError:
        await _kill(process)
        return None, ""
    except asyncio.CancelledError:  # shutdown, reset or removal: leave nothing running
        await asyncio.shield(_kill(process))
        raise
    return process.returncode, out.decode(errors="replace")[-MAX_LOGGED_OUTPUT:]


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()
