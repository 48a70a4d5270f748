"""The agent's own ids: a caller names a queued task by its queue id and a
context by the id a2ad made; the agent knows them by its own."""

from __future__ import annotations

import json
from typing import Any

from . import a2a
from .ids import is_queue_id
from .store import QueueStore


def agent_ids_in(result: bytes, parsed: Any = None) -> tuple[str | None, str | None]:
    """The agent's own task and context ids in its answer (`parsed`, when the
    body was parsed already), when it made a Task."""
    try:
        answer = a2a.read_answer(json.loads(result) if parsed is None else parsed)
    except (ValueError, RecursionError):
        return None, None
    if answer.kind != "task":
        return None, None
    task_id, context_id = answer.value.get("id"), answer.value.get("contextId")
    return (
        task_id if isinstance(task_id, str) else None,
        context_id if isinstance(context_id, str) else None,
    )


class AgentIds:
    """Rewrites what goes on the wire to the agent; stored bodies are never rewritten."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store

    async def rewrite(self, body: Any, caller: str, workspace: str) -> dict[str, Any] | None:
        """The request with queue ids, and the context ids a2ad made, replaced by the
        agent's own ids; None when nothing names them. Only the caller's own items
        of this workspace: another agent's ids never reach this one."""
        params = body.get("params") if isinstance(body, dict) else None
        if not isinstance(params, dict):
            return None
        new_params = dict(params)
        message = params.get("message")
        new_message = dict(message) if isinstance(message, dict) else None
        changed = False
        for holder in (new_params, new_message):
            if holder is None:
                continue
            for key in ("id", "taskId", "contextId"):
                value = holder.get(key)
                if not isinstance(value, str):
                    continue
                if key == "contextId" and value.startswith(a2a.CONTEXT_PREFIX):
                    mapped = await self.store.agent_context(value, caller, workspace)
                elif key != "contextId" and is_queue_id(value):
                    item = await self.store.get(value)
                    mapped = None
                    if item is not None and (item.caller, item.workspace) == (caller, workspace):
                        mapped = item.agent_task_id
                else:
                    continue
                if mapped:
                    holder[key] = mapped
                    changed = True
        if not changed:
            return None
        if new_message is not None:
            new_params["message"] = new_message
        return {**body, "params": new_params}

    async def body_for_agent(
        self, raw: bytes, caller: str, workspace: str, body: Any = None
    ) -> bytes:
        """`raw`, unless it names ids the agent knows by other names."""
        if not a2a.may_name_a2ad_ids(raw):
            return raw  # nothing to look up or parse
        parsed = json.loads(raw) if body is None else body
        rewritten = await self.rewrite(parsed, caller, workspace)
        return raw if rewritten is None else json.dumps(rewritten).encode()
