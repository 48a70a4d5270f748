"""Request forgery: which URLs a run-time workspace (PUT /workspaces/{id}) may name."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from fakes import A2ad, FakeAgent
from yarl import URL

from a2ad.agent_urls import AgentResolver
from a2ad.settings import WorkspaceSettings
from a2ad.upstream import Outcome, Upstream

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
            "params": {
                "message": {
                    "messageId": "m-1",
                    "role": "user",
                    "parts": [{"kind": "text", "text": "hi"}],
                }
            },
        }
        resp = await a2ad.client.post("/workspaces/w/a2a", json=body, allow_redirects=False)
        assert resp.status == 307
        assert target.received == []
    finally:
        await server.close()


# -- at every connect: a name that passed registration cannot be rebound ---------


class ChangingDns(AbstractResolver):
    """Stands in for a DNS server whose answers the test sets: what a name that
    passed registration resolves to later is up to whoever runs its DNS."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.answers[host]
        ]

    async def close(self) -> None:
        pass


def _send_to(host: str, port: int) -> WorkspaceSettings:
    return WorkspaceSettings(
        id="rt", url=f"http://{host}:{port}/", heartbeat=False, request_timeout_seconds=3
    )


async def test_a_name_rebound_to_a_metadata_address_is_refused_at_connect(
    agent_factory: AgentFactory,
) -> None:
    agent = await agent_factory()
    port = URL(agent.url).port
    assert port is not None
    dns = ChangingDns(
        {
            "agent.test": ["127.0.0.1"],
            "rebound.test": ["169.254.169.254"],
            "mixed.test": ["169.254.169.254", "127.0.0.1"],
            "metadata.google.internal": ["127.0.0.1"],
        }
    )
    upstream = Upstream(
        max_result_bytes=1 << 20,
        resolver=lambda: AgentResolver(trusted_urls=[], allow_link_local=False, inner=dns),
    )
    await upstream.start()
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message": {}}}
    ).encode()
    try:
        answer = await upstream.send(_send_to("agent.test", port), body, {})
        assert answer.outcome is Outcome.FINAL, answer
        # The same kind of name, now answered with the metadata address.
        answer = await upstream.send(_send_to("rebound.test", port), body, {})
        assert answer.outcome is Outcome.BUSY and answer.refused, answer
        assert "link-local" in (answer.error or "")
        assert "allow_link_local_agents" in (answer.error or "")
        # A refused address among allowed ones is dropped; the rest are used.
        answer = await upstream.send(_send_to("mixed.test", port), body, {})
        assert answer.outcome is Outcome.FINAL, answer
        # A metadata service's name is refused whatever it resolves to.
        answer = await upstream.send(_send_to("metadata.google.internal", port), body, {})
        assert answer.outcome is Outcome.BUSY and "metadata" in (answer.error or "")
    finally:
        await upstream.close()
    assert len(agent.received) == 2  # agent.test and mixed.test, nothing else
    assert "metadata.google.internal" not in dns.asked


async def test_config_hosts_and_the_operators_allowance_pass_the_resolver() -> None:
    dns = ChangingDns({"agent.internal": ["169.254.10.10"], "other.test": ["169.254.10.10"]})
    trusted = AgentResolver(
        trusted_urls=["http://Agent.Internal.:9001/"], allow_link_local=False, inner=dns
    )
    [result] = await trusted.resolve("agent.internal", 9001)
    assert result["host"] == "169.254.10.10"
    with pytest.raises(OSError, match="link-local"):
        await trusted.resolve("other.test", 9001)
    allowed = AgentResolver(trusted_urls=[], allow_link_local=True, inner=dns)
    [result] = await allowed.resolve("other.test", 9001)
    assert result["host"] == "169.254.10.10"


async def test_a_stored_workspace_the_policy_now_refuses_is_not_served(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Registered while link-local agents were allowed; a2ad restarts with them
    refused: the workspace is not served and the log says why; a PUT with another
    URL brings it back."""
    allowed = await a2ad_factory([], auth={"allow_link_local_agents": True})
    status, data = await put(allowed, "http://169.254.10.10:9/")
    assert status == 201, data
    await allowed.client.close()  # stops that a2ad and lets go of the store

    again = await a2ad_factory([])
    resp = await again.client.get("/workspaces/rt")
    assert resp.status == 404
    assert any(
        "rt" in r.message and "allow_link_local_agents" in r.message
        for r in caplog.records
        if r.levelname == "ERROR"
    )
    agent = await agent_factory()
    status, data = await put(again, agent.url)
    assert status == 201, data
    status, data = await again.send("rt", "hello again")
    assert status == 200, data
