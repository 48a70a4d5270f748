"""What a2ad asks of a store, whichever database holds it: the SQLite file
(sqlite.py, the default) or a PostgreSQL server (postgres.py). Operations are
named for what they do; none of them exposes SQL or a driver."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Literal, Protocol

from .depth import Depths
from .models import Enqueued, Item, NewItem, Push, Released, State
from .schema import Migration


class QueueStore(Protocol):
    """A store: `open()` it, `migrate()` it, use it, `close()` it."""

    depths: Depths  # the queue's counts, changed in commit order
    # A server that can lose a delivery's last steps while a2ad runs (it crashed
    # and came back): a claim can outlive its outcome there, so the daemon
    # sweeps lapsed leases that no delivery of its own holds.
    is_server: bool

    @property
    def last_write_error(self) -> str | None: ...
    @property
    def commits(self) -> int: ...

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def probe_write(self, now: float) -> None: ...
    async def schema_version(self) -> int: ...
    async def migrate(self, migrations: Iterable[Migration] | None = None) -> list[Migration]: ...
    async def data_version(self) -> int: ...
    async def tend(self) -> None: ...
    async def take_ownership(self, replica: str | None = None) -> None: ...
    async def server_time(self) -> float | None: ...

    # -- the queue
    async def enqueue(self, new: NewItem, *, now: float, replay_window: float) -> Enqueued: ...
    def submit_enqueue(
        self,
        new: NewItem,
        *,
        now: float,
        replay_window: float,
        caps: tuple[int, int] | None = None,
    ) -> asyncio.Future[Enqueued]: ...
    def submit_claim(
        self,
        workspace: str,
        *,
        now: float,
        lease_seconds: float,
        promote_after: float,
        limit: int = 1,
        cap: int | None = None,
        if_cancelled: Callable[[list[Item]], None] | None = None,
    ) -> asyncio.Future[list[Item]]: ...
    async def claim(
        self,
        workspace: str,
        *,
        now: float,
        lease_seconds: float,
        promote_after: float,
        limit: int = 1,
        cap: int | None = None,
    ) -> list[Item]: ...
    async def renew(
        self, claims: dict[str, str], *, lease_until: float, now: float
    ) -> set[str]: ...
    async def settle(
        self,
        item_id: str,
        token: str,
        *,
        state: State,
        now: float,
        result: bytes | None = None,
        last_error: str | None = None,
        agent_task_id: str | None = None,
        agent_context_id: str | None = None,
        attempt_used: bool = False,
    ) -> bool: ...
    async def hand_back(
        self,
        item_id: str,
        token: str,
        *,
        now: float,
        not_before: float = 0.0,
        attempt_used: bool = False,
        busy: bool = False,
        last_error: str | None = None,
    ) -> bool: ...
    async def recover_dispatching(self, *, now: float, max_attempts: int) -> list[Released]: ...
    async def sweep_leases(
        self, *, now: float, max_attempts: int, except_tokens: Collection[str] = ()
    ) -> list[Released]: ...
    async def release_claims(
        self, claims: dict[str, str], *, now: float, max_attempts: int
    ) -> list[Released]: ...
    async def expire_due(self, *, now: float) -> list[Released]: ...
    async def cancel(self, item_id: str, *, now: float) -> bool: ...
    async def retry(
        self, item_id: str, *, now: float, max_age: float
    ) -> Literal["retried", "not_final", "duplicate"]: ...
    async def retry_failed(self, workspace: str, *, now: float, max_age: float) -> int: ...
    async def delete(self, item_id: str) -> bool: ...
    async def purge(self, *, state: str, before: float, workspace: str | None = None) -> int: ...
    async def delete_finished(self, *, before: float, chunk: int = 2000) -> int: ...
    async def recount(self) -> None: ...

    # -- the push outbox (outbox.py)
    async def set_push(self, item_id: str, configs: str | None, *, before: str | None) -> bool: ...
    async def claim_pushes(self, *, now: float, lease_until: float, limit: int) -> list[Push]: ...
    async def push_sent(self, seq: int, *, now: float) -> None: ...
    async def push_failed(
        self, seq: int, *, next_at: float, error: str, max_attempts: int
    ) -> bool: ...
    async def add_push_update(self, item_id: str, task: str, *, now: float) -> int: ...
    async def follow_push(self, item_id: str, task: str, *, next_at: float, now: float) -> None: ...
    async def follow_again(
        self, seq: int, *, next_at: float, task: str, attempts: int, error: str | None = None
    ) -> None: ...
    async def dead_pushes(self, *, item_id: str | None = None, limit: int = 100) -> list[Push]: ...
    async def retry_pushes(self, *, now: float, seq: int | None = None) -> int: ...
    async def push_counts(self) -> dict[str, int]: ...

    # -- run-time workspaces
    async def save_workspace(
        self, workspace_id: str, config: dict[str, Any], *, now: float
    ) -> None: ...
    async def remove_workspace(self, workspace_id: str, *, purge: bool) -> int: ...
    async def load_workspaces(self) -> list[dict[str, Any]]: ...

    # -- reads
    async def get(self, item_id: str) -> Item | None: ...
    async def find_message(self, workspace: str, caller: str, message_id: str) -> Item | None: ...
    async def last_delivered(self, workspaces: Iterable[str]) -> dict[str, float]: ...
    async def agent_context(self, context_id: str, caller: str, workspace: str) -> str | None: ...
    async def list_items(
        self,
        *,
        workspace: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: int = 0,
        newest_first: bool = False,
    ) -> list[Item]: ...
    async def caller_items(
        self,
        workspace: str,
        caller: str,
        *,
        context_id: str | None = None,
        states: Sequence[str] | None = None,
        updated_from: float | None = None,
        before: tuple[float, int] | None = None,
        limit: int | None = None,
    ) -> tuple[list[Item], int]: ...
    async def counts(self) -> dict[str, dict[str, int]]: ...
    async def next_due(self, workspace: str, *, now: float) -> float | None: ...


class SharedSlotStore(QueueStore, Protocol):
    """A store several replicas serve (PostgreSQL): an agent's slots are counted
    there over all of them. A claim takes its items' slots itself (`cap`: the
    agent's capacity less its other load); settling or handing back the item
    returns them. A direct send takes and returns its own."""

    # Told of another process's commit: the workspaces whose queue it changed,
    # those where it only freed slots, the items it finished.
    on_change: Callable[[list[str], list[str], list[str]], None]

    def submit_take_slot(
        self,
        workspace: str,
        *,
        token: str,
        cap: int,
        arrived: float,
        now: float,
        lease_until: float,
        if_cancelled: Callable[[bool], None] | None = None,
    ) -> asyncio.Future[bool]: ...
    def submit_free_slots(self, tokens: list[str]) -> asyncio.Future[None]: ...
    async def renew_slots(self, tokens: list[str], *, lease_until: float) -> set[str]: ...


class ReplicaStore(SharedSlotStore, Protocol):
    """What replicas share there besides slots (replicas.py)."""

    on_note: Callable[[str, list[str]], None]

    async def share_heartbeat(
        self, workspace: str, *, active: int, capacity: int | None, at: float
    ) -> int: ...
    async def load_heartbeats(self) -> list[tuple[str, int, int | None, int, float]]: ...
    async def take_duties(
        self, wanted: dict[str, bool], *, now: float, lease_seconds: float, started_at: float
    ) -> set[str]: ...
    async def drop_duties(self) -> None: ...
    async def replicas_seen(self) -> list[tuple[str, float, float, list[str]]]: ...
    async def slots_in_use(self) -> dict[str, int]: ...
    async def record_restart(self, workspace: str, *, at: float, duty: str) -> bool: ...
    async def clear_restarts(self, workspace: str) -> None: ...
    async def restarts_since(self, workspace: str, since: float) -> list[float]: ...
    async def tell(self, kind: str, *fields: str) -> None: ...
