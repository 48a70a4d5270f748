"""What replicas serving one PostgreSQL store share besides slots (shared_slots.py):
heartbeats, duties, decisions about agents, run-time workspaces, finished items.

- Heartbeats: any replica takes an agent's heartbeat, stores it and tells the
  others (NOTIFY), so every one counts the agent's slots from the same load.
- Duties: what must happen once (probing and restarting an agent, the sweeps of
  expiry, lapsed leases and retention) is done by the replica that holds its
  duty in the store, under a lease renewed each second; another takes it over
  when the lease lapses. A replica that can restart an agent (it has a
  restart_command for it) takes that agent's duty from one that cannot.
- Decisions: the replica acting for an agent tells the others when it declares
  it dead, restarts it, gives up on it or sees it running again; they hand it
  their failure signals.
- Run-time workspaces (PUT/DELETE) and finished items reach every replica, so a
  workspace is served everywhere, and a caller waiting on one replica for an
  item another delivered is answered at once.

Times crossing replicas are the store's clock (Clock.now follows it); each
replica turns them into its own monotonic clock for what it keeps in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .a2a import timestamp
from .clock import Clock
from .errors import StoreUnavailable
from .liveness import HOUR, Liveness
from .store.base import ReplicaStore
from .workspaces import Registry, State, Workspace

log = logging.getLogger("a2ad.replicas")

DUTY_LEASE_SECONDS = 5.0  # a dead replica's duties pass on within this (+1 s)
DUTY_MARGIN_SECONDS = 1.0  # a renewal slower than the lease less this: it holds none
SWEEPS = "sweeps"
SIGNAL_EVERY_SECONDS = 1.0  # failure signals handed over per agent, at most
# Decisions the acting replica tells of, and what the others make of them.
TOLD_STATES = {State.DEAD, State.RESTARTING, State.FAILED, State.ONLINE}


def agent_duty(workspace_id: str) -> str:
    return f"agent:{workspace_id}"


class Replicas:
    """This replica's part among those serving one store."""

    def __init__(
        self,
        store: ReplicaStore,
        registry: Registry,
        clock: Clock,
        liveness: Liveness,
        *,
        heartbeat_timeout: float,
        workspace_changed: Callable[[str], Awaitable[None]],
    ) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self.liveness = liveness
        self.heartbeat_timeout = heartbeat_timeout
        self._workspace_changed = workspace_changed
        self.held: set[str] = set()  # the duties this replica holds
        self.started_at = clock.now()
        self._signalled: dict[str, float] = {}  # workspace → when a signal was handed over
        self._jobs: set[asyncio.Task[None]] = set()
        self._stopped = False
        liveness.acts_for = self.acts_for
        liveness.hand_over = self._hand_over
        liveness.decided = self._decided
        liveness.shared_history = _SharedHistory(store, clock)
        store.on_note = self._on_note

    # -- duties ------------------------------------------------------------------

    def acts_for(self, ws: Workspace) -> bool:
        return agent_duty(ws.id) in self.held

    @property
    def sweeps(self) -> bool:
        return SWEEPS in self.held

    async def renew(self) -> None:
        """Take or keep this replica's duties (once a second)."""
        if self._stopped:
            return
        wanted = {SWEEPS: False}
        for ws in self.registry:
            if ws.delivers_here:  # it can reach the agent
                wanted[agent_duty(ws.id)] = bool(ws.config.restart_command)
        try:
            # Renewed in time, or not held: past the lease, another replica may
            # hold them already (the store is out of reach, or the writer stalls).
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancel that comes as the write ends, and this loop would not stop.
            async with asyncio.timeout(DUTY_LEASE_SECONDS - DUTY_MARGIN_SECONDS):
                held = await self.store.take_duties(
                    wanted,
                    now=self.clock.now(),
                    lease_seconds=DUTY_LEASE_SECONDS,
                    started_at=self.started_at,
                )
        except (StoreUnavailable, TimeoutError):
            if self.held:
                log.warning("cannot renew this replica's duties: it acts on none until it can")
            self.held = set()
            raise
        for duty in sorted(held - self.held):
            log.info("this replica now holds duty %s", duty)
        for duty in sorted(self.held - held):
            log.info("this replica no longer holds duty %s", duty)
        self.held = held

    async def stop(self) -> None:
        """Hand the duties on at once."""
        self._stopped = True
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        self.held = set()
        with contextlib.suppress(StoreUnavailable):
            await self.store.drop_duties()

    # -- heartbeats ----------------------------------------------------------------

    async def share_heartbeat(self, ws: Workspace, active: int, capacity: int | None) -> None:
        """A heartbeat this replica took: stored and told; its load that is not
        a2ad's is counted over every replica's slots."""
        external = await self.store.share_heartbeat(
            ws.id, active=active, capacity=capacity, at=self.clock.now()
        )
        hb = ws.heartbeat
        if hb is not None:
            ws.record_heartbeat(active, capacity, hb.at, external=external)

    async def load_heartbeats(self) -> None:
        """The heartbeats other replicas took (at start-up, and with each slow recount)."""
        for workspace_id, active, capacity, external, at in await self.store.load_heartbeats():
            self._heartbeat(workspace_id, active, capacity, external, at)

    def _heartbeat(
        self, workspace_id: str, active: int, capacity: int | None, external: int, at: float
    ) -> None:
        ws = self.registry.find(workspace_id)
        age = max(0.0, self.clock.now() - at)
        if ws is None or age > self.heartbeat_timeout:
            return
        seen = self.clock.monotonic() - age
        if ws.heartbeat is not None and ws.heartbeat.at >= seen:
            return  # this replica knows a later one
        ws.record_heartbeat(active, capacity, seen, external=external)
        ws.admission.told = True
        ws.wakeup.set()  # a slot it freed is used at once

    # -- notes from the other replicas -------------------------------------------------

    def _on_note(self, kind: str, fields: list[str]) -> None:
        try:
            self._note(kind, fields)
        except (ValueError, IndexError):
            log.warning(
                "a note from another replica that this one does not read: %s %s", kind, fields
            )

    def _note(self, kind: str, fields: list[str]) -> None:
        if kind == "hb":
            workspace_id, active, capacity, external, at = fields
            cap = None if capacity == "-" else int(capacity)
            self._heartbeat(workspace_id, int(active), cap, int(external), float(at))
            return
        if kind == "workspace":
            self._run(self._workspace_changed(fields[0]))
            return
        ws = self.registry.find(fields[0])
        if ws is None:
            return
        if kind == "signal" and self.acts_for(ws):
            self.liveness.signal(ws, " ".join(fields[1:]) + " (seen by another replica)")
        elif kind == "state" and not self.acts_for(ws):
            state = State(fields[1])
            if state is State.ONLINE:
                ws.sign_of_life(self.clock.monotonic())
            elif ws.state is not state:
                log.info("workspace %s is %s (another replica acts for it)", ws.id, state.value)
                ws.state = state
        elif kind == "reset":
            self.liveness.reset(ws)
        elif kind == "pause":
            # The agent said it is busy to another replica: every replica waits
            # (no send here passes the item that replica handed back).
            ws.admission.pause_until_wall(float(fields[1]))
            ws.wakeup.set()

    def _hand_over(self, ws: Workspace, reason: str) -> None:
        """A failure signal, for the replica that acts for the agent (once a second)."""
        now = self.clock.monotonic()
        if now - self._signalled.get(ws.id, -SIGNAL_EVERY_SECONDS) < SIGNAL_EVERY_SECONDS:
            return
        self._signalled[ws.id] = now
        self._tell("signal", ws.id, *reason.split())

    def paused(self, ws: Workspace) -> None:
        """This replica began or lengthened the workspace's busy pause: all wait."""
        self._tell("pause", ws.id, repr(ws.admission.paused_until_wall()))

    def _decided(self, ws: Workspace) -> None:
        if ws.state in TOLD_STATES:
            self._tell("state", ws.id, ws.state.value)

    async def reset(self, ws: Workspace) -> None:
        """An operator's reset, here: the restart history goes, and every replica resets."""
        await self.store.clear_restarts(ws.id)
        await self.store.tell("reset", ws.id)

    async def workspace_changed(self, workspace_id: str) -> None:
        """A run-time workspace was added, changed or removed here: tell the others."""
        await self.store.tell("workspace", workspace_id)

    def _tell(self, kind: str, *fields: str) -> None:
        async def tell() -> None:
            with contextlib.suppress(StoreUnavailable):
                await self.store.tell(kind, *fields)

        self._run(tell())

    def _run(self, job: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await job
            except StoreUnavailable as exc:
                log.warning("replicas: %s", exc.message)
            except Exception:
                log.exception("replicas: a job failed; continuing")

        task = asyncio.ensure_future(run())
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    # -- what GET /workspaces shows ------------------------------------------------

    async def view(self) -> list[dict[str, Any]]:
        now = self.clock.now()
        return [
            {
                "replica": replica,
                "live": now - seen_at <= DUTY_LEASE_SECONDS,
                "seen_age_seconds": round(max(0.0, now - seen_at), 3),
                "started_at": timestamp(started_at),
                "duties": duties,
            }
            for replica, started_at, seen_at, duties in await self.store.replicas_seen()
        ]


class _SharedHistory:
    """Restarts over the last hour, as every replica recorded them in the store."""

    def __init__(self, store: ReplicaStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    async def load(self, workspace_id: str) -> list[float]:
        now, mono = self.clock.now(), self.clock.monotonic()
        return [
            mono - (now - at) for at in await self.store.restarts_since(workspace_id, now - HOUR)
        ]

    async def add(self, workspace_id: str) -> bool:
        return await self.store.record_restart(
            workspace_id, at=self.clock.now(), duty=agent_duty(workspace_id)
        )
