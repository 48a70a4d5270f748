"""What callers and operators see of a queue item: its A2A Task in either
protocol version, and the operator's JSON view."""

from __future__ import annotations

import base64
import json
import math
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import a2a, a2a_params
from .errors import InvalidParams
from .push_configs import configs_of
from .store import PRIORITY_NAMES, Item, QueueStore
from .store.models import Push


def _rfc3339(seconds: float | None) -> str | None:
    return a2a.timestamp(seconds) if seconds else None


def stored_result(item: Item) -> Any:
    """The agent's JSON-RPC response, parsed (None before delivery)."""
    if item.result is None:
        return None
    try:
        return json.loads(item.result)
    except (ValueError, RecursionError):
        return {"unparsed": item.result.decode(errors="replace")}


def item_view(item: Item, *, with_body: bool = False, with_result: bool = True) -> dict[str, Any]:
    """The operator's view: GET /queue/{qid} and queue listings."""
    view: dict[str, Any] = {
        "id": item.id,
        "workspace": item.workspace,
        "state": item.state,
        "priority": PRIORITY_NAMES.get(item.priority, str(item.priority)),
        "method": item.method,
        "attempts": item.attempts,
        "busy_answers": item.busy_answers,
        "caller": item.caller or None,
        "message_id": item.message_id,
        "enqueued_at": _rfc3339(item.enqueued_at),
        "not_before": _rfc3339(item.not_before),
        "expires_at": _rfc3339(item.expires_at),
        "finished_at": _rfc3339(item.finished_at),
        "last_error": item.last_error,
    }
    if with_result:
        view["result"] = stored_result(item)
    if with_body:
        # The caller's push config (its token, credentials) is never shown.
        view["body"] = json.loads(a2a.without_push(item.body))
    return view


async def dead_push_views(
    store: QueueStore, *, item_id: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The newest dead letters of the push outbox (of one item, or all), as
    operators see them: GET /queue/pushes, `a2ad queue pushes`, /ui."""
    dead = await store.dead_pushes(item_id=item_id, limit=limit)
    items = {i: await store.get(i) for i in {p.item_id for p in dead}}
    return [_push_view(p, items[p.item_id]) for p in dead]


def _push_view(push: Push, item: Item | None) -> dict[str, Any]:
    """A dead letter as an operator sees it: never the config's token or credentials,
    and its webhook URL without query or fragment (they may hold a secret)."""
    url = None
    if item is not None:
        config = next((c for c in configs_of(item) if c.get("id") == push.config_id), None)
        if config is not None:
            parts = urlsplit(str(config.get("url", "")))
            url = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    return {
        "seq": push.seq,
        "item_id": push.item_id,
        "workspace": item.workspace if item is not None else None,
        "config_id": push.config_id,
        "url": url,
        "update": push.state,
        "status": push.status,
        "attempts": push.attempts,
        "last_error": push.last_error,
        "created_at": a2a.timestamp(push.created_at),
    }


def _metadata(item: Item, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"queue_id": item.id, "queue_state": item.state}
    if item.agent_task_id:
        meta["agent_task_id"] = item.agent_task_id
    if item.agent_context_id:
        meta["agent_context_id"] = item.agent_context_id
    meta.update(extra)
    return {"a2ad": meta}


def as_queue_task(item: Item, agent_task: dict[str, Any], protocol: a2a.Protocol) -> dict[str, Any]:
    """The agent's Task as the caller knows it: under the queue id, the agent's ids
    in metadata.a2ad."""
    converted = a2a.convert_task(agent_task, protocol)
    meta = dict(converted.get("metadata") or {})
    meta.update(_metadata(item))
    context_id = item.context_id or item.agent_context_id or ""

    def own_ids(message: Any) -> Any:
        if not isinstance(message, dict):
            return message
        ids = {"taskId": item.id, "contextId": context_id}
        return {**message, **{k: v for k, v in ids.items() if k in message}}

    if isinstance(converted.get("history"), list):
        converted["history"] = [own_ids(m) for m in converted["history"]]
    status = converted.get("status")
    if isinstance(status, dict) and "message" in status:
        converted["status"] = {**status, "message": own_ids(status["message"])}
    return {**converted, "id": item.id, "contextId": context_id, "metadata": meta}


def item_task(item: Item, protocol: a2a.Protocol) -> dict[str, Any]:
    """The Task a caller sees for a queue item, under the queue id."""
    context_id = item.context_id or item.agent_context_id or ""

    def own(state: str, reason: str | None = None, **extra: Any) -> dict[str, Any]:
        message = None
        if reason:
            message = a2a.text_message(reason, protocol, task_id=item.id, context_id=context_id)
        return a2a.task(
            item.id,
            context_id,
            state,
            protocol,
            at=item.updated_at,
            message=message,
            metadata=_metadata(item, **extra),
        )

    if item.state == "queued":
        return own("submitted")
    if item.state == "dispatching":
        return own("working")
    if item.state == "cancelled":
        return own("canceled", "cancelled before delivery")
    if item.state in ("failed", "expired"):
        return own("failed", f"{item.state}: {item.last_error or 'no reason recorded'}")
    answer = a2a.read_answer(stored_result(item))
    if answer.kind == "task":
        return as_queue_task(item, answer.value, protocol)
    if answer.kind == "message":
        out = a2a.task(
            item.id, context_id, "completed", protocol, at=item.updated_at, metadata=_metadata(item)
        )
        out["status"]["message"] = a2a.convert_message(answer.value, protocol)
        return out
    if answer.kind == "error":
        code, message = answer.value.get("code"), answer.value.get("message")
        return own("failed", f"the agent answered with error {code}: {message}", error=answer.value)
    return own("failed", "the agent's answer was not an A2A result")


# -- ListTasks ------------------------------------------------------------------

# The item states whose Task a2ad writes itself in each A2A state; a delivered
# item's Task is the agent's, in whatever state its stored answer gives.
_OWN_STATES = {
    "submitted": ("queued",),
    "working": ("dispatching",),
    "canceled": ("cancelled",),
    "failed": ("failed", "expired"),
}


def list_states(state: str) -> tuple[str, ...]:
    """The item states whose Task may be in A2A `state`."""
    return (*_OWN_STATES.get(state, ()), "delivered")


def page_token(item: Item) -> str:
    """An opaque nextPageToken: the last listed item's place in the order."""
    return base64.urlsafe_b64encode(f"{item.updated_at!r} {item.seq}".encode()).decode()


def read_page_token(token: str) -> tuple[float, int]:
    """A pageToken back to (updated_at, seq); InvalidParams if a2ad did not make it."""
    refused = InvalidParams(f"pageToken {token[:40]!r} is not one ListTasks gave")
    try:
        text_at, text_seq = base64.urlsafe_b64decode(token.encode()).decode().split(" ")
        updated_at, seq = float(text_at), int(text_seq)
    except (ValueError, UnicodeError):
        raise refused from None
    # What a2ad writes: a finite time and a row number a database integer holds.
    if not math.isfinite(updated_at) or not 0 <= seq < 2**63:
        raise refused
    return updated_at, seq


def listed_tasks(
    items: list[Item], query: a2a_params.ListQuery, protocol: a2a.Protocol
) -> list[tuple[Item, dict[str, Any]]]:
    """Each item with its Task as ListTasks shows it, those in the status asked for:
    artifacts only when asked, history cut to historyLength."""
    out = []
    for item in items:
        task = item_task(item, protocol)
        if query.state and a2a.canonical_state(task["status"]["state"]) != query.state:
            continue
        if not query.include_artifacts:
            task.pop("artifacts", None)
        out.append((item, a2a_params.limit_history(task, query.history_length)))
    return out


def list_result(
    page: list[tuple[Item, dict[str, Any]]], query: a2a_params.ListQuery, total: int, *, more: bool
) -> dict[str, Any]:
    """ListTasks' result: the page, the token for the next (empty on the last page,
    as the specification has it), the page size used and the count before paging."""
    return {
        "tasks": [task for _, task in page],
        "nextPageToken": page_token(page[-1][0]) if more and page else "",
        "pageSize": query.page_size,
        "totalSize": total,
    }
