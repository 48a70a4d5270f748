"""The store's rows as a2ad sees them, whichever database holds them."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ..ids import QUEUE_ID_PREFIX, random_hex

LIVE_STATES = ("queued", "dispatching")
FINAL_STATES = ("delivered", "failed", "expired", "cancelled")
STATES = LIVE_STATES + FINAL_STATES
State = Literal["queued", "dispatching", "delivered", "failed", "expired", "cancelled"]

PRIORITIES = {"critical": 100, "task": 50, "info": 10}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}


def new_queue_id() -> str:
    """`q-` + 32 hex digits: 13 of a microsecond timestamp, then 76 random bits. Ids
    that grow with time land at the end of the id index, so inserts and look-ups
    stay on hot pages however many items the store holds."""
    return f"{QUEUE_ID_PREFIX}{time.time_ns() // 1000:013x}{random_hex(76)}"


def answers_again(
    state: str, finished_at: float | None, *, now: float, replay_window: float
) -> bool:
    """The replay rule, one for the proxy and the store: a send whose messageId
    matches a live item, or one delivered within the replay window, is answered
    by that item and creates nothing; a failed, expired or cancelled one does not."""
    if state in LIVE_STATES:
        return True
    return state == "delivered" and finished_at is not None and now - finished_at <= replay_window


@dataclass(frozen=True, slots=True)
class NewItem:
    """What the proxy hands the store to enqueue."""

    workspace: str
    method: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    caller: str = ""
    message_id: str | None = None
    context_id: str | None = None
    request_id: str | None = None
    priority: int = 50
    ttl_seconds: float | None = None
    expires_at: float | None = None
    busy_answers: int = 0  # the agent already said busy on the direct path
    push: str | None = None  # the task's push-notification configs, as JSON (push.py)
    id: str = field(default_factory=new_queue_id)

    def row(self, now: float) -> dict[str, Any]:
        """The values either store inserts for it (headers as JSON), by column name."""
        return {
            "id": self.id,
            "workspace": self.workspace,
            "caller": self.caller,
            "method": self.method,
            "body": self.body,
            "headers": json.dumps(self.headers),
            "message_id": self.message_id,
            "context_id": self.context_id,
            "request_id": self.request_id,
            "priority": self.priority,
            "ttl_seconds": self.ttl_seconds,
            "expires_at": self.expires_at,
            "busy_answers": self.busy_answers,
            "push": self.push,
            "now": now,
        }


@dataclass(frozen=True, slots=True)
class Item:
    """One stored row."""

    seq: int
    id: str
    workspace: str
    caller: str
    method: str
    body: bytes
    headers: dict[str, str]
    message_id: str | None
    context_id: str | None
    request_id: str | None
    priority: int
    state: State
    attempts: int
    busy_answers: int
    ttl_seconds: float | None
    not_before: float
    expires_at: float | None
    lease_until: float | None
    claim_token: str | None
    result: bytes | None
    last_error: str | None
    agent_task_id: str | None
    agent_context_id: str | None
    enqueued_at: float
    updated_at: float
    finished_at: float | None
    push: str | None = None  # push-notification configs, JSON: never shown in views

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Item:
        """An item from a row selected as ITEM_COLUMNS. By position, not by name:
        a third of the time, and claims build thousands a second."""
        values = list(row)
        values[_HEADERS] = json.loads(values[_HEADERS])
        values[_BODY] = bytes(values[_BODY])
        if values[_RESULT] is not None:
            values[_RESULT] = bytes(values[_RESULT])
        return cls(*values)

    @classmethod
    def stored(cls, new: NewItem, seq: int, now: float) -> Item:
        """The row an enqueue of `new` wrote, built here rather than read back."""
        return cls(
            seq=seq,
            id=new.id,
            workspace=new.workspace,
            caller=new.caller,
            method=new.method,
            body=new.body,
            headers=dict(new.headers),
            message_id=new.message_id,
            context_id=new.context_id,
            request_id=new.request_id,
            priority=new.priority,
            state="queued",
            attempts=0,
            busy_answers=new.busy_answers,
            ttl_seconds=new.ttl_seconds,
            not_before=0.0,
            expires_at=new.expires_at,
            lease_until=None,
            claim_token=None,
            result=None,
            last_error=None,
            agent_task_id=None,
            agent_context_id=None,
            enqueued_at=now,
            updated_at=now,
            finished_at=None,
            push=new.push,
        )

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


ITEM_FIELDS = tuple(f.name for f in fields(Item))
ITEM_COLUMNS = ", ".join(ITEM_FIELDS)  # what every query that builds an Item selects
_HEADERS, _BODY, _RESULT = (ITEM_FIELDS.index(name) for name in ("headers", "body", "result"))


@dataclass(frozen=True, slots=True)
class Enqueued:
    item: Item
    created: bool  # False: an existing item answered for this messageId
    depth: int = 0  # the workspace's queued items as it committed
    position: int = 0  # its place in line then (those of its priority or higher)


@dataclass(frozen=True, slots=True)
class Released:
    """An item a sweep moved out of `dispatching` or `queued`."""

    id: str
    workspace: str
    state: State


@dataclass(frozen=True, slots=True)
class Push:
    """One row of the push outbox: an update of an item's Task to POST to one of
    its push configs (or, with config_id "", the agent's task a2ad follows)."""

    seq: int
    item_id: str
    config_id: str
    state: str  # the item's state it tells of; "update": the agent's later Task in payload
    payload: str | None
    status: str  # pending | sent | dead
    attempts: int
    next_at: float
    last_error: str | None
    created_at: float
    token: str | None = None  # a followed task's: the agent's pushes to a2ad carry it


PUSH_COLUMNS = ", ".join(f.name for f in fields(Push))
