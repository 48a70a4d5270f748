"""A2A shapes: read a JSON-RPC request, tell message methods from others, and
write Tasks in the A2A 1.0 or v0.3 form, whichever the request speaks."""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InvalidParams, InvalidRequest, ParseError, VersionNotSupported
from .ids import random_hex

Protocol = Literal["1.0", "0.3"]

SEND_METHODS = frozenset({"SendMessage", "message/send"})
STREAM_METHODS = frozenset({"SendStreamingMessage", "message/stream"})
MESSAGE_METHODS = SEND_METHODS | STREAM_METHODS
GET_TASK_METHODS = frozenset({"GetTask", "tasks/get"})
CANCEL_TASK_METHODS = frozenset({"CancelTask", "tasks/cancel"})
SUBSCRIBE_METHODS = frozenset({"SubscribeToTask", "tasks/resubscribe"})

# Every method name of each protocol version: an agent refuses a name of the other
# version than the request's A2A-Version names (the a2a-sdk's server does).
V1_METHODS = frozenset(
    {
        "SendMessage",
        "SendStreamingMessage",
        "GetTask",
        "ListTasks",
        "CancelTask",
        "SubscribeToTask",
        "CreateTaskPushNotificationConfig",
        "GetTaskPushNotificationConfig",
        "ListTaskPushNotificationConfigs",
        "DeleteTaskPushNotificationConfig",
        "GetExtendedAgentCard",
    }
)
V03_METHODS = frozenset(
    {
        "message/send",
        "message/stream",
        "tasks/get",
        "tasks/list",
        "tasks/cancel",
        "tasks/resubscribe",
        "tasks/pushNotificationConfig/set",
        "tasks/pushNotificationConfig/get",
        "tasks/pushNotificationConfig/list",
        "tasks/pushNotificationConfig/delete",
        "agent/getAuthenticatedExtendedCard",
    }
)

# Error codes of the A2A specification.
TASK_NOT_FOUND = -32001
TASK_NOT_CANCELABLE = -32002

# The headers a2ad passes to agents and stores with each queued item: W3C trace
# context too, so a trace follows a message through the queue.
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
FORWARDED_HEADERS = ("A2A-Version", "A2A-Extensions", "Content-Type", "Accept", *TRACE_HEADERS)
STORED_HEADERS = ("A2A-Version", "A2A-Extensions", "Accept", *TRACE_HEADERS)
# List-valued headers that may come in several lines; they are passed on as one.
LIST_HEADERS = frozenset({"tracestate", "baggage"})

# state → (1.0 enum name, v0.3 name)
_STATES = {
    "submitted": ("TASK_STATE_SUBMITTED", "submitted"),
    "working": ("TASK_STATE_WORKING", "working"),
    "input-required": ("TASK_STATE_INPUT_REQUIRED", "input-required"),
    "completed": ("TASK_STATE_COMPLETED", "completed"),
    "canceled": ("TASK_STATE_CANCELED", "canceled"),
    "failed": ("TASK_STATE_FAILED", "failed"),
    "rejected": ("TASK_STATE_REJECTED", "rejected"),
    "auth-required": ("TASK_STATE_AUTH_REQUIRED", "auth-required"),
    "unknown": ("TASK_STATE_UNSPECIFIED", "unknown"),
}
_STATE_FROM_ANY = {name: key for key, names in _STATES.items() for name in names}
FINAL_TASK_STATES = frozenset({"completed", "canceled", "failed", "rejected"})


@dataclass(frozen=True, slots=True)
class RpcRequest:
    """A JSON-RPC 2.0 request as a2ad needs it."""

    id: str | int | None
    method: str
    params: dict[str, Any]

    @property
    def is_message(self) -> bool:
        return self.method in MESSAGE_METHODS

    @property
    def is_stream(self) -> bool:
        return self.method in STREAM_METHODS

    @property
    def is_blocking(self) -> bool:
        """Does the caller of a non-streaming send wait for the task to end? In 1.0
        unless `configuration.returnImmediately`; in v0.3 unless `blocking: false`
        (absent counts as blocking, as the a2a-sdk agent reads it). Each version's
        field only: its agent ignores the other's (the method name says which)."""
        configuration = self.params.get("configuration")
        if self.is_stream or not isinstance(configuration, dict):
            return not self.is_stream
        if "/" in self.method:  # message/send
            return configuration.get("blocking") is not False
        return configuration.get("returnImmediately") is not True

    @property
    def message(self) -> dict[str, Any]:
        message = self.params.get("message")
        return message if isinstance(message, dict) else {}

    @property
    def message_id(self) -> str | None:
        value = self.message.get("messageId")
        return value if isinstance(value, str) and value else None

    @property
    def context_id(self) -> str | None:
        value = self.message.get("contextId")
        return value if isinstance(value, str) and value else None

    @property
    def task_id(self) -> str | None:
        """The task a GetTask, CancelTask or SubscribeToTask names."""
        value = self.params.get("id")
        return value if isinstance(value, str) else None


def readable_id(body: Any) -> str | int | None:
    """The request id to echo in an error, when one can be read."""
    if isinstance(body, dict):
        value = body.get("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return value
    return None


def parse_json(raw: bytes) -> Any:
    """The body as JSON; raise ParseError."""
    try:
        # UTF-8 only (RFC 8259; a leading BOM is let pass, as it allows): json.loads
        # would also take UTF-16 and UTF-32, in which the check below sees nothing.
        value = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError):  # ValueError also covers UnicodeDecodeError
        raise ParseError("the body is not valid JSON in UTF-8") from None
    if b"\\ud" in raw or b"\\uD" in raw:
        # JSON lets "\ud800" escape half a surrogate pair; such a string is not
        # Unicode, and SQLite and every UTF-8 writer refuse it later.
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ParseError("the body has a lone surrogate escape (such as \\ud800)") from None
        except RecursionError:
            raise ParseError("the body is not valid JSON (nested too deeply)") from None
    return value


def parse_request(body: Any, protocol: Protocol) -> RpcRequest:
    """Check a parsed body is a JSON-RPC 2.0 request in the protocol version the
    caller speaks; raise InvalidRequest, InvalidParams or VersionNotSupported."""
    if not isinstance(body, dict):
        raise InvalidRequest("a JSON-RPC request must be a JSON object")
    if body.get("jsonrpc") != "2.0":
        raise InvalidRequest('the request needs "jsonrpc": "2.0"')
    method = body.get("method")
    if not isinstance(method, str) or not method:
        raise InvalidRequest('the request needs a "method" string')
    rpc_id = body.get("id")
    if rpc_id is not None and (not isinstance(rpc_id, (str, int)) or isinstance(rpc_id, bool)):
        raise InvalidRequest('"id" must be a string, a number or null')
    refuse_other_version(method, protocol)
    params = body.get("params", {})
    if isinstance(params, list) and "/" not in method:
        # By-position params are valid JSON-RPC that A2A 1.0 cannot take: invalid
        # params, as its agents answer (v0.3 agents answer invalid request).
        raise InvalidParams(f"{method} takes its params as a JSON object, not an array")
    if not isinstance(params, dict):
        raise InvalidRequest('"params" must be a JSON object')
    if method in MESSAGE_METHODS and not isinstance(params.get("message"), dict):
        raise InvalidParams(f'{method} needs "params.message" as an object')
    return RpcRequest(rpc_id, method, params)


def refuse_other_version(method: str, protocol: Protocol) -> None:
    """A method of the other protocol version is refused before its params are read,
    whether or not a slot is free, as the agent refuses it (so the answer never
    depends on load)."""
    if protocol == "0.3" and method in V1_METHODS:
        raise VersionNotSupported(
            f"{method} is an A2A 1.0 method and the request speaks v0.3 (no A2A-Version "
            f"header, or 0.x): send A2A-Version: 1.0, or use the v0.3 method name"
        )
    if protocol == "1.0" and method in V03_METHODS:
        raise VersionNotSupported(
            f"{method} is an A2A v0.3 method and the request says A2A-Version 1.x: "
            f"use the 1.0 method name, or leave A2A-Version out to speak v0.3"
        )


def protocol_of(headers: Mapping[str, str]) -> Protocol:
    """1.0 when A2A-Version is 1.x, else v0.3 (absent or 0.x)."""
    version = headers.get("A2A-Version", "").strip()
    return "1.0" if version.startswith("1") else "0.3"


@functools.lru_cache(maxsize=64)
def _whole_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def timestamp(seconds: float) -> str:
    """RFC 3339 UTC with milliseconds (the date part cached: every Task a2ad
    writes carries one, and most fall in the same few seconds)."""
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1_000_000)  # as datetime rounds, then truncates
    if micros >= 1_000_000:
        whole, micros = whole + 1, 0
    return f"{_whole_second(whole)}.{micros // 1000:03d}Z"


def state_name(state: str, protocol: Protocol) -> str:
    names = _STATES[_STATE_FROM_ANY.get(state, "unknown")]
    return names[0] if protocol == "1.0" else names[1]


def canonical_state(name: str) -> str:
    """Either protocol's state name → the v0.3-style key used inside a2ad."""
    return _STATE_FROM_ANY.get(name, "unknown")


CONTEXT_PREFIX = "ctx-"  # marks the context ids a2ad makes, so only those are looked up


_CONTEXT_MARK = f'"{CONTEXT_PREFIX}'.encode()


def may_name_a2ad_ids(raw: bytes) -> bool:
    """Could this body name a queue id or a context id a2ad made? (A byte check:
    most bodies name neither, and then nothing needs parsing or looking up.)"""
    return b'"q-' in raw or _CONTEXT_MARK in raw


def new_context_id() -> str:
    return CONTEXT_PREFIX + random_hex(128)


def text_message(
    text: str,
    protocol: Protocol,
    *,
    role: str = "agent",
    task_id: str | None = None,
    context_id: str | None = None,
) -> dict[str, Any]:
    """A Message with one text part."""
    message: dict[str, Any] = {"messageId": str(uuid.uuid4())}
    if protocol == "1.0":
        message |= {"role": f"ROLE_{role.upper()}", "parts": [{"text": text}]}
    else:
        message |= {"kind": "message", "role": role, "parts": [{"kind": "text", "text": text}]}
    if task_id:
        message["taskId"] = task_id
    if context_id:
        message["contextId"] = context_id
    return message


def task(
    task_id: str,
    context_id: str,
    state: str,
    protocol: Protocol,
    *,
    at: float,
    message: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Task that a2ad writes itself."""
    status: dict[str, Any] = {"state": state_name(state, protocol), "timestamp": timestamp(at)}
    if message is not None:
        status["message"] = message
    out: dict[str, Any] = {"id": task_id, "contextId": context_id, "status": status}
    if protocol == "0.3":
        out = {"kind": "task", **out}
    if metadata:
        out["metadata"] = metadata
    return out


def send_result(task_obj: dict[str, Any], protocol: Protocol) -> dict[str, Any]:
    """A send's result: `{"task": …}` in 1.0, the Task itself in v0.3."""
    return {"task": task_obj} if protocol == "1.0" else task_obj


def rpc_result(rpc_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": result}


def rpc_error(rpc_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": rpc_id, "error": error}


# -- reading and converting agents' answers ----------------------------------


@dataclass(frozen=True, slots=True)
class AgentAnswer:
    """What an agent's JSON-RPC response to a send holds."""

    kind: Literal["task", "message", "error", "other"]
    value: dict[str, Any]


def read_answer(response: Any) -> AgentAnswer:
    """Classify a JSON-RPC response to a send (either protocol)."""
    if not isinstance(response, dict):
        return AgentAnswer("other", {})
    error = response.get("error")
    if isinstance(error, dict):
        return AgentAnswer("error", error)
    result = response.get("result")
    if not isinstance(result, dict):
        return AgentAnswer("other", {})
    for key in ("task", "message"):  # 1.0 wraps the answer
        if isinstance(result.get(key), dict):
            return AgentAnswer(key, result[key])
    if result.get("kind") in ("task", "message"):
        return AgentAnswer(result["kind"], result)
    if "status" in result and "id" in result:
        return AgentAnswer("task", result)
    if "parts" in result and "role" in result:
        return AgentAnswer("message", result)
    return AgentAnswer("other", result)


def _convert_part(part: Any, protocol: Protocol) -> Any:
    if not isinstance(part, dict):
        return part
    if protocol == "1.0":
        out = {k: v for k, v in part.items() if k != "kind"}
        return out
    if "kind" in part:
        return part
    for kind in ("text", "data", "file"):
        if kind in part:
            return {"kind": kind, **part}
    if "url" in part or "raw" in part:
        return {"kind": "file", **part}
    return part


def convert_message(message: dict[str, Any], protocol: Protocol) -> dict[str, Any]:
    """Best-effort conversion of a Message between the two protocol versions."""
    out = dict(message)
    role = str(out.get("role", "agent")).lower().removeprefix("role_")
    if protocol == "1.0":
        out.pop("kind", None)
        out["role"] = f"ROLE_{role.upper()}"
    else:
        out = {"kind": "message", **out}
        out["role"] = role
    if isinstance(out.get("parts"), list):
        out["parts"] = [_convert_part(p, protocol) for p in out["parts"]]
    return out


def convert_status(status: Any, protocol: Protocol) -> dict[str, Any]:
    """A TaskStatus in the given protocol's shape: its state name and its message."""
    out = dict(status) if isinstance(status, dict) else {}
    out["state"] = state_name(str(out.get("state", "unknown")), protocol)
    if isinstance(out.get("message"), dict):
        out["message"] = convert_message(out["message"], protocol)
    return out


def convert_artifact(artifact: Any, protocol: Protocol) -> Any:
    if not isinstance(artifact, dict) or not isinstance(artifact.get("parts"), list):
        return artifact
    return {**artifact, "parts": [_convert_part(p, protocol) for p in artifact["parts"]]}


def convert_task(agent_task: dict[str, Any], protocol: Protocol) -> dict[str, Any]:
    """Best-effort conversion of an agent's Task to the caller's protocol version."""
    out = {k: v for k, v in agent_task.items() if k != "kind"}
    if protocol == "0.3":
        out = {"kind": "task", **out}
    out["status"] = convert_status(out.get("status"), protocol)
    if isinstance(out.get("history"), list):
        out["history"] = [
            convert_message(m, protocol) if isinstance(m, dict) else m for m in out["history"]
        ]
    if isinstance(out.get("artifacts"), list):
        out["artifacts"] = [convert_artifact(a, protocol) for a in out["artifacts"]]
    return out


# -- stream events -------------------------------------------------------------
# Inside a2ad an event is held in the v0.3 shape (a dict with "kind"); it is
# written in the caller's shape on the way out.

INTERRUPTED_TASK_STATES = frozenset({"input-required", "auth-required"})


def is_terminal(task: dict[str, Any]) -> bool:
    """Is a Task (either protocol's shape) completed, canceled, failed or rejected?"""
    status = task.get("status")
    state = status.get("state", "") if isinstance(status, dict) else ""
    return canonical_state(str(state)) in FINAL_TASK_STATES


def is_final_state(state: str) -> bool:
    key = canonical_state(state)
    return key in FINAL_TASK_STATES or key in INTERRUPTED_TASK_STATES


def read_event(result: Any) -> dict[str, Any] | None:
    """An agent's stream result (either protocol) → an event in the v0.3 shape."""
    if not isinstance(result, dict):
        return None
    for key, kind in (
        ("task", "task"),
        ("message", "message"),
        ("statusUpdate", "status-update"),
        ("artifactUpdate", "artifact-update"),
    ):
        if isinstance(result.get(key), dict):
            return to_v03({**result[key], "kind": kind})
    if result.get("kind") in ("task", "message", "status-update", "artifact-update"):
        return to_v03(result)
    return None


def to_v03(event: dict[str, Any]) -> dict[str, Any]:
    kind = event["kind"]
    if kind == "task":
        return convert_task(event, "0.3")
    if kind == "message":
        return convert_message(event, "0.3")
    out = dict(event)
    if kind == "status-update":
        out["status"] = convert_status(out.get("status"), "0.3")
        out["final"] = bool(out.get("final")) or is_final_state(out["status"]["state"])
    elif "artifact" in out:
        out["artifact"] = convert_artifact(out["artifact"], "0.3")
    return out


def write_event(event: dict[str, Any], protocol: Protocol) -> dict[str, Any]:
    """A v0.3-shaped event as a stream result in the caller's protocol."""
    if protocol == "0.3":
        return event
    kind = event["kind"]
    if kind == "task":
        return {"task": convert_task(event, "1.0")}
    if kind == "message":
        return {"message": convert_message(event, "1.0")}
    body = {k: v for k, v in event.items() if k not in ("kind", "final")}
    if kind == "status-update":
        body["status"] = convert_status(body.get("status"), "1.0")
        return {"statusUpdate": body}
    if "artifact" in body:
        body["artifact"] = convert_artifact(body["artifact"], "1.0")
    return {"artifactUpdate": body}


def status_event(
    task_id: str, context_id: str, state: str, *, at: float, message: dict[str, Any] | None = None
) -> dict[str, Any]:
    status: dict[str, Any] = {"state": state_name(state, "0.3"), "timestamp": timestamp(at)}
    if message is not None:
        status["message"] = convert_message(message, "0.3")
    return {
        "kind": "status-update",
        "taskId": task_id,
        "contextId": context_id,
        "status": status,
        "final": is_final_state(state),
    }


def relabel(
    event: dict[str, Any], task_id: str, context_id: str, *, at: float
) -> list[dict[str, Any]]:
    """An agent's event as events of a2ad's one Task (the queue id): its Task event
    becomes a status-update plus artifact-updates, its Message a COMPLETED status."""
    kind = event["kind"]
    if kind == "task":
        status = dict(event.get("status") or {"state": "working"})
        if canonical_state(str(status.get("state", ""))) == "submitted":
            # Delivery has started; the caller's Task does not go back to submitted.
            status["state"] = "working"
        out = [
            {
                "kind": "status-update",
                "taskId": task_id,
                "contextId": context_id,
                "status": status,
                "final": is_final_state(str(status.get("state", ""))),
            }
        ]
        for artifact in event.get("artifacts") or []:
            out.insert(
                len(out) - 1,
                {
                    "kind": "artifact-update",
                    "taskId": task_id,
                    "contextId": context_id,
                    "artifact": artifact,
                },
            )
        return out
    if kind == "message":
        return [status_event(task_id, context_id, "completed", at=at, message=event)]
    return [{**event, "taskId": task_id, "contextId": context_id}]


class TaskAssembler:
    """Builds the final Task from an agent's stream events (the stored result)."""

    def __init__(self, task_id: str, context_id: str) -> None:
        self.task: dict[str, Any] = {
            "kind": "task",
            "id": task_id,
            "contextId": context_id,
            "status": {"state": "working"},
        }

    def add(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "task":
            self.task = dict(event)
        elif kind == "message":
            self.task["status"] = {"state": "completed", "message": event}
        elif kind == "status-update":
            self.task["status"] = event.get("status") or self.task["status"]
            for key, field in (("taskId", "id"), ("contextId", "contextId")):
                if isinstance(event.get(key), str):
                    self.task[field] = event[key]
        elif kind == "artifact-update" and isinstance(event.get("artifact"), dict):
            self._artifact(event["artifact"], bool(event.get("append")))

    def _artifact(self, artifact: dict[str, Any], append: bool) -> None:
        artifacts: list[dict[str, Any]] = list(self.task.get("artifacts") or [])
        for i, known in enumerate(artifacts):
            if known.get("artifactId") == artifact.get("artifactId"):
                if append:
                    parts = list(known.get("parts") or []) + list(artifact.get("parts") or [])
                    artifacts[i] = {**known, "parts": parts}
                else:
                    artifacts[i] = artifact
                break
        else:
            artifacts.append(artifact)
        self.task["artifacts"] = artifacts


PUSH_CONFIG_KEYS = ("taskPushNotificationConfig", "pushNotificationConfig")


def without_push(body: bytes) -> bytes:
    """A queued send as the agent gets it and operators see it: without the caller's
    push config (its token and credentials), which is a2ad's to serve (the agent
    would push under its own task id, which the caller does not know, or refuse
    the send when it has no push). Unchanged when it carries none."""
    if b"NotificationConfig" not in body:  # neither key: nothing to parse
        return body
    parsed = json.loads(body)
    params = parsed.get("params") if isinstance(parsed, dict) else None
    configuration = params.get("configuration") if isinstance(params, dict) else None
    if not isinstance(configuration, dict) or not any(
        key in configuration for key in PUSH_CONFIG_KEYS
    ):
        return body
    for key in PUSH_CONFIG_KEYS:
        configuration.pop(key, None)
    return json.dumps(parsed).encode()
