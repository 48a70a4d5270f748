"""Fixtures: real aiohttp agents on 127.0.0.1 and a real a2ad app on a real SQLite file,
or, in modules that set `BOTH_STORES = True`, on each store in turn: the SQLite file
and a schema of its own on the throwaway PostgreSQL server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fakes import A2ad, FakeAgent, make_settings
from pgserver import PgServer

from a2ad import create_app
from a2ad.clock import Clock
from a2ad.daemon import DAEMON
from a2ad.store.postgres import PostgresStore


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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    both = getattr(metafunc.module, "BOTH_STORES", False)
    sqlite_only = metafunc.definition.get_closest_marker("sqlite_only") is not None
    chosen = _parametrizes(metafunc, "store_kind")  # the test names its stores itself
    if both and not sqlite_only and not chosen and "a2ad_factory" in metafunc.fixturenames:
        metafunc.parametrize("store_kind", ["sqlite", "postgres"])


def _parametrizes(metafunc: pytest.Metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if name in names:
            return True
    return False


@pytest.fixture
def store_kind() -> str:
    return "sqlite"


@pytest.fixture
async def a2ad_factory(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    tmp_path: Path,
    store_kind: str,
    request: pytest.FixtureRequest,
) -> Callable[..., Awaitable[A2ad]]:
    store: dict[str, Any] = {}
    if store_kind == "postgres":
        server: PgServer = request.getfixturevalue("pg_server")
        store = {"url": server.url, "schema": f"t_{uuid.uuid4().hex[:12]}"}
        async with PostgresStore(server.url, schema=store["schema"]) as fresh:
            await fresh.migrate()  # as `a2ad migrate` would, before serve

    async def make(
        workspaces: list[dict[str, Any]], clock: Clock | None = None, **sections: dict[str, Any]
    ) -> A2ad:
        sections["store"] = {**store, **sections.get("store", {})}
        settings = make_settings(tmp_path, workspaces, **sections)
        app = create_app(settings, clock=clock)
        client = await aiohttp_client(app)
        return A2ad(client, app[DAEMON])

    return make
