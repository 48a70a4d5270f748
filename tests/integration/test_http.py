"""Tokens, bad input and the operator endpoints, as a client sees them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fakes import A2ad, FakeAgent, jsonrpc_task, wait_until

from a2ad.clock import ManualClock

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]

ADMIN = {"Authorization": "Bearer admin-secret"}
PLANNER = {"Authorization": "Bearer planner-secret"}
WRITER = {"Authorization": "Bearer writer-secret"}
HEARTBEAT = {"Authorization": "Bearer hb-secret"}
AUTH = {
    "admin_token": "admin-secret",
    "callers": [
        {"name": "planner", "token": "planner-secret"},
        {"name": "writer", "token": "writer-secret"},
    ],
}
SEND = {
    "jsonrpc": "2.0",
    "id": 3,
    "method": "message/send",
    "params": {
        "message": {
            "messageId": "m-send",
            "role": "user",
            "parts": [{"kind": "text", "text": "x"}],
        },
        "configuration": {"blocking": False},
    },
}


async def secured(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, **agent_args: Any
) -> tuple[FakeAgent, A2ad]:
    agent = await agent_factory(**agent_args)
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "token": "hb-secret"}], auth=AUTH, clock=ManualClock()
    )
    return agent, a2ad


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer nope"}, 401, "unauthorized"),
        ({"Authorization": "Basic cGxhbm5lcg=="}, 401, "unauthorized"),
        (ADMIN, 403, "forbidden"),
        (HEARTBEAT, 403, "forbidden"),
    ],
)
async def test_proxy_tokens(
    agent_factory: AgentFactory,
    a2ad_factory: A2adFactory,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    agent, a2ad = await secured(agent_factory, a2ad_factory)
    resp = await a2ad.client.post("/workspaces/w/a2a", json=SEND, headers=headers)
    assert resp.status == status
    data = await resp.json()
    # A JSON-RPC error body on the proxy path; the token is checked before the
    # body is read, so the id is not known yet.
    assert data["jsonrpc"] == "2.0" and data["id"] is None
    assert data["error"]["data"]["code"] == code
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "secret" not in await resp.text()
    assert agent.received == []
    assert await a2ad.daemon.store.counts() == {}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 401),
        (PLANNER, 403),
        (ADMIN, 403),
        ({"Authorization": "Bearer other-hb"}, 403),
    ],
)
async def test_heartbeat_tokens(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, headers: dict[str, str], status: int
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory(
        [
            {"id": "w", "url": agent.url, "token": "hb-secret"},
            {"id": "v", "url": agent.url, "token": "other-hb"},
        ],
        auth=AUTH,
    )
    resp = await a2ad.client.post(
        "/workspaces/w/heartbeat", json={"active_tasks": 0}, headers=headers
    )
    assert resp.status == status
    info = await (await a2ad.client.get("/workspaces/w", headers=ADMIN)).json()
    assert info["state"] == "unknown"  # nothing changed


@pytest.mark.parametrize("path", ["/workspaces", "/workspaces/w", "/workspaces/w/queue"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer x"}, 401),
        (PLANNER, 403),
        (HEARTBEAT, 403),
        (ADMIN, 200),
    ],
)
async def test_operator_tokens(
    agent_factory: AgentFactory,
    a2ad_factory: A2adFactory,
    path: str,
    headers: dict[str, str],
    status: int,
) -> None:
    _, a2ad = await secured(agent_factory, a2ad_factory)
    resp = await a2ad.client.get(path, headers=headers)
    assert resp.status == status
    if status != 200:
        assert (await resp.json())["error"]["code"] in ("unauthorized", "forbidden")


async def test_a_caller_sees_only_its_own_items(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad = await secured(agent_factory, a2ad_factory)
    agent.script = [(503, {}, {})]
    resp = await a2ad.client.post("/workspaces/w/a2a", json=SEND, headers=PLANNER)
    assert resp.status == 202
    qid = jsonrpc_task(await resp.json())["id"]
    own = await a2ad.client.get(f"/queue/{qid}", headers=PLANNER)
    assert own.status == 200 and (await own.json())["caller"] == "planner"
    other = await a2ad.client.get(f"/queue/{qid}", headers=WRITER)
    assert other.status == 404 and (await other.json())["error"]["code"] == "not_found"
    assert (await a2ad.client.get(f"/queue/{qid}", headers=ADMIN)).status == 200
    assert (await a2ad.client.get(f"/queue/{qid}", headers=HEARTBEAT)).status == 403
    get = {"jsonrpc": "2.0", "id": 9, "method": "tasks/get", "params": {"id": qid}}
    resp = await a2ad.client.post("/workspaces/w/a2a", json=get, headers=WRITER)
    assert (await resp.json())["error"]["code"] == -32001
    resp = await a2ad.client.post("/workspaces/w/a2a", json=get, headers=PLANNER)
    assert (await resp.json())["result"]["id"] == qid


# SPEC, Errors: on the proxy path a JSON-RPC-level error is HTTP 200, the error in
# the body, as the agent and the a2a-sdk answer.
@pytest.mark.parametrize(
    ("body", "status", "rpc_code", "code"),
    [
        (b"{not json", 200, -32700, "parse_error"),
        (b"", 200, -32700, "parse_error"),
        # JSON, but in UTF-16: RFC 8259 wants UTF-8 on the wire.
        (
            '{"jsonrpc": "2.0", "id": 1, "method": "message/send"}'.encode("utf-16"),
            200,
            -32700,
            "parse_error",
        ),
        (b"[1, 2]", 200, -32600, "invalid_request"),
        (b'{"jsonrpc": "1.0", "method": "x", "id": 1}', 200, -32600, "invalid_request"),
        (b'{"jsonrpc": "2.0", "id": 1}', 200, -32600, "invalid_request"),
        (b'{"jsonrpc": "2.0", "id": {}, "method": "x"}', 200, -32600, "invalid_request"),
        (
            b'{"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": []}',
            200,
            -32600,
            "invalid_request",
        ),
        (
            b'{"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {}}',
            200,
            -32602,
            "invalid_params",
        ),
    ],
)
async def test_bad_requests_get_json_rpc_errors_and_store_nothing(
    agent_factory: AgentFactory,
    a2ad_factory: A2adFactory,
    body: bytes,
    status: int,
    rpc_code: int,
    code: str,
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([{"id": "w", "url": agent.url, "heartbeat": False}])
    resp = await a2ad.client.post(
        "/workspaces/w/a2a", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == status
    data = await resp.json()
    assert data["jsonrpc"] == "2.0"
    assert data["error"]["code"] == rpc_code and data["error"]["data"]["code"] == code
    assert "Traceback" not in await resp.text()
    assert agent.received == [] and await a2ad.daemon.store.counts() == {}


async def test_the_request_id_is_echoed_in_errors(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([{"id": "w", "url": agent.url, "heartbeat": False}])
    resp = await a2ad.client.post(
        "/workspaces/w/a2a", json={"jsonrpc": "2.0", "id": "r-1", "method": "message/send"}
    )
    assert (await resp.json())["id"] == "r-1"


async def test_unknown_workspace_body_too_large_bad_header(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "heartbeat": False}], server={"max_body_bytes": 1000}
    )
    resp = await a2ad.client.post("/workspaces/nope/a2a", json=SEND)
    assert resp.status == 404
    assert (await resp.json())["error"]["data"]["code"] == "unknown_workspace"
    resp = await a2ad.client.get("/workspaces/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_workspace"
    big = {
        **SEND,
        "params": {"message": {"role": "user", "parts": [{"kind": "text", "text": "x" * 2000}]}},
    }
    resp = await a2ad.client.post("/workspaces/w/a2a", json=big)
    assert resp.status == 413
    assert (await resp.json())["error"]["data"]["code"] == "body_too_large"
    for header, value in (
        ("A2AD-Priority", "urgent"),
        ("A2AD-TTL", "-1"),
        ("A2AD-TTL", "soon"),
        ("A2AD-Queue", "maybe"),
    ):
        resp = await a2ad.client.post("/workspaces/w/a2a", json=SEND, headers={header: value})
        assert resp.status == 400, header
        error = (await resp.json())["error"]
        assert error["data"]["code"] == "invalid_header" and header in error["message"]
    resp = await a2ad.client.post(
        "/workspaces/w/a2a", json=SEND, headers={"A2AD-Priority": "urgent"}
    )
    assert "critical, task, info" in (await resp.json())["error"]["message"]
    assert agent.received == [] and await a2ad.daemon.store.counts() == {}


async def test_unknown_paths_and_methods_are_json_errors(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([{"id": "w", "url": agent.url, "heartbeat": False}])
    resp = await a2ad.client.get("/nothing/here")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    assert resp.headers["X-Request-Id"]
    resp = await a2ad.client.delete("/healthz")
    assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"
    assert (await resp.json())["error"]["message"] == "DELETE is not allowed here; use GET, HEAD"
    resp = await a2ad.client.get("/workspaces/w/a2a")
    assert resp.status == 405 and "use POST" in (await resp.json())["error"]["message"]
    assert (await a2ad.client.head("/healthz")).status == 200
    resp = await a2ad.client.get("/queue/q-nothing")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await a2ad.client.get("/queue/x", params={"wait": "forever"})
    assert resp.status == 400


@pytest.mark.parametrize(
    "body",
    [
        b"nope",
        b"[]",
        b'{"active_tasks": -1}',
        b'{"active_tasks": "1"}',
        b'{"active_tasks": true}',
        b'{"active_tasks": 1, "max_concurrent_tasks": 0}',
        b'{"active_tasks": 1, "x": 1}',
        b"{}",
    ],
)
async def test_bad_heartbeats(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, body: bytes
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([{"id": "w", "url": agent.url, "token": "hb-secret"}])
    resp = await a2ad.client.post("/workspaces/w/heartbeat", data=body, headers=HEARTBEAT)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] in ("parse_error", "invalid_body")
    assert a2ad.daemon.registry.get("w").heartbeat is None


async def test_health_readiness_and_workspace_views(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    agent.script = [(503, {}, {})]
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "heartbeat": False}], clock=ManualClock()
    )
    assert (await (await a2ad.client.get("/healthz")).json()) == {"status": "ok"}
    assert (await (await a2ad.client.get("/readyz")).json()) == {"status": "ready"}
    _, data = await a2ad.send("w", "one")
    _, _ = await a2ad.send("w", "two")
    listing = await (await a2ad.client.get("/workspaces")).json()
    (view,) = listing["workspaces"]
    assert view["id"] == "w" and view["state"] == "online"
    assert view["queue"]["queued"] == 2 and view["capacity"] == 1
    assert view["paused_until"] is not None and view["last_sign_of_life_age_seconds"] == 0
    page = await (await a2ad.client.get("/workspaces/w/queue", params={"limit": "1"})).json()
    assert len(page["items"]) == 1 and page["next"] is not None
    assert "body" not in page["items"][0]
    rest = await (
        await a2ad.client.get("/workspaces/w/queue", params={"after": page["next"], "bodies": "1"})
    ).json()
    assert rest["next"] is None and rest["items"][0]["body"]["params"]["message"]
    item = await a2ad.item(jsonrpc_task(data)["id"])
    assert set(item) >= {
        "id",
        "workspace",
        "state",
        "priority",
        "attempts",
        "busy_answers",
        "caller",
        "enqueued_at",
        "not_before",
        "expires_at",
        "last_error",
        "result",
    }
    assert item["priority"] == "task" and item["enqueued_at"].endswith("Z")
    resp = await a2ad.client.get("/workspaces/w/queue", params={"state": "weird"})
    assert resp.status == 400


async def test_an_item_of_a_removed_workspace_is_not_retried(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """Its workspace is gone: a retry would queue it where no pump serves it (or,
    were the id registered again, send it to another URL)."""
    agent = await agent_factory()
    a2ad = await a2ad_factory([], queue={"max_attempts": 1})
    resp = await a2ad.client.put("/workspaces/rt", json={"url": agent.url, "heartbeat": False})
    assert resp.status == 201
    agent.script = [(503, {"error": "busy"}, {"Retry-After": "0"}), (502, {"error": "x"}, {})]
    status, data = await a2ad.send("rt", "x")
    assert status == 202, data
    qid = data["result"]["id"]
    assert (await a2ad.final(qid))["state"] == "failed"
    # The store may show the outcome a moment before the delivery's own task has
    # counted it (the reader sees the commit first); DELETE goes by those counts.
    ws = a2ad.daemon.registry.get("rt")
    await wait_until(lambda: ws.queued_total + ws.dispatching == 0)
    resp = await a2ad.client.delete("/workspaces/rt")
    assert resp.status == 200, await resp.text()
    resp = await a2ad.client.post(f"/queue/{qid}/retry")
    assert resp.status == 409
    assert "gone" in (await resp.json())["error"]["message"]
