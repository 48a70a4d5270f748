"""A caller cannot tell a2ad from the agent (issue 15): the same raw requests are sent
to a real a2a-sdk 1.3 agent directly and through the real `a2ad serve`, and the
answers compared: the HTTP status, the JSON-RPC error code, or for a result its
kind (Message or Task, wrapped or bare) and the class of the task's state. Ids,
timestamps, messageIds and `metadata.a2ad` are not compared.

The table holds malformed, edge-case and valid requests, each in both protocol
versions (v0.3 method names without `A2A-Version`, 1.0 names with `A2A-Version:
1.0`; one SDK agent with v0.3 compatibility serves both). It runs through two a2ad
processes in front of the same agent: one with free slots (a2ad forwards), one whose
only slot a heartbeat of external load keeps taken (a2ad would queue). What SPEC says
must not depend on load (parse errors, invalid requests, invalid params, methods on
tasks a2ad does not hold) is compared on both; a valid send with no free slot differs
by design and is checked against SPEC instead.

Requests go out with raw HTTP (httpx), not the SDK client, so malformed bodies can be
sent."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import Launcher, Process

AGENT_SCRIPT = Path(__file__).with_name("sdk_agent.py")
AGENT_PAUSE = 0.05  # seconds between the agent's events: a blocking send ends in ~0.2 s
FREE = "free"  # the workspace of the a2ad with free slots
BUSY = "busy"  # the workspace of the a2ad whose only slot is taken
HEARTBEAT_TOKEN = "transparency-heartbeat-token"
BLOCKING_WAIT = 1.0  # the busy a2ad holds a blocking send this long, then answers 202
TIMEOUT = httpx.Timeout(20.0)

PROTOCOLS = ["0.3", "1.0"]

Body = bytes
Builder = Callable[["Proto"], Body]


# -- the two protocol versions ------------------------------------------------------


@dataclass(frozen=True)
class Proto:
    """What differs between a v0.3 and a 1.0 caller."""

    version: str

    @property
    def v1(self) -> bool:
        return self.version == "1.0"

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.v1:
            headers["A2A-Version"] = "1.0"
        return headers

    @property
    def send(self) -> str:
        return "SendMessage" if self.v1 else "message/send"

    @property
    def stream(self) -> str:
        return "SendStreamingMessage" if self.v1 else "message/stream"

    @property
    def other(self) -> Proto:
        """The other version's names and shapes (sent with this version's headers)."""
        return Proto("0.3" if self.v1 else "1.0")

    @property
    def get(self) -> str:
        return "GetTask" if self.v1 else "tasks/get"

    @property
    def cancel(self) -> str:
        return "CancelTask" if self.v1 else "tasks/cancel"

    def config(self, *, blocking: bool) -> dict[str, Any]:
        if self.v1:
            return {} if blocking else {"returnImmediately": True}
        return {"blocking": blocking}

    def message(self, **changes: Any) -> dict[str, Any]:
        """A valid user message with one text part; a change of None drops the field."""
        text = f"transparency {uuid.uuid4().hex[:8]}"
        message: dict[str, Any]
        if self.v1:
            message = {"role": "ROLE_USER", "parts": [{"text": text}]}
        else:
            message = {"kind": "message", "role": "user", "parts": [{"kind": "text", "text": text}]}
        message["messageId"] = str(uuid.uuid4())
        for key, value in changes.items():
            if value is None:
                message.pop(key, None)
            else:
                message[key] = value
        return message


def rpc(method: Any, params: Any = ..., /, **envelope: Any) -> Body:
    """A JSON-RPC request; `params=...` leaves params out, an envelope value of ...
    leaves that key out."""
    request: dict[str, Any] = {"jsonrpc": "2.0", "id": 7, "method": method}
    if params is not ...:
        request["params"] = params
    for key, value in envelope.items():
        if value is ...:
            request.pop(key, None)
        else:
            request[key] = value
    return json.dumps(request).encode()


def send(p: Proto, message: Any, *, blocking: bool = False) -> Body:
    return rpc(p.send, {"message": message, "configuration": p.config(blocking=blocking)})


# -- the table ----------------------------------------------------------------------
# name -> the raw body for a protocol version. The valid sends come last: they are the
# only rows whose answer with no free slot differs by design.

MALFORMED: dict[str, Builder] = {
    "parse_error": lambda p: b'{"jsonrpc": "2.0", "id": 7, "method"',
    "empty_body": lambda p: b"",
    "not_object_string": lambda p: b'"SendMessage"',
    "not_object_number": lambda p: b"42",
    "not_object_list": lambda p: b"[1]",
    "empty_batch": lambda p: b"[]",
    "jsonrpc_1_0": lambda p: rpc(p.send, {"message": p.message()}, jsonrpc="1.0"),
    "jsonrpc_missing": lambda p: rpc(p.send, {"message": p.message()}, jsonrpc=...),
    "method_missing": lambda p: rpc(p.send, {"message": p.message()}, method=...),
    "method_not_string": lambda p: rpc(5, {"message": p.message()}),
    "method_unknown": lambda p: rpc("tasks/frobnicate", {}),
    "id_object": lambda p: rpc(p.get, {"id": "no-such-task"}, id={}),
    "params_list": lambda p: rpc(p.send, [p.message()]),
    "params_string": lambda p: rpc(p.send, "hello"),
    "params_missing": lambda p: rpc(p.send),
    "message_missing": lambda p: rpc(p.send, {"configuration": p.config(blocking=False)}),
    "message_string": lambda p: send(p, "hello"),
    "message_without_messageId": lambda p: send(p, p.message(messageId=None)),
    "message_without_role": lambda p: send(p, p.message(role=None)),
    "message_empty_parts": lambda p: send(p, p.message(parts=[])),
    "stream_without_messageId": lambda p: rpc(p.stream, {"message": p.message(messageId=None)}),
    "stream_empty_parts": lambda p: rpc(p.stream, {"message": p.message(parts=[])}),
    "other_version_send": lambda p: rpc(p.other.send, {"message": p.other.message()}),
    "other_version_get": lambda p: rpc(p.other.get, {"id": str(uuid.uuid4())}),
    "get_unknown_task": lambda p: rpc(p.get, {"id": str(uuid.uuid4())}),
    "cancel_unknown_task": lambda p: rpc(p.cancel, {"id": str(uuid.uuid4())}),
    "get_history_negative": lambda p: rpc(p.get, {"id": str(uuid.uuid4()), "historyLength": -1}),
    "get_history_string": lambda p: rpc(p.get, {"id": str(uuid.uuid4()), "historyLength": "x"}),
}
VALID: dict[str, Builder] = {
    "send_nonblocking": lambda p: send(p, p.message(), blocking=False),
    "send_blocking": lambda p: send(p, p.message(), blocking=True),
}

# Where SPEC answers otherwise than this agent, by design: (case, version) -> the
# JSON-RPC error code a2ad must answer, on both paths. SPEC's invalid_params row: a
# message any A2A agent must refuse is answered -32602 by a2ad itself, with a free
# slot and without, so the answer never depends on load. The SDK's v0.3 compatibility
# layer answers these -32600 (its pydantic validation of the whole request fails
# before the handler sees it; empty parts, which pass that validation, get -32602),
# so a v0.3 caller of this agent sees -32602 through a2ad where it saw -32600.
V03_SDK_SAYS_INVALID_REQUEST = (
    "params_missing",
    "message_missing",
    "message_string",
    "message_without_messageId",
    "message_without_role",
    "stream_without_messageId",
)
BY_DESIGN: dict[tuple[str, str], int] = {
    (case, "0.3"): -32602 for case in V03_SDK_SAYS_INVALID_REQUEST
}
BY_DESIGN_CODES = {-32602: "invalid_params", -32009: "version_not_supported"}

# A v0.3 method name with A2A-Version 1.x: the SDK agent's v0.3 layer refuses it
# with -32603 (internal error: v0.3 has no version error); a2ad answers the A2A
# specification's VersionNotSupportedError (-32009), the code the agent itself uses
# for a 1.0 name without the header, with a free slot and without.
BY_DESIGN[("other_version_send", "1.0")] = -32009
BY_DESIGN[("other_version_get", "1.0")] = -32009

# Genuine a2ad defects: (case, version, load) -> reason. Each row fails today; the
# xfail is strict so that a fix shows up as XPASS and the row is taken out.
DEFECTS: dict[tuple[str, str, str], str] = {}


def params(table: dict[str, Builder], load: str) -> list[Any]:
    rows = []
    for name in table:
        for version in PROTOCOLS:
            marks = []
            reason = DEFECTS.get((name, version, load))
            if reason is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            rows.append(pytest.param(name, version, marks=marks, id=f"{name}-v{version}"))
    return rows


# -- comparing answers ----------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    text: str

    def json(self) -> Any:
        """The JSON-RPC response; for an event stream, its first event's (an agent may
        answer a streaming request's error as one event: its framing is not compared)."""
        text = self.text
        if text.startswith("data:"):
            text = text.split("\n", 1)[0].removeprefix("data:")
        try:
            return json.loads(text)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.text[:600]}"


def state_class(task: Any) -> str:
    """pending (submitted, working), interrupted (input/auth required) or the terminal
    state itself, the same in either version's spelling."""
    if not isinstance(task, dict):
        return "no-task"
    status = task.get("status")
    state = status.get("state", "") if isinstance(status, dict) else ""
    state = str(state).lower().removeprefix("task_state_").replace("_", "-")
    if state in ("submitted", "working"):
        return "pending"
    if state in ("input-required", "auth-required"):
        return "interrupted"
    return state or "no-state"


def shape(answer: Answer) -> tuple[Any, ...]:
    """What must be equal between the agent's answer and a2ad's."""
    body = answer.json()
    if not isinstance(body, dict):
        return (answer.status, "not-json-rpc")
    error = body.get("error")
    if isinstance(error, dict):
        return (answer.status, "error", error.get("code"))
    result = body.get("result")
    if not isinstance(result, dict):
        return (answer.status, "result", type(result).__name__)
    if "kind" in result:  # v0.3: a Task or a Message, tagged
        return (answer.status, result["kind"], state_class(result))
    for wrapper in ("task", "message"):  # 1.0 send: {"task": …} or {"message": …}
        if wrapper in result:
            return (answer.status, wrapper, "wrapped", state_class(result[wrapper]))
    if "status" in result:  # 1.0 GetTask / CancelTask: the Task itself
        return (answer.status, "task", "bare", state_class(result))
    return (answer.status, "result", sorted(result))


def assert_transparent(case: str, p: Proto, direct: Answer, proxied: Answer) -> None:
    """a2ad's answer has the agent's shape, or the error code SPEC gives instead."""
    where = f"\nagent: {direct}\na2ad:  {proxied}"
    code = BY_DESIGN.get((case, p.version))
    if code is None:
        assert shape(proxied) == shape(direct), where
    else:
        assert shape(proxied) == (200, "error", code), where
        data = proxied.json()
        assert data["error"]["data"]["code"] == BY_DESIGN_CODES[code], where


# -- the stack: one SDK agent, two a2ad in front of it --------------------------------


@dataclass
class Stack:
    agent: Process
    free: Process
    busy: Process
    http: httpx.Client

    def post(self, url: str, body: Body, p: Proto) -> Answer:
        resp = self.http.post(url, content=body, headers=p.headers)
        return Answer(resp.status_code, resp.text)

    def agent_answer(self, body: Body, p: Proto) -> Answer:
        return self.post(self.agent.url + "/", body, p)

    def a2ad_answer(self, a2ad: Process, workspace: str, body: Body, p: Proto) -> Answer:
        return self.post(f"{a2ad.url}/workspaces/{workspace}/a2a", body, p)

    def take_the_slot(self) -> None:
        """External load holds the busy workspace's only slot: a2ad queues every send."""
        resp = self.http.post(
            f"{self.busy.url}/workspaces/{BUSY}/heartbeat",
            headers={"Authorization": f"Bearer {HEARTBEAT_TOKEN}"},
            json={"active_tasks": 1, "max_concurrent_tasks": 1},
        )
        assert resp.status_code == 200, resp.text


@pytest.fixture(scope="module")
def stack(module_launcher: Launcher) -> Iterator[Stack]:
    launcher = module_launcher
    port = launcher.free_port()
    argv = [sys.executable, str(AGENT_SCRIPT), "--port", str(port), "--protocol", "0.3"]
    argv += ["--pause", str(AGENT_PAUSE), "--log", str(launcher.directory / "agent.jsonl")]
    agent = launcher.spawn("sdk-agent", argv, url=f"http://127.0.0.1:{port}")
    agent.wait_until("/.well-known/agent-card.json")
    workspace = {"url": agent.url + "/", "request_timeout_seconds": 15.0}
    free_config = launcher.config(
        name="free.toml",
        store=launcher.directory / "free" / "a2ad.db",
        workspaces=[{"id": FREE, "max_concurrent": 8, "heartbeat": False, **workspace}],
    )
    busy_config = launcher.config(
        name="busy.toml",
        store=launcher.directory / "busy" / "a2ad.db",
        queue={"blocking_wait_seconds": BLOCKING_WAIT},
        workspaces=[
            {
                "id": BUSY,
                "max_concurrent": 1,
                "heartbeat": True,
                "token": HEARTBEAT_TOKEN,
                **workspace,
            }
        ],
    )
    free = launcher.a2ad(free_config)
    busy = launcher.a2ad(busy_config)
    with httpx.Client(timeout=TIMEOUT) as http:
        s = Stack(agent, free, busy, http)
        s.take_the_slot()
        yield s


# -- with a free slot: a2ad forwards, and must answer as the agent does ---------------


@pytest.mark.parametrize(("case", "version"), params(MALFORMED | VALID, FREE))
def test_free_slot_answers_as_the_agent(stack: Stack, case: str, version: str) -> None:
    p = Proto(version)
    build = (MALFORMED | VALID)[case]
    direct = stack.agent_answer(build(p), p)
    proxied = stack.a2ad_answer(stack.free, FREE, build(p), p)
    assert_transparent(case, p, direct, proxied)


# -- with no free slot: what must not depend on load is still the agent's answer ------


@pytest.mark.parametrize(("case", "version"), params(MALFORMED, BUSY))
def test_no_free_slot_answers_as_the_agent(stack: Stack, case: str, version: str) -> None:
    p = Proto(version)
    build = MALFORMED[case]
    stack.take_the_slot()
    direct = stack.agent_answer(build(p), p)
    proxied = stack.a2ad_answer(stack.busy, BUSY, build(p), p)
    assert_transparent(case, p, direct, proxied)


# -- with no free slot, a valid send differs by design ------------------------------
# The agent would start the task at once; a2ad queues it instead (SPEC, Proxy:
# "Queued answer", "Blocking sends"). A non-blocking send gets HTTP 202 and a SUBMITTED
# Task under the queue id with metadata.a2ad.queued at once. A blocking send is held
# until the item ends or queue.blocking_wait_seconds pass; here the slot never frees,
# so after the wait it gets the current (SUBMITTED) Task with 202. Held to its end it
# would be HTTP 200 with the agent's own answer, which test_interop checks.


@pytest.mark.parametrize("version", PROTOCOLS, ids=[f"v{v}" for v in PROTOCOLS])
@pytest.mark.parametrize("blocking", [False, True], ids=["nonblocking", "blocking"])
def test_no_free_slot_valid_send_differs_by_design(
    stack: Stack, version: str, blocking: bool
) -> None:
    p = Proto(version)
    stack.take_the_slot()
    body = send(p, p.message(), blocking=blocking)
    started = time.monotonic()
    answer = stack.a2ad_answer(stack.busy, BUSY, body, p)
    held = time.monotonic() - started
    assert answer.status == 202, answer
    # A blocking send is held through the wait; a non-blocking one is answered at once.
    assert (held >= BLOCKING_WAIT * 0.9) if blocking else (held < BLOCKING_WAIT), held
    data = answer.json()
    assert isinstance(data, dict) and data.get("jsonrpc") == "2.0" and data.get("id") == 7, answer
    result = data["result"]
    if p.v1:
        assert set(result) == {"task"}, answer
        task = result["task"]
        assert task["status"]["state"] == "TASK_STATE_SUBMITTED", answer
    else:
        task = result
        assert task["kind"] == "task" and task["status"]["state"] == "submitted", answer
    assert task["id"] and task["contextId"], answer
    a2ad_meta = task["metadata"]["a2ad"]
    assert a2ad_meta["queued"] is True and a2ad_meta["queue_id"] == task["id"], answer
