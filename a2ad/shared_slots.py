"""Direct sends' slots when several replicas serve one PostgreSQL store.

Admission decides in memory, in one step, whether a send may go to the agent
now; with replicas that is this process's view only. A send it lets through
then takes a lease on one of the agent's slots in the store, which counts them
over every replica (and refuses while an item of the workspace is due, so a
send never passes the queue another replica holds). No lease: the send is
queued. The lease is renewed while the request runs (a long stream) and
returned with the slot; a replica that dies returns its leases when they lapse.
Queued deliveries need none of this: their claim takes the slot in the store.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from .admission import Slot
from .clock import Clock
from .errors import StoreUnavailable
from .store.base import SharedSlotStore
from .workspaces import Workspace

log = logging.getLogger("a2ad.slots")


class SharedSlots:
    """The leases this replica's direct sends hold on slots the replicas share."""

    def __init__(self, store: SharedSlotStore, clock: Clock, *, lease_seconds: float) -> None:
        self.store = store
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.held: dict[str, str] = {}  # token → workspace
        self._freeing: set[asyncio.Future[None]] = set()

    async def take(self, ws: Workspace, slot: Slot, *, arrived: float) -> bool:
        """A lease for the send that holds `slot` (given back with it); False: the
        agent's slots are all taken over the replicas, or an item queued before
        the send `arrived` is due: queue it."""
        token = uuid.uuid4().hex
        now = self.clock.now()
        taken = await self.store.submit_take_slot(
            ws.id,
            token=token,
            cap=ws.admission.shared_capacity(self.clock.monotonic()),
            arrived=arrived,
            now=now,
            lease_until=now + self.lease_seconds,
            # The caller left while it was taken: return it.
            if_cancelled=lambda taken: self._free(token) if taken else None,
        )
        if taken:
            self.held[token] = ws.id
            slot.also = lambda: self._free(token)
        return taken

    def _free(self, token: str) -> None:
        self.held.pop(token, None)
        try:
            freeing = self.store.submit_free_slots([token])
        except StoreUnavailable:
            return  # the lease lapses, and whichever replica sweeps first frees it
        self._freeing.add(freeing)
        freeing.add_done_callback(self._freed)

    def _freed(self, freeing: asyncio.Future[None]) -> None:
        self._freeing.discard(freeing)
        if not freeing.cancelled() and freeing.exception() is not None:
            log.warning("cannot return a slot now (its lease lapses): %s", freeing.exception())

    async def keep(self) -> None:
        """Renew every held lease each lease_seconds / 3, in one write."""
        while True:
            await self.clock.sleep(self.lease_seconds / 3)
            if not self.held:
                continue
            tokens = list(self.held)
            try:
                lost = await self.store.renew_slots(
                    tokens, lease_until=self.clock.now() + self.lease_seconds
                )
            except StoreUnavailable as exc:
                log.warning("cannot renew slot leases: %s", exc.message)
                continue
            for token in lost & self.held.keys():
                log.warning(
                    "workspace %s: a direct send's slot lease lapsed while it ran",
                    self.held[token],
                )

    async def close(self) -> None:
        """Wait for the slots being returned (before the store closes)."""
        if self._freeing:
            await asyncio.gather(*self._freeing, return_exceptions=True)
