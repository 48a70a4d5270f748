"""The workspace registry: each agent's run-time state, heartbeats and slots, in memory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from .clock import Clock
from .errors import UnknownWorkspace
from .settings import LivenessSettings, WorkspaceSettings

log = logging.getLogger("a2ad.workspaces")

BUSY_PAUSE_FIRST = 0.5
BUSY_PAUSE_MAX = 30.0


class State(StrEnum):
    UNKNOWN = "unknown"  # no sign of life yet since start or reset
    ONLINE = "online"
    OFFLINE = "offline"  # no sign of life within the heartbeat timeout
    DEAD = "dead"
    RESTARTING = "restarting"
    FAILED = "failed"


# States in which a message send may go straight to the agent (if a slot is free).
DELIVERABLE = frozenset({State.UNKNOWN, State.ONLINE})


@dataclass(slots=True)
class Totals:
    """Counts over every workspace, kept in step so caps cost O(1) per send."""

    live: int = 0  # queued + dispatching


@dataclass(frozen=True, slots=True)
class Heartbeat:
    active_tasks: int
    max_concurrent_tasks: int | None
    at: float
    # The agent's load that is not a2ad's own requests, fixed when the heartbeat arrived.
    external: int


class Workspace:
    """One agent: its configuration and what a2ad knows of it right now."""

    def __init__(
        self,
        config: WorkspaceSettings,
        liveness: LivenessSettings,
        clock: Clock,
        *,
        from_config: bool = True,
        totals: Totals | None = None,
    ):
        self.config = config
        self.from_config = from_config  # a2ad.toml's workspaces are read-only at run time
        self._liveness = liveness
        self._clock = clock
        self.state = State.UNKNOWN
        self.in_flight = 0  # a2ad's own message requests to the agent, direct or queued
        self.heartbeat: Heartbeat | None = None
        self.last_sign_of_life: float | None = None
        self.paused_until = 0.0
        self.busy_streak = 0
        self.busy_since: float | None = None  # when the current run of busy answers began
        self.restarts = 0
        # Kept in step with the store (and recounted from it): priority → queued items.
        self.queued: dict[int, int] = {}
        self.queued_total = 0
        self.dispatching = 0
        self._dispatching_counted = 0
        self._totals = totals or Totals()
        self.last_queued_at: float | None = None  # when an item was last queued here
        # Set whenever something may let the dispatcher deliver: a trigger.
        self.wakeup = asyncio.Event()

    @property
    def id(self) -> str:
        return self.config.id

    def add_queued(self, priority: int, n: int) -> None:
        self.queued[priority] = max(0, self.queued.get(priority, 0) + n)
        self._refresh_totals()

    def add_dispatching(self, n: int) -> None:
        self.dispatching = max(0, self.dispatching + n)
        self._refresh_totals()

    def set_counts(self, queued: dict[int, int], dispatching: int) -> None:
        self.queued = dict(queued)
        self.dispatching = dispatching
        self._refresh_totals()

    def _refresh_totals(self) -> None:
        before = self.queued_total + self._dispatching_counted
        self.queued_total = sum(self.queued.values())
        self._dispatching_counted = self.dispatching
        self._totals.live += self.queued_total + self.dispatching - before

    def _fresh_heartbeat(self, now: float) -> Heartbeat | None:
        hb = self.heartbeat
        if hb is not None and now - hb.at <= self._liveness.heartbeat_timeout_seconds:
            return hb
        return None

    def capacity(self, now: float) -> int:
        hb = self._fresh_heartbeat(now)
        if hb is not None and hb.max_concurrent_tasks is not None:
            return hb.max_concurrent_tasks
        return self.config.max_concurrent

    def external_load(self, now: float) -> int:
        hb = self._fresh_heartbeat(now)
        return hb.external if hb is not None else 0

    def free_slots(self, now: float) -> int:
        return max(0, self.capacity(now) - self.in_flight - self.external_load(now))

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    def can_deliver(self, now: float) -> bool:
        """A slot is free and nothing holds delivery back."""
        return self.state in DELIVERABLE and not self.paused(now) and self.free_slots(now) > 0

    def goes_direct(self, now: float) -> bool:
        """A message send may skip the queue: deliverable and nobody waiting ahead."""
        return self.queued_total == 0 and self.can_deliver(now)

    def record_heartbeat(self, active_tasks: int, max_concurrent: int | None, now: float) -> None:
        external = max(0, active_tasks - self.in_flight)
        self.heartbeat = Heartbeat(active_tasks, max_concurrent, now, external)
        self.sign_of_life(now)

    def sign_of_life(self, now: float) -> None:
        """A heartbeat, an answer or a good probe: online, and delivery starts.
        A failed workspace stays failed until an operator resets it."""
        self.last_sign_of_life = now
        if self.state in (State.UNKNOWN, State.OFFLINE, State.DEAD, State.RESTARTING):
            if self.state is not State.UNKNOWN:
                log.info("workspace %s is online again (was %s)", self.id, self.state.value)
            self.state = State.ONLINE
            self.wakeup.set()

    def note_busy(self, retry_after: float | None, now: float, *, answered: bool) -> float:
        """The agent is busy: pause the whole workspace; return the pause length.

        `answered`: it said so itself (a 503 or 429 is a sign of life; a refused
        connection is not)."""
        if answered:
            self.sign_of_life(now)
        if self.busy_streak == 0:
            self.busy_since = now
        self.busy_streak += 1
        if retry_after is not None:
            pause = retry_after
        else:
            pause = min(BUSY_PAUSE_MAX, BUSY_PAUSE_FIRST * 2 ** (self.busy_streak - 1))
        # No trigger ends a pause early, so a later, shorter answer does not shorten it.
        self.paused_until = max(self.paused_until, now + pause)
        return pause

    def note_answer(self, now: float) -> None:
        """The agent answered (not busy): a sign of life, and the busy streak ends."""
        self.busy_streak = 0
        self.busy_since = None
        self.sign_of_life(now)

    def check_heartbeat_timeout(self, now: float) -> bool:
        """Online → offline when heartbeats stopped; True when that happened now."""
        if not self.config.heartbeat or self.state is not State.ONLINE:
            return False
        last = self.last_sign_of_life
        if last is not None and now - last > self._liveness.heartbeat_timeout_seconds:
            self.state = State.OFFLINE
            log.warning("workspace %s is offline: no sign of life for %.0f s", self.id, now - last)
            return True
        return False


class Registry:
    """Every workspace a2ad fronts, by id."""

    def __init__(self, liveness: LivenessSettings, clock: Clock):
        self._liveness = liveness
        self._clock = clock
        self._by_id: dict[str, Workspace] = {}
        self.totals = Totals()

    def add(self, config: WorkspaceSettings, *, from_config: bool = True) -> Workspace:
        ws = Workspace(
            config, self._liveness, self._clock, from_config=from_config, totals=self.totals
        )
        self._by_id[config.id] = ws
        return ws

    def remove(self, workspace_id: str) -> None:
        ws = self._by_id.pop(workspace_id, None)
        if ws is not None:
            ws.set_counts({}, 0)

    def get(self, workspace_id: str) -> Workspace:
        try:
            return self._by_id[workspace_id]
        except KeyError:
            raise UnknownWorkspace(f"no workspace {workspace_id!r}") from None

    def find(self, workspace_id: str) -> Workspace | None:
        return self._by_id.get(workspace_id)

    def __iter__(self) -> Iterator[Workspace]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)
