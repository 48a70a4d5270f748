"""What a request's params must say: a message every A2A agent must refuse, a
historyLength, a ListTasks query. Checked by a2ad on every path, so the answer
never depends on load."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import a2a
from .a2a import Protocol, RpcRequest
from .errors import InvalidParams

# A message's roles in each version: v0.3 names them; 1.0 is proto3 JSON, which
# takes the enum's name or its number (0, ROLE_UNSPECIFIED, is no role).
_ROLES: dict[Protocol, frozenset[str | int]] = {
    "1.0": frozenset({"ROLE_USER", "ROLE_AGENT", 1, 2}),
    "0.3": frozenset({"user", "agent"}),
}
_ROLE_NAMES = {"1.0": "ROLE_USER or ROLE_AGENT (A2A 1.0)", "0.3": '"user" or "agent" (A2A v0.3)'}
_METHOD_PROTOCOL: dict[str, Protocol] = {
    "SendMessage": "1.0",
    "SendStreamingMessage": "1.0",
    "message/send": "0.3",
    "message/stream": "0.3",
}


def check_message(rpc: RpcRequest, protocol: Protocol) -> None:
    """Refuse (InvalidParams) a message every A2A agent refuses: no messageId, no
    role, no parts. Called before a send is forwarded or stored, so the answer does
    not depend on whether a slot was free. No more than the a2a-sdk agent refuses:
    a blank messageId (" ") and a Part object it cannot read pass, for the agent
    to judge.

    The role is read in the version the request speaks (`protocol`, from its
    header) and in the one its method name belongs to: an agent parses by method
    and refuses a mismatch with the header by itself, so a2ad does not answer that
    with a role error of its own."""
    message = rpc.message
    message_id = message.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise InvalidParams("params.message.messageId is required: a non-empty string")
    for key in ("messageId", "contextId", "taskId"):
        value = message.get(key)
        if isinstance(value, str) and "\x00" in value:
            # Neither store could keep it the same (PostgreSQL text has no NUL), and
            # an id that changes on its way is no id; on both paths, so the answer
            # does not depend on a free slot.
            raise InvalidParams(f"params.message.{key} must not contain NUL (U+0000)")
    role = message.get("role")
    versions = {protocol, _METHOD_PROTOCOL.get(rpc.method, protocol)}
    known = isinstance(role, (str, int)) and not isinstance(role, bool)
    if not known or not any(role in _ROLES[version] for version in versions):
        names = " or ".join(_ROLE_NAMES[version] for version in sorted(versions))
        raise InvalidParams(f"params.message.role is required: {names}")
    parts = message.get("parts")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        raise InvalidParams("params.message.parts must be a non-empty list of Part objects")
    configuration = rpc.params.get("configuration")
    if isinstance(configuration, dict):
        history_length(configuration)  # the agent refuses a bad one, so a2ad does on both paths


_INTEGER_TEXT = re.compile(r"-?[0-9]{1,10}")


def history_length(params: Mapping[str, Any]) -> int | None:
    """GetTask's `historyLength`: None when absent or null; raise InvalidParams unless
    it is an integer >= 0. A number without a fraction (2.0) or an integer in a
    string ("2") counts, as the a2a-sdk agent reads them (proto3 JSON, pydantic)."""
    value = params.get("historyLength")
    if value is None:
        return None
    integral = (
        (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, float) and value.is_integer())
        or (isinstance(value, str) and _INTEGER_TEXT.fullmatch(value) is not None)
    )
    number = int(value) if integral else None
    if number is None or number < 0:
        shown = json.dumps(value)[:40]
        raise InvalidParams(f"historyLength must be an integer >= 0 (got {shown})")
    return number


def limit_history(task: dict[str, Any], length: int | None) -> dict[str, Any]:
    """The Task with only its last `length` history entries: none for 0 (the field
    left out, as the a2a-sdk writes it), all when `length` is None."""
    history = task.get("history")
    if length is None or not isinstance(history, list):
        return task
    if length == 0:
        return {k: v for k, v in task.items() if k != "history"}
    return {**task, "history": history[-length:]}


LIST_TASKS_METHODS = frozenset({"ListTasks", "tasks/list"})
# The specification's ListTasks page size: 50 unless asked, from 1 to 100.
LIST_PAGE_SIZE, LIST_PAGE_SIZE_MAX = 50, 100
# TaskState's numbers in the 1.0 protobuf, which proto3 JSON also accepts.
_STATE_NUMBERS = {1: "submitted", 2: "working", 3: "completed", 4: "failed", 5: "canceled"}
_STATE_NUMBERS |= {6: "input-required", 7: "rejected", 8: "auth-required"}


@dataclass(frozen=True, slots=True)
class ListQuery:
    """ListTasks' params, checked."""

    context_id: str | None
    state: str | None  # a2ad's state key ("submitted", …), None for any
    page_size: int
    page_token: str | None
    history_length: int | None
    updated_from: float | None  # statusTimestampAfter, in epoch seconds
    include_artifacts: bool


def list_query(params: Mapping[str, Any]) -> ListQuery:
    """ListTasks' params as the specification defines them; raise InvalidParams
    naming the first one that is not."""

    def text(key: str) -> str | None:
        value = params.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise InvalidParams(f"{key} must be a string (got {json.dumps(value)[:40]})")
        return value

    size = params.get("pageSize")
    page_size = LIST_PAGE_SIZE
    if size is not None:
        integral = (isinstance(size, int) and not isinstance(size, bool)) or (
            isinstance(size, float) and size.is_integer()
        )
        if not integral or not 1 <= int(size) <= LIST_PAGE_SIZE_MAX:
            raise InvalidParams(
                f"pageSize must be an integer from 1 to {LIST_PAGE_SIZE_MAX}"
                f" (got {json.dumps(size)[:40]})"
            )
        page_size = int(size)
    include = params.get("includeArtifacts")
    if include is not None and not isinstance(include, bool):
        shown = json.dumps(include)[:40]
        raise InvalidParams(f"includeArtifacts must be true or false (got {shown})")
    return ListQuery(
        context_id=text("contextId"),
        state=_list_state(params.get("status")),
        page_size=page_size,
        page_token=text("pageToken"),
        history_length=history_length(params),
        updated_from=_list_time(text("statusTimestampAfter")),
        include_artifacts=include is True,
    )


def _list_state(value: Any) -> str | None:
    """A status filter: a TaskState name (either protocol's) or number; unspecified
    (0, TASK_STATE_UNSPECIFIED or absent) filters nothing."""
    if value is None or value in (0, "", "TASK_STATE_UNSPECIFIED"):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value in _STATE_NUMBERS:
        return _STATE_NUMBERS[value]
    if isinstance(value, str) and a2a.canonical_state(value) != "unknown":
        return a2a.canonical_state(value)
    raise InvalidParams(f"status must be a TaskState (got {json.dumps(value)[:40]})")


def _list_time(value: str | None) -> float | None:
    """statusTimestampAfter: an RFC 3339 time with its offset, as epoch seconds."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise InvalidParams(f"statusTimestampAfter must be an RFC 3339 time (got {value[:40]!r})")
    return when.timestamp()
