"""Generated inputs at every endpoint (SPEC, HTTP API: Errors, and the endpoints' shapes).

Hypothesis drives each test's examples against one a2ad (auth on, a real SQLite
file, a real agent). The examples run in a worker thread and submit their
requests to the test's event loop, where a2ad keeps running between examples
with its background loops; after the last example the test checks, on that same
a2ad, that it is still healthy and that a send still works end to end.

Properties of every answer: never a 500; a documented status; an error is JSON
with a stable code (SPEC's shape, or on the proxy path a JSON-RPC error with the
code in error.data.code and the request id echoed when it can be read); no
traceback. State: the set of stored items grows by exactly the items a2ad
answered as queued, and a refused change changes nothing.

The focused tests at the end of this file pin the bugs this fuzzing found, each
with its minimal input; the generators include those inputs too."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import A2ad
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

A2adFactory = Callable[..., Awaitable[A2ad]]
T = TypeVar("T")

ADMIN_TOKEN = "tok-fuzz-admin-5b0e7d"
CALLER_TOKEN = "tok-fuzz-caller-c3a914"
BUSY_TOKEN = "tok-fuzz-hb-busy-81f2"
HB_TOKEN = "tok-fuzz-hb-hb-4d6a0c"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CALLER = {"Authorization": f"Bearer {CALLER_TOKEN}"}
SECRETS = (ADMIN_TOKEN, CALLER_TOKEN, BUSY_TOKEN, HB_TOKEN)
MAX_BODY = 65536  # a2ad's server.max_body_bytes here, so 413 is cheap to reach
BUSY_SLOTS = 4
CONFIG_WORKSPACES = ("free", "busy", "hb")
STATES = ("queued", "dispatching", "delivered", "failed", "expired", "cancelled")
PRIORITIES = ("critical", "task", "info")
TEN_YEARS = 10 * 365 * 86400.0
WORKSPACE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

# Code → its status. SPEC's table, plus the codes a2ad adds for what the table
# does not name: invalid_body (a bad PUT or heartbeat body), method_not_allowed,
# card_unavailable (a card never fetched → 503), request_timeout (a body that does
# not arrive) and headers_too_large.
ERROR_STATUS = {
    "parse_error": 400,
    "invalid_request": 400,
    "invalid_header": 400,
    "invalid_body": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "unknown_workspace": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "conflict": 409,
    "body_too_large": 413,
    "headers_too_large": 431,
    "queue_full": 503,
    "store_unavailable": 503,
    "card_unavailable": 503,
    "upstream_failed": 502,
    "upstream_timeout": 504,
}
# On the proxy path SPEC's "proxy" column: a JSON-RPC-level error is HTTP 200 with
# the error in the body, as the agent, the a2a-sdk and the A2A conformance kit
# answer; only what the HTTP transport refuses keeps the status above.
PROXY_STATUS = {
    **ERROR_STATUS,
    "parse_error": 200,
    "invalid_request": 200,
    "invalid_params": 200,
    "unsupported_operation": 200,
    "version_not_supported": 200,
}
DOCUMENTED = {200, 201, 202, 304, *ERROR_STATUS.values()}
# Errors a2ad answers before it has read the body, so no request id to echo.
BEFORE_THE_BODY = {
    "unauthorized",
    "forbidden",
    "unknown_workspace",
    "body_too_large",
    "request_timeout",
    "parse_error",
}

SEND_METHODS = ("message/send", "SendMessage")
STREAM_METHODS = ("message/stream", "SendStreamingMessage")
MESSAGE_METHODS = SEND_METHODS + STREAM_METHODS
KNOWN_METHODS = (
    *MESSAGE_METHODS,
    "tasks/get",
    "GetTask",
    "tasks/cancel",
    "CancelTask",
    "tasks/resubscribe",
    "SubscribeToTask",
    "ListTasks",
    "GetExtendedAgentCard",
    "tasks/pushNotificationConfig/set",
    "CreateTaskPushNotificationConfig",
)


# `make test` runs the same examples every time, so CI never fails on a draw no one
# has seen; A2AD_FUZZ_EXPLORE=N runs N times as many fresh random examples
# (`make soak` does, to look for new bugs).
EXPLORE = int(os.environ.get("A2AD_FUZZ_EXPLORE", "0"))


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples * max(1, EXPLORE),
        deadline=None,
        database=None,
        derandomize=not EXPLORE,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


@pytest.fixture(autouse=True, scope="module")
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hypothesis caches tables (unicode data) under its home: not in the repository."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


async def fuzz(
    strategy: st.SearchStrategy[T], example: Callable[[T], Awaitable[None]], max_examples: int
) -> None:
    """Run `example` on values from `strategy` on this event loop, with Hypothesis
    (a synchronous engine) in a worker thread: a2ad keeps serving in between."""
    loop = asyncio.get_running_loop()

    @fuzz_settings(max_examples)
    @given(strategy)
    def run(value: T) -> None:
        future = asyncio.run_coroutine_threadsafe(example(value), loop)
        try:
            future.result(timeout=60)
        except TimeoutError:
            future.cancel()
            raise

    await asyncio.to_thread(run)


# -- a real agent that answers anything ---------------------------------------------


@dataclass
class EchoAgent:
    """An A2A agent on a real aiohttp server that never fails: a send gets a Message,
    a stream a final status-update, anything else JSON-RPC "method not found"."""

    url: str = ""
    requests: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        rpc_id = body.get("id") if isinstance(body, dict) else None
        if isinstance(rpc_id, bool) or not isinstance(rpc_id, (str, int)):
            rpc_id = None
        method = body.get("method") if isinstance(body, dict) else None
        if method in STREAM_METHODS:
            event = {
                "kind": "status-update",
                "taskId": "agent-task",
                "contextId": "agent-ctx",
                "status": {"state": "completed"},
                "final": True,
            }
            data = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": event})
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(f"data: {data}\n\n".encode())
            await response.write_eof()
            return response
        if method in SEND_METHODS:
            result = {
                "kind": "message",
                "messageId": f"m-{self.requests}",
                "role": "agent",
                "parts": [{"kind": "text", "text": "ok"}],
            }
            return web.json_response({"jsonrpc": "2.0", "id": rpc_id, "result": result})
        error = {"code": -32601, "message": "method not found"}
        return web.json_response({"jsonrpc": "2.0", "id": rpc_id, "error": error})

    async def card(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "fuzz agent", "url": self.url, "version": "1", "skills": []}
        )


@pytest.fixture
async def agent() -> AsyncIterator[EchoAgent]:
    agent = EchoAgent()
    app = web.Application()
    app.router.add_post("/", agent.handle)
    app.router.add_get("/.well-known/agent-card.json", agent.card)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    agent.url = str(server.make_url("/"))
    yield agent
    await server.close()


# -- the a2ad under test -------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    queued_ids: set[str] = field(default_factory=set)  # items a2ad said it queued

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


@dataclass
class World:
    """free: sends go straight to the agent. busy: its heartbeat holds every slot, so
    sends queue. hb: for heartbeats. `final_id` is a cancelled item of the caller's."""

    a2ad: A2ad
    agent: EchoAgent
    final_id: str

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        client = self.a2ad.client
        async with (
            asyncio.timeout(30),
            client.request(method, path, data=body, headers=headers or {}) as resp,
        ):
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._stream(resp)
            return Reply(resp.status, dict(resp.headers), await resp.read())

    async def _stream(self, resp: Any) -> Reply:
        """An event stream: a queued one stays open until its item is final, so the
        item is cancelled (as an operator would) once its first event has come."""
        first: bytes = await resp.content.readuntil(b"\n\n")
        queued: set[str] = set()
        event = json.loads(first.removeprefix(b"data: "))
        task = event.get("result", {})
        task = task.get("task", task) if isinstance(task, dict) else {}
        if isinstance(task, dict) and task.get("metadata", {}).get("a2ad", {}).get("queued"):
            queued.add(task["id"])
            cancel = await self.call("DELETE", f"/queue/{task['id']}", headers=ADMIN)
            assert cancel.status in (200, 409), cancel.text
        rest = await resp.read()
        return Reply(resp.status, dict(resp.headers), first + rest, queued)

    async def admin_json(self, path: str) -> Any:
        reply = await self.call("GET", path, headers=ADMIN)
        assert reply.status == 200, (path, reply.text)
        return reply.json

    async def workspace_ids(self) -> set[str]:
        listing = await self.admin_json("/workspaces")
        return {ws["id"] for ws in listing["workspaces"]}

    async def item_ids(self) -> set[str]:
        """Every stored item, as the operator lists them."""
        ids: set[str] = set()
        for workspace in sorted(await self.workspace_ids()):
            after = "0"
            while True:
                page = await self.admin_json(
                    f"/workspaces/{workspace}/queue?limit=1000&after={after}"
                )
                ids |= {item["id"] for item in page["items"]}
                if page["next"] is None:
                    break
                after = page["next"]
        return ids


def send_body(text: str, method: str = "message/send", rpc_id: Any = 1, v1: bool = False) -> bytes:
    """A valid send (its own messageId) whose caller does not wait: a queued one is
    answered 202 at once."""
    message: dict[str, Any] = {"role": "user", "parts": [{"kind": "text", "text": text}]}
    if v1:
        message = {"role": "ROLE_USER", "parts": [{"text": text}]}
    message["messageId"] = f"m-{uuid.uuid4().hex}"
    params: dict[str, Any] = {"message": message}
    if method in SEND_METHODS:
        key, value = ("returnImmediately", True) if method[0].isupper() else ("blocking", False)
        params["configuration"] = {key: value}
    body = {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}
    return json.dumps(body).encode()


async def heartbeat(world: World, workspace: str, token: str, active: int) -> None:
    reply = await world.call(
        "POST",
        f"/workspaces/{workspace}/heartbeat",
        body=json.dumps({"active_tasks": active}).encode(),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert reply.status == 200, reply.text


@pytest.fixture
async def world(a2ad_factory: A2adFactory, agent: EchoAgent) -> World:
    a2ad = await a2ad_factory(
        [
            {"id": "free", "url": agent.url, "heartbeat": False, "max_concurrent": 8},
            {"id": "busy", "url": agent.url, "token": BUSY_TOKEN, "max_concurrent": BUSY_SLOTS},
            {"id": "hb", "url": agent.url, "token": HB_TOKEN},
        ],
        auth={"admin_token": ADMIN_TOKEN, "callers": [{"name": "fuzzer", "token": CALLER_TOKEN}]},
        server={"max_body_bytes": MAX_BODY},
        # One heartbeat holds the busy workspace's slots for the whole run: with
        # `make soak`'s ten times the examples, a test outlasts the default 90 s.
        liveness={"heartbeat_timeout_seconds": 3600},
        # A generated blocking send that is queued is held (SPEC, blocking sends) until
        # this wait runs out, then answered 202: short, so an example takes no minute.
        queue={"blocking_wait_seconds": 0.3},
    )
    world = World(a2ad, agent, final_id="")
    await heartbeat(world, "busy", BUSY_TOKEN, BUSY_SLOTS)
    reply = await world.call(
        "POST", "/workspaces/busy/a2a", body=send_body("to cancel"), headers=CALLER
    )
    assert reply.status == 202, reply.text
    world.final_id = reply.json["result"]["id"]
    reply = await world.call("DELETE", f"/queue/{world.final_id}", headers=ADMIN)
    assert reply.json["state"] == "cancelled"
    return world


async def assert_still_works(world: World) -> None:
    """After the fuzzing: healthy, ready, and a send still goes end to end, straight
    and through the queue (the busy workspace frees and drains)."""
    healthz = await world.call("GET", "/healthz")
    assert (healthz.status, healthz.json) == (200, {"status": "ok"})
    readyz = await world.call("GET", "/readyz")
    assert (readyz.status, readyz.json) == (200, {"status": "ready"})
    direct = await world.call(
        "POST", "/workspaces/free/a2a", body=send_body("after", rpc_id="last"), headers=CALLER
    )
    assert direct.status == 200, direct.text
    assert direct.json == {
        "jsonrpc": "2.0",
        "id": "last",
        "result": {
            "kind": "message",
            "messageId": f"m-{world.agent.requests}",
            "role": "agent",
            "parts": [{"kind": "text", "text": "ok"}],
        },
    }
    queued = await world.call(
        "POST",
        "/workspaces/busy/a2a",
        body=send_body("after, queued"),
        headers={**CALLER, "A2AD-Priority": "critical"},
    )
    assert queued.status == 202, queued.text
    qid = queued.json["result"]["id"]
    await heartbeat(world, "busy", BUSY_TOKEN, 0)
    reply = await world.call("GET", f"/queue/{qid}?wait=30", headers=CALLER)
    assert reply.status == 200, reply.text
    item = reply.json
    assert item["state"] == "delivered", item
    assert item["result"]["result"]["parts"] == [{"kind": "text", "text": "ok"}]


# -- what every answer must look like ------------------------------------------------


def readable_id(body: Any) -> Any:
    """The request id a2ad can echo: a string or a number that is not a bool."""
    if isinstance(body, dict):
        value = body.get("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return value
    return None


def parsed(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def a2ads_rpc_error(reply: Reply) -> bool:
    """Is this a JSON-RPC error a2ad answered itself (its code in error.data.code)? An
    agent's own JSON-RPC error, relayed, names none."""
    if not reply.headers.get("Content-Type", "").startswith("application/json"):
        return False
    data = reply.json
    error = data.get("error") if isinstance(data, dict) else None
    details = error.get("data") if isinstance(error, dict) else None
    return isinstance(details, dict) and isinstance(details.get("code"), str)


def check_reply(reply: Reply, *, rpc_path: bool, sent: bytes | None = None) -> str | None:
    """The properties every answer has; the error code, if it is an error."""
    assert reply.status in DOCUMENTED, (reply.status, reply.text[:500])
    assert "Traceback" not in reply.text
    for secret in SECRETS:
        assert secret not in reply.text
        assert all(secret not in value for value in reply.headers.values())
    content_type = reply.headers.get("Content-Type", "")
    if reply.status < 400 and not (rpc_path and a2ads_rpc_error(reply)):
        if content_type.startswith("application/json"):
            data = reply.json
            if rpc_path:
                assert data["jsonrpc"] == "2.0" and ("result" in data) != ("error" in data)
                assert data["id"] == readable_id(parsed(sent or b""))
        elif content_type.startswith("text/event-stream"):
            for line in reply.text.splitlines():
                if line.startswith("data:"):
                    assert json.loads(line.removeprefix("data:"))["jsonrpc"] == "2.0"
        return None
    assert content_type.startswith("application/json"), (reply.status, reply.text[:300])
    data = reply.json
    if rpc_path:
        assert set(data) == {"jsonrpc", "id", "error"}, data
        assert data["jsonrpc"] == "2.0"
        error = data["error"]
        assert isinstance(error["code"], int) and not isinstance(error["code"], bool)
        assert isinstance(error["message"], str) and error["message"]
        code = error["data"]["code"]
        if code not in BEFORE_THE_BODY:
            assert data["id"] == readable_id(parsed(sent or b"")), (code, data["id"])
    else:
        assert set(data) == {"error"}, data
        code = data["error"]["code"]
        assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    assert isinstance(code, str)
    statuses = PROXY_STATUS if rpc_path else ERROR_STATUS
    assert statuses.get(code) == reply.status, (code, reply.status)
    if reply.status == 503:
        assert int(reply.headers["Retry-After"]) >= 1
    if reply.status == 401:
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    return code


# -- strategies ------------------------------------------------------------------------

# st.text() makes no lone surrogates (json.dumps writes astral characters as
# surrogate pairs, which decode back): a lone one has its own test below.
TEXT = st.text(max_size=24)


class Huge(str):
    """A long string that prints short in Hypothesis's reports."""

    def __repr__(self) -> str:
        return f"Huge({len(self)} x)"


class Body(bytes):
    """A request body that prints short in Hypothesis's reports when it is long."""

    def __repr__(self) -> str:
        text = bytes.__repr__(self)
        return text if len(text) < 400 else f"{text[:200]}...({len(self)} bytes)"


HUGE_TEXT = st.sampled_from([2_000, 70_000]).map(lambda n: Huge("x" * n))  # 70 000 > MAX_BODY
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | TEXT
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
# Deferred, so the strategies built from it print short in Hypothesis's reports.
# A huge string one time in five.
JUNK = st.deferred(lambda: st.one_of(JSON_VALUES, JSON_VALUES, JSON_VALUES, JSON_VALUES, HUGE_TEXT))

FieldPath = tuple[str | int, ...]


def _has(holder: Any, key: str | int) -> bool:
    if isinstance(holder, dict):
        return key in holder
    return isinstance(holder, list) and isinstance(key, int) and key < len(holder)


def _mutate(value: Any, mutations: list[tuple[FieldPath, bool, Any]]) -> Any:
    """`value` with each (path, drop, junk): the field at `path` removed, or set to
    `junk` (added, if an object lacks it). A path that is no longer there (an
    earlier mutation took it) is skipped."""
    value = copy.deepcopy(value)
    for path, drop, junk in mutations:
        *parents, last = path
        holder = value
        for key in parents:
            holder = holder[key] if _has(holder, key) else None
        if _has(holder, last) or (isinstance(holder, dict) and not drop):
            if drop:
                del holder[last]
            else:
                holder[last] = junk
    return value


def mutated(
    base: st.SearchStrategy[Any], paths: list[FieldPath], values: st.SearchStrategy[Any] = JUNK
) -> st.SearchStrategy[Any]:
    """A valid value with none, one or two fields dropped or given a value of the
    wrong type (or a huge one): so examples reach every level of the handler."""
    mutation = st.tuples(st.sampled_from(paths), st.booleans(), values)
    return st.builds(_mutate, base, st.lists(mutation, max_size=2))


QUEUE_LIKE_IDS = st.sampled_from(["q-" + "0" * 32, "q-"]) | TEXT.map(lambda t: "q-" + t) | TEXT
PARTS = st.lists(
    st.fixed_dictionaries({"kind": st.just("text"), "text": TEXT}), min_size=1, max_size=2
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "ROLE_USER"]), "parts": PARTS},
    optional={
        "kind": st.just("message"),
        "messageId": TEXT,
        "contextId": st.just("ctx-" + "0" * 32) | TEXT,
        "taskId": QUEUE_LIKE_IDS,
        "metadata": JSON_VALUES,
    },
)
VALID_RPC = st.fixed_dictionaries(
    {
        "jsonrpc": st.just("2.0"),
        "method": st.sampled_from(MESSAGE_METHODS) | st.sampled_from(KNOWN_METHODS) | TEXT,
        "params": st.fixed_dictionaries(
            {"message": MESSAGE}, optional={"id": QUEUE_LIKE_IDS, "metadata": JSON_VALUES}
        ),
    },
    optional={"id": st.integers(min_value=-(2**70), max_value=2**70) | TEXT | st.none()},
)
RPC_PATHS: list[FieldPath] = [
    ("jsonrpc",),
    ("id",),
    ("method",),
    ("params",),
    ("params", "id"),
    ("params", "message"),
    ("params", "message", "role"),
    ("params", "message", "parts"),
    ("params", "message", "parts", 0),
    ("params", "message", "parts", 0, "kind"),
    ("params", "message", "parts", 0, "text"),
    ("params", "message", "messageId"),
    ("params", "message", "contextId"),
    ("params", "message", "taskId"),
    ("params", "message", "metadata"),
]
RPC = mutated(VALID_RPC, RPC_PATHS)


def dumps(value: Any) -> Body:
    return Body(json.dumps(value).encode())


def deep(depth: int) -> Body:
    """A send whose message metadata nests `depth` arrays (far from or far past the
    parser's recursion limit, never near it, where it depends on the stack)."""
    nested = b"[" * depth + b"]" * depth
    return Body(
        b'{"jsonrpc": "2.0", "id": 5, "method": "message/send", "params": {"message": '
        b'{"role": "user", "parts": [], "metadata": ' + nested + b"}}}"
    )


RAW_BODIES = st.one_of(
    RPC.map(dumps),
    RPC.map(dumps),
    RPC.map(dumps),
    RPC.map(dumps).flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda i: Body(b[:i]))),
    JSON_VALUES.map(dumps),
    st.binary(max_size=64).map(Body),
    st.sampled_from([1, 50, 400, 5_000, 30_000]).map(deep),
    st.sampled_from([b"", b"{}", b"null", b"[]", b'"2.0"', b"\xef\xbb\xbf{}", b"{" * 10]).map(Body),
)


# A message's roles as the a2a-sdk agent reads them, in each version.
ROLES: dict[str, tuple[str | int, ...]] = {
    "1.0": ("ROLE_USER", "ROLE_AGENT", 1, 2),
    "0.3": ("user", "agent"),
}


# Method names of one protocol version, as the agent refuses them under the other
# (A2A 1.0, Versioning): a 1.0 name without A2A-Version 1.x, a v0.3 name with it.
V1_NAMES = {name for name in KNOWN_METHODS if "/" not in name}
V03_NAMES = {name for name in KNOWN_METHODS if "/" in name}


def speaks_v1(version: str | None) -> bool:
    return (version or "").strip().startswith("1")


def other_version(method: str, version: str | None) -> bool:
    return method in (V03_NAMES if speaks_v1(version) else V1_NAMES)


def message_verdict(message: dict[str, Any], method: str, version: str | None) -> str:
    """SPEC: a message any A2A agent must refuse (no messageId, no role, empty parts)
    is invalid_params. The role counts in the version of the request's header or of
    its method's name (a mismatch of the two is the agent's to refuse)."""
    message_id = message.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        return "invalid_params"
    versions = {"1.0" if (version or "").strip().startswith("1") else "0.3"}
    versions.add("1.0" if method[0].isupper() else "0.3")
    role = message.get("role")
    known = isinstance(role, (str, int)) and not isinstance(role, bool)
    if not known or not any(role in ROLES[v] for v in versions):
        return "invalid_params"
    parts = message.get("parts")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        return "invalid_params"
    return "ok"


def rpc_verdict(raw: bytes, version: str | None = None) -> str:
    """What SPEC (and JSON-RPC 2.0) make of a body sent with this A2A-Version: an
    error code, "ok", or "either" where JSON-RPC allows what A2A has no use for (a
    fractional id, array params)."""
    if len(raw) > MAX_BODY:
        return "body_too_large"
    try:
        body = json.loads(raw.decode("utf-8-sig"))  # JSON in UTF-8, a BOM allowed
    except (ValueError, RecursionError):
        return "parse_error"
    if not isinstance(body, dict) or body.get("jsonrpc") != "2.0":
        return "invalid_request"
    method = body.get("method")
    if not isinstance(method, str) or not method:
        return "invalid_request"
    rpc_id = body.get("id")
    if isinstance(rpc_id, float):
        return "either"
    if rpc_id is not None and (isinstance(rpc_id, bool) or not isinstance(rpc_id, (str, int))):
        return "invalid_request"
    params = body.get("params", {})
    if isinstance(params, list) and not other_version(method, version):
        return "either"
    if other_version(method, version):
        return "version_not_supported"  # before the params, as the agent checks
    if not isinstance(params, dict):
        return "invalid_request"
    if method in MESSAGE_METHODS:
        message = params.get("message")
        if not isinstance(message, dict):
            return "invalid_params"
        return message_verdict(message, method, version)
    return "ok"


# -- POST /workspaces/{id}/a2a: bodies ---------------------------------------------------


@dataclass(frozen=True)
class RpcCase:
    workspace: str
    raw: bytes
    version: str | None


RPC_CASES = st.builds(
    RpcCase,
    workspace=st.sampled_from(["free", "busy"]),
    raw=RAW_BODIES,
    version=st.none() | st.sampled_from(["1.0", "0.3"]),
)


async def test_fuzz_proxy_bodies(world: World) -> None:
    """Malformed JSON, wrong types and missing fields at every level of a JSON-RPC
    request, random methods, huge strings, deep nesting: each is the SPEC error, or
    a JSON-RPC answer; only a message send to the busy workspace stores an item."""

    async def example(case: RpcCase) -> None:
        before = await world.item_ids()
        headers = {**CALLER, "Content-Type": "application/json"}
        if case.version is not None:
            headers["A2A-Version"] = case.version
        reply = await world.call(
            "POST", f"/workspaces/{case.workspace}/a2a", body=case.raw, headers=headers
        )
        code = check_reply(reply, rpc_path=True, sent=case.raw)
        verdict = rpc_verdict(case.raw, case.version)
        if verdict not in ("ok", "either"):
            assert code == verdict, (verdict, reply.status, reply.text[:300])
        elif verdict == "ok":
            assert code is None and reply.status in (200, 202), reply.text[:300]
        if reply.status == 202 or reply.queued_ids:
            body = json.loads(case.raw)
            assert case.workspace == "busy" and body["method"] in MESSAGE_METHODS
        if reply.status == 202:
            reply.queued_ids.add(reply.json["result"].get("task", reply.json["result"])["id"])
        assert await world.item_ids() == before | reply.queued_ids

    await fuzz(RPC_CASES, example, max_examples=800)
    await assert_still_works(world)


# -- POST /workspaces/{id}/a2a: the A2AD-* and A2A-Version headers -------------------------

# Header values a client can send (printable; aiohttp's client refuses control
# characters). Unicode is in: a2ad reads it as UTF-8. No Content-Encoding: a body
# that does not decode has its own test below.
HEADER_TEXT = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30
)
PRIORITY_VALUES = st.sampled_from(PRIORITIES) | st.sampled_from(["TASK", " info", "urgent", ""])
TTL_VALUES = st.one_of(
    st.sampled_from(["1", "30", "0.5", "86400", "100000"]),
    st.sampled_from(["0", "-1", "nan", "inf", "1e3", "1_0", "", "315360001"]),
    st.floats(allow_nan=True).map(str),
    st.integers(-10, 10**10).map(str),
)
QUEUE_VALUES = st.sampled_from(["never", "allow"]) | st.sampled_from(["NEVER", "", "maybe"])
VERSION_VALUES = st.sampled_from(["1.0", "1", "0.3", "0.3.0", "2.0", "", "1.x", "v1"])
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "A2AD-Priority": st.one_of(PRIORITY_VALUES, PRIORITY_VALUES, HEADER_TEXT),
        "A2AD-TTL": st.one_of(TTL_VALUES, TTL_VALUES, HEADER_TEXT),
        "A2AD-Queue": st.one_of(QUEUE_VALUES, QUEUE_VALUES, HEADER_TEXT),
        "A2A-Version": VERSION_VALUES | HEADER_TEXT,
        "A2A-Extensions": HEADER_TEXT,
        "Accept": st.sampled_from(["application/json", "text/event-stream", "*/*"]) | HEADER_TEXT,
        "X-Request-Id": st.sampled_from(["req-1", "a" * 65]) | HEADER_TEXT,
    },
)


def priority_verdict(value: str | None) -> str:
    if value is None or value in PRIORITIES:
        return "valid"
    return "either" if value.strip().lower() in PRIORITIES else "invalid"


def ttl_verdict(value: str | None) -> str:
    if value is None:
        return "valid"
    try:
        seconds = float(value)
    except ValueError:
        return "invalid"
    if math.isnan(seconds) or seconds <= 0:
        return "invalid"
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value) and seconds <= TEN_YEARS:
        return "valid"
    return "either"  # 1e3, 1_0, very long TTLs: SPEC says only "<seconds>"


def queue_verdict(value: str | None) -> str:
    if value is None or value in ("never", "allow", ""):
        return "valid"
    return "either" if value.strip().lower() in ("never", "allow") else "invalid"


def shape_of(version: str | None) -> str | None:
    """1.0 for A2A-Version 1.x, v0.3 when it is absent or 0.x; junk: either."""
    if version is None or re.fullmatch(r"0(\.[0-9]+)*", version.strip()):
        return "0.3"
    if re.fullmatch(r"1(\.[0-9]+)*", version.strip()):
        return "1.0"
    return None


def seconds(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class HeaderCase:
    workspace: str
    method: str
    headers: dict[str, str]


HEADER_CASES = st.builds(
    HeaderCase,
    workspace=st.sampled_from(["free", "busy"]),
    method=st.sampled_from(MESSAGE_METHODS),
    headers=HEADERS,
)


async def test_fuzz_proxy_headers(world: World) -> None:
    """A2AD-Priority, A2AD-TTL, A2AD-Queue and A2A-Version with junk values: a bad
    A2AD-* value is invalid_header naming the header; a good one is honoured (the
    item's priority and expiry, queue_full for A2AD-Queue: never, the Task's shape)."""

    async def example(case: HeaderCase) -> None:
        before = await world.item_ids()
        h = case.headers
        v1 = (h.get("A2A-Version") or "").strip().startswith("1")
        raw = send_body("headers", method=case.method, rpc_id="h-1", v1=v1)
        reply = await world.call(
            "POST",
            f"/workspaces/{case.workspace}/a2a",
            body=raw,
            headers={**CALLER, **h},
        )
        code = check_reply(reply, rpc_path=True, sent=raw)
        if other_version(case.method, h.get("A2A-Version")):
            assert code == "version_not_supported", (h, reply.text[:300])
            assert await world.item_ids() == before
            return
        verdicts = {
            "A2AD-Priority": priority_verdict(h.get("A2AD-Priority")),
            "A2AD-TTL": ttl_verdict(h.get("A2AD-TTL")),
            "A2AD-Queue": queue_verdict(h.get("A2AD-Queue")),
        }
        named = [name for name, v in verdicts.items() if v != "valid"]
        if code == "invalid_header":
            assert named, h
            assert any(name in reply.json["error"]["message"] for name in named)
        else:
            assert all(v != "invalid" for v in verdicts.values()), (h, reply.text[:300])
        never = (h.get("A2AD-Queue") or "").strip().lower() == "never"
        if code is None and case.workspace == "free":
            assert reply.status == 200
        if code is None and case.workspace == "busy":
            assert not never, reply.text[:300]
            assert reply.status == 202 or reply.queued_ids
        if code == "queue_full":
            assert case.workspace == "busy" and never
        if reply.status == 202:
            result = reply.json["result"]
            shape = shape_of(h.get("A2A-Version"))
            task = result.get("task", result)
            if shape == "1.0":
                assert task["status"]["state"] == "TASK_STATE_SUBMITTED", result
            elif shape == "0.3":
                assert result["kind"] == "task" and task["status"]["state"] == "submitted"
            assert task["metadata"]["a2ad"]["queued"] is True
            reply.queued_ids.add(task["id"])
            item = await world.admin_json(f"/queue/{task['id']}")
            priority = (h.get("A2AD-Priority") or "task").strip().lower()
            assert item["priority"] == priority and item["caller"] == "fuzzer"
            ttl = float(h["A2AD-TTL"]) if "A2AD-TTL" in h else None
            if ttl is None and priority == "info":
                ttl = 300.0  # queue.info_ttl_seconds
            ttl = min(ttl, 86400.0) if ttl is not None else 86400.0  # queue.max_age_seconds
            lived = seconds(item["expires_at"]) - seconds(item["enqueued_at"])
            assert lived == pytest.approx(ttl, abs=0.05), (h, item)
        assert await world.item_ids() == before | reply.queued_ids

    await fuzz(HEADER_CASES, example, max_examples=500)
    await assert_still_works(world)


# -- operator endpoints: ids, query strings, methods -----------------------------------

# Path ids: any text ("." and ".." are path steps, not ids), percent-encoded.
PATH_IDS = st.text(min_size=1, max_size=40).filter(lambda s: s not in (".", ".."))
# Query values, with the non-ASCII digits str.isdigit() takes and int() refuses ("²").
QUERY_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
INT_TEXT = st.one_of(
    st.integers(-5, 2**63).map(str),
    st.sampled_from(["0", "1", "1000", "1001", "01", "+1", " 1", "1.0", "", "٣"]),
    QUERY_TEXT,
)
WAIT_TEXT = st.one_of(
    st.sampled_from(["0", "0.01", "300", "300.5", "-1", "nan", "inf", "1e-9", "", "forever"]),
    st.floats(min_value=-1, max_value=400).map(str),
    QUERY_TEXT,
)


def int_verdict(value: str | None, maximum: int) -> str:
    if value is None:
        return "valid"
    if re.fullmatch(r"[0-9]+", value):
        return "valid" if int(value) <= maximum else "invalid"
    return "either" if value.isdigit() else "invalid"


def wait_verdict(value: str | None) -> str:
    if value is None:
        return "valid"
    try:
        wait = float(value)
    except ValueError:
        return "invalid"
    if not 0 <= wait <= 300:
        return "invalid"
    return "valid" if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value) else "either"


@dataclass(frozen=True)
class OperatorCase:
    kind: str
    target: str  # a workspace or item id (not encoded), or a path
    query: dict[str, str]
    method: str = "GET"


def known_or_random(known: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(known) | PATH_IDS


OPERATOR_CASES = st.one_of(
    st.builds(
        OperatorCase,
        kind=st.just("list_queue"),
        target=known_or_random(["free", "busy", "hb"]),
        query=st.fixed_dictionaries(
            {},
            optional={
                "state": st.sampled_from([*STATES, "QUEUED", "", "done"]) | QUERY_TEXT,
                "limit": INT_TEXT,
                "after": INT_TEXT,
                "bodies": st.sampled_from(["1", "true", "0", "yes"]) | QUERY_TEXT,
                "junk": QUERY_TEXT,
            },
        ),
    ),
    st.builds(
        OperatorCase,
        kind=st.just("get_item"),
        target=known_or_random(["FINAL", "q-" + "0" * 32]),
        query=st.fixed_dictionaries({}, optional={"wait": WAIT_TEXT, "junk": QUERY_TEXT}),
    ),
    st.builds(
        OperatorCase,
        kind=st.sampled_from(["delete_item", "retry_item"]),
        target=PATH_IDS,
        query=st.fixed_dictionaries({}, optional={"junk": QUERY_TEXT}),
    ),
    st.builds(OperatorCase, kind=st.just("retry_item"), target=st.just("FINAL"), query=st.just({})),
    st.builds(
        OperatorCase,
        kind=st.sampled_from(["get_workspace", "delete_workspace", "reset_workspace", "card"]),
        target=known_or_random(["free", "hb"]),
        query=st.fixed_dictionaries(
            {}, optional={"purge": st.sampled_from(["1", "true", "no"]), "junk": QUERY_TEXT}
        ),
    ),
    st.builds(
        OperatorCase,
        kind=st.just("plain"),
        target=st.sampled_from(["/healthz", "/readyz", "/metrics", "/workspaces"]),
        query=st.fixed_dictionaries({}, optional={"junk": QUERY_TEXT, "wait": QUERY_TEXT}),
    ),
    st.builds(
        OperatorCase,
        kind=st.just("wrong_method"),
        target=st.sampled_from(
            [
                "/healthz",
                "/workspaces",
                "/workspaces/free/a2a",
                "/workspaces/free/heartbeat",
                "/workspaces/free/reset",
                "/queue/q-1",
                "/queue/q-1/retry",
            ]
        ),
        query=st.just({}),
        method=st.sampled_from(["PATCH", "PUT", "POST", "DELETE", "GET"]),
    ),
    st.builds(
        OperatorCase,
        kind=st.just("no_route"),
        target=PATH_IDS.map(lambda s: "/zz-" + quote(s, safe="")),
        query=st.just({}),
        method=st.sampled_from(["GET", "POST", "DELETE"]),
    ),
)
# Which (method, path) pairs exist, for wrong_method.
ROUTES = {
    "/healthz": {"GET"},
    "/workspaces": {"GET"},
    "/workspaces/free/a2a": {"POST"},
    "/workspaces/free/heartbeat": {"POST"},
    "/workspaces/free/reset": {"POST"},
    "/queue/q-1": {"GET", "DELETE"},
    "/queue/q-1/retry": {"POST"},
}


def operator_request(case: OperatorCase, final_id: str) -> tuple[str, str]:
    target = final_id if case.target == "FINAL" else case.target
    ident = quote(target, safe="")
    query = f"?{urlencode(case.query)}" if case.query else ""
    paths = {
        "list_queue": ("GET", f"/workspaces/{ident}/queue"),
        "get_item": ("GET", f"/queue/{ident}"),
        "delete_item": ("DELETE", f"/queue/{ident}"),
        "retry_item": ("POST", f"/queue/{ident}/retry"),
        "get_workspace": ("GET", f"/workspaces/{ident}"),
        "delete_workspace": ("DELETE", f"/workspaces/{ident}"),
        "reset_workspace": ("POST", f"/workspaces/{ident}/reset"),
        "card": ("GET", f"/workspaces/{ident}/a2a/.well-known/agent-card.json"),
    }
    method, path = paths.get(case.kind, (case.method, case.target))
    return method, path + query


def operator_expectation(case: OperatorCase, workspaces: set[str]) -> set[str]:
    """The codes SPEC allows ("ok" for a 2xx answer)."""
    q = case.query
    if set(case.target) & set("{}") and case.kind not in ("plain", "wrong_method", "no_route"):
        return {"not_found"}  # aiohttp's routes take no "{" or "}" in a path segment
    if case.kind == "list_queue":
        if case.target not in workspaces:
            return {"unknown_workspace"}
        verdicts = [
            "valid" if "state" not in q or q["state"] in STATES else "invalid",
            int_verdict(q.get("limit"), 1000),
            int_verdict(q.get("after"), 2**62),
        ]
    elif case.kind == "get_item":
        verdicts = [wait_verdict(q.get("wait"))]
        if verdicts == ["valid"]:
            return {"ok"} if case.target == "FINAL" else {"not_found"}
        if verdicts == ["either"]:
            return {"ok" if case.target == "FINAL" else "not_found", "invalid_request"}
    elif case.kind == "delete_item":
        return {"not_found"}
    elif case.kind == "retry_item":
        return {"conflict"} if case.target == "FINAL" else {"not_found"}
    elif case.kind in ("get_workspace", "delete_workspace", "reset_workspace", "card"):
        if case.target not in workspaces:
            return {"unknown_workspace"}
        if case.kind == "delete_workspace" and case.target in CONFIG_WORKSPACES:
            return {"conflict"}
        return {"ok"}
    elif case.kind == "plain":
        return {"ok"}
    elif case.kind == "wrong_method":
        return {"method_not_allowed"}
    else:
        return {"not_found"}
    if "invalid" in verdicts:
        return {"invalid_request"}
    return {"ok"} if "either" not in verdicts else {"ok", "invalid_request"}


async def test_fuzz_operator_endpoints(world: World) -> None:
    """Random ids in every path (encoded), random query strings (?state=, ?limit=,
    ?after=, ?bodies=, ?wait=, ?purge=), wrong methods and unknown paths."""

    async def example(case: OperatorCase) -> None:
        workspaces = await world.workspace_ids()
        before = await world.item_ids()
        method, path = operator_request(case, world.final_id)
        if case.kind == "wrong_method" and case.method in ROUTES[case.target]:
            return  # an allowed method: the other tests cover it
        reply = await world.call(method, path, headers=ADMIN)
        # a POST to a path ending in /a2a is answered in JSON-RPC, route or not
        rpc_path = method == "POST" and unquote(path.partition("?")[0]).endswith("/a2a")
        code = check_reply(reply, rpc_path=rpc_path)
        allowed = operator_expectation(case, workspaces)
        assert (code or "ok") in allowed, (case, reply.status, reply.text[:300])
        if case.kind == "list_queue" and code is None:
            page = reply.json
            limit = int(case.query.get("limit") or 0) or 100
            assert len(page["items"]) <= limit
            assert page["next"] is None or page["next"].isdigit()
            if "state" in case.query:
                assert {i["state"] for i in page["items"]} <= {case.query["state"]}
            with_bodies = case.query.get("bodies") in ("1", "true")
            assert all(("body" in i) == with_bodies for i in page["items"])
        if case.kind == "get_item" and code is None:
            assert reply.json["id"] == world.final_id and reply.json["state"] == "cancelled"
        if case.kind == "card" and code is None:
            assert reply.json["name"] == "fuzz agent"
        assert await world.item_ids() == before
        assert await world.workspace_ids() == workspaces

    await fuzz(OPERATOR_CASES, example, max_examples=800)
    await assert_still_works(world)


# -- PUT /workspaces/{id} -----------------------------------------------------------------

# Agent URLs: IP literals and localhost only (a name would be resolved), and hosts
# with an unmatched "[" or "]".
URL_HOSTS = st.sampled_from(
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "",
        "u:p@127.0.0.1",
        "[",
        "[::1",
        "127.0.0.1]",
    ]
)
URL_PORTS = st.sampled_from(["", ":1", ":65535", ":99999", ":x"])
URL_SCHEMES = st.sampled_from(["http", "https", "ftp", "HTTP"])
URLS = st.one_of(
    st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
        URL_SCHEMES,
        URL_HOSTS,
        URL_PORTS,
        st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=10),
    ),
    st.text(max_size=20).filter(lambda s: not re.match(r"^https?://", s, re.IGNORECASE)),
)
TIMEOUTS = st.floats(allow_nan=True) | st.sampled_from(["5", "x", 0, -1])


def infinite(value: Any) -> bool:
    """Would a lenient parser read `value` as an infinite number?"""
    try:
        return math.isinf(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


RUNTIME_FIELDS = ("url", "max_concurrent", "token", "heartbeat", "request_timeout_seconds")


@dataclass(frozen=True)
class PutCase:
    workspace: str
    body: Any


AGENT_URL = "(the agent's url)"  # replaced by the real one in the example
WRONG_TYPES = st.sampled_from([None, -1, 0, 2.5, 1.0, True, "2", "yes", "inf", [], {}])
TOKENS = st.uuids().map(lambda u: f"tok-put-{u.hex}")
PUT_OPTIONAL = {
    "max_concurrent": st.integers(1, 8),
    "token": TOKENS,
    "request_timeout_seconds": st.floats(0.5, 600),
}
PUT_BODIES = st.one_of(
    mutated(
        st.one_of(
            st.fixed_dictionaries(
                {"url": st.just(AGENT_URL) | URLS, "heartbeat": st.just(False)},
                optional=PUT_OPTIONAL,
            ),
            st.fixed_dictionaries(
                {"url": st.just(AGENT_URL) | URLS, "token": TOKENS},
                optional={
                    "max_concurrent": PUT_OPTIONAL["max_concurrent"],
                    "request_timeout_seconds": PUT_OPTIONAL["request_timeout_seconds"],
                    "heartbeat": st.just(True),
                },
            ),
        ),
        [(name,) for name in (*RUNTIME_FIELDS, "id", "restart_command", "status_command", "junk")],
        WRONG_TYPES | TIMEOUTS | JUNK,
    ),
    JSON_VALUES,
)
PUT_CASES = st.builds(
    PutCase,
    workspace=st.one_of(
        *[st.uuids().map(lambda u: f"fz-{u.hex[:12]}")] * 4,
        st.sampled_from(["free", "busy"]),
        PATH_IDS,
    ),
    body=PUT_BODIES,
)


async def registered(world: World) -> dict[str, Any]:
    """Each workspace's registration as the operator sees it (not its changing load)."""
    listing = await world.admin_json("/workspaces")
    return {ws["id"]: (ws["url"], ws["capacity"], ws["source"]) for ws in listing["workspaces"]}


def put_definitely_invalid(workspace: str, body: Any) -> bool:
    """Bodies SPEC's workspace keys cannot take, whatever a lenient parser makes of
    the rest."""
    if not isinstance(body, dict) or not WORKSPACE_ID.match(workspace):
        return True
    if set(body) - {*RUNTIME_FIELDS, "id"}:
        return True  # unknown fields, restart_command among them
    if "id" in body and body["id"] != workspace:
        return True
    url = body.get("url")
    if not isinstance(url, str) or not re.match(r"^https?://[^\s]+$", url):
        return True
    heartbeat = body.get("heartbeat", True)
    if heartbeat is True and not body.get("token"):
        return True  # a workspace with heartbeats needs a token
    concurrency = body.get("max_concurrent", 1)
    if isinstance(concurrency, (int, float)) and concurrency < 1:
        return True
    timeout = body.get("request_timeout_seconds", 1)
    if infinite(timeout):
        return True  # no infinite durations
    return isinstance(timeout, (int, float)) and not timeout > 0


async def test_fuzz_put_workspace(world: World) -> None:
    """PUT /workspaces/{id} with bodies of wrong types and junk URLs: refused with
    invalid_body (conflict for the config file's workspaces) and nothing changes; a
    workspace it does accept is listed as sent, never echoes its token, and takes a send."""

    async def example(case: PutCase) -> None:
        body = case.body
        if isinstance(body, dict) and body.get("url") == AGENT_URL:
            body = {**body, "url": world.agent.url}
        before = await registered(world)
        raw = dumps(body)
        ident = quote(case.workspace, safe="")
        reply = await world.call(
            "PUT", f"/workspaces/{ident}", body=raw, headers={**ADMIN, "A2AD-TTL": "junk"}
        )
        code = check_reply(reply, rpc_path=False)
        if set(case.workspace) & set("{}"):
            assert code == "not_found"  # aiohttp's routes take no "{" or "}" in a path segment
        elif case.workspace in CONFIG_WORKSPACES:
            assert code == "conflict", reply.text
        elif len(raw) > 65536:
            assert code == "body_too_large"
        elif put_definitely_invalid(case.workspace, body):
            assert code in ("invalid_body", "parse_error"), (body, reply.status, reply.text)
        else:
            assert code in (None, "invalid_body"), reply.text
        if code is not None:
            assert await registered(world) == before
            return
        assert isinstance(body, dict)
        token = body.get("token")
        if isinstance(token, str) and token.startswith("tok-put-"):
            assert token not in reply.text
        view = await world.admin_json(f"/workspaces/{ident}")
        assert view["url"] == body["url"] == reply.json["url"]
        assert view["id"] == case.workspace
        send = await world.call(
            "POST",
            f"/workspaces/{ident}/a2a",
            body=send_body("to a new workspace"),
            headers=CALLER,
        )
        check_reply(send, rpc_path=True, sent=send_body("to a new workspace"))
        assert send.status in (200, 202, 502, 504), send.text

    await fuzz(PUT_CASES, example, max_examples=400)
    await assert_still_works(world)


# -- POST /workspaces/{id}/heartbeat --------------------------------------------------------

HEARTBEAT_BODIES = st.one_of(
    mutated(
        st.fixed_dictionaries(
            {"active_tasks": st.integers(0, 10)},
            optional={"max_concurrent_tasks": st.integers(1, 10) | st.none()},
        ),
        [("active_tasks",), ("max_concurrent_tasks",), ("extra",)],
        WRONG_TYPES | st.sampled_from([10**6, 10**6 + 1, 2**40, -(2**40)]) | JUNK,
    ).map(dumps),
    JSON_VALUES.map(dumps),
    st.binary(max_size=40).map(Body),
    st.just(Body(b"{" * 5_000)),
)


def heartbeat_verdict(raw: bytes) -> str:
    """SPEC: {"active_tasks": int >= 0, "max_concurrent_tasks": int >= 1 (optional)}."""
    body = parsed(raw)
    if not isinstance(body, dict):
        return "invalid"
    if set(body) - {"active_tasks", "max_concurrent_tasks"}:
        return "invalid"

    def count(value: Any, least: int) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least:
            return "invalid"
        if isinstance(value, float):
            return "either" if value.is_integer() else "invalid"
        return "valid" if value <= 1_000_000 else "either"  # SPEC names no upper bound

    verdicts = [count(body.get("active_tasks"), 0)]
    if body.get("max_concurrent_tasks") is not None:
        verdicts.append(count(body["max_concurrent_tasks"], 1))
    if "invalid" in verdicts:
        return "invalid"
    return "either" if "either" in verdicts else "valid"


async def test_fuzz_heartbeats(world: World) -> None:
    """Heartbeat bodies of wrong types: a bad one is refused and leaves the
    workspace's load as it was; a good one is what the workspace view shows."""

    async def example(raw: bytes) -> None:
        before = await world.admin_json("/workspaces/hb")
        reply = await world.call(
            "POST",
            "/workspaces/hb/heartbeat",
            body=raw,
            headers={"Authorization": f"Bearer {HB_TOKEN}"},
        )
        code = check_reply(reply, rpc_path=False)
        verdict = "too large" if len(raw) > 65536 else heartbeat_verdict(raw)
        after = await world.admin_json("/workspaces/hb")
        if code is not None:
            assert verdict != "valid", (raw[:200], reply.text)
            if verdict == "too large":
                assert code == "body_too_large"
            else:
                assert code in ("invalid_body", "parse_error")
            assert after["active_tasks"] == before["active_tasks"]
            assert after["capacity"] == before["capacity"]
            return
        assert verdict != "invalid", (raw[:200], reply.text)
        assert reply.json == {"queue_depth": 0}
        body = json.loads(raw)
        assert after["active_tasks"] == body["active_tasks"]
        assert after["capacity"] == (body.get("max_concurrent_tasks") or 1)
        assert after["state"] == "online"

    await fuzz(HEARTBEAT_BODIES, example, max_examples=400)
    # The heartbeat workspace still takes a plain heartbeat, and everything else works.
    await heartbeat(world, "hb", HB_TOKEN, 0)
    await assert_still_works(world)


# -- bugs found by the fuzzing: each with its minimal input -------------------------------


@pytest.mark.parametrize("query", ["limit=%C2%B2", "after=%C2%B2"])
async def test_a_superscript_digit_in_a_query_is_a_client_error(world: World, query: str) -> None:
    reply = await world.call("GET", f"/workspaces/busy/queue?{query}", headers=ADMIN)
    assert reply.status == 400, reply.text
    assert reply.json["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("workspace", "body"),
    [
        (
            "busy",
            b'{"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"id": "q-\\ud800"}}',
        ),
        (
            "busy",
            b'{"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message":'
            b' {"role": "user", "parts": [], "messageId": "\\ud800"}}}',
        ),
        (
            "busy",
            b'{"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message":'
            b' {"role": "user", "parts": [], "contextId": "\\ud800"}}}',
        ),
        (
            "free",
            b'{"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message":'
            b' {"role": "user", "parts": []}, "id": "q-\\ud800"}}',
        ),
    ],
    ids=["GetTask id", "messageId", "contextId", "direct send naming a q- id"],
)
async def test_a_lone_surrogate_in_an_id_is_not_a_500(
    world: World, workspace: str, body: bytes
) -> None:
    before = await world.item_ids()
    reply = await world.call("POST", f"/workspaces/{workspace}/a2a", body=body, headers=CALLER)
    assert reply.status < 500, reply.text
    check_reply(reply, rpc_path=True, sent=body)
    if reply.status != 202:
        assert await world.item_ids() == before


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/workspaces/busy/a2a", CALLER),
        ("/workspaces/hb/heartbeat", {"Authorization": f"Bearer {HB_TOKEN}"}),
    ],
    ids=["proxy", "heartbeat"],
)
async def test_a_body_that_does_not_decode_is_a_json_client_error(
    world: World, encoding: str, path: str, headers: dict[str, str]
) -> None:
    reply = await world.call(
        "POST",
        path,
        body=b"not compressed",
        headers={**headers, "Content-Encoding": encoding, "Connection": "close"},
    )
    # SPEC, Errors: parse_error is HTTP 200 on the proxy path, 400 elsewhere.
    assert reply.status == (200 if path.endswith("/a2a") else 400), reply.text
    code = check_reply(reply, rpc_path=path.endswith("/a2a"), sent=b"")
    assert code == "parse_error"


async def test_a_url_with_an_unmatched_bracket_is_invalid_body(world: World) -> None:
    reply = await world.call(
        "PUT",
        "/workspaces/bracket",
        body=dumps({"url": "http://[", "heartbeat": False}),
        headers=ADMIN,
    )
    assert reply.status == 400, reply.text
    assert reply.json["error"]["code"] == "invalid_body"


async def test_an_infinite_request_timeout_does_not_break_the_workspace(world: World) -> None:
    reply = await world.call(
        "PUT",
        "/workspaces/forever",
        body=dumps({"url": world.agent.url, "heartbeat": False, "request_timeout_seconds": "inf"}),
        headers=ADMIN,
    )
    assert reply.status == 400, reply.text
    assert reply.json["error"]["code"] == "invalid_body"
    assert "request_timeout_seconds" in reply.json["error"]["message"]
