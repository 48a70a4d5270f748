"""The servers a benchmark run starts beside a2ad, each as its own process.

    python -m bench.servers agent    --port P [--events K]   fast fake agent
    python -m bench.servers recorder --port P                one slot, records arrival times
    python -m bench.servers busy     --port P                always 503 + Retry-After: 3600
    python -m bench.servers accept   --port P                trivial aiohttp 202, stores nothing
    python -m bench.servers stored   --port P --db FILE [--on-loop]
                                                             202 after a2ad's INSERT commits
    python -m bench.servers proxy    --port P --upstream URL bare aiohttp pass-through proxy
    python -m bench.servers sink     --port P                minimal non-aiohttp HTTP target
    python -m bench.servers webhook  --port P                push receiver, records arrivals

`proxy` and `accept` are the references a2ad is judged against: the floor for
any aiohttp proxy and the ceiling for any aiohttp enqueue endpoint. `stored` is
the floor of a2ad's own design: it writes each request as a row of a2ad's
schema, batched on one writer thread with one COMMIT per batch at FULL, and
answers 202 after the commit, with nothing else of a2ad's; with `--on-loop` it
runs the INSERTs on the event loop, at most 64 a batch, and only the COMMIT on
the thread, as a2ad's SQLite writer does now. `sink`
answers from a bare asyncio protocol, so what a load generator reaches against
it is the generator's own ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

JSON = "application/json"
ACCEPTED_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "kind": "task",
            "id": "q-00000000000000000000000000000000",
            "contextId": "ctx-0",
            "status": {"state": "submitted"},
        },
    }
).encode()


# -- the fast fake agent ---------------------------------------------------------


@dataclass
class AgentStats:
    """What the agent saw: counts, and when the first and last send arrived."""

    events: int = 8
    served: int = 0
    streams: int = 0
    first: float | None = None
    last: float | None = None


AGENT = web.AppKey("bench_agent", AgentStats)


def _reply(rpc_id: Any, message: Any) -> bytes:
    context = message.get("contextId") if isinstance(message, dict) else None
    result: dict[str, Any] = {
        "kind": "message",
        "role": "agent",
        "messageId": uuid.uuid4().hex,
        "parts": [{"kind": "text", "text": "ok"}],
    }
    if isinstance(context, str):
        result["contextId"] = context
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": result}).encode()


def _sse(rpc_id: Any, result: dict[str, Any]) -> bytes:
    return (
        b"data: "
        + json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": result}).encode()
        + (b"\n\n")
    )


async def agent_rpc(request: web.Request) -> web.StreamResponse:
    """message/send answered at once with a Message; message/stream as SSE events."""
    stats = request.app[AGENT]
    now = time.monotonic()
    stats.first = stats.first if stats.first is not None else now
    stats.last = now
    body = json.loads(await request.read())
    rpc_id = body.get("id")
    params = body.get("params") or {}
    message = params.get("message") or {}
    if body.get("method") in ("message/stream", "SendStreamingMessage"):
        stats.streams += 1
        return await _stream(request, rpc_id, message, stats.events)
    stats.served += 1
    return web.Response(body=_reply(rpc_id, message), content_type=JSON)


async def _stream(
    request: web.Request, rpc_id: Any, message: dict[str, Any], events: int
) -> web.StreamResponse:
    """A Task, then artifact-updates, then the final status-update: one write each."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    task_id = uuid.uuid4().hex
    context = message.get("contextId") or uuid.uuid4().hex
    ids = {"taskId": task_id, "contextId": context}
    await response.write(
        _sse(
            rpc_id,
            {"kind": "task", "id": task_id, "contextId": context, "status": {"state": "working"}},
        )
    )
    for n in range(max(0, events - 2)):
        artifact = {"artifactId": f"a{n}", "parts": [{"kind": "text", "text": f"chunk {n}"}]}
        await response.write(
            _sse(rpc_id, {"kind": "artifact-update", **ids, "artifact": artifact, "append": n > 0})
        )
    await response.write(
        _sse(
            rpc_id,
            {"kind": "status-update", **ids, "status": {"state": "completed"}, "final": True},
        )
    )
    await response.write_eof()
    return response


async def agent_stats(request: web.Request) -> web.Response:
    stats = request.app[AGENT]
    return web.json_response(
        {
            "served": stats.served,
            "streams": stats.streams,
            "first": stats.first,
            "last": stats.last,
        }
    )


async def agent_card(request: web.Request) -> web.Response:
    url = f"http://{request.host}/"
    return web.json_response(
        {
            "name": "bench-agent",
            "description": "a2ad benchmark agent",
            "version": "0",
            "url": url,
            "preferredTransport": "JSONRPC",
            "protocolVersion": "0.3.0",
            "capabilities": {"streaming": True},
            "defaultInputModes": ["text/plain"],
            "defaultOutputModes": ["text/plain"],
            "skills": [],
        }
    )


def agent_app(events: int) -> web.Application:
    app = web.Application()
    app[AGENT] = AgentStats(events=events)
    app.router.add_post("/", agent_rpc)
    app.router.add_get("/stats", agent_stats)
    app.router.add_get("/.well-known/agent-card.json", agent_card)
    return app


# -- the recording agent (drain latency) -------------------------------------------


@dataclass
class Records:
    """Per request: when it arrived and when its answer was written (monotonic)."""

    active: int = 0
    busy: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list)


RECORDS = web.AppKey("bench_records", Records)


async def recorder_rpc(request: web.Request) -> web.StreamResponse:
    """One slot: a second request while one is in progress is answered 503."""
    records = request.app[RECORDS]
    arrived = time.monotonic()
    body = json.loads(await request.read())
    if records.active:
        records.busy += 1
        return web.Response(status=503, headers={"Retry-After": "1"})
    records.active = 1
    params = body.get("params") or {}
    response = web.Response(body=_reply(body.get("id"), params.get("message")), content_type=JSON)
    # The slot is free the moment the answer is written; a2ad's next request
    # cannot be read before this handler returns to the event loop.
    records.active = 0
    await response.prepare(request)
    await response.write_eof()
    records.spans.append((arrived, time.monotonic()))
    return response


async def recorder_records(request: web.Request) -> web.Response:
    records = request.app[RECORDS]
    return web.json_response({"busy": records.busy, "spans": records.spans})


def recorder_app() -> web.Application:
    app = web.Application()
    app[RECORDS] = Records()
    app.router.add_post("/", recorder_rpc)
    app.router.add_get("/records", recorder_records)
    app.router.add_get("/stats", recorder_records)
    return app


# -- the busy agent ------------------------------------------------------------------


async def busy_rpc(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=503, headers={"Retry-After": "3600"})


def busy_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/", busy_rpc)
    return app


# -- the webhook (push notifications) -------------------------------------------------


@dataclass
class Hooks:
    """Per push received: (time.monotonic(), task id, state, token header). The
    monotonic clock is the machine's, so it compares with the recorder's."""

    received: list[tuple[float, str, str, str | None]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)


HOOKS = web.AppKey("bench_hooks", Hooks)


async def webhook_push(request: web.Request) -> web.Response:
    """Take any update at once (200): the receiver must not be what is measured."""
    at = time.monotonic()
    update = json.loads(await request.read())
    task = update.get("task", update)  # 1.0: {"task": …}; v0.3: the Task itself
    state = str((task.get("status") or {}).get("state", ""))
    hooks = request.app[HOOKS]
    token = request.headers.get("X-A2A-Notification-Token")
    hooks.received.append((at, str(task.get("id", "")), state, token))
    async with hooks.arrived:
        hooks.arrived.notify_all()
    return web.Response(status=200)


async def webhook_records(request: web.Request) -> web.Response:
    """The pushes from index `after` on; with `wait` (seconds), held until there is
    one, so a caller waiting for a push need not poll the receiver it measures."""
    hooks = request.app[HOOKS]
    after = int(request.query.get("after", "0"))
    wait = float(request.query.get("wait", "0"))
    if wait > 0 and len(hooks.received) <= after:
        async with hooks.arrived:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    hooks.arrived.wait_for(lambda: len(hooks.received) > after), wait
                )
    return web.json_response({"records": hooks.received[after:]})


async def webhook_stats(request: web.Request) -> web.Response:
    """How many pushes, and when the first and last arrived (monotonic)."""
    received = request.app[HOOKS].received
    return web.json_response(
        {
            "received": len(received),
            "first": received[0][0] if received else None,
            "last": received[-1][0] if received else None,
        }
    )


def webhook_app() -> web.Application:
    app = web.Application()
    app[HOOKS] = Hooks()
    app.router.add_post("/hook", webhook_push)
    app.router.add_get("/records", webhook_records)
    app.router.add_get("/stats", webhook_stats)
    return app


# -- the references ------------------------------------------------------------------


async def accept_rpc(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202, body=ACCEPTED_BODY, content_type=JSON)


def accept_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/{tail:.*}", accept_rpc)
    return app


class StoredWriter:
    """Rows of a2ad's items table, written in batches: each batch one transaction
    and one COMMIT on one thread, its INSERTs there too or (`on_loop`) on the event
    loop, as a2ad's writer does (without its checks)."""

    def __init__(self, db: str, on_loop: bool) -> None:
        from a2ad.store.schema import apply_migrations, bundled_migrations
        from a2ad.store.sql import INSERT
        from a2ad.store.writer import LOOP_MAX_ROWS

        self.insert = INSERT
        self.on_loop = on_loop
        self.loop_max_rows = LOOP_MAX_ROWS
        self.conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        apply_migrations(self.conn, bundled_migrations(), time.time())
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self.wake = asyncio.Event()

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        """Begin the batch's transaction and insert its rows; the COMMIT is the caller's."""
        self.conn.execute("BEGIN IMMEDIATE")
        for row in rows:
            self.conn.execute(self.insert, row)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        self._insert(rows)
        self.conn.execute("COMMIT")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                if self.on_loop:
                    batch = self.pending[: self.loop_max_rows]
                    self.pending = self.pending[self.loop_max_rows :]
                    self._insert([row for row, _ in batch])
                    await loop.run_in_executor(self.pool, self.conn.execute, "COMMIT")
                else:
                    batch, self.pending = self.pending, []
                    await loop.run_in_executor(self.pool, self._write, [row for row, _ in batch])
                for _, future in batch:
                    future.set_result(None)


STORED = web.AppKey("bench_stored", StoredWriter)


async def stored_rpc(request: web.Request) -> web.Response:
    body = await request.read()
    now = time.time()
    row = {
        "id": "q-" + uuid.uuid4().hex,
        "workspace": "stored",
        "caller": "",
        "method": "message/send",
        "body": body,
        "headers": "{}",
        "message_id": uuid.uuid4().hex,
        "context_id": uuid.uuid4().hex,
        "request_id": None,
        "priority": 50,
        "ttl_seconds": 3600.0,
        "expires_at": now + 3600,
        "busy_answers": 0,
        "push": None,
        "now": now,
    }
    writer = request.app[STORED]
    future = asyncio.get_running_loop().create_future()
    writer.pending.append((row, future))
    writer.wake.set()
    await future
    return web.Response(status=202, body=ACCEPTED_BODY, content_type=JSON)


def stored_app(db: str, on_loop: bool) -> web.Application:
    async def writer_ctx(app: web.Application) -> AsyncIterator[None]:
        app[STORED] = writer = StoredWriter(db, on_loop)
        task = asyncio.create_task(writer.run())
        yield
        task.cancel()

    app = web.Application()
    app.cleanup_ctx.append(writer_ctx)
    app.router.add_post("/{tail:.*}", stored_rpc)
    return app


SESSION = web.AppKey("bench_session", aiohttp.ClientSession)


def proxy_app(upstream: str) -> web.Application:
    """Read the body, POST it upstream on one shared session, answer status and body;
    an event stream is relayed chunk by chunk."""

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # limit=0 as in a2ad's own client, so neither queues on a connection pool.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            app[SESSION] = session
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", JSON)}
        async with request.app[SESSION].post(upstream, data=body, headers=headers) as resp:
            content_type = resp.headers.get("Content-Type", JSON)
            if not content_type.startswith("text/event-stream"):
                payload = await resp.read()
                return web.Response(
                    status=resp.status, body=payload, headers={"Content-Type": content_type}
                )
            out = web.StreamResponse(status=resp.status, headers={"Content-Type": content_type})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/{tail:.*}", forward)
    return app


# -- the sink: the generator's ceiling ---------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
SINK_RESPONSE = (
    b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(ACCEPTED_BODY)).encode() + b"\r\n\r\n" + ACCEPTED_BODY
)


class Sink(asyncio.Protocol):
    """HTTP/1.1 keep-alive without a framework: each request gets the canned 202."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            found = _CONTENT_LENGTH.search(self.buffer, 0, end + 2)
            total = end + 4 + (int(found.group(1)) if found else 0)
            if len(self.buffer) < total:
                return
            del self.buffer[:total]
            assert self.transport is not None
            self.transport.write(SINK_RESPONSE)


async def run_sink(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Sink, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument(
        "kind",
        choices=["agent", "recorder", "busy", "accept", "stored", "proxy", "sink", "webhook"],
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", help="the agent's URL (proxy)")
    parser.add_argument("--db", help="the SQLite file (stored)")
    parser.add_argument("--on-loop", action="store_true", help="INSERTs on the event loop (stored)")
    parser.add_argument("--events", type=int, default=8, help="events per stream (agent)")
    args = parser.parse_args(argv)
    if args.kind == "sink":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_sink(args.host, args.port))
        return
    if args.kind == "proxy":
        if not args.upstream:
            parser.error("proxy needs --upstream")
        app = proxy_app(args.upstream)
    elif args.kind == "agent":
        app = agent_app(args.events)
    elif args.kind == "recorder":
        app = recorder_app()
    elif args.kind == "busy":
        app = busy_app()
    elif args.kind == "webhook":
        app = webhook_app()
    elif args.kind == "stored":
        if not args.db:
            parser.error("stored needs --db")
        app = stored_app(args.db, args.on_loop)
    else:
        app = accept_app()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=1024)


if __name__ == "__main__":
    main()
