"""Headers between callers and agents, end to end with real agents on loopback:
W3C trace context passes through (stored with queued items), a workspace's
credentials from the config file go with every request to its agent and a
caller's own Authorization with none, and send options come in request
metadata as well as in A2AD-* headers.

Queued sends ask not to block (v0.3 `blocking: false`, 1.0 `returnImmediately`),
so they are answered 202 at once; a ManualClock keeps a2ad's own timers still."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import A2ad, FakeAgent, jsonrpc_task

from a2ad.clock import ManualClock
from a2ad.liveness import Observation

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
ServerFactory = Callable[..., Awaitable[TestServer]]

V1 = {"A2A-Version": "1.0"}
TRACE = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "congo=t61rcWkgMzE",
    "baggage": "userId=alice,serverNode=DF%2028",
}
QUEUED_TRACE = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "rojo=00f067aa0ba902b7",
    "baggage": "tenant=blue",
}
HEARTBEAT = {"Authorization": "Bearer hb-token"}
AGENT_TOKEN = "agent-secret-7f3a"
API_KEY = "api-key-secret-91c2"
CALLER_TOKEN = "caller-secret-55d0"
CALLER = {"Authorization": f"Bearer {CALLER_TOKEN}"}
CREDENTIALS = {"agent_token": AGENT_TOKEN, "agent_headers": {"X-Api-Key": API_KEY}}
Reply = tuple[int, dict[str, Any], dict[str, str]]
BUSY: Reply = (503, {"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": "busy"}}, {})


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


def send_body(
    text: str,
    *,
    v1: bool = False,
    metadata: Any = None,
    method: str | None = None,
    blocking: bool = False,
) -> dict[str, Any]:
    """A message send any agent takes; not blocking unless asked."""
    message_id = f"m-{text}"
    if v1:
        message: dict[str, Any] = {
            "messageId": message_id,
            "role": "ROLE_USER",
            "parts": [{"text": text}],
        }
        configuration = {"returnImmediately": not blocking}
    else:
        message = {
            "kind": "message",
            "messageId": message_id,
            "role": "user",
            "parts": [{"kind": "text", "text": text}],
        }
        configuration = {"blocking": blocking}
    params: dict[str, Any] = {"message": message}
    name = method or ("SendMessage" if v1 else "message/send")
    if name in ("SendMessage", "message/send"):
        params["configuration"] = configuration
    if metadata is not None:
        params["metadata"] = metadata
    return {"jsonrpc": "2.0", "id": 1, "method": name, "params": params}


async def post(
    a2ad: A2ad, body: dict[str, Any], headers: Any = None, workspace: str = "w"
) -> tuple[int, dict[str, Any]]:
    resp = await a2ad.client.post(f"/workspaces/{workspace}/a2a", json=body, headers=headers)
    data: dict[str, Any] = await resp.json()
    return resp.status, data


async def heartbeat(a2ad: A2ad, active: int) -> None:
    resp = await a2ad.client.post(
        "/workspaces/w/heartbeat",
        json={"active_tasks": active, "max_concurrent_tasks": 1},
        headers=HEARTBEAT,
    )
    assert resp.status == 200, await resp.text()


def full_ws(agent: FakeAgent, **extra: Any) -> dict[str, Any]:
    """A workspace whose heartbeats can say it is full, so sends queue at will."""
    return {"id": "w", "url": agent.url, "token": "hb-token", **extra}


def task_answer(task_id: str, state: str) -> Reply:
    task = {"kind": "task", "id": task_id, "contextId": "agent-ctx", "status": {"state": state}}
    return (200, {"jsonrpc": "2.0", "id": 7, "result": task}, {})


class CardAgent:
    """A FakeAgent that also serves its card, only to requests carrying `require`."""

    def __init__(self, require: dict[str, str] | None = None) -> None:
        self.fake = FakeAgent()
        self.require = require or {}
        self.card_requests: list[dict[str, str]] = []

    async def card(self, request: web.Request) -> web.Response:
        self.card_requests.append(dict(request.headers))
        if any(request.headers.get(k) != v for k, v in self.require.items()):
            return web.json_response({"error": "unauthorized"}, status=401)
        interface = {"url": self.fake.url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}
        return web.json_response(
            {"name": "guarded", "version": "1", "supportedInterfaces": [interface]}
        )


async def start_card_agent(
    aiohttp_server: ServerFactory, require: dict[str, str] | None = None
) -> CardAgent:
    agent = CardAgent(require)
    app = web.Application()
    app.router.add_post("/", agent.fake.handle)
    app.router.add_get("/.well-known/agent-card.json", agent.card)
    server = await aiohttp_server(app, host="127.0.0.1")
    agent.fake.url = str(server.make_url("/"))
    return agent


# -- W3C trace context ---------------------------------------------------------------


async def test_trace_context_reaches_the_agent_on_a_direct_send_and_a_forwarded_method(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([{"id": "w", "url": agent.url, "heartbeat": False}])
    status, data = await post(a2ad, send_body("hi"), headers=TRACE)
    assert status == 200, data
    agent.script = [task_answer("agent-task-1", "working")]
    got = await a2ad.rpc("w", "tasks/get", {"id": "agent-task-1"}, headers=TRACE)
    assert got["result"]["id"] == "agent-task-1"
    direct, forwarded = agent.received
    for seen in (direct.headers, forwarded.headers):
        assert {k: seen.get(k) for k in TRACE} == TRACE
        assert trace_id(seen["traceparent"]) == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_trace_context_is_stored_with_a_queued_send_and_goes_with_its_delivery(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([full_ws(agent)], clock=ManualClock())
    await heartbeat(a2ad, active=1)  # full: the sends below are queued
    status, data = await post(a2ad, send_body("queued", v1=True), headers={**V1, **QUEUED_TRACE})
    assert status == 202, data
    qid = jsonrpc_task(data)["id"]
    status, data = await post(a2ad, send_body("queued-v03"), headers=TRACE)
    assert status == 202, data
    second = jsonrpc_task(data)["id"]
    assert agent.received == []
    await heartbeat(a2ad, active=0)
    assert (await a2ad.final(qid))["state"] == "delivered"
    assert (await a2ad.final(second))["state"] == "delivered"
    first, other = agent.received
    assert first.text == "queued" and first.headers["A2A-Version"] == "1.0"
    assert {k: first.headers.get(k) for k in QUEUED_TRACE} == QUEUED_TRACE
    assert trace_id(first.headers["traceparent"]) == "0af7651916cd43dd8448eb211c80319c"
    # Each item keeps its own caller's trace.
    assert {k: other.headers.get(k) for k in TRACE} == TRACE


async def test_tracestate_and_baggage_in_several_lines_reach_the_agent_as_one(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([{"id": "w", "url": agent.url, "heartbeat": False}])
    lines = [
        ("traceparent", TRACE["traceparent"]),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("tracestate", "rojo=00f067aa0ba902b7"),
        ("baggage", "userId=alice"),
        ("baggage", "tenant=blue"),
    ]
    status, data = await post(a2ad, send_body("hi"), headers=lines)
    assert status == 200, data
    seen = agent.received[0].headers
    assert seen["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert seen["baggage"] == "userId=alice,tenant=blue"


# -- agent credentials -----------------------------------------------------------------


def assert_credentials(headers: dict[str, str]) -> None:
    assert headers.get("Authorization") == f"Bearer {AGENT_TOKEN}", headers
    assert headers.get("X-Api-Key") == API_KEY, headers
    assert CALLER_TOKEN not in str(headers)


async def test_agent_credentials_go_with_sends_deliveries_and_forwarded_methods(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "heartbeat": False, **CREDENTIALS}],
        clock=clock,
        auth={"callers": [{"name": "planner", "token": CALLER_TOKEN}]},
    )
    agent.script = [
        BUSY,  # the direct send: busy, so it is queued
        task_answer("agent-task-9", "working"),  # its delivery
        task_answer("agent-task-9", "working"),  # GetTask on the queue id: a refresh
        task_answer("agent-task-9", "canceled"),  # CancelTask on it: forwarded
        task_answer("agent-task-1", "completed"),  # a method forwarded as it is
    ]
    status, data = await post(a2ad, send_body("hello"), headers=CALLER)
    assert status == 202, data
    qid = jsonrpc_task(data)["id"]
    await clock.advance(0.5)  # the busy pause ends: delivery
    await agent.wait_received(2)
    assert (await a2ad.final(qid))["state"] == "delivered"
    got = await a2ad.rpc("w", "tasks/get", {"id": qid}, headers=CALLER)
    assert got["result"]["id"] == qid
    got = await a2ad.rpc("w", "tasks/cancel", {"id": qid}, headers=CALLER)
    assert got["result"]["status"]["state"] == "canceled"
    got = await a2ad.rpc("w", "tasks/get", {"id": "agent-task-1"}, headers=CALLER)
    assert got["result"]["id"] == "agent-task-1"
    resp = await a2ad.client.post(
        "/workspaces/w/a2a", json=send_body("streamed", method="message/stream"), headers=CALLER
    )
    assert resp.status == 200 and "echo: streamed" in await resp.text()

    methods = [r.body["method"] for r in agent.received]
    assert methods == [
        "message/send",
        "message/send",
        "tasks/get",
        "tasks/cancel",
        "tasks/get",
        "message/stream",
    ]
    assert agent.received[2].body["params"]["id"] == "agent-task-9"
    for received in agent.received:
        assert_credentials(received.headers)


async def test_agent_credentials_go_with_card_fetches_and_probes(
    aiohttp_server: ServerFactory, a2ad_factory: A2adFactory, tmp_path: Path
) -> None:
    require = {"Authorization": f"Bearer {AGENT_TOKEN}", "X-Api-Key": API_KEY}
    agent = await start_card_agent(aiohttp_server, require)
    (tmp_path / "agent.token").write_text(AGENT_TOKEN + "\n")
    config = {
        "id": "w",
        "url": agent.fake.url,
        "heartbeat": False,
        "agent_token_file": str(tmp_path / "agent.token"),
        "agent_headers": {"X-Api-Key": API_KEY},
    }
    a2ad = await a2ad_factory([config], clock=ManualClock())
    # The agent serves its card only to a2ad's credentials: without them a2ad
    # would have no card to serve (503).
    resp = await a2ad.client.get("/workspaces/w/a2a/.well-known/agent-card.json", headers=CALLER)
    assert resp.status == 200, await resp.text()
    card = await resp.json()
    assert card["supportedInterfaces"][0]["url"].endswith("/workspaces/w/a2a")
    # A probe GETs the card too: with the credentials it finds the agent running.
    ws = a2ad.daemon.registry.get("w")
    assert await a2ad.daemon.liveness.probe(ws) is Observation.RUNNING
    assert len(agent.card_requests) == 2
    for headers in agent.card_requests:
        assert_credentials(headers)
    # The direct send goes with the credentials read from the file as well.
    status, data = await post(a2ad, send_body("hi"))
    assert status == 200, data
    assert_credentials(agent.fake.received[0].headers)


async def test_a_callers_authorization_never_reaches_an_agent(
    aiohttp_server: ServerFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    plain = await start_card_agent(aiohttp_server)
    guarded = await start_card_agent(aiohttp_server)
    a2ad = await a2ad_factory(
        [
            {"id": "w", "url": plain.fake.url, "heartbeat": False},
            {"id": "g", "url": guarded.fake.url, "heartbeat": False, **CREDENTIALS},
        ],
        clock=clock,
        auth={"callers": [{"name": "planner", "token": CALLER_TOKEN}]},
    )
    for agent, workspace in ((plain, "w"), (guarded, "g")):
        agent.fake.script = [
            BUSY,  # the first send: queued
            task_answer("agent-task-1", "completed"),  # its delivery
            task_answer("agent-task-1", "completed"),  # a forwarded tasks/get
        ]
        status, data = await post(a2ad, send_body("hi"), CALLER, workspace)  # busy: queued
        assert status == 202, data
        await clock.advance(0.5)
        assert (await a2ad.final(jsonrpc_task(data)["id"]))["state"] == "delivered"
        got = await a2ad.rpc(workspace, "tasks/get", {"id": "agent-task-1"}, headers=CALLER)
        assert got["result"]["id"] == "agent-task-1"
        status, data = await post(a2ad, send_body("direct"), CALLER, workspace)
        assert status == 200, data
        resp = await a2ad.client.get(
            f"/workspaces/{workspace}/a2a/.well-known/agent-card.json", headers=CALLER
        )
        assert resp.status == 200
    seen = [r.headers for r in plain.fake.received] + plain.card_requests
    assert len(seen) == 5
    for headers in seen:
        assert "Authorization" not in headers, headers
        assert CALLER_TOKEN not in str(headers)
    seen = [r.headers for r in guarded.fake.received] + guarded.card_requests
    assert len(seen) == 5
    for headers in seen:
        assert_credentials(headers)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("agent_token", "put-secret"),
        ("agent_token_file", "/etc/a2ad/put-secret.token"),
        ("agent_headers", {"X-Api-Key": "put-secret"}),
    ],
)
async def test_put_refuses_agent_credentials(
    a2ad_factory: A2adFactory, field: str, value: Any
) -> None:
    a2ad = await a2ad_factory([])
    body = {"url": "http://127.0.0.1:9/", "heartbeat": False, field: value}
    resp = await a2ad.client.put("/workspaces/rt", json=body)
    data = await resp.json()
    assert resp.status == 400, data
    assert data["error"]["code"] == "invalid_body"
    assert field in data["error"]["message"] and "config file" in data["error"]["message"]
    assert "put-secret" not in str(data)
    assert (await a2ad.client.get("/workspaces/rt")).status == 404
    # Nor may an update of a run-time workspace add them.
    resp = await a2ad.client.put("/workspaces/rt", json={"url": body["url"], "heartbeat": False})
    assert resp.status == 201
    resp = await a2ad.client.put("/workspaces/rt", json=body)
    assert resp.status == 400
    assert "put-secret" not in await resp.text()


async def test_views_and_logs_never_show_agent_credentials(
    aiohttp_server: ServerFactory,
    a2ad_factory: A2adFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    agent = await start_card_agent(aiohttp_server)
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.fake.url, "heartbeat": False, **CREDENTIALS}]
    )
    agent.fake.script = [(502, {"error": "down"}, {})]  # a logged failure
    status, _ = await post(a2ad, send_body("hi"))
    assert status == 502
    assert (await post(a2ad, send_body("again")))[0] == 200
    assert (await a2ad.client.get("/workspaces/w/a2a/.well-known/agent-card.json")).status == 200
    texts = [caplog.text]
    for path in ("/workspaces", "/workspaces/w", "/metrics", "/ui"):
        resp = await a2ad.client.get(path)
        assert resp.status == 200, path
        texts.append(await resp.text())
    for text in texts:
        assert AGENT_TOKEN not in text and API_KEY not in text


# -- send options in params.metadata.a2ad ------------------------------------------------


async def queued_item(a2ad: A2ad, body: dict[str, Any], headers: Any = None) -> dict[str, Any]:
    status, data = await post(a2ad, body, headers)
    assert status == 202, data
    return await a2ad.item(jsonrpc_task(data)["id"])


def ttl_of(item: dict[str, Any]) -> float:
    expires = datetime.fromisoformat(item["expires_at"])
    return (expires - datetime.fromisoformat(item["enqueued_at"])).total_seconds()


async def test_metadata_options_set_priority_ttl_and_never_queue(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([full_ws(agent)], clock=ManualClock())
    await heartbeat(a2ad, active=1)
    low = await queued_item(a2ad, send_body("low", metadata={"a2ad": {"priority": "info"}}))
    high = await queued_item(
        a2ad,
        send_body("high", v1=True, metadata={"a2ad": {"priority": "critical", "ttl_seconds": 90}}),
        headers=V1,
    )
    plain = await queued_item(a2ad, send_body("plain", metadata={"other": {"x": 1}}))
    assert (low["priority"], high["priority"], plain["priority"]) == ("info", "critical", "task")
    assert ttl_of(high) == 90
    assert ttl_of(low) == 300  # info's own TTL (queue.info_ttl_seconds)
    assert ttl_of(plain) == 86_400  # queue.max_age_seconds
    status, data = await post(a2ad, send_body("now", metadata={"a2ad": {"queue": "never"}}))
    assert status == 503, data
    assert data["error"]["data"]["code"] == "queue_full"
    await heartbeat(a2ad, active=0)
    for item in (high, plain, low):
        assert (await a2ad.final(item["id"]))["state"] == "delivered"
    assert [r.text for r in agent.received] == ["high", "plain", "low"]
    # The request reached the agent as it came, metadata included.
    assert agent.received[0].body["params"]["metadata"]["a2ad"]["priority"] == "critical"


async def test_headers_win_over_metadata(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([full_ws(agent)], clock=ManualClock())
    await heartbeat(a2ad, active=1)
    metadata = {"a2ad": {"priority": "critical", "ttl_seconds": 600, "queue": "never"}}
    headers = {"A2AD-Priority": "info", "A2AD-TTL": "60", "A2AD-Queue": "allow"}
    item = await queued_item(a2ad, send_body("m", metadata=metadata), headers=headers)
    assert item["priority"] == "info"
    assert ttl_of(item) == 60
    # Each header wins for its own option only; the others still come from metadata.
    item = await queued_item(
        a2ad, send_body("n", metadata={"a2ad": {"ttl_seconds": 45}}), {"A2AD-Priority": "critical"}
    )
    assert (item["priority"], ttl_of(item)) == ("critical", 45)
    status, data = await post(
        a2ad, send_body("o", metadata={"a2ad": {"queue": "allow"}}), {"A2AD-Queue": "never"}
    )
    assert status == 503 and data["error"]["data"]["code"] == "queue_full"


@pytest.mark.parametrize("full", [False, True], ids=["free-slot", "no-slot"])
@pytest.mark.parametrize(
    ("options", "key", "allowed"),
    [
        ({"priority": "urgent"}, "params.metadata.a2ad.priority", "critical, task, info"),
        ({"priority": 100}, "params.metadata.a2ad.priority", "critical, task, info"),
        ({"ttl_seconds": 0}, "params.metadata.a2ad.ttl_seconds", "above 0"),
        ({"ttl_seconds": "60"}, "params.metadata.a2ad.ttl_seconds", "above 0"),
        ({"ttl_seconds": True}, "params.metadata.a2ad.ttl_seconds", "above 0"),
        ({"queue": "sometimes"}, "params.metadata.a2ad.queue", "never or allow"),
        ({"ttl": 60}, "params.metadata.a2ad", "priority, ttl_seconds, queue"),
        ("critical", "params.metadata.a2ad", "priority, ttl_seconds, queue"),
    ],
)
async def test_a_bad_metadata_option_is_invalid_params(
    agent_factory: AgentFactory,
    a2ad_factory: A2adFactory,
    full: bool,
    options: Any,
    key: str,
    allowed: str,
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([full_ws(agent)], clock=ManualClock())
    await heartbeat(a2ad, active=1 if full else 0)
    status, data = await post(a2ad, send_body("x", metadata={"a2ad": options}))
    assert status == 200, data
    assert data["id"] == 1 and "result" not in data
    error = data["error"]
    assert error["code"] == -32602 and error["data"]["code"] == "invalid_params"
    assert key in error["message"] and allowed in error["message"]
    assert agent.received == []
    assert await a2ad.daemon.store.counts() == {}
