"""README.md's Embedding examples, run as they stand there, in front of a real agent.

The three ```python blocks of the Embedding section are read from the README and
executed: the first (a2ad mounted under /a2ad of another application) and the second
(a2ad on its own port in the same process) into namespaces the tests below drive;
the third (a pytest fixture and a test using it) into this module, where pytest
collects its fixture and its test like any other."""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fakes import FakeAgent

from a2ad.daemon import DAEMON
from a2ad.settings import Settings
from a2ad.store import StoreLock, StoreLocked

README = Path(__file__).resolve().parents[2] / "README.md"
HEARTBEAT_TOKEN = "embedding-heartbeat-token"


@dataclass(frozen=True)
class Block:
    code: str
    line: int  # where the code starts in README.md


def readme_blocks() -> list[Block]:
    """The ```python blocks of the README's Embedding section, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Embedding\n")
    end = text.index("\n## ", start + 1)
    blocks = []
    for found in re.finditer(r"^```python\n(.*?)^```", text[start:end], re.M | re.S):
        line = text.count("\n", 0, start + found.start(1)) + 1
        blocks.append(Block(found.group(1), line))
    assert len(blocks) == 3, f"expected three python blocks under ## Embedding, found {len(blocks)}"
    return blocks


def run_block(block: Block, namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute a README block; tracebacks point at README.md and its line numbers."""
    padded = "\n" * (block.line - 1) + block.code
    exec(compile(padded, str(README), "exec"), namespace)
    return namespace


MOUNTED, OWN_PORT, PYTEST_FIXTURE = readme_blocks()

# The README's fixture and test join this module: pytest collects them from here.
run_block(PYTEST_FIXTURE, globals())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rpc(text: str, message_id: str) -> dict[str, Any]:
    message = {"role": "user", "messageId": message_id, "parts": [{"kind": "text", "text": text}]}
    params = {"message": message, "configuration": {"blocking": False}}
    return {"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": params}


@pytest.fixture
async def agent() -> AsyncIterator[FakeAgent]:
    """A real aiohttp agent with one slot and an agent card that names its own URL."""
    fake = FakeAgent(slots=1)

    async def card(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": "fake",
                "url": fake.url,
                "preferredTransport": "JSONRPC",
                "additionalInterfaces": [{"url": fake.url, "transport": "JSONRPC"}],
            }
        )

    app = web.Application()
    app.router.add_post("/", fake.handle)
    app.router.add_get("/.well-known/agent-card.json", card)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("/"))
    yield fake
    await server.close()


@pytest.fixture
def agent_url(agent: FakeAgent) -> str:
    """What the README's fixture calls "your agent's fixture"."""
    return agent.url


def settings_for(tmp_path: Path, agent: FakeAgent, **server: Any) -> Settings:
    return Settings(
        server=server,
        store={"path": str(tmp_path / "a2ad.db")},
        workspaces=[{"id": "demo", "url": agent.url, "token": HEARTBEAT_TOKEN}],
    )


def store_is_free(settings: Settings) -> bool:
    """Has a2ad's clean-up run? Then the store's lock is free again."""
    lock = StoreLock(settings.store.path)
    try:
        lock.acquire()
    except StoreLocked:
        return False
    lock.release()
    return True


async def test_mounted_under_a_prefix(
    tmp_path: Path,
    agent: FakeAgent,
    aiohttp_client: Callable[..., Any],
) -> None:
    port = free_port()
    public_url = f"http://127.0.0.1:{port}/a2ad"
    settings = settings_for(tmp_path, agent, public_url=public_url)
    build_app = run_block(MOUNTED, {"__name__": "readme_embedding"})["build_app"]
    app: web.Application = build_app(settings)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        TestServer(app, host="127.0.0.1", port=port)
    )

    resp = await client.get("/")
    assert await resp.text() == "your application"

    # Straight through to the agent while it has a free slot.
    resp = await client.post("/a2ad/workspaces/demo/a2a", json=rpc("one", "m-1"))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["result"]["parts"][0]["text"] == "echo: one"

    # The agent's card points at a2ad's public URL, prefix included.
    resp = await client.get("/a2ad/workspaces/demo/a2a/.well-known/agent-card.json")
    assert resp.status == 200, await resp.text()
    card = await resp.json()
    assert card["url"] == f"{public_url}/workspaces/demo/a2a"
    assert card["additionalInterfaces"] == [{"url": card["url"], "transport": "JSONRPC"}]

    resp = await client.post(
        "/a2ad/workspaces/demo/heartbeat",
        json={"active_tasks": 0, "max_concurrent_tasks": 1},
        headers={"Authorization": f"Bearer {HEARTBEAT_TOKEN}"},
    )
    assert resp.status == 200, await resp.text()

    # With the slot taken, a send is queued; a2ad's delivery loop, started by the
    # parent's start-up, delivers it once the slot frees.
    agent.gate = asyncio.Event()

    async def send_two() -> int:
        async with client.post("/a2ad/workspaces/demo/a2a", json=rpc("two", "m-2")) as resp:
            return resp.status

    first = asyncio.create_task(send_two())
    await agent.wait_received(2)
    resp = await client.post("/a2ad/workspaces/demo/a2a", json=rpc("three", "m-3"))
    assert resp.status == 202, await resp.text()
    queue_id = (await resp.json())["result"]["id"]
    agent.gate.set()
    assert await first == 200
    resp = await client.get(f"/a2ad/queue/{queue_id}", params={"wait": "10"})
    item = await resp.json()
    assert item["state"] == "delivered", item
    assert item["result"]["result"]["parts"][0]["text"] == "echo: three"

    # Unknown paths inside a2ad get its JSON errors, its bare prefix too.
    resp = await client.get("/a2ad/queue/q-" + "0" * 32)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    for path, status in (("/a2ad", 404), ("/a2ad/", 404), ("/a2ad/nothing", 404)):
        resp = await client.post(path)
        assert resp.status == status and resp.headers["X-Request-Id"], path
        assert (await resp.json())["error"]["code"] == "not_found", path
    resp = await client.delete("/a2ad/healthz")
    assert (await resp.json())["error"]["code"] == "method_not_allowed"

    assert not store_is_free(settings)
    await client.close()  # the parent's clean-up runs a2ad's
    assert store_is_free(settings)


def test_mounted_example_runs_as_a_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent_url: str
) -> None:
    """The README's `__main__` part: run_app gets arguments it accepts and the app."""
    (tmp_path / "a2ad.toml").write_text(
        '[server]\npublic_url = "http://127.0.0.1:8080/a2ad"\n'
        f'[store]\npath = "{tmp_path / "a2ad.db"}"\n'
        f'[[workspaces]]\nid = "demo"\nurl = "{agent_url}"\nheartbeat = false\n'
    )
    monkeypatch.chdir(tmp_path)
    calls: list[inspect.BoundArguments] = []
    signature = inspect.signature(web.run_app)
    monkeypatch.setattr(web, "run_app", lambda *a, **kw: calls.append(signature.bind(*a, **kw)))
    run_block(MOUNTED, {"__name__": "__main__"})
    (call,) = calls
    parent = call.arguments["app"]
    assert isinstance(parent, web.Application)
    assert [r.canonical for r in parent.router.resources()] == ["/", "/a2ad"]
    assert call.kwargs["handler_cancellation"] is True


async def test_on_a_port_of_its_own(tmp_path: Path, agent: FakeAgent) -> None:
    port = free_port()
    settings = settings_for(tmp_path, agent, host="127.0.0.1", port=port)
    start_a2ad = run_block(OWN_PORT, {"__name__": "readme_embedding"})["start_a2ad"]
    runner: web.AppRunner = await start_a2ad(settings)
    try:
        assert runner.app[DAEMON].loops_running
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(base) as session:
            async with session.post("/workspaces/demo/a2a", json=rpc("hello", "m-1")) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
            assert answer["result"]["parts"][0]["text"] == "echo: hello"
            card_path = "/workspaces/demo/a2a/.well-known/agent-card.json"
            async with session.get(card_path) as resp:
                card = await resp.json()
            assert card["url"] == f"{base}/workspaces/demo/a2a"
    finally:
        await runner.cleanup()
    assert store_is_free(settings)
