"""Test parts: a scriptable agent on a real aiohttp server, and a client for a2ad."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from aiohttp.test_utils import TestClient
from psycopg import sql as pgsql

from a2ad.daemon import Daemon
from a2ad.settings import Settings, StoreSettings


@dataclass
class Received:
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def text(self) -> str:
        parts = self.body["params"]["message"].get("parts", [])
        return "".join(p.get("text", "") for p in parts)


Reply = tuple[int, Any, dict[str, str]]  # status, JSON body (or bytes), headers


@dataclass
class FakeAgent:
    """A scriptable A2A agent: answers from `script` first, then echoes.

    With `slots` set it answers 503 while that many requests are running, as
    a real one-slot agent does."""

    delay: float = 0.0
    slots: int | None = None
    script: list[Reply | str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    served: list[Received] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    gate: asyncio.Event | None = None  # when set, message sends wait for it
    before_last: asyncio.Event | None = None  # a stream waits for it before its last event
    url: str = ""
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    def echo(self, rpc: dict[str, Any], protocol: str) -> dict[str, Any]:
        text = "".join(p.get("text", "") for p in rpc["params"]["message"].get("parts", []))
        if protocol == "1.0":
            message = {
                "messageId": f"r-{len(self.served)}",
                "role": "ROLE_AGENT",
                "parts": [{"text": f"echo: {text}"}],
            }
            return {"jsonrpc": "2.0", "id": rpc.get("id"), "result": {"message": message}}
        message = {
            "kind": "message",
            "messageId": f"r-{len(self.served)}",
            "role": "agent",
            "parts": [{"kind": "text", "text": f"echo: {text}"}],
        }
        return {"jsonrpc": "2.0", "id": rpc.get("id"), "result": message}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rpc = await request.json()
        got = Received(rpc, dict(request.headers))
        self.received.append(got)
        async with self.arrived:
            self.arrived.notify_all()
        if self.slots is not None and self.active >= self.slots:
            return web.json_response(
                {
                    "jsonrpc": "2.0",
                    "id": rpc.get("id"),
                    "error": {"code": -32000, "message": "busy"},
                },
                status=503,
            )
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.script:
                step = self.script.pop(0)
                if step == "drop":
                    assert request.transport is not None
                    request.transport.close()
                    return web.Response()
                assert not isinstance(step, str)
                status, body, headers = step
                if isinstance(body, bytes):
                    return web.Response(body=body, status=status, headers=headers)
                return web.json_response(body, status=status, headers=headers)
            self.served.append(got)
            protocol = "1.0" if request.headers.get("A2A-Version", "").startswith("1") else "0.3"
            if rpc["method"] in ("message/stream", "SendStreamingMessage"):
                return await self.stream(request, rpc, protocol)
            return web.json_response(self.echo(rpc, protocol))
        finally:
            self.active -= 1

    async def stream(
        self, request: web.Request, rpc: dict[str, Any], protocol: str
    ) -> web.StreamResponse:
        """A Task, a working status, an echo artifact, then completed: as SSE."""
        n = len(self.served) - 1
        text = "".join(p.get("text", "") for p in rpc["params"]["message"].get("parts", []))
        task_id, context_id = f"agent-task-{n}", f"agent-ctx-{n}"
        if protocol == "1.0":
            events: list[dict[str, Any]] = [
                {
                    "task": {
                        "id": task_id,
                        "contextId": context_id,
                        "status": {"state": "TASK_STATE_SUBMITTED"},
                    }
                },
                {
                    "statusUpdate": {
                        "taskId": task_id,
                        "contextId": context_id,
                        "status": {"state": "TASK_STATE_WORKING"},
                    }
                },
                {
                    "artifactUpdate": {
                        "taskId": task_id,
                        "contextId": context_id,
                        "artifact": {"artifactId": "a1", "parts": [{"text": f"echo: {text}"}]},
                    }
                },
                {
                    "statusUpdate": {
                        "taskId": task_id,
                        "contextId": context_id,
                        "status": {"state": "TASK_STATE_COMPLETED"},
                    }
                },
            ]
        else:
            events = [
                {
                    "kind": "task",
                    "id": task_id,
                    "contextId": context_id,
                    "status": {"state": "submitted"},
                },
                {
                    "kind": "status-update",
                    "taskId": task_id,
                    "contextId": context_id,
                    "status": {"state": "working"},
                    "final": False,
                },
                {
                    "kind": "artifact-update",
                    "taskId": task_id,
                    "contextId": context_id,
                    "artifact": {
                        "artifactId": "a1",
                        "parts": [{"kind": "text", "text": f"echo: {text}"}],
                    },
                },
                {
                    "kind": "status-update",
                    "taskId": task_id,
                    "contextId": context_id,
                    "status": {"state": "completed"},
                    "final": True,
                },
            ]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": hello\n\n")
        for i, event in enumerate(events):
            if i == len(events) - 1 and self.before_last is not None:
                await self.before_last.wait()
            data = {"jsonrpc": "2.0", "id": rpc.get("id"), "result": event}
            await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        await response.write_eof()
        return response

    async def wait_received(self, n: int, within: float = 5.0) -> None:
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(lambda: len(self.received) >= n)


@dataclass
class A2ad:
    client: TestClient[web.Request, web.Application]
    daemon: Daemon

    async def send(
        self,
        workspace: str,
        text: str,
        *,
        message_id: str | None = None,
        method: str | None = None,
        rpc_id: Any = 1,
        headers: dict[str, str] | None = None,
        blocking: bool = False,
    ) -> tuple[int, dict[str, Any]]:
        """A message send, named in the version the headers speak (SendMessage with
        A2A-Version 1.x, else message/send). Not blocking unless asked: a queued send
        is answered 202 at once (a blocking one is held until its item ends)."""
        v1 = bool(headers and headers.get("A2A-Version", "").startswith("1"))
        method = method or ("SendMessage" if v1 else "message/send")
        message: dict[str, Any] = {"role": "user", "parts": [{"kind": "text", "text": text}]}
        if v1:
            message = {"role": "ROLE_USER", "parts": [{"text": text}]}
        message["messageId"] = message_id or f"m-{uuid.uuid4().hex}"
        params: dict[str, Any] = {"message": message}
        if not blocking and method in ("message/send", "SendMessage"):
            params["configuration"] = {"returnImmediately": True} if v1 else {"blocking": False}
        body = {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}
        resp = await self.client.post(
            f"/workspaces/{workspace}/a2a", json=body, headers=headers or {}
        )
        return resp.status, await resp.json()

    async def rpc(
        self,
        workspace: str,
        method: str,
        params: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
        resp = await self.client.post(
            f"/workspaces/{workspace}/a2a", json=body, headers=headers or {}
        )
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data

    async def item(
        self, qid: str, wait: float = 0, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        resp = await self.client.get(
            f"/queue/{qid}", params={"wait": str(wait)}, headers=headers or {}
        )
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data

    async def final(self, qid: str, within: float = 10.0) -> dict[str, Any]:
        item = await self.item(qid, wait=within)
        assert item["state"] not in ("queued", "dispatching"), item
        return item


def make_settings(
    tmp_path: Path, workspaces: list[dict[str, Any]], **sections: dict[str, Any]
) -> Settings:
    data: dict[str, Any] = {"store": {"path": str(tmp_path / "a2ad.db")}, "workspaces": workspaces}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Settings(**data)


def jsonrpc_task(data: dict[str, Any]) -> dict[str, Any]:
    """The Task in a send's result, either protocol."""
    result: dict[str, Any] = data["result"]
    return result.get("task", result)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a2ad's in-memory state that has no event to await, with a deadline."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - nothing to await: plain state
            await asyncio.sleep(0.005)


@contextlib.contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Another process holds the store's write lock (a backup, the queue CLI)."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# -- either store, from outside a2ad -------------------------------------------------

PG_TABLES = ("items", "workspaces", "write_probe")


@contextlib.asynccontextmanager
async def store_write_lock(store: StoreSettings) -> AsyncIterator[None]:
    """Another process holds the store's write lock, on either store: on SQLite the
    file's (write_lock), on PostgreSQL an EXCLUSIVE lock on a2ad's tables, taken on a
    connection of its own: reads go on, every write waits (till its timeout)."""
    if not store.is_postgres:
        with write_lock(Path(store.path)):
            yield
        return
    tables = pgsql.SQL(", ").join(pgsql.Identifier(store.schema_name, t) for t in PG_TABLES)
    async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as conn:
        await conn.execute("BEGIN")
        await conn.execute(pgsql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(tables))
        try:
            yield
        finally:
            await conn.execute("ROLLBACK")


def store_query(store: StoreSettings, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run one statement (`?` placeholders) on either store by a connection of its
    own, as the queue CLI would, and commit; its rows. On PostgreSQL call it from a
    thread when it writes: a row a2ad's writer holds would block the event loop."""
    if not store.is_postgres:
        with contextlib.closing(sqlite3.connect(store.path, timeout=5)) as conn, conn:
            return conn.execute(statement, params).fetchall()
    options = f"-c search_path={store.schema_name}"
    with psycopg.connect(store.url, autocommit=True, options=options) as pg:
        cursor = pg.execute(statement.replace("?", "%s").encode(), params)
        return cursor.fetchall() if cursor.description else []
