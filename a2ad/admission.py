"""Admission: the one authority on a workspace's slots and its busy pause.

It alone decides whether a message send goes to the agent now or to the
queue, and it alone takes and returns slots, for direct sends and queued
deliveries alike. Each decision takes its slot in the same synchronous step:
no await falls between "is a slot free?" and "take it", so any number of
concurrent sends can never put more of a2ad's requests at an agent than it
has slots. A slot is a `Slot`, returned exactly once, on every path.

Times here are the clock's monotonic reading (`now`): a busy pause lives only
in this process, and a step of the wall clock must not lengthen or end it.
Stored times (an item's not-before) are compared with the wall clock.

The queue's depth is not kept here: it is the store's `Depth`, which changes
only where the store commits. What admission adds is what is not committed
yet: sends whose item is being written (they are waiting already, so no
later send may overtake them) and slots reserved for a claim in progress.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from .clock import Clock
from .errors import QueueFull, UnknownWorkspace
from .store import Depth, Depths

BUSY_PAUSE_FIRST = 0.5
BUSY_PAUSE_MAX = 30.0
TOLD_CLAIM = 4  # slots a claim reserves on another replica's word (it goes on while it finds items)


@dataclass(slots=True)
class Enqueuing:
    """Sends whose item is being written, over every workspace (for max_depth)."""

    total: int = 0


class Slot:
    """One of a2ad's requests at an agent. `release()` returns it, once."""

    __slots__ = ("_admission", "also")

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission
        # Run as it is returned: a direct send's lease on a slot replicas share.
        self.also: Callable[[], None] | None = None

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._slot_returned()
            if self.also is not None:
                self.also()

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    """Slots, reservations and the busy pause of one workspace."""

    def __init__(
        self,
        workspace: str,
        depth: Depth,
        enqueuing: Enqueuing,
        clock: Clock,
        *,
        capacity: Callable[[float], int],
        external_load: Callable[[float], int],
        deliverable_state: Callable[[], bool],
        wakeup: asyncio.Event,
    ) -> None:
        self.workspace = workspace
        self.depth = depth
        self._enqueuing_all = enqueuing
        self._clock = clock
        self.bind(capacity, external_load, deliverable_state, wakeup)
        self.closed = False  # the workspace is being removed: nothing more is admitted
        self._written = asyncio.Event()  # set as the last item being written is done
        self.in_flight = 0  # a2ad's own message requests at the agent, direct or queued
        self.reserved = 0  # slots held for a claim the store has not answered yet
        self.enqueuing = 0  # sends whose item is being written
        self.paused_until = 0.0  # monotonic
        self.busy_streak = 0
        self.busy_since: float | None = None  # when the current busy spell began (monotonic)
        # Another replica changed this workspace's queue (its NOTIFY): there may be
        # items due that this one has not counted yet, so its next claim looks.
        self.told = False
        self.pump_idle = False  # the pump sleeps on an empty queue's plan (delivery.py)

    def bind(
        self,
        capacity: Callable[[float], int],
        external_load: Callable[[float], int],
        deliverable_state: Callable[[], bool],
        wakeup: asyncio.Event,
    ) -> None:
        """Take what it knows of the agent from its workspace (again, when a
        workspace removed while its requests still ran is added back)."""
        self._capacity = capacity
        self._external_load = external_load
        self._deliverable_state = deliverable_state
        self._wakeup = wakeup

    @property
    def busy(self) -> bool:
        """Requests of a2ad's are at the agent, or slots are held for a claim."""
        return bool(self.in_flight or self.reserved)

    async def close(self) -> None:
        """Admit nothing more (sends get unknown_workspace), and wait for the items
        being written to be committed, so the depth counts every one of them."""
        self.closed = True
        while self.enqueuing:  # each ends with its write, committed or failed
            self._written.clear()
            await self._written.wait()

    # -- what is free --------------------------------------------------------

    def shared_capacity(self, now: float) -> int:
        """What a2ad may run at the agent, over every replica: its capacity less
        its other load (as this replica knows them)."""
        return self._capacity(now) - self._external_load(now)

    def free_slots(self, now: float) -> int:
        """Capacity less a2ad's requests, reservations and the agent's other load;
        negative when a heartbeat lowered the capacity below what runs."""
        taken = self.in_flight + self.reserved + self._external_load(now)
        return self._capacity(now) - taken

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    def paused_until_wall(self) -> float:
        """The end of the pause on the wall clock, for people and logs."""
        return self._clock.now() + (self.paused_until - self._clock.monotonic())

    def can_deliver(self, now: float) -> bool:
        """A slot is free and nothing holds delivery back."""
        return (
            not self.closed
            and self._deliverable_state()
            and not self.paused(now)
            and self.free_slots(now) > 0
        )

    def waiting(self, now: float) -> int:
        """Sends that wait ahead of a new one: deliverable queued items and items
        being written. An item waiting out a failure backoff does not count."""
        return self.depth.deliverable(self._clock.now()) + self.enqueuing

    # -- the decisions ---------------------------------------------------------

    def try_direct(self, now: float) -> Slot | None:
        """A slot for a send that may skip the queue, taken now; None: queue it."""
        if self.waiting(now) or not self.can_deliver(now):
            return None
        self.in_flight += 1
        return Slot(self)

    def reserve(self, now: float) -> int:
        """Slots for the pump's next claim, held until `claimed`: as many as are
        free and items are due, 0 when nothing may be delivered now."""
        due = self.depth.deliverable(self._clock.now())
        if self.told:
            # Items another replica queued may wait: look, for a few slots only, so
            # direct sends here still find the rest free while the claim runs.
            due = max(due, min(self.free_slots(now), TOLD_CLAIM))
        if due <= 0 or not self.can_deliver(now):
            return 0
        n = min(self.free_slots(now), due)
        self.reserved += n
        return n

    def claimed(self, reserved: int, n: int) -> list[Slot]:
        """The claim took `n` items: each gets one of the `reserved` slots; the
        rest are free again."""
        assert 0 <= n <= reserved <= self.reserved
        if n < reserved:
            self.told = False  # the store had no more, or no more slots
        self.reserved -= reserved
        self.in_flight += n
        return [Slot(self) for _ in range(n)]

    def _slot_returned(self) -> None:
        self.in_flight -= 1
        assert self.in_flight >= 0, f"workspace {self.workspace}: a slot returned twice"
        if self.depth.queued_total or self.enqueuing:
            self._wakeup.set()  # a slot freed for the items that wait

    # -- enqueues ----------------------------------------------------------------

    def begin_enqueue(self, depths: Depths, *, max_per_workspace: int, max_total: int) -> None:
        """Count a send as waiting while its item is written, after the caps allow it.
        Counted before the write, so concurrent sends cannot overshoot a cap."""
        if self.closed:
            raise UnknownWorkspace(f"no workspace {self.workspace!r} (it is being removed)")
        if self.depth.live + self.enqueuing >= max_per_workspace:
            raise QueueFull.workspace(self.workspace, max_per_workspace)
        if depths.live_total + self._enqueuing_all.total >= max_total:
            raise QueueFull.total(max_total)
        self.enqueuing += 1
        self._enqueuing_all.total += 1

    def end_enqueue(self) -> None:
        """The write is done (committed, or not): the store's depth counts it now."""
        self.enqueuing -= 1
        self._enqueuing_all.total -= 1
        if not self.enqueuing:
            self._written.set()
        # The pump claims the item if a slot is free. When none is, a slot's return,
        # a heartbeat or the end of a pause it planned for wakes it, and waking it
        # for each of a burst of sends would only have it plan the same sleep
        # again; unless it sleeps on an empty queue's plan, which knows of no
        # pause and rechecks only after a minute.
        if self.pump_idle or self.can_deliver(self._clock.monotonic()):
            self._wakeup.set()

    # -- the busy pause ----------------------------------------------------------

    def pause(self, retry_after: float | None, now: float) -> float:
        """The agent is busy: pause the whole workspace; return the pause length."""
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

    def pause_until_wall(self, until: float) -> None:
        """Another replica's busy pause, ending at `until` on the wall clock."""
        now = self._clock.monotonic()
        self.paused_until = max(self.paused_until, now + (until - self._clock.now()))

    def busy_spell_ended(self) -> None:
        """The agent answered (not busy)."""
        self.busy_streak = 0
        self.busy_since = None
