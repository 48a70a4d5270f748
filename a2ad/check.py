"""`a2ad check`: is this config ready to serve? A table, and exit 1 if anything fails.

It reads and never writes: a store that does not exist yet is not created, and
a store another a2ad serves is only read."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import aiohttp

from .cards import card_urls
from .errors import StoreUnavailable
from .liveness import run_command
from .settings import Settings, WorkspaceSettings
from .store import Store, bundled_migrations, migrations_for, open_store
from .upstream import to_agent

PROBE_TIMEOUT = 3.0
OK, FAIL = "ok", "FAIL"


@dataclass
class Row:
    check: str
    result: str
    detail: str


def _postgres_row(settings: Settings) -> Row:
    """The server, its version, the schema version and whether a2ad can write there;
    it opens no write transaction and creates nothing."""
    where = settings.store.where

    async def look() -> tuple[str, bool, int]:
        from .store.postgres import PostgresStore  # the optional extra

        store = open_store(settings.store)
        assert isinstance(store, PostgresStore)
        await store.open(create_schema=False)
        try:
            version, writable = await store.server()
            return version, writable, await store.schema_version()
        finally:
            await store.close()

    try:
        version, writable, current = asyncio.run(look())
    except StoreUnavailable as exc:
        return Row("store", FAIL, exc.message)
    latest = migrations_for(settings.store)[-1].version
    detail = f"{where}: PostgreSQL {version}, schema {current} of {latest}"
    if not writable:
        return Row("store", FAIL, detail + ": cannot write (a standby, or no CREATE right)")
    if current > latest:
        return Row("store", FAIL, detail + ": written by a newer a2ad")
    if current < latest:
        return Row("store", FAIL, detail + ": run a2ad migrate")
    return Row("store", OK, detail + ", writable")


def _store_row(settings: Settings) -> Row:
    if settings.store.is_postgres:
        return _postgres_row(settings)
    path = settings.store.path
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        parent = directory
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            return Row("store", FAIL, f"{path} does not exist and {parent} is not writable")
        return Row("store", OK, f"{path} does not exist yet; a2ad serve creates it")
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(directory, os.W_OK):
        return Row("store", FAIL, f"{path}: a2ad needs to write the file and its directory")

    async def version() -> int:
        async with Store(path, synchronous=settings.store.synchronous) as store:
            return await store.schema_version()

    try:
        current = asyncio.run(version())
    except StoreUnavailable as exc:  # a broken or foreign file: what SQLite said
        return Row("store", FAIL, exc.message)
    latest = bundled_migrations()[-1].version
    detail = f"{path}, schema {current} of {latest}"
    if current > latest:
        return Row("store", FAIL, detail + ": written by a newer a2ad")
    if current < latest:
        detail += " (a2ad serve or a2ad migrate applies the rest)"
    return Row("store", OK, detail)


async def _probe(session: aiohttp.ClientSession, ws: WorkspaceSettings) -> Row:
    name = f"workspace {ws.id}"
    if ws.status_command:
        code, output = await run_command(ws.status_command, ws.id, PROBE_TIMEOUT)
        if code == 0:
            return Row(name, OK, f"{ws.url}: running (status_command)")
        if code is None:
            return Row(name, FAIL, f"status_command gave no answer within {PROBE_TIMEOUT:g} s")
        last = output.strip().splitlines()[-1:] or [""]
        return Row(name, FAIL, f"status_command exited {code}: {last[0][:120]}".rstrip(": "))
    url = card_urls(ws.url)[0]
    try:
        # With the agent's credentials, as a2ad serve sends them: an agent that
        # requires them answers 401 without.
        async with session.get(url, headers=to_agent(ws, {}), allow_redirects=False) as resp:
            if resp.status < 300:
                return Row(name, OK, f"{ws.url}: the agent card answers")
            return Row(name, FAIL, f"{url} answered HTTP {resp.status}")
    except TimeoutError:
        return Row(name, FAIL, f"{url}: no answer within {PROBE_TIMEOUT:g} s")
    except aiohttp.ClientConnectorError as exc:
        errno = exc.os_error.errno
        return Row(name, FAIL, f"{url}: {os.strerror(errno) if errno else exc}")
    except aiohttp.ClientError as exc:
        return Row(name, FAIL, f"{url}: {type(exc).__name__}")


async def _probe_all(settings: Settings) -> list[Row]:
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(_probe(session, ws) for ws in settings.workspaces)))


def run(settings: Settings, config_path: str | None) -> int:
    rows = [Row("config", OK, config_path or "defaults (no --config)"), _store_row(settings)]
    if settings.workspaces:
        rows += asyncio.run(_probe_all(settings))
    else:
        rows.append(Row("workspaces", OK, "none configured; PUT /workspaces/{id} adds them"))
    width = max(len(r.check) for r in rows)
    print(f"{'CHECK':<{width}}  RESULT  DETAIL")
    for row in rows:
        print(f"{row.check:<{width}}  {row.result:<6}  {row.detail}")
    return 1 if any(r.result == FAIL for r in rows) else 0
