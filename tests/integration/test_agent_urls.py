"""Request forgery: which URLs a run-time workspace (PUT /workspaces/{id}) may name."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import A2ad, FakeAgent

A2adFactory = Callable[..., Awaitable[A2ad]]
AgentFactory = Callable[..., Awaitable[FakeAgent]]


async def put(a2ad: A2ad, url: str) -> tuple[int, dict[str, Any]]:
    resp = await a2ad.client.put("/workspaces/rt", json={"url": url, "heartbeat": False})
    data: dict[str, Any] = await resp.json()
    return resp.status, data


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]:8080/", "link-local"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://100.100.100.200/", "metadata"),
        ("http://[fd00:ec2::254]/", "metadata"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
        ("http://0.0.0.0:9001/", "unicast"),
        ("http://224.0.0.1/", "unicast"),
        ("http://user:secret@127.0.0.1:9001/", "credentials"),
        ("ftp://127.0.0.1/", "http"),
        ("file:///etc/passwd", "http"),
    ],
)
async def test_forgery_targets_are_refused(a2ad_factory: A2adFactory, url: str, why: str) -> None:
    a2ad = await a2ad_factory([])
    status, data = await put(a2ad, url)
    assert status == 400, data
    assert data["error"]["code"] == "invalid_body"
    assert why in data["error"]["message"]
    # Nothing was registered.
    resp = await a2ad.client.get("/workspaces/rt")
    assert resp.status == 404


async def test_a_hostname_is_checked_by_what_it_resolves_to(a2ad_factory: A2adFactory) -> None:
    """localhost resolves to loopback: allowed. A name that does not resolve is a
    clear 400, not a workspace that can never be reached."""
    a2ad = await a2ad_factory([])
    status, data = await put(a2ad, "http://localhost:9/")
    assert status == 201, data
    status, data = await put(a2ad, "http://no-such-host.invalid/")
    assert status == 400, data
    assert "cannot resolve" in data["error"]["message"]


async def test_loopback_and_private_agents_are_allowed(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory
) -> None:
    fake = await agent_factory()
    a2ad = await a2ad_factory([])
    for url in ("http://10.1.2.3:9/", "http://[::1]:9/", "http://192.168.1.10/", fake.url):
        status, data = await put(a2ad, url)
        assert status in (200, 201), (url, data)
    status, data = await a2ad.send("rt", "hi")
    assert status == 200 and data["result"]["parts"][0]["text"] == "echo: hi"


async def test_the_operator_can_allow_link_local_agents(a2ad_factory: A2adFactory) -> None:
    a2ad = await a2ad_factory([], auth={"allow_link_local_agents": True})
    status, data = await put(a2ad, "http://169.254.10.20:9001/")
    assert status == 201, data
    # Schemes other than http(s) stay refused whatever the setting.
    status, data = await put(a2ad, "ftp://169.254.10.20/")
    assert status == 400, data


async def test_redirects_from_an_agent_are_not_followed(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory
) -> None:
    """An agent that answers 307 elsewhere: a2ad relays the redirect and does not
    go there itself (it connects only to registered URLs)."""
    target = await agent_factory()
    redirector = web.Application()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target.url)

    redirector.router.add_post("/", redirect)
    server = TestServer(redirector, host="127.0.0.1")
    await server.start_server()
    try:
        a2ad = await a2ad_factory(
            [{"id": "w", "url": str(server.make_url("/")), "heartbeat": False}]
        )
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "message/send",
            "params": {"message": {"role": "user", "parts": [{"kind": "text", "text": "hi"}]}},
        }
        resp = await a2ad.client.post("/workspaces/w/a2a", json=body, allow_redirects=False)
        assert resp.status == 307
        assert target.received == []
    finally:
        await server.close()
