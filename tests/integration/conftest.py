"""Fixtures: real aiohttp agents on 127.0.0.1 and a real a2ad app on a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fakes import A2ad, FakeAgent, make_settings

from a2ad import create_app
from a2ad.clock import Clock
from a2ad.daemon import DAEMON


@pytest.fixture
async def agent_factory() -> AsyncIterator[Callable[..., Awaitable[FakeAgent]]]:
    servers: list[TestServer] = []

    async def make(**kwargs: Any) -> FakeAgent:
        agent = FakeAgent(**kwargs)
        app = web.Application()
        app.router.add_post("/", agent.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        agent.url = str(server.make_url("/"))
        return agent

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def a2ad_factory(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    tmp_path: Path,
) -> Callable[..., Awaitable[A2ad]]:
    async def make(
        workspaces: list[dict[str, Any]], clock: Clock | None = None, **sections: dict[str, Any]
    ) -> A2ad:
        settings = make_settings(tmp_path, workspaces, **sections)
        app = create_app(settings, clock=clock)
        client = await aiohttp_client(app)
        return A2ad(client, app[DAEMON])

    return make
