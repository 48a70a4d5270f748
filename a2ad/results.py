"""What callers and operators see of a queue item: its A2A Task in either
protocol version, and the operator's JSON view."""

from __future__ import annotations

import json
from typing import Any

from . import a2a
from .store import PRIORITY_NAMES, Item


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
        view["body"] = json.loads(item.body)
    return view


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
