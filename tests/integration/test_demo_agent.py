"""The demo agent: echo in both A2A shapes, slots and 503s, errors, the card, heartbeats."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from a2ad.demo_agent import (
    STATE,
    Heartbeat,
    create_demo_app,
    enable_heartbeats,
    main,
)

ROOT = Path(__file__).resolve().parents[2]
WAIT = 5.0  # upper bound for things that happen within milliseconds


def v03_send(text: str, rpc_id: Any = 1, context_id: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {
        "kind": "message",
        "role": "user",
        "messageId": str(uuid.uuid4()),
        "parts": [{"kind": "text", "text": text}],
    }
    if context_id is not None:
        message["contextId"] = context_id
    return {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "method": "message/send",
        "params": {"message": message},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Beat:
    workspace: str
    authorization: str | None
    body: Any


@dataclass
class Recorder:
    """A stand-in for a2ad's heartbeat endpoint that records what it receives."""

    beats: asyncio.Queue[Beat] = field(default_factory=asyncio.Queue)
    # Statuses to answer, in order; 200 once they run out.
    script: list[int] = field(default_factory=list)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        status = self.script.pop(0) if self.script else 200
        beat = Beat(
            request.match_info["workspace"],
            request.headers.get("Authorization"),
            await request.json(),
        )
        await self.beats.put(beat)
        if status != 200:
            return web.json_response({"error": {"code": "x", "message": "no"}}, status=status)
        return web.json_response({"queue_depth": 0})

    async def next(self) -> Beat:
        return await asyncio.wait_for(self.beats.get(), WAIT)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/"))


@pytest.fixture
async def recorder(aiohttp_server: AiohttpServer) -> Recorder:
    rec = Recorder()
    app = web.Application()
    app.router.add_post("/workspaces/{workspace}/heartbeat", rec.handle)
    rec.server = await aiohttp_server(app)
    return rec


async def stats(client: TestClient[Any, Any]) -> dict[str, int]:
    resp = await client.get("/stats")
    assert resp.status == 200
    data: dict[str, int] = await resp.json()
    return data


async def test_echoes_in_the_v03_shape(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_demo_app())
    body = v03_send("hello", rpc_id=7, context_id="ctx-1")
    body["params"]["message"]["parts"].append({"kind": "text", "text": "world"})

    resp = await client.post("/", json=body, headers={"A2A-Version": "0.3"})

    assert resp.status == 200
    answer = await resp.json()
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] == 7
    result = answer["result"]
    uuid.UUID(result.pop("messageId"))
    assert result == {
        "kind": "message",
        "role": "agent",
        "parts": [{"kind": "text", "text": "echo: hello\nworld"}],
        "contextId": "ctx-1",
    }
    assert await stats(client) == {"served": 1, "busy": 0, "active": 0}


async def test_echoes_in_the_v03_shape_without_a_version_header(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await aiohttp_client(create_demo_app())

    resp = await client.post("/", json=v03_send("plain", rpc_id="a"))

    answer = await resp.json()
    assert answer["id"] == "a"
    assert answer["result"]["kind"] == "message"
    assert answer["result"]["parts"] == [{"kind": "text", "text": "echo: plain"}]
    assert "contextId" not in answer["result"]


async def test_echoes_in_the_1_0_shape(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_demo_app())
    body = {
        "jsonrpc": "2.0",
        "id": "req-1",
        "method": "SendMessage",
        "params": {
            "message": {
                "role": "ROLE_USER",
                "messageId": "m-1",
                "contextId": "ctx-9",
                "parts": [{"text": "hi"}, {"data": {"ignored": True}}],
            }
        },
    }

    resp = await client.post("/", json=body, headers={"A2A-Version": "1.0"})

    assert resp.status == 200
    answer = await resp.json()
    assert answer["id"] == "req-1"
    message = answer["result"]["message"]
    uuid.UUID(message.pop("messageId"))
    assert answer["result"] == {
        "message": {"role": "ROLE_AGENT", "parts": [{"text": "echo: hi"}], "contextId": "ctx-9"}
    }


async def test_second_request_while_the_only_slot_is_taken_is_busy(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await aiohttp_client(create_demo_app(delay=0.2))

    first, second = await asyncio.gather(
        client.post("/", json=v03_send("one", rpc_id=1)),
        client.post("/", json=v03_send("two", rpc_id=2)),
    )

    by_status = {first.status: first, second.status: second}
    assert sorted(by_status) == [200, 503]
    busy = by_status[503]
    assert busy.headers["Retry-After"] == "1"
    answer = await busy.json()
    assert answer["error"] == {"code": -32000, "message": "busy"}
    assert answer["id"] in (1, 2)
    assert (await by_status[200].json())["id"] != answer["id"]
    assert await stats(client) == {"served": 1, "busy": 1, "active": 0}

    # The slot is free again once the first request is answered.
    again = await client.post("/", json=v03_send("three"))
    assert again.status == 200


async def test_two_slots_take_two_requests_at_once(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_demo_app(delay=0.05, slots=2))

    answers = await asyncio.gather(
        client.post("/", json=v03_send("one")), client.post("/", json=v03_send("two"))
    )

    assert [a.status for a in answers] == [200, 200]
    assert await stats(client) == {"served": 2, "busy": 0, "active": 0}


@pytest.mark.parametrize(
    ("body", "headers", "rpc_id", "code", "message"),
    [
        (b"{not json", {}, None, -32700, None),
        (b"[]", {}, None, -32600, None),
        (b'{"id": 1, "method": "message/send"}', {}, None, -32600, None),
        (b'{"jsonrpc": "2.0", "id": 3, "method": "tasks/get", "params": {}}', {}, 3, -32601, None),
        (
            b'{"jsonrpc": "2.0", "id": 4, "method": "message/send", "params": {}}',
            {},
            4,
            -32602,
            None,
        ),
        (
            b'{"jsonrpc": "2.0", "id": 5, "method": "SendMessage"}',
            {"A2A-Version": "1.0"},
            5,
            -32602,
            None,
        ),
        (
            b'{"jsonrpc": "2.0", "id": 6, "method": "message/stream", "params": {"message": {}}}',
            {},
            6,
            -32601,
            "streaming not supported by the demo agent",
        ),
        (
            b'{"jsonrpc": "2.0", "id": 7, "method": "SendStreamingMessage", "params": {}}',
            {"A2A-Version": "1.0"},
            7,
            -32601,
            "streaming not supported by the demo agent",
        ),
    ],
)
async def test_bad_requests_get_json_rpc_errors(
    aiohttp_client: AiohttpClient,
    body: bytes,
    headers: dict[str, str],
    rpc_id: Any,
    code: int,
    message: str | None,
) -> None:
    client = await aiohttp_client(create_demo_app())

    resp = await client.post("/", data=body, headers=headers)

    assert resp.status == 200
    answer = await resp.json()
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] == rpc_id
    assert answer["error"]["code"] == code
    if message is not None:
        assert answer["error"]["message"] == message
    assert await stats(client) == {"served": 0, "busy": 0, "active": 0}


@pytest.mark.parametrize("path", ["/.well-known/agent-card.json", "/.well-known/agent.json"])
async def test_agent_card(aiohttp_client: AiohttpClient, path: str) -> None:
    client = await aiohttp_client(create_demo_app(name="echo-bot"))
    url = f"http://127.0.0.1:{client.port}/"

    resp = await client.get(path)

    assert resp.status == 200
    card = await resp.json()
    assert isinstance(card.pop("description"), str)
    assert card == {
        "name": "echo-bot",
        "version": "0.1.0",
        "url": url,
        "preferredTransport": "JSONRPC",
        "protocolVersion": "0.3.0",
        "supportedInterfaces": [
            {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}
        ],
        "capabilities": {"streaming": False},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": [
            {
                "id": "echo",
                "name": "echo",
                "description": "Echoes the text it receives",
                "tags": ["demo"],
            }
        ],
    }


async def test_agent_card_url_follows_the_host_header(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_demo_app())

    resp = await client.get("/.well-known/agent-card.json", headers={"Host": "agent.local:9001"})

    card = await resp.json()
    assert card["url"] == "http://agent.local:9001/"
    assert card["supportedInterfaces"][0]["url"] == "http://agent.local:9001/"


async def test_heartbeat_at_start_and_after_each_request(
    aiohttp_client: AiohttpClient, recorder: Recorder
) -> None:
    app = create_demo_app(slots=2)
    # A long interval: every beat after the first comes from a finished request.
    enable_heartbeats(app, a2ad_url=recorder.url, workspace="demo", token="s3cret", interval=600)
    client = await aiohttp_client(app)

    first = await recorder.next()
    assert first == Beat("demo", "Bearer s3cret", {"active_tasks": 0, "max_concurrent_tasks": 2})

    resp = await client.post("/", json=v03_send("ping"))
    assert resp.status == 200

    after = await recorder.next()
    assert after == Beat("demo", "Bearer s3cret", {"active_tasks": 0, "max_concurrent_tasks": 2})


async def test_heartbeats_report_requests_in_flight(
    aiohttp_client: AiohttpClient, recorder: Recorder
) -> None:
    app = create_demo_app(delay=0.2, slots=3)
    enable_heartbeats(app, a2ad_url=recorder.url, workspace="w1", token="t", interval=0.02)
    client = await aiohttp_client(app)
    assert (await recorder.next()).body["active_tasks"] == 0

    request = asyncio.create_task(client.post("/", json=v03_send("slow")))
    while (await recorder.next()).body != {"active_tasks": 1, "max_concurrent_tasks": 3}:
        pass
    assert (await request).status == 200
    while (await recorder.next()).body["active_tasks"] != 0:
        pass


async def test_failing_heartbeats_are_logged_once_per_outage(
    aiohttp_client: AiohttpClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="a2ad.demo_agent")
    recorder.script = [503, 401, 503, 200, 200, 500, 500, 200]
    app = create_demo_app()
    enable_heartbeats(app, a2ad_url=recorder.url, workspace="demo", token="t", interval=0.01)
    client = await aiohttp_client(app)

    # One beat past the script, so the loop has handled every scripted answer.
    for _ in range(len(recorder.script) + 1):
        await recorder.next()

    records = [r for r in caplog.records if r.name == "a2ad.demo_agent"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "HTTP 503" in warnings[0].getMessage()
    assert "HTTP 500" in warnings[1].getMessage()
    assert sum("works again" in r.getMessage() for r in records) == 2
    # The agent keeps serving throughout.
    assert (await client.post("/", json=v03_send("still here"))).status == 200


async def test_heartbeat_to_a_closed_port_fails_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="a2ad.demo_agent")
    app = create_demo_app()
    url = f"http://127.0.0.1:{free_port()}"
    async with aiohttp.ClientSession() as session:
        heartbeat = Heartbeat(
            app[STATE], session, a2ad_url=url, workspace="demo", token="s3cret", interval=5
        )
        assert [await heartbeat.beat() for _ in range(3)] == [False, False, False]

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ClientConnectorError" in warnings[0].getMessage()
    assert "s3cret" not in caplog.text


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="slots"):
        create_demo_app(slots=0)
    with pytest.raises(ValueError, match="interval"):
        enable_heartbeats(web.Application(), a2ad_url="x", workspace="w", token="t", interval=0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--a2ad", "http://127.0.0.1:8470"],
        ["--workspace", "demo", "--token", "t"],
        ["--slots", "0"],
        ["--heartbeat-interval", "0"],
    ],
)
def test_main_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


async def test_runs_as_a_module_and_sends_heartbeats(recorder: Recorder) -> None:
    port = free_port()
    argv = ["--port", str(port), "--delay", "0", "--slots", "2", "--name", "cli"]
    argv += ["--a2ad", recorder.url, "--workspace", "demo", "--token", "tok"]
    argv += ["--heartbeat-interval", "600"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "a2ad.demo_agent",
        *argv,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
        assert f"listening on http://127.0.0.1:{port}/" in line
        assert (await recorder.next()).body == {"active_tasks": 0, "max_concurrent_tasks": 2}

        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/", json=v03_send("x")) as resp:
                assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{port}/stats") as resp:
                assert await resp.json() == {"served": 1, "busy": 0, "active": 0}
        assert (await recorder.next()).authorization == "Bearer tok"
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0
