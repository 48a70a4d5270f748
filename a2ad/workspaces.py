"""The workspace registry: each agent's run-time state, heartbeats and slots, in memory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from .admission import Admission, Enqueuing
from .clock import Clock
from .errors import UnknownWorkspace
from .settings import LivenessSettings, WorkspaceSettings
from .store import Depths

log = logging.getLogger("a2ad.workspaces")


class State(StrEnum):
    UNKNOWN = "unknown"  # no sign of life yet since start or reset
    ONLINE = "online"
    OFFLINE = "offline"  # no sign of life within the heartbeat timeout
    DEAD = "dead"
    RESTARTING = "restarting"
    FAILED = "failed"


# States in which a message send may go straight to the agent (if a slot is free).
DELIVERABLE = frozenset({State.UNKNOWN, State.ONLINE})


@dataclass(frozen=True, slots=True)
class Heartbeat:
    active_tasks: int
    max_concurrent_tasks: int | None
    at: float
    # The agent's load that is not a2ad's own requests, fixed when the heartbeat arrived.
    external: int


class Workspace:
    """One agent: its configuration and what a2ad knows of it right now.

    Every `now` here is the clock's monotonic reading: heartbeats, signs of
    life and pauses live only in this process, and a step of the wall clock
    must neither age them nor make them fresh again."""

    def __init__(
        self,
        config: WorkspaceSettings,
        liveness: LivenessSettings,
        clock: Clock,
        *,
        from_config: bool = True,
        depths: Depths | None = None,
        enqueuing: Enqueuing | None = None,
        replica: str | None = None,
    ):
        self.config = config
        self.replica = replica  # this a2ad's store.replica_id, when replicas share a store
        self.from_config = from_config  # a2ad.toml's workspaces are read-only at run time
        self._liveness = liveness
        self._clock = clock
        self.state = State.UNKNOWN
        self.heartbeat: Heartbeat | None = None
        self.last_sign_of_life: float | None = None
        self.restarts = 0
        # Set whenever something may let the dispatcher deliver: a trigger.
        self.wakeup = asyncio.Event()
        # The queue as the store committed it, and the one authority on slots.
        self.depth = (depths or Depths()).of(config.id)
        self.admission = Admission(
            config.id,
            self.depth,
            enqueuing or Enqueuing(),
            clock,
            capacity=self.capacity,
            external_load=self.external_load,
            deliverable_state=self.admits,
            wakeup=self.wakeup,
        )

    @property
    def id(self) -> str:
        return self.config.id

    def admits(self) -> bool:
        """Its state lets a message go to the agent (if a slot is free), from here."""
        return self.state in DELIVERABLE and self.delivers_here

    @property
    def delivers_here(self) -> bool:
        """This replica may deliver to the agent (`replicas` names it, or is empty:
        an agent on a loopback URL is reached only from its own host)."""
        replicas = self.config.replicas
        return not replicas or self.replica is None or self.replica in replicas

    # Read-only views for the status page, metrics and tests.
    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    @property
    def queued_total(self) -> int:
        return self.depth.queued_total

    @property
    def dispatching(self) -> int:
        return self.depth.dispatching

    @property
    def paused_until(self) -> float:
        return self.admission.paused_until

    @property
    def busy_since(self) -> float | None:
        return self.admission.busy_since

    def free_slots(self, now: float) -> int:
        return max(0, self.admission.free_slots(now))

    def paused(self, now: float) -> bool:
        return self.admission.paused(now)

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

    def record_heartbeat(
        self,
        active_tasks: int,
        max_concurrent: int | None,
        now: float,
        *,
        external: int | None = None,
    ) -> None:
        """A heartbeat at `now`. `external`: its load that is not a2ad's, as the
        store counted it over the replicas; else this process's requests are a2ad's
        (only those that have started: slots reserved for a claim in progress are
        not at the agent yet, so its active_tasks cannot hold them)."""
        if external is None:
            external = max(0, active_tasks - self.admission.in_flight)
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
        return self.admission.pause(retry_after, now)

    def note_answer(self, now: float) -> None:
        """The agent answered (not busy): a sign of life, and the busy streak ends."""
        self.admission.busy_spell_ended()
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

    def __init__(
        self,
        liveness: LivenessSettings,
        clock: Clock,
        depths: Depths | None = None,
        *,
        replica: str | None = None,
    ):
        self._liveness = liveness
        self.replica = replica
        self._clock = clock
        self._by_id: dict[str, Workspace] = {}
        self.depths = depths or Depths()
        self.enqueuing = Enqueuing()
        # Admissions of removed workspaces whose requests still run at their agent:
        # a workspace added back under the same id takes its slots over.
        self._retired: dict[str, Admission] = {}

    def add(self, config: WorkspaceSettings, *, from_config: bool = True) -> Workspace:
        ws = Workspace(
            config,
            self._liveness,
            self._clock,
            from_config=from_config,
            depths=self.depths,
            enqueuing=self.enqueuing,
            replica=self.replica,
        )
        retired = self._retired.pop(config.id, None)
        if retired is not None:
            retired.bind(ws.capacity, ws.external_load, ws.admits, ws.wakeup)
            retired.closed = False
            ws.admission = retired
        self._by_id[config.id] = ws
        return ws

    def remove(self, workspace_id: str) -> None:
        ws = self._by_id.pop(workspace_id, None)
        if ws is not None and ws.admission.busy:
            self._retired[workspace_id] = ws.admission

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
