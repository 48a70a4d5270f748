"""Every endpoint against every kind of credential (SPEC, HTTP API: Auth and Errors).

One a2ad with auth on: an admin token, two callers (planner, writer) and a
heartbeat token per workspace. For each endpoint and each credential the test
checks the status and the stable error code SPEC names, that no token comes back
in a body or a header (or reaches the agent, or the log), and that a refused
request changed nothing an operator can see."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import A2ad, jsonrpc_task

from a2ad.clock import ManualClock

# Both stores for what reaches the store: an allowed request, a caller's own items.
# Refusals come before any store access: those run on SQLite only.
BOTH_STORES = True

A2adFactory = Callable[..., Awaitable[A2ad]]

# Distinctive tokens, so a leak shows up as a plain substring anywhere.
TOKENS = {
    "admin": "tok-admin-4c1d9e0b7a",
    "planner": "tok-planner-8f2a61c3d5",
    "writer": "tok-writer-07be5d9a41",
    "heartbeat": "tok-hb-w-5e7c20a9f3",  # workspace w's heartbeat token
    "other_heartbeat": "tok-hb-v-93d1f4b6e8",  # workspace v's
    "wrong": "tok-wrong-6a0c3e8b12",  # nobody's
}
NEW_WORKSPACE_TOKEN = "tok-hb-new-2d8e6f1c04"  # sent in a PUT body; never shown back
SECRETS = [*TOKENS.values(), NEW_WORKSPACE_TOKEN]
AUTH = {
    "admin_token": TOKENS["admin"],
    "callers": [
        {"name": "planner", "token": TOKENS["planner"]},
        {"name": "writer", "token": TOKENS["writer"]},
    ],
}
CREDENTIALS = ["none", "wrong", "planner", "writer", "admin", "heartbeat", "other_heartbeat"]
ADMIN = {"Authorization": f"Bearer {TOKENS['admin']}"}
PLANNER = {"Authorization": f"Bearer {TOKENS['planner']}"}
WRITER = {"Authorization": f"Bearer {TOKENS['writer']}"}
HB_W = {"Authorization": f"Bearer {TOKENS['heartbeat']}"}


def auth_header(credential: str) -> dict[str, str]:
    if credential == "none":
        return {}
    return {"Authorization": f"Bearer {TOKENS[credential]}"}


def rpc(method: str, params: dict[str, Any], rpc_id: Any = 11) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}).encode()


def send_body(text: str, rpc_id: Any = 11) -> bytes:
    """A send whose caller does not wait (a queued one is answered 202 at once)."""
    message = {
        "messageId": f"m-{uuid.uuid4().hex}",
        "role": "user",
        "parts": [{"kind": "text", "text": text}],
    }
    return rpc("message/send", {"message": message, "configuration": {"blocking": False}}, rpc_id)


# -- a real agent -----------------------------------------------------------------

CARD = {
    "name": "auth-matrix agent",
    "url": "http://agent.invalid/",
    "version": "1",
    "protocolVersion": "0.3.0",
    "preferredTransport": "JSONRPC",
    "capabilities": {},
    "defaultInputModes": ["text/plain"],
    "defaultOutputModes": ["text/plain"],
    "skills": [],
}


@dataclass
class Agent:
    """An A2A agent on a real aiohttp server: answers a message send with a Message,
    any other method with JSON-RPC "method not found", serves its card, and keeps
    every request it got (headers and body) so the tests can look for tokens."""

    url: str = ""
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle_rpc(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append((dict(request.headers), raw))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        rpc_id = body.get("id") if isinstance(body, dict) else None
        if isinstance(body, dict) and body.get("method") in ("message/send", "SendMessage"):
            message = {
                "kind": "message",
                "messageId": f"m-{len(self.requests)}",
                "role": "agent",
                "parts": [{"kind": "text", "text": "done"}],
            }
            return web.json_response({"jsonrpc": "2.0", "id": rpc_id, "result": message})
        error = {"code": -32601, "message": "method not found"}
        return web.json_response({"jsonrpc": "2.0", "id": rpc_id, "error": error})

    async def handle_card(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), b""))
        return web.json_response(CARD)


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    agent = Agent()
    app = web.Application()
    app.router.add_post("/", agent.handle_rpc)
    app.router.add_get("/.well-known/agent-card.json", agent.handle_card)
    app.router.add_get("/.well-known/agent.json", agent.handle_card)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    agent.url = str(server.make_url("/"))
    yield agent
    await server.close()


# -- the world every row starts from ------------------------------------------------


@dataclass
class World:
    """Workspace w is busy (its heartbeat holds the one slot), so sends to it queue;
    v is free, so sends to it go straight to the agent; rt was added at run time.
    planner owns one queued item and one expired item on w."""

    a2ad: A2ad
    agent: Agent
    clock: ManualClock
    queued: str
    expired: str


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


async def request(
    a2ad: A2ad,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    all_headers = dict(headers or {})
    if body is not None:
        all_headers.setdefault("Content-Type", "application/json")
    async with a2ad.client.request(method, path, data=body, headers=all_headers) as resp:
        # A queue item's stream ends when the item is final; the rows only
        # subscribe to final items, so reading to the end is bounded.
        async with asyncio.timeout(10):
            raw = await resp.read()
        return Reply(resp.status, dict(resp.headers), raw)


async def admin_json(a2ad: A2ad, path: str) -> Any:
    reply = await request(a2ad, "GET", path, headers=ADMIN)
    assert reply.status == 200, reply.text
    return reply.json


async def move_clock(clock: ManualClock, seconds: float) -> None:
    """Move the manual clock a second at a time, letting the loops due at each step run."""
    while seconds > 0:
        step = min(1.0, seconds)
        await clock.advance(step)
        seconds -= step
        for _ in range(3):
            await asyncio.sleep(0.005)


async def item_state(a2ad: A2ad, qid: str) -> str:
    state: str = (await admin_json(a2ad, f"/queue/{qid}"))["state"]
    return state


async def build_world(a2ad_factory: A2adFactory, agent: Agent) -> World:
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [
            {"id": "w", "url": agent.url, "token": TOKENS["heartbeat"]},
            {"id": "v", "url": agent.url, "token": TOKENS["other_heartbeat"]},
        ],
        clock=clock,
        auth=AUTH,
    )
    reply = await request(
        a2ad, "POST", "/workspaces/w/heartbeat", body=b'{"active_tasks": 1}', headers=HB_W
    )
    assert reply.status == 200, reply.text
    reply = await request(
        a2ad,
        "PUT",
        "/workspaces/rt",
        body=json.dumps({"url": agent.url, "heartbeat": False}).encode(),
        headers=ADMIN,
    )
    assert reply.status == 201, reply.text
    reply = await request(
        a2ad, "POST", "/workspaces/w/a2a", body=send_body("stays queued"), headers=PLANNER
    )
    assert reply.status == 202, reply.text
    queued = jsonrpc_task(reply.json)["id"]
    reply = await request(
        a2ad,
        "POST",
        "/workspaces/w/a2a",
        body=send_body("expires"),
        headers={**PLANNER, "A2AD-TTL": "1"},
    )
    assert reply.status == 202, reply.text
    expired = jsonrpc_task(reply.json)["id"]
    await move_clock(clock, 2.0)
    async with asyncio.timeout(5):
        while await item_state(a2ad, expired) != "expired":  # noqa: ASYNC110 - no event to await
            await asyncio.sleep(0.005)
    assert agent.requests == []
    return World(a2ad, agent, clock, queued, expired)


@pytest.fixture
async def world(a2ad_factory: A2adFactory, agent: Agent) -> World:
    return await build_world(a2ad_factory, agent)


async def snapshot(world: World) -> dict[str, Any]:
    """What an operator can see: every workspace's view and every item with its body
    and result, and what the agent has been sent. The clock stands still, so two
    snapshots of an unchanged a2ad are equal."""
    a2ad = world.a2ad
    workspaces = await admin_json(a2ad, "/workspaces")
    queues = {
        ws["id"]: await admin_json(a2ad, f"/workspaces/{ws['id']}/queue?bodies=1&limit=1000")
        for ws in workspaces["workspaces"]
    }
    return {"workspaces": workspaces, "queues": queues, "agent": len(world.agent.requests)}


# -- what each row expects ------------------------------------------------------------

# Who may use an endpoint:
#   open    - no token needed; any Authorization header is ignored
#   caller  - a caller token (the proxy)
#   owner   - a caller token, and only the caller that sent the item sees it
#   hb      - workspace w's own heartbeat token
#   admin   - the admin token
#   reader  - the admin token, or the caller that sent the item
UNAUTHORIZED = (401, "unauthorized")
FORBIDDEN = (403, "forbidden")


def _refusals(**others: tuple[int, str]) -> dict[str, tuple[int, str]]:
    return {"none": UNAUTHORIZED, "wrong": UNAUTHORIZED, **others}


REFUSED_BY_KIND: dict[str, dict[str, tuple[int, str]]] = {
    "open": {},
    "caller": _refusals(admin=FORBIDDEN, heartbeat=FORBIDDEN, other_heartbeat=FORBIDDEN),
    "owner": _refusals(admin=FORBIDDEN, heartbeat=FORBIDDEN, other_heartbeat=FORBIDDEN),
    "hb": _refusals(
        admin=FORBIDDEN, planner=FORBIDDEN, writer=FORBIDDEN, other_heartbeat=FORBIDDEN
    ),
    "admin": _refusals(
        planner=FORBIDDEN, writer=FORBIDDEN, heartbeat=FORBIDDEN, other_heartbeat=FORBIDDEN
    ),
    "reader": _refusals(
        # Another caller's item: exactly as if it did not exist.
        writer=(404, "not_found"),
        heartbeat=FORBIDDEN,
        other_heartbeat=FORBIDDEN,
    ),
}


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str  # {queued} and {expired} stand for planner's items
    kind: str
    ok: int  # the status of an allowed request
    body: bytes | None = None

    @property
    def rpc(self) -> bool:
        return self.method == "POST" and self.path.endswith("/a2a")

    def url(self, world: World) -> str:
        return self.path.format(queued=world.queued, expired=world.expired)

    def body_for(self, world: World) -> bytes | None:
        if self.body is None:
            return None
        return self.body.replace(b"{queued}", world.queued.encode()).replace(
            b"{expired}", world.expired.encode()
        )


HEARTBEAT_BODY = b'{"active_tasks": 0, "max_concurrent_tasks": 5}'
PUT_BODY = json.dumps(
    {"url": "{agent}", "heartbeat": True, "token": NEW_WORKSPACE_TOKEN, "max_concurrent": 2}
).encode()
ENDPOINTS = [
    Endpoint("healthz", "GET", "/healthz", "open", 200),
    Endpoint("readyz", "GET", "/readyz", "open", 200),
    Endpoint("card", "GET", "/workspaces/v/a2a/.well-known/agent-card.json", "open", 200),
    Endpoint("legacy card", "GET", "/workspaces/v/a2a/.well-known/agent.json", "open", 200),
    Endpoint("send, direct", "POST", "/workspaces/v/a2a", "caller", 200, send_body("hi")),
    Endpoint("send, queued", "POST", "/workspaces/w/a2a", "caller", 202, send_body("hi")),
    Endpoint(
        "forwarded method",
        "POST",
        "/workspaces/v/a2a",
        "caller",
        200,
        rpc("tasks/get", {"id": "agent-task-1"}),
    ),
    Endpoint(
        "GetTask", "POST", "/workspaces/w/a2a", "owner", 200, rpc("tasks/get", {"id": "{queued}"})
    ),
    Endpoint(
        "CancelTask",
        "POST",
        "/workspaces/w/a2a",
        "owner",
        200,
        rpc("tasks/cancel", {"id": "{queued}"}),
    ),
    Endpoint(
        "SubscribeToTask",
        "POST",
        "/workspaces/w/a2a",
        "owner",
        200,
        rpc("tasks/resubscribe", {"id": "{expired}"}),
    ),
    Endpoint("heartbeat", "POST", "/workspaces/w/heartbeat", "hb", 200, HEARTBEAT_BODY),
    Endpoint("list workspaces", "GET", "/workspaces", "admin", 200),
    Endpoint("get workspace", "GET", "/workspaces/w", "admin", 200),
    Endpoint("put workspace", "PUT", "/workspaces/added", "admin", 201, PUT_BODY),
    Endpoint("delete workspace", "DELETE", "/workspaces/rt", "admin", 200),
    Endpoint("reset workspace", "POST", "/workspaces/w/reset", "admin", 200),
    Endpoint("list queue", "GET", "/workspaces/w/queue", "admin", 200),
    Endpoint("get item", "GET", "/queue/{queued}", "reader", 200),
    Endpoint("delete item", "DELETE", "/queue/{queued}", "admin", 200),
    Endpoint("retry item", "POST", "/queue/{expired}/retry", "admin", 200),
    Endpoint("metrics", "GET", "/metrics", "admin", 200),
]
ALLOWED = {
    "open": set(CREDENTIALS),
    "caller": {"planner", "writer"},
    "owner": {"planner"},
    "hb": {"heartbeat"},
    "admin": {"admin"},
    "reader": {"admin", "planner"},
}


def expected(endpoint: Endpoint, credential: str) -> tuple[int, str | None]:
    if credential in ALLOWED[endpoint.kind]:
        return endpoint.ok, None
    if endpoint.kind == "owner" and credential == "writer":
        return 200, "task_not_found"  # an A2A error, answered as A2A does: HTTP 200
    return REFUSED_BY_KIND[endpoint.kind][credential]


def assert_no_secret(reply: Reply) -> None:
    for secret in SECRETS:
        assert secret not in reply.text, f"a token is in the body: {reply.text[:300]}"
        for name, value in reply.headers.items():
            assert secret not in value, f"a token is in the {name} header"


def assert_error(reply: Reply, status: int, code: str, *, rpc: bool) -> None:
    """SPEC's error shape: {"error": {"code", "message"}}, or on the proxy path a
    JSON-RPC error object with the same name in error.data.code."""
    assert reply.status == status, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    data = reply.json
    if rpc:
        assert data["jsonrpc"] == "2.0" and "id" in data and "result" not in data
        assert isinstance(data["error"]["code"], int)
        assert isinstance(data["error"]["message"], str)
        assert data["error"]["data"]["code"] == code
    else:
        assert set(data) == {"error"}
        assert data["error"]["code"] == code and isinstance(data["error"]["message"], str)
    if status == 401:
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Traceback" not in reply.text


async def check_allowed(world: World, endpoint: Endpoint, credential: str, reply: Reply) -> None:
    """What an allowed request does, as its caller and the operator see it."""
    a2ad = world.a2ad
    assert reply.status == endpoint.ok, reply.text
    if endpoint.name in ("healthz", "readyz"):
        assert reply.json["status"] in ("ok", "ready")
    elif endpoint.name.endswith("card"):
        assert reply.json["name"] == CARD["name"]
        assert reply.json["url"].endswith("/workspaces/v/a2a")
    elif endpoint.name == "send, direct":
        assert reply.json["result"]["parts"][0]["text"] == "done"
    elif endpoint.name == "send, queued":
        item = await admin_json(a2ad, f"/queue/{jsonrpc_task(reply.json)['id']}")
        assert item["state"] == "queued" and item["caller"] == credential
    elif endpoint.name == "forwarded method":
        assert reply.json["error"]["code"] == -32601  # the agent's own answer
    elif endpoint.name == "GetTask":
        assert reply.json["result"]["id"] == world.queued
    elif endpoint.name == "CancelTask":
        assert reply.json["result"]["status"]["state"] == "canceled"
        assert await item_state(a2ad, world.queued) == "cancelled"
    elif endpoint.name == "SubscribeToTask":
        # The item is expired: a task already terminal is the specification's
        # UnsupportedOperationError (-32004), not a stream.
        assert reply.json["error"]["code"] == -32004, reply.text
        assert reply.json["error"]["data"]["code"] == "unsupported_operation"
        assert world.expired in reply.text
    elif endpoint.name == "heartbeat":
        assert reply.json == {"queue_depth": 1}
    elif endpoint.name == "put workspace":
        assert reply.json["id"] == "added" and reply.json["capacity"] == 2
        await admin_json(a2ad, "/workspaces/added")
    elif endpoint.name == "delete workspace":
        assert reply.json["deleted"] is True
        gone = await request(a2ad, "GET", "/workspaces/rt", headers=ADMIN)
        assert gone.status == 404
    elif endpoint.name == "reset workspace":
        assert reply.json["state"] in ("unknown", "online")  # left failed; may deliver at once
    elif endpoint.name == "get item":
        assert reply.json["id"] == world.queued and reply.json["caller"] == "planner"
    elif endpoint.name == "delete item":
        assert reply.json == {"id": world.queued, "state": "cancelled"}
    elif endpoint.name == "retry item":
        assert reply.json["state"] == "queued"
    elif endpoint.name == "metrics":
        assert reply.headers["Content-Type"].startswith("text/plain")


def build_request(world: World, endpoint: Endpoint) -> tuple[str, bytes | None]:
    body = endpoint.body_for(world)
    if body is not None:
        body = body.replace(b"{agent}", world.agent.url.encode())
    return endpoint.url(world), body


def reaches_the_store(endpoint: Endpoint, credential: str) -> bool:
    """An allowed request (once for an open endpoint), or an owner lookup by another
    caller: what a refusal never gets to."""
    if endpoint.kind == "open":
        return credential == "none"
    return credential in ALLOWED[endpoint.kind] or expected(endpoint, credential)[1] == (
        "task_not_found"
    )


STORE_CASES = [(e, c) for e in ENDPOINTS for c in CREDENTIALS if reaches_the_store(e, c)]


@pytest.mark.sqlite_only  # store-independent, mostly: the store's cases run on both below
@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
async def test_every_endpoint_with_every_credential(
    world: World, endpoint: Endpoint, credential: str, caplog: pytest.LogCaptureFixture
) -> None:
    await check_endpoint(world, endpoint, credential, caplog)


@pytest.mark.parametrize("store_kind", ["postgres"])
@pytest.mark.parametrize(
    ("endpoint", "credential"), STORE_CASES, ids=[f"{e.name}-{c}" for e, c in STORE_CASES]
)
async def test_every_endpoint_with_the_credentials_that_reach_the_store(
    world: World, endpoint: Endpoint, credential: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The matrix's cases that read or write the store, on PostgreSQL (on SQLite the
    matrix above has them)."""
    await check_endpoint(world, endpoint, credential, caplog)


async def check_endpoint(
    world: World, endpoint: Endpoint, credential: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path, body = build_request(world, endpoint)
    before = await snapshot(world)
    reply = await request(
        world.a2ad,
        endpoint.method,
        path,
        body=body,
        headers=auth_header(credential),
    )
    assert_no_secret(reply)
    status, code = expected(endpoint, credential)
    if code == "task_not_found":
        # Another caller's queue id is unknown to this caller: TaskNotFound.
        assert reply.status == 200, reply.text
        assert reply.json["error"]["code"] == -32001 and "result" not in reply.json
        assert await snapshot(world) == before
    elif code is not None:
        assert_error(reply, status, code, rpc=endpoint.rpc)
        assert await snapshot(world) == before
    else:
        await check_allowed(world, endpoint, credential, reply)
    for headers, raw in world.agent.requests:
        for secret in SECRETS:
            assert secret not in raw.decode(errors="replace")
            assert all(secret not in v for v in headers.values()), "a token reached the agent"
    for record in caplog.records:
        for secret in SECRETS:
            assert secret not in record.getMessage(), f"a token is in the log: {record.name}"


# -- refusals come before lookups ------------------------------------------------------

UNKNOWN_QID = "q-" + "0" * 32
LOOKUPS = [
    Endpoint("send", "POST", "/workspaces/nope/a2a", "caller", 404, send_body("hi")),
    Endpoint(
        "GetTask", "POST", "/workspaces/w/a2a", "owner", 200, rpc("tasks/get", {"id": UNKNOWN_QID})
    ),
    Endpoint("card", "GET", "/workspaces/nope/a2a/.well-known/agent-card.json", "open", 404),
    Endpoint("heartbeat", "POST", "/workspaces/nope/heartbeat", "hb", 404, HEARTBEAT_BODY),
    Endpoint("get workspace", "GET", "/workspaces/nope", "admin", 404),
    Endpoint("delete workspace", "DELETE", "/workspaces/nope", "admin", 404),
    Endpoint("reset workspace", "POST", "/workspaces/nope/reset", "admin", 404),
    Endpoint("list queue", "GET", "/workspaces/nope/queue", "admin", 404),
    Endpoint("get item", "GET", f"/queue/{UNKNOWN_QID}", "reader", 404),
    Endpoint("delete item", "DELETE", f"/queue/{UNKNOWN_QID}", "admin", 404),
    Endpoint("retry item", "POST", f"/queue/{UNKNOWN_QID}/retry", "admin", 404),
]


@pytest.mark.sqlite_only  # store-independent: refusals come before lookups
@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("endpoint", LOOKUPS, ids=lambda e: e.name)
async def test_unknown_ids_tell_nothing_to_a_refused_credential(
    world: World, endpoint: Endpoint, credential: str
) -> None:
    """Without the right token an unknown workspace or item is refused exactly as a
    known one is, so a refusal never tells what exists; with it, 404."""
    before = await snapshot(world)
    reply = await request(
        world.a2ad,
        endpoint.method,
        endpoint.path,
        body=endpoint.body,
        headers=auth_header(credential),
    )
    assert_no_secret(reply)
    status, code = expected_for_unknown(endpoint, credential)
    if code == "task_not_found":
        assert reply.status == 200 and reply.json["error"]["code"] == -32001, reply.text
    else:
        assert_error(reply, status, code, rpc=endpoint.rpc)
    assert await snapshot(world) == before


def expected_for_unknown(endpoint: Endpoint, credential: str) -> tuple[int, str]:
    if endpoint.kind == "owner" and credential in ("planner", "writer"):
        return 200, "task_not_found"
    if endpoint.kind == "hb" and credential == "heartbeat":
        return FORBIDDEN  # w's token, on another workspace's heartbeat
    if credential in ALLOWED[endpoint.kind]:
        return 404, "not_found" if endpoint.path.startswith("/queue/") else "unknown_workspace"
    return REFUSED_BY_KIND[endpoint.kind][credential]


async def test_another_callers_item_reads_exactly_like_no_item(world: World) -> None:
    """writer asking for planner's item gets the same answer as for an id that was
    never used, apart from the id itself: GET /queue/{qid} and the A2A task methods."""
    a2ad = world.a2ad
    for qid in (world.queued, world.expired):
        theirs = await request(a2ad, "GET", f"/queue/{qid}", headers=WRITER)
        nobodys = await request(a2ad, "GET", f"/queue/{UNKNOWN_QID}", headers=WRITER)
        assert theirs.status == nobodys.status == 404
        assert theirs.text.replace(qid, "ID") == nobodys.text.replace(UNKNOWN_QID, "ID")
        for method in ("tasks/get", "tasks/cancel", "tasks/resubscribe", "GetTask", "CancelTask"):
            headers = {**WRITER, "A2A-Version": "1.0"} if method[0].isupper() else WRITER
            theirs = await request(
                a2ad, "POST", "/workspaces/w/a2a", body=rpc(method, {"id": qid}), headers=headers
            )
            nobodys = await request(
                a2ad,
                "POST",
                "/workspaces/w/a2a",
                body=rpc(method, {"id": UNKNOWN_QID}),
                headers=headers,
            )
            assert theirs.status == nobodys.status == 200, method
            assert theirs.json["error"]["code"] == -32001, method
            assert theirs.text.replace(qid, "ID") == nobodys.text.replace(UNKNOWN_QID, "ID")
    assert await item_state(a2ad, world.queued) == "queued"
    assert await item_state(a2ad, world.expired) == "expired"
    # A long poll on a final item answers at once: still not_found.
    waited = await request(a2ad, "GET", f"/queue/{world.expired}?wait=5", headers=WRITER)
    assert waited.status == 404 and waited.json["error"]["code"] == "not_found"


async def test_a_long_poll_on_another_callers_item_answers_like_an_unknown_id(
    a2ad_factory: A2adFactory, agent: Agent
) -> None:
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "token": TOKENS["heartbeat"]}], auth=AUTH
    )  # the real clock: a long poll runs out in real time
    reply = await request(
        a2ad, "POST", "/workspaces/w/heartbeat", body=b'{"active_tasks": 1}', headers=HB_W
    )
    assert reply.status == 200
    reply = await request(a2ad, "POST", "/workspaces/w/a2a", body=send_body("x"), headers=PLANNER)
    assert reply.status == 202
    qid = jsonrpc_task(reply.json)["id"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    nobodys = await request(a2ad, "GET", f"/queue/{UNKNOWN_QID}?wait=1", headers=WRITER)
    assert nobodys.status == 404 and loop.time() - started < 0.5
    started = loop.time()
    theirs = await request(a2ad, "GET", f"/queue/{qid}?wait=1", headers=WRITER)
    assert theirs.status == 404
    assert loop.time() - started < 0.5, "the answer waited for the item: it exists"


async def test_a_messageid_is_each_callers_own(world: World) -> None:
    """Idempotency is keyed on the caller too: writer reusing planner's messageId makes
    its own item and never gets planner's answer."""
    a2ad = world.a2ad
    message = {"role": "user", "messageId": "shared-1", "parts": [{"kind": "text", "text": "a"}]}
    body = rpc("message/send", {"message": message, "configuration": {"blocking": False}})
    first = await request(a2ad, "POST", "/workspaces/w/a2a", body=body, headers=PLANNER)
    again = await request(a2ad, "POST", "/workspaces/w/a2a", body=body, headers=PLANNER)
    other = await request(a2ad, "POST", "/workspaces/w/a2a", body=body, headers=WRITER)
    assert first.status == again.status == other.status == 202
    planners = jsonrpc_task(first.json)["id"]
    assert jsonrpc_task(again.json)["id"] == planners
    writers = jsonrpc_task(other.json)["id"]
    assert writers != planners
    assert (await admin_json(a2ad, f"/queue/{writers}"))["caller"] == "writer"
    mine = await request(a2ad, "GET", f"/queue/{writers}", headers=WRITER)
    assert mine.status == 200
    theirs = await request(a2ad, "GET", f"/queue/{planners}", headers=WRITER)
    assert theirs.status == 404


# -- malformed Authorization headers --------------------------------------------------


@pytest.mark.sqlite_only  # store-independent: the header is refused before any store access
@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("Basic " + "YWRtaW46eA==", 401),
        ("Bearer", 401),
        ("Bearer ", 401),
        (TOKENS["admin"], 401),  # no scheme
        (f"Token {TOKENS['admin']}", 401),
        (f"Bearer {TOKENS['admin'][:-1]}", 401),  # a prefix of the admin token
        (f"Bearer {TOKENS['admin']}x", 401),  # the admin token and more
        (f"Bearer {TOKENS['admin']} {TOKENS['admin']}", 401),
        (f"Bearer {TOKENS['admin'].upper()}", 401),
        (f"bearer {TOKENS['admin']}", 200),  # the scheme is case-insensitive (RFC 7235)
        (f"Bearer   {TOKENS['admin']}  ", 200),
    ],
    ids=lambda v: v if isinstance(v, int) else repr(v.replace(TOKENS["admin"], "<admin>")),
)
async def test_malformed_authorization_headers(world: World, value: str, status: int) -> None:
    before = await snapshot(world)
    for method, path in (("GET", "/workspaces"), ("POST", "/workspaces/w/reset")):
        reply = await request(world.a2ad, method, path, headers={"Authorization": value})
        assert_no_secret(reply)
        if status == 401:
            assert_error(reply, 401, "unauthorized", rpc=False)
        else:
            assert reply.status == 200, reply.text
    if status == 401:
        assert await snapshot(world) == before
    reply = await request(
        world.a2ad,
        "POST",
        "/workspaces/v/a2a",
        body=send_body("x"),
        headers={"Authorization": value},
    )
    refusal = UNAUTHORIZED if status == 401 else FORBIDDEN  # the admin token: not a caller's
    assert_error(reply, *refusal, rpc=True)


async def raw_http(a2ad: A2ad, data: bytes) -> tuple[int, bytes, bytes]:
    """One request written byte for byte (for header bytes aiohttp's client will not
    send): the status, the head and the body."""
    reader, writer = await asyncio.open_connection(a2ad.client.host, a2ad.client.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


@pytest.mark.sqlite_only  # store-independent: the header is refused before any store access
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/workspaces"), ("GET", f"/queue/{UNKNOWN_QID}")]
)
async def test_a_token_that_is_not_utf8_is_unauthorized(
    world: World, method: str, path: str
) -> None:
    status, head, body = await raw_http(
        world.a2ad,
        f"{method} {path} HTTP/1.1\r\nHost: a2ad\r\nConnection: close\r\n".encode()
        + b"Authorization: Bearer \xff\r\n\r\n",
    )
    assert status == 401, body
    assert json.loads(body)["error"]["code"] == "unauthorized"
    assert b"WWW-Authenticate: Bearer" in head


# -- open endpoints ---------------------------------------------------------------


@pytest.mark.sqlite_only  # store-independent: auth, before any store access
@pytest.mark.parametrize("credential", ["none", "wrong", "admin", "heartbeat"])
async def test_an_open_proxy_ignores_the_authorization_header(
    a2ad_factory: A2adFactory, agent: Agent, credential: str
) -> None:
    """No caller tokens configured: the proxy is open and a token, even an unknown
    one, is ignored. The operator endpoints still need the admin token."""
    a2ad = await a2ad_factory(
        [{"id": "v", "url": agent.url, "token": TOKENS["heartbeat"]}],
        auth={"admin_token": TOKENS["admin"]},
    )
    reply = await request(
        a2ad, "POST", "/workspaces/v/a2a", body=send_body("hi"), headers=auth_header(credential)
    )
    assert reply.status == 200, reply.text
    assert reply.json["result"]["parts"][0]["text"] == "done"
    assert_no_secret(reply)
    reply = await request(a2ad, "GET", "/workspaces", headers=auth_header(credential))
    if credential == "admin":
        assert reply.status == 200
    elif credential == "heartbeat":
        assert_error(reply, 403, "forbidden", rpc=False)
    else:
        assert_error(reply, 401, "unauthorized", rpc=False)


@pytest.mark.sqlite_only  # store-independent: auth, before any store access
@pytest.mark.parametrize("credential", ["none", "wrong", "planner", "heartbeat"])
async def test_open_operator_endpoints_ignore_the_authorization_header(
    a2ad_factory: A2adFactory, agent: Agent, credential: str
) -> None:
    """No admin token configured: the operator endpoints are open; the proxy still
    needs a caller token."""
    a2ad = await a2ad_factory(
        [{"id": "v", "url": agent.url, "token": TOKENS["heartbeat"]}],
        auth={"callers": [{"name": "planner", "token": TOKENS["planner"]}]},
    )
    for path in ("/workspaces", "/workspaces/v", "/workspaces/v/queue", "/metrics"):
        reply = await request(a2ad, "GET", path, headers=auth_header(credential))
        assert reply.status == 200, (path, reply.text)
        assert_no_secret(reply)
    reply = await request(
        a2ad, "POST", "/workspaces/v/a2a", body=send_body("hi"), headers=auth_header(credential)
    )
    if credential == "planner":
        assert reply.status == 200, reply.text
    elif credential == "heartbeat":
        assert_error(reply, 403, "forbidden", rpc=True)
    else:
        assert_error(reply, 401, "unauthorized", rpc=True)


# -- the status page --------------------------------------------------------------

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.mark.sqlite_only  # store-independent: the status page's login
@pytest.mark.parametrize("credential", CREDENTIALS)
async def test_the_status_page_takes_no_bearer_token(world: World, credential: str) -> None:
    """/ui works with a login session, not with an Authorization header: every bearer
    credential gets the sign-in form, sees no item, and retries nothing."""
    a2ad = world.a2ad
    before = await snapshot(world)
    reply = await request(a2ad, "GET", "/ui", headers=auth_header(credential))
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/html")
    assert_no_secret(reply)
    assert world.queued not in reply.text and world.expired not in reply.text
    assert "a2ad_session" not in reply.headers.get("Set-Cookie", "")
    reply = await request(
        a2ad, "POST", f"/ui/items/{world.expired}/retry", headers=auth_header(credential)
    )
    assert reply.status in (401, 403), reply.text
    assert_no_secret(reply)
    assert await snapshot(world) == before


@pytest.mark.sqlite_only  # store-independent: the status page's login
@pytest.mark.parametrize("credential", CREDENTIALS)
async def test_the_status_page_login_takes_only_the_admin_token(
    world: World, credential: str
) -> None:
    """POST /ui/login with each credential as the form's token (and a valid CSRF
    token): only the admin token opens a session; no token is ever shown back."""
    client = world.a2ad.client
    async with client.get("/ui") as page:
        found = _CSRF.search(await page.text())
    assert found is not None
    form = {"csrf": found.group(1)}
    if credential != "none":
        form["token"] = TOKENS[credential]
    async with client.post("/ui/login", data=form, allow_redirects=False) as resp:
        reply = Reply(resp.status, dict(resp.headers), await resp.read())
        cookies = resp.headers.getall("Set-Cookie", [])
    assert_no_secret(reply)
    session = [c for c in cookies if c.startswith("a2ad_session=")]
    if credential == "admin":
        assert reply.status == 303 and reply.headers["Location"] == "/ui"
        (cookie,) = session
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        async with client.get("/ui") as resp:
            assert resp.status == 200 and 'action="/ui/login"' not in await resp.text()
        async with client.post("/ui/logout", data={}, allow_redirects=False) as resp:
            assert resp.status == 403  # no CSRF token: refused, still signed in
    else:
        assert reply.status == 401, reply.text
        assert session == []
        async with client.get("/ui") as resp:
            assert 'action="/ui/login"' in await resp.text()
