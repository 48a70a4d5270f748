"""Watching results: who waits for an item to end, and who streams its events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from .clock import Clock
from .store import Item, QueueStore


class ResultWatch:
    """Long polls, held blocking sends and queued streams wait here; deliveries
    and sweeps tell them."""

    def __init__(self, store: QueueStore, clock: Clock, *, max_held: int = 1000) -> None:
        self.store = store
        self.clock = clock
        self.max_held = max_held
        self.held = 0  # blocking sends waiting for their item
        self._closing = False
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any] | None]]] = {}
        # The push sender's: an item ended here (`pushes`: it is known to have configs).
        self.on_final: Callable[[str, bool], None] = lambda item_id, pushes: None

    def hold(self) -> bool:
        """Take a place for a held blocking send; False past max_held or at shutdown."""
        if self._closing or self.held >= self.max_held:
            return False
        self.held += 1
        return True

    def unhold(self) -> None:
        self.held -= 1

    def close(self) -> None:
        """Shutdown: every wait ends now with the item as it is."""
        self._closing = True
        for waiters in list(self._waiters.values()):
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    def notify(self, item_id: str, *, pushes: bool = False) -> None:
        """The item is final: wake its waiters and end its streams."""
        self.on_final(item_id, pushes)
        for future in self._waiters.pop(item_id, ()):
            if not future.done():
                future.set_result(None)
        for queue in self._subscribers.get(item_id, ()):
            queue.put_nowait(None)

    def subscribe(self, item_id: str) -> asyncio.Queue[dict[str, Any] | None]:
        """Events of the item's one Task (v0.3 shape), then None when it is final."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._subscribers.setdefault(item_id, set()).add(queue)
        return queue

    def unsubscribe(self, item_id: str, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        queues = self._subscribers.get(item_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[item_id]

    def watched(self, item_id: str) -> bool:
        """Does a stream follow this item?"""
        return bool(self._subscribers.get(item_id))

    def publish(self, item_id: str, event: dict[str, Any]) -> None:
        for queue in self._subscribers.get(item_id, ()):
            queue.put_nowait(event)

    async def wait_final(self, item_id: str, seconds: float) -> Item | None:
        """The item, once final or after `seconds` (None if it does not exist)."""
        deadline = self.clock.now() + seconds
        while True:
            # Listen before reading, so a settle between the two is not missed.
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters = self._waiters.setdefault(item_id, set())
            waiters.add(future)
            try:
                item = await self.store.get(item_id)
                remaining = deadline - self.clock.now()
                if item is None or item.is_final or remaining <= 0 or self._closing:
                    return item
                # Re-read at least once a second: the queue CLI may settle it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(future, min(remaining, 1.0))
            finally:
                waiters.discard(future)
                if not waiters and self._waiters.get(item_id) is waiters:
                    del self._waiters[item_id]
