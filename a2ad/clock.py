"""The one clock, so tests can move it.

Two readings: `now()` is wall time, for what is stored and compared across
restarts (enqueue, expiry, not-before, finished times); `monotonic()` is for
deadlines that live only in this process (claim leases), which a step of the
system clock must not move.

On PostgreSQL the wall time is the database server's: the daemon measures how
far the server's clock is from this host's and `follow()`s it, so stored times
agree whichever host wrote them, even when a host's clock is off by minutes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Clock:
    """Real time. Every part of a2ad asks this object, never `time` directly."""

    server_offset = 0.0  # the store's clock minus this host's

    def now(self) -> float:
        return self.host_now() + self.server_offset

    def host_now(self) -> float:
        """This host's wall clock, whatever the store's says."""
        return time.time()

    async def follow(self, store_time: Callable[[], Awaitable[float | None]]) -> float:
        """Keep wall time on the store's clock (`store_time()`: its reading, None
        when the store has no clock but this host's); the offset found, in seconds.
        The reading is taken to be halfway through its round trip, and a change
        smaller than that round trip's noise is not followed."""
        sent = self.host_now()
        reading = await store_time()
        back = self.host_now()
        offset = 0.0 if reading is None else reading - (sent + back) / 2
        if abs(offset - self.server_offset) > max(0.05, back - sent):
            self.server_offset = offset
        return self.server_offset

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Cancellable:
        """Call `callback` after `seconds` (a timer, not a task: cheap to set and cancel)."""
        return asyncio.get_running_loop().call_later(max(0.0, seconds), callback)


class ManualClock(Clock):
    """A clock that moves only when told; sleepers wake when it passes their deadline."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = 0.0  # how far the wall clock was stepped
        self._moved = asyncio.Condition()
        self._timers: list[_ManualTimer] = []

    def now(self) -> float:
        return self._now + self._wall_offset

    def monotonic(self) -> float:
        return self._now

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock alone (an NTP correction, an operator's `date -s`):
        sleepers, timers and monotonic deadlines do not move."""
        self._wall_offset += seconds

    async def sleep(self, seconds: float) -> None:
        deadline = self._now + max(0.0, seconds)
        async with self._moved:
            await self._moved.wait_for(lambda: self._now >= deadline)

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Cancellable:
        if seconds <= 0:  # already due: as soon as the loop can, like the real one
            return asyncio.get_running_loop().call_soon(callback)
        timer = _ManualTimer(self._now + seconds, callback)
        self._timers.append(timer)
        return timer

    async def advance(self, seconds: float) -> None:
        """Move time forward and let every sleeper and timer whose deadline passed run."""
        self._now += seconds
        due = [t for t in self._timers if t.deadline <= self._now]
        self._timers = [t for t in self._timers if t.deadline > self._now and not t.cancelled]
        for timer in due:
            if not timer.cancelled:
                timer.callback()
        async with self._moved:
            self._moved.notify_all()
        for _ in range(5):
            await asyncio.sleep(0)


class _ManualTimer:
    def __init__(self, deadline: float, callback: Callable[[], object]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
