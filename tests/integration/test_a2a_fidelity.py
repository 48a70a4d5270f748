"""A2A fidelity on the proxy path (issue 15), as a caller sees it: JSON-RPC errors
with HTTP 200 (SPEC, Errors: the proxy column), invalid params, the messages every
agent refuses (the real a2a-sdk agent is the oracle), historyLength on GetTask,
terminal tasks (-32004) and A2A-Version as a query parameter."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from a2a.helpers import new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types.a2a_pb2 import AgentCapabilities, AgentCard, AgentInterface
from aiohttp import ClientResponse
from fakes import A2ad, FakeAgent, jsonrpc_task
from starlette.applications import Starlette

from a2ad.clock import ManualClock

BOTH_STORES = True  # the same behaviour on SQLite and PostgreSQL

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
V1 = {"A2A-Version": "1.0"}
HB = {"Authorization": "Bearer hb"}


def v03_message(text: str, message_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "message",
        "messageId": message_id,
        "role": "user",
        "parts": [{"kind": "text", "text": text}],
        **extra,
    }


def v1_message(text: str, message_id: str, **extra: Any) -> dict[str, Any]:
    return {"messageId": message_id, "role": "ROLE_USER", "parts": [{"text": text}], **extra}


def rpc(method: str, params: dict[str, Any], rpc_id: Any = 7) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}


def send(method: str, message: Any) -> dict[str, Any]:
    """A message send whose caller does not wait: a queued one is answered at once."""
    params: dict[str, Any] = {"message": message}
    if method == "SendMessage":
        params["configuration"] = {"returnImmediately": True}
    elif method == "message/send":
        params["configuration"] = {"blocking": False}
    return rpc(method, params)


async def heartbeat(a2ad: A2ad, active: int, workspace: str = "w") -> None:
    resp = await a2ad.client.post(
        f"/workspaces/{workspace}/heartbeat", json={"active_tasks": active}, headers=HB
    )
    assert resp.status == 200, await resp.text()


async def post(
    a2ad: A2ad, body: Any, headers: dict[str, str] | None = None, workspace: str = "w"
) -> tuple[int, dict[str, Any]]:
    resp = await a2ad.client.post(f"/workspaces/{workspace}/a2a", json=body, headers=headers or {})
    assert resp.content_type == "application/json", (resp.status, resp.content_type)
    data: dict[str, Any] = await resp.json()
    return resp.status, data


async def setup(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, **sections: dict[str, Any]
) -> tuple[FakeAgent, A2ad, ManualClock]:
    """Workspace w: one slot, heartbeats with token hb, on the manual clock."""
    agent = await agent_factory()
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "token": "hb"}], clock=clock, **sections
    )
    return agent, a2ad, clock


async def move_clock(clock: ManualClock, seconds: float) -> None:
    """Move the manual clock a second at a time, letting the loops due at each step run."""
    while seconds > 0:
        step = min(1.0, seconds)
        await clock.advance(step)
        seconds -= step
        for _ in range(3):
            await asyncio.sleep(0.005)


async def wait_state(a2ad: A2ad, qid: str, state: str) -> None:
    async with asyncio.timeout(5):
        while (await a2ad.item(qid))["state"] != state:  # noqa: ASYNC110 - no event to await
            await asyncio.sleep(0.005)


async def queued_item(a2ad: A2ad, message_id: str, headers: dict[str, str] | None = None) -> str:
    """A queue item's id: someone else's work holds the one slot."""
    await heartbeat(a2ad, 1)
    status, data = await post(a2ad, send("message/send", v03_message("x", message_id)), headers)
    assert status == 202, data
    return str(jsonrpc_task(data)["id"])


async def delivered_item(a2ad: A2ad, agent: FakeAgent, answer: dict[str, Any], name: str) -> str:
    """An item the agent answered with the Task `answer`."""
    agent.script.append((200, {"jsonrpc": "2.0", "id": 1, "result": answer}, {}))
    qid = await queued_item(a2ad, name)
    await heartbeat(a2ad, 0)
    assert (await a2ad.final(qid))["state"] == "delivered"
    return qid


def assert_rpc_error(status: int, data: dict[str, Any], rpc_code: int, code: str) -> None:
    assert status == 200, data
    assert data["jsonrpc"] == "2.0" and "result" not in data, data
    assert data["error"]["code"] == rpc_code and data["error"]["data"]["code"] == code, data


# -- 1. JSON-RPC-level errors are HTTP 200 on the proxy path ------------------------------


@pytest.mark.parametrize(
    ("body", "rpc_id", "rpc_code", "code"),
    [
        (b"{not json", None, -32700, "parse_error"),
        (b"", None, -32700, "parse_error"),
        (
            '{"jsonrpc": "2.0", "id": 1, "method": "x"}'.encode("utf-16"),
            None,
            -32700,
            "parse_error",
        ),
        (b"[1, 2]", None, -32600, "invalid_request"),
        (b'{"jsonrpc": "1.0", "method": "x", "id": 1}', 1, -32600, "invalid_request"),
        (b'{"jsonrpc": "2.0", "id": "r-2"}', "r-2", -32600, "invalid_request"),
        (b'{"jsonrpc": "2.0", "id": {}, "method": "x"}', None, -32600, "invalid_request"),
        (
            b'{"jsonrpc": "2.0", "id": 3, "method": "message/send", "params": []}',
            3,
            -32600,
            "invalid_request",
        ),
    ],
    ids=[
        "not JSON",
        "empty body",
        "UTF-16",
        "not an object",
        "jsonrpc 1.0",
        "no method",
        "object id",
        "array params",
    ],
)
async def test_json_rpc_errors_are_http_200_on_the_proxy_path(
    agent_factory: AgentFactory,
    a2ad_factory: A2adFactory,
    body: bytes,
    rpc_id: Any,
    rpc_code: int,
    code: str,
) -> None:
    """As the agent, the a2a-sdk and the A2A conformance kit answer them: the error in
    the body, the request id echoed when it can be read; nothing stored or sent."""
    agent, a2ad, _ = await setup(agent_factory, a2ad_factory)
    resp = await a2ad.client.post(
        "/workspaces/w/a2a", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.content_type == "application/json"
    data = await resp.json()
    assert_rpc_error(resp.status, data, rpc_code, code)
    assert data["id"] == rpc_id
    assert agent.received == [] and await a2ad.daemon.store.counts() == {}


async def test_the_transport_keeps_its_statuses_and_other_endpoints_keep_400(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """SPEC's proxy column: a parse error is 200 on the proxy and 400 elsewhere; what
    the HTTP transport refuses keeps its status on the proxy too."""
    agent, a2ad, _ = await setup(agent_factory, a2ad_factory, server={"max_body_bytes": 2000})
    resp = await a2ad.client.post("/workspaces/w/a2a", data=b"{not json")
    assert resp.status == 200 and (await resp.json())["error"]["code"] == -32700
    # Outside the proxy path the same errors keep HTTP 400.
    resp = await a2ad.client.post("/workspaces/w/heartbeat", data=b"{not json", headers=HB)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "parse_error"
    resp = await a2ad.client.get("/workspaces/w/queue?limit=many")
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_request"
    # What the transport refuses on the proxy path.
    good = send("message/send", v03_message("x", "m-good"))
    refusals: list[tuple[str, Any, dict[str, str], int, str]] = [
        ("nope", good, {}, 404, "unknown_workspace"),
        ("w", send("message/send", v03_message("x" * 3000, "m-big")), {}, 413, "body_too_large"),
        ("w", good, {"A2AD-Priority": "urgent"}, 400, "invalid_header"),
    ]
    for workspace, body, headers, status, code in refusals:
        resp = await a2ad.client.post(f"/workspaces/{workspace}/a2a", json=body, headers=headers)
        assert resp.status == status, (code, await resp.text())
        assert (await resp.json())["error"]["data"]["code"] == code
    await heartbeat(a2ad, 1)
    resp = await a2ad.client.post("/workspaces/w/a2a", json=good, headers={"A2AD-Queue": "never"})
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["data"]["code"] == "queue_full"
    await heartbeat(a2ad, 0)
    agent.script.append("drop")  # the connection closes after the body was sent
    resp = await a2ad.client.post("/workspaces/w/a2a", json=good)
    assert resp.status == 502 and (await resp.json())["error"]["data"]["code"] == "upstream_failed"


# -- 2. a missing or invalid params.message is invalid params ------------------------------


@pytest.mark.parametrize("slot", ["free", "none"])
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("message/send", {}),
        ("message/send", {"message": "hello"}),
        ("message/stream", {"message": None}),
        ("SendMessage", {"message": []}),
        ("SendStreamingMessage", {}),
        # A send's configuration.historyLength, as GetTask's (the SDK agent refuses both).
        (
            "SendMessage",
            {
                "message": {"messageId": "h1", "role": "ROLE_USER", "parts": [{"text": "x"}]},
                "configuration": {"historyLength": -1},
            },
        ),
        (
            "message/send",
            {
                "message": {
                    "messageId": "h2",
                    "role": "user",
                    "parts": [{"kind": "text", "text": "x"}],
                },
                "configuration": {"historyLength": "abc", "blocking": False},
            },
        ),
        # A NUL in an id: no store keeps it as it is (PostgreSQL text has none).
        (
            "SendMessage",
            {"message": {"messageId": "a\u0000b", "role": "ROLE_USER", "parts": [{"text": "x"}]}},
        ),
        (
            "message/send",
            {
                "message": {
                    "messageId": "n1",
                    "contextId": "\u0000",
                    "role": "user",
                    "parts": [{"kind": "text", "text": "x"}],
                },
            },
        ),
    ],
)
async def test_a_missing_or_invalid_message_is_invalid_params(
    agent_factory: AgentFactory,
    a2ad_factory: A2adFactory,
    method: str,
    params: dict[str, Any],
    slot: str,
) -> None:
    agent, a2ad, _ = await setup(agent_factory, a2ad_factory)
    await heartbeat(a2ad, 1 if slot == "none" else 0)
    headers = V1 if method[0].isupper() else {}
    status, data = await post(a2ad, rpc(method, params), headers)
    assert_rpc_error(status, data, -32602, "invalid_params")
    assert data["id"] == 7
    assert agent.received == [] and await a2ad.daemon.store.counts() == {}


# -- 3. messages every A2A agent refuses: the a2a-sdk agent is the oracle --------------------


class _Reply(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        await event_queue.enqueue_event(new_text_message("ok"))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


def sdk_agent(protocol: str) -> httpx.AsyncClient:
    """The a2a-sdk 1.3 agent (JSON-RPC, v0.3 compatibility for a v0.3 card), served
    in process: a client whose requests it answers."""
    card = AgentCard(
        name="oracle",
        description="answers every message",
        version="1",
        supported_interfaces=[
            AgentInterface(url="http://sdk/", protocol_binding="JSONRPC", protocol_version=protocol)
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
    )
    handler = DefaultRequestHandler(
        agent_executor=_Reply(), task_store=InMemoryTaskStore(), agent_card=card
    )
    routes = create_agent_card_routes(card) + create_jsonrpc_routes(
        handler, rpc_url="/", enable_v0_3_compat=protocol == "0.3"
    )
    app = Starlette(routes=routes)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sdk")


def refused(status: int, content_type: str, text: str) -> bool:
    """Did an agent refuse the send? (A refusal may come as a stream's only event.)"""
    assert status == 200, text
    if content_type.startswith("text/event-stream"):
        first = next(line for line in text.splitlines() if line.startswith("data:"))
        return "error" in json.loads(first.removeprefix("data:"))
    return "error" in json.loads(text)


P1 = {"text": "hi"}
P03 = {"kind": "text", "text": "hi"}
# (name, method, message): each protocol's own shapes, a method with its own header.
MESSAGES: list[tuple[str, str, dict[str, Any]]] = [
    ("1.0 valid", "SendMessage", {"messageId": "a", "role": "ROLE_USER", "parts": [P1]}),
    ("1.0 no messageId", "SendMessage", {"role": "ROLE_USER", "parts": [P1]}),
    ("1.0 empty messageId", "SendMessage", {"messageId": "", "role": "ROLE_USER", "parts": [P1]}),
    ("1.0 numeric messageId", "SendMessage", {"messageId": 5, "role": "ROLE_USER", "parts": [P1]}),
    ("1.0 blank messageId", "SendMessage", {"messageId": " ", "role": "ROLE_USER", "parts": [P1]}),
    ("1.0 no role", "SendMessage", {"messageId": "b", "parts": [P1]}),
    ("1.0 role null", "SendMessage", {"messageId": "b2", "role": None, "parts": [P1]}),
    ("1.0 v0.3 role", "SendMessage", {"messageId": "c", "role": "user", "parts": [P1]}),
    (
        "1.0 unspecified role",
        "SendMessage",
        {"messageId": "d", "role": "ROLE_UNSPECIFIED", "parts": [P1]},
    ),
    ("1.0 role number", "SendMessage", {"messageId": "e", "role": 1, "parts": [P1]}),
    ("1.0 agent role", "SendMessage", {"messageId": "f", "role": "ROLE_AGENT", "parts": [P1]}),
    ("1.0 no parts", "SendMessage", {"messageId": "g", "role": "ROLE_USER"}),
    ("1.0 empty parts", "SendMessage", {"messageId": "h", "role": "ROLE_USER", "parts": []}),
    ("1.0 parts null", "SendMessage", {"messageId": "i", "role": "ROLE_USER", "parts": None}),
    ("1.0 part null", "SendMessage", {"messageId": "j", "role": "ROLE_USER", "parts": [None]}),
    ("1.0 empty part", "SendMessage", {"messageId": "k", "role": "ROLE_USER", "parts": [{}]}),
    ("1.0 part with kind", "SendMessage", {"messageId": "l", "role": "ROLE_USER", "parts": [P03]}),
    ("1.0 stream, no role", "SendStreamingMessage", {"messageId": "m", "parts": [P1]}),
    ("1.0 stream, no parts", "SendStreamingMessage", {"messageId": "n", "role": "ROLE_USER"}),
    ("0.3 valid", "message/send", {"messageId": "o", "role": "user", "parts": [P03]}),
    ("0.3 part without kind", "message/send", {"messageId": "p", "role": "user", "parts": [P1]}),
    ("0.3 no messageId", "message/send", {"role": "user", "parts": [P03]}),
    ("0.3 empty messageId", "message/send", {"messageId": "", "role": "user", "parts": [P03]}),
    ("0.3 blank messageId", "message/send", {"messageId": "  ", "role": "user", "parts": [P03]}),
    ("0.3 no role", "message/send", {"messageId": "q", "parts": [P03]}),
    ("0.3 1.0 role", "message/send", {"messageId": "r", "role": "ROLE_USER", "parts": [P03]}),
    ("0.3 agent role", "message/send", {"messageId": "s", "role": "agent", "parts": [P03]}),
    ("0.3 no parts", "message/send", {"messageId": "t", "role": "user"}),
    ("0.3 empty parts", "message/send", {"messageId": "u", "role": "user", "parts": []}),
    ("0.3 parts a string", "message/send", {"messageId": "v", "role": "user", "parts": "hi"}),
    ("0.3 stream, no messageId", "message/stream", {"role": "user", "parts": [P03]}),
    ("0.3 stream, empty parts", "message/stream", {"messageId": "w", "role": "user", "parts": []}),
]


async def test_a2ad_refuses_on_both_paths_exactly_the_messages_the_sdk_agent_refuses(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """No messageId, no role (for the version spoken), empty or missing parts: refused
    with -32602 whether a slot is free (direct) or not (queued), before anything is
    sent or stored, so the answer never depends on load. What the a2a-sdk agent takes
    (a blank messageId, a role by its enum number, a Part it cannot read) passes."""
    agent = await agent_factory()
    a2ad = await a2ad_factory(
        [
            {"id": "free", "url": agent.url, "heartbeat": False, "max_concurrent": 100},
            {"id": "busy", "url": agent.url, "token": "hb"},
        ],
        clock=ManualClock(),
    )
    await heartbeat(a2ad, 1, "busy")
    sdk = {protocol: sdk_agent(protocol) for protocol in ("1.0", "0.3")}
    seen: dict[str, tuple[str, ...]] = {}
    expected: dict[str, tuple[str, ...]] = {}
    refusals: list[tuple[int, Any, Any]] = []
    accepted = 0
    try:
        for name, method, message in MESSAGES:
            protocol = "1.0" if method[0].isupper() else "0.3"
            headers = V1 if protocol == "1.0" else {}
            resp = await sdk[protocol].post("/", json=send(method, message), headers=headers)
            oracle = refused(resp.status_code, resp.headers["Content-Type"], resp.text)
            verdicts = ["refused" if oracle else "accepted"]
            for workspace in ("free", "busy"):
                body = send(method, {**message, "contextId": f"{workspace}-{name}"})
                status, data = await post(a2ad, body, headers, workspace)
                verdicts.append("refused" if "error" in data else "accepted")
                if "error" in data:
                    refusals.append((status, data["error"]["code"], data["error"]["data"]))
                else:
                    accepted += 1
            seen[name] = tuple(verdicts)
            expected[name] = (verdicts[0],) * 3
    finally:
        for client in sdk.values():
            await client.aclose()
    assert seen == expected
    assert {(s, c, d["code"]) for s, c, d in refusals} == {(200, -32602, "invalid_params")}
    # Refused sends reached no agent and left nothing stored.
    sent = {r.body["params"]["message"]["contextId"] for r in agent.received}
    assert all(not c.startswith("busy-") for c in sent)  # queued ones are still queued
    assert sent == {f"free-{n}" for n, v in seen.items() if v[0] == "accepted"}
    counts = await a2ad.daemon.store.counts()
    assert "free" not in counts
    assert counts["busy"] == {"queued": accepted - len(sent)}


# -- 4. historyLength on GetTask for a queue id --------------------------------------------


HISTORY = [
    {
        "kind": "message",
        "messageId": f"h-{i}",
        "role": "user",
        "parts": [{"kind": "text", "text": str(i)}],
    }
    for i in range(3)
]
DONE_WITH_HISTORY = {
    "kind": "task",
    "id": "t-h",
    "contextId": "c-h",
    "status": {"state": "completed"},
    "history": HISTORY,
}


@pytest.mark.parametrize(("method", "headers"), [("tasks/get", {}), ("GetTask", V1)])
async def test_history_length_on_a_queue_id_is_checked_and_honoured(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, method: str, headers: dict[str, str]
) -> None:
    agent, a2ad, _ = await setup(agent_factory, a2ad_factory)
    qid = await delivered_item(a2ad, agent, DONE_WITH_HISTORY, "with-history")

    async def history(length: Any) -> list[str] | None:
        params: dict[str, Any] = {"id": qid}
        if length != "absent":
            params["historyLength"] = length
        status, data = await post(a2ad, rpc(method, params), headers)
        assert status == 200 and data["result"]["id"] == qid, data
        task = data["result"]
        return None if "history" not in task else [m["messageId"] for m in task["history"]]

    assert await history("absent") == ["h-0", "h-1", "h-2"]
    assert await history(None) == ["h-0", "h-1", "h-2"]
    assert await history(0) is None  # no history entries, as the a2a-sdk agent answers
    assert await history(1) == ["h-2"]
    assert await history(2) == ["h-1", "h-2"]
    assert await history(10) == ["h-0", "h-1", "h-2"]
    # Read as the a2a-sdk agent reads them (proto3 JSON, pydantic).
    assert await history(2.0) == ["h-1", "h-2"]
    assert await history("2") == ["h-1", "h-2"]
    for bad in (-1, "-1", 1.5, "two", True, [], {}):
        for task_id in (qid, "q-" + "0" * 32):
            status, data = await post(
                a2ad, rpc(method, {"id": task_id, "historyLength": bad}), headers
            )
            assert_rpc_error(status, data, -32602, "invalid_params")
            assert "historyLength" in data["error"]["message"]
    assert len(agent.received) == 1  # the delivery: a2ad answered every GetTask itself


# -- 5. terminal tasks: SubscribeToTask and follow-up messages -------------------------------


async def terminal_items(a2ad: A2ad, agent: FakeAgent, clock: ManualClock) -> dict[str, str]:
    """One item of each way a Task a2ad answers for ends: cancelled, expired, failed,
    and delivered with the agent's Task completed."""
    items = {}
    items["cancelled"] = await queued_item(a2ad, "to-cancel")
    resp = await a2ad.client.delete(f"/queue/{items['cancelled']}")
    assert (await resp.json())["state"] == "cancelled"
    items["expired"] = await queued_item(a2ad, "to-expire", {"A2AD-TTL": "1"})
    await move_clock(clock, 2.0)
    await wait_state(a2ad, items["expired"], "expired")
    agent.script.append((502, {}, {}))  # a failure; max_attempts = 1
    items["failed"] = await queued_item(a2ad, "to-fail")
    await heartbeat(a2ad, 0)
    assert (await a2ad.final(items["failed"]))["state"] == "failed"
    done = {"kind": "task", "id": "t-done", "contextId": "c-done", "status": {"state": "completed"}}
    items["completed"] = await delivered_item(a2ad, agent, done, "to-complete")
    return items


@pytest.mark.parametrize(
    ("method", "headers"), [("tasks/resubscribe", {}), ("SubscribeToTask", V1)]
)
async def test_subscribing_to_a_terminal_queue_task_is_unsupported_operation(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, method: str, headers: dict[str, str]
) -> None:
    """The specification's answer for a task already terminal: -32004, not a stream."""
    agent, a2ad, clock = await setup(agent_factory, a2ad_factory, queue={"max_attempts": 1})
    items = await terminal_items(a2ad, agent, clock)
    received = len(agent.received)
    for name, qid in items.items():
        status, data = await post(a2ad, rpc(method, {"id": qid}), headers)
        assert_rpc_error(status, data, -32004, "unsupported_operation")
        assert qid in data["error"]["message"] and data["id"] == 7, name
    assert len(agent.received) == received
    # A task still going on streams as before: its Task first.
    qid = await queued_item(a2ad, "still-queued")
    resp = await a2ad.client.post(
        "/workspaces/w/a2a", json=rpc(method, {"id": qid}), headers=headers
    )
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    first = await first_event(resp)
    assert jsonrpc_task(first)["id"] == qid
    resp.close()


async def first_event(resp: ClientResponse) -> dict[str, Any]:
    async with asyncio.timeout(5):
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                event: dict[str, Any] = json.loads(line.removeprefix("data:"))
                return event
    raise AssertionError("no event")


@pytest.mark.parametrize("slot", ["free", "none"])
async def test_a_message_to_a_queue_task_that_ended_before_the_agent_is_unsupported_operation(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, slot: str
) -> None:
    """A follow-up naming a cancelled, expired or failed queue id is a2ad's to answer
    (-32004), whether a slot is free or not: the q- id never reaches the agent and
    nothing is stored. A delivered item's task goes on at the agent, under its id."""
    agent, a2ad, clock = await setup(agent_factory, a2ad_factory, queue={"max_attempts": 1})
    items = await terminal_items(a2ad, agent, clock)
    await heartbeat(a2ad, 1 if slot == "none" else 0)
    counts = await a2ad.daemon.store.counts()
    received = len(agent.received)
    for name in ("cancelled", "expired", "failed"):
        for method, headers, make in (
            ("message/send", {}, v03_message),
            ("SendMessage", V1, v1_message),
            ("message/stream", {}, v03_message),
        ):
            message = make("more", f"follow-{name}-{method}", taskId=items[name])
            status, data = await post(a2ad, send(method, message), headers)
            assert_rpc_error(status, data, -32004, "unsupported_operation")
            assert items[name] in data["error"]["message"], (name, method)
    assert len(agent.received) == received and await a2ad.daemon.store.counts() == counts
    # A delivered item's task continues at the agent, which gets its own task id.
    await heartbeat(a2ad, 0)
    message = v03_message("more", "follow-completed", taskId=items["completed"])
    status, data = await post(a2ad, send("message/send", message))
    assert status == 200 and "result" in data, data
    assert agent.received[-1].body["params"]["message"]["taskId"] == "t-done"


# -- 6. A2A-Version as a query parameter ---------------------------------------------------


async def test_a2a_version_as_a_query_parameter_reaches_the_agent_as_the_header(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """A2A 1.0, section 3.6.1: a client may name the version in the URL. a2ad answers
    in that version and the agent gets the header, on the direct and the queued path;
    a header given too wins."""
    agent, a2ad, _ = await setup(agent_factory, a2ad_factory)
    url = "/workspaces/w/a2a?A2A-Version=1.0"
    # Direct.
    resp = await a2ad.client.post(url, json=send("SendMessage", v1_message("hi", "m-direct")))
    assert resp.status == 200
    assert (await resp.json())["result"]["message"]["role"] == "ROLE_AGENT"
    assert agent.received[-1].headers.get("A2A-Version") == "1.0"
    # Queued: answered in 1.0, stored with the header, delivered with it.
    await heartbeat(a2ad, 1)
    resp = await a2ad.client.post(url, json=send("SendMessage", v1_message("hi", "m-queued")))
    assert resp.status == 202
    task = (await resp.json())["result"]["task"]
    assert task["status"]["state"] == "TASK_STATE_SUBMITTED"
    resp = await a2ad.client.post(url, json=rpc("GetTask", {"id": task["id"]}))
    assert (await resp.json())["result"]["status"]["state"] == "TASK_STATE_SUBMITTED"
    await heartbeat(a2ad, 0)
    assert (await a2ad.final(task["id"]))["state"] == "delivered"
    assert agent.received[-1].body["params"]["message"]["messageId"] == "m-queued"
    assert agent.received[-1].headers.get("A2A-Version") == "1.0"
    # The header wins over the query parameter.
    await heartbeat(a2ad, 1)
    resp = await a2ad.client.post(
        url,
        json=send("message/send", v03_message("hi", "m-header")),
        headers={"A2A-Version": "0.3"},
    )
    assert resp.status == 202
    task = (await resp.json())["result"]
    assert task["kind"] == "task" and task["status"]["state"] == "submitted"
    await heartbeat(a2ad, 0)
    assert (await a2ad.final(task["id"]))["state"] == "delivered"
    assert agent.received[-1].headers.get("A2A-Version") == "0.3"
