"""A small A2A JSON-RPC agent that echoes text: what `make run` starts beside a2ad.

It has a fixed number of slots and answers HTTP 503 when all are taken, so it
shows a2ad's queueing. With `--a2ad`, `--workspace` and `--token` it sends
heartbeats, periodically and right after each request finishes.

    python -m a2ad.demo_agent --port 9001 --delay 2 --slots 1 \\
        --a2ad http://127.0.0.1:8470 --workspace demo --token TOKEN
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

# Named, not __name__, so `python -m` logs under the same name as an import.
logger = logging.getLogger("a2ad.demo_agent")

SEND_METHODS = frozenset({"message/send", "SendMessage"})
STREAM_METHODS = frozenset({"message/stream", "SendStreamingMessage"})

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
BUSY = -32000

HEARTBEAT_TIMEOUT_SECONDS = 5.0


@dataclass
class DemoState:
    """The agent's settings and counters; one per app."""

    name: str
    delay: float
    slots: int
    served: int = 0
    busy: int = 0
    active: int = 0
    # Set whenever a request finishes, so the heartbeat loop reports the freed slot at once.
    finished: asyncio.Event = field(default_factory=asyncio.Event)


STATE = web.AppKey("demo_state", DemoState)


class _RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _rpc_result(rpc_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": result}


def _rpc_error(rpc_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": code, "message": message}}


def _is_v1(request: web.Request) -> bool:
    return request.headers.get("A2A-Version", "").strip().startswith("1")


def _read_message(body: dict[str, Any]) -> dict[str, Any]:
    """Return the request's message, or raise the JSON-RPC error it deserves."""
    method = body.get("method")
    if method in STREAM_METHODS:
        raise _RpcError(METHOD_NOT_FOUND, "streaming not supported by the demo agent")
    if method not in SEND_METHODS:
        raise _RpcError(METHOD_NOT_FOUND, f"method not found: {method}")
    params = body.get("params")
    message = params.get("message") if isinstance(params, dict) else None
    if not isinstance(message, dict):
        raise _RpcError(INVALID_PARAMS, "params.message is required")
    return message


def _echo(message: dict[str, Any], *, v1: bool) -> dict[str, Any]:
    """The answer Message, in the 1.0 or the v0.3 shape."""
    parts = message.get("parts")
    texts = [
        part["text"]
        for part in (parts if isinstance(parts, list) else [])
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    ]
    text = "echo: " + "\n".join(texts)
    reply: dict[str, Any] = {"messageId": str(uuid.uuid4())}
    if v1:
        reply |= {"role": "ROLE_AGENT", "parts": [{"text": text}]}
    else:
        reply |= {"kind": "message", "role": "agent", "parts": [{"kind": "text", "text": text}]}
    context_id = message.get("contextId")
    if isinstance(context_id, str):
        reply["contextId"] = context_id
    return {"message": reply} if v1 else reply


async def handle_rpc(request: web.Request) -> web.Response:
    """POST /: message/send and SendMessage, one slot each, echoed after `delay`."""
    state = request.app[STATE]
    try:
        body = json.loads(await request.read())
    except ValueError:
        return web.json_response(_rpc_error(None, PARSE_ERROR, "parse error: body is not JSON"))
    if not isinstance(body, dict) or body.get("jsonrpc") != "2.0":
        return web.json_response(
            _rpc_error(None, INVALID_REQUEST, "invalid request: not a JSON-RPC 2.0 request")
        )
    rpc_id = body.get("id")
    try:
        message = _read_message(body)
    except _RpcError as exc:
        return web.json_response(_rpc_error(rpc_id, exc.code, exc.message))

    # No await between the check and the increment, so the count cannot race.
    if state.active >= state.slots:
        state.busy += 1
        return web.json_response(
            _rpc_error(rpc_id, BUSY, "busy"), status=503, headers={"Retry-After": "1"}
        )
    state.active += 1
    try:
        await asyncio.sleep(state.delay)
        state.served += 1
        return web.json_response(_rpc_result(rpc_id, _echo(message, v1=_is_v1(request))))
    finally:
        state.active -= 1
        state.finished.set()


def agent_card(state: DemoState, url: str) -> dict[str, Any]:
    """The agent card, readable by a2a-sdk 1.3.0 as a 1.0 card and as a v0.3 card."""
    return {
        "name": state.name,
        "description": f"a2ad demo agent: echoes text, {state.slots} slot(s), "
        f"{state.delay:g} s per request",
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


async def handle_card(request: web.Request) -> web.Response:
    """GET /.well-known/agent-card.json: the card, its url taken from the Host header."""
    return web.json_response(agent_card(request.app[STATE], f"{request.scheme}://{request.host}/"))


async def handle_stats(request: web.Request) -> web.Response:
    """GET /stats: how many requests were served, refused as busy, and are in flight."""
    state = request.app[STATE]
    return web.json_response({"served": state.served, "busy": state.busy, "active": state.active})


def create_demo_app(*, delay: float = 0.0, slots: int = 1, name: str = "demo") -> web.Application:
    """Build the demo agent's aiohttp application."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    if delay < 0:
        raise ValueError("delay must not be negative")
    app = web.Application()
    app[STATE] = DemoState(name=name, delay=delay, slots=slots)
    app.router.add_post("/", handle_rpc)
    app.router.add_get("/.well-known/agent-card.json", handle_card)
    app.router.add_get("/.well-known/agent.json", handle_card)
    app.router.add_get("/stats", handle_stats)
    return app


class Heartbeat:
    """Reports the agent's load to a2ad every `interval` seconds and after each request."""

    def __init__(
        self,
        state: DemoState,
        session: aiohttp.ClientSession,
        *,
        a2ad_url: str,
        workspace: str,
        token: str,
        interval: float,
    ) -> None:
        self._state = state
        self._session = session
        self.url = f"{a2ad_url.rstrip('/')}/workspaces/{quote(workspace, safe='')}/heartbeat"
        self._headers = {"Authorization": f"Bearer {token}"}
        self._interval = interval
        self._failing = False

    async def run(self) -> None:
        """Beat until cancelled."""
        while True:
            # Cleared before the beat, so a request ending during it triggers another.
            self._state.finished.clear()
            await self.beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state.finished.wait(), self._interval)

    async def beat(self) -> bool:
        """Send one heartbeat; log the first failure of an outage and the recovery."""
        body = {"active_tasks": self._state.active, "max_concurrent_tasks": self._state.slots}
        unexpected = False
        try:
            async with self._session.post(self.url, json=body, headers=self._headers) as resp:
                text = await resp.text()
                problem = None if resp.status < 300 else f"HTTP {resp.status}: {text[:200]}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            # Anything else is a bug here, but the heartbeat must never take the agent down.
            problem, unexpected = f"{type(exc).__name__}: {exc}", True
        if problem is None:
            if self._failing:
                logger.info("heartbeat to %s works again", self.url)
            self._failing = False
            return True
        if not self._failing:
            logger.warning(
                "heartbeat to %s failed (%s); retrying every %g s, logged again only after "
                "it recovers",
                self.url,
                problem,
                self._interval,
                exc_info=unexpected,
            )
        self._failing = True
        return False


def enable_heartbeats(
    app: web.Application,
    *,
    a2ad_url: str,
    workspace: str,
    token: str,
    interval: float = 5.0,
) -> None:
    """Make `app` send heartbeats to a2ad while it runs; call before the app starts."""
    if interval <= 0:
        raise ValueError("interval must be positive")

    async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=HEARTBEAT_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            heartbeat = Heartbeat(
                app[STATE],
                session,
                a2ad_url=a2ad_url,
                workspace=workspace,
                token=token,
                interval=interval,
            )
            task = asyncio.create_task(heartbeat.run(), name="demo-agent-heartbeat")
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(heartbeat_ctx)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m a2ad.demo_agent",
        description="A small A2A JSON-RPC agent that echoes text, with a fixed number of slots.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s)")
    parser.add_argument("--port", type=int, default=9001, help="listen port (default %(default)s)")
    parser.add_argument(
        "--delay", type=float, default=2.0, help="seconds each request takes (default %(default)s)"
    )
    parser.add_argument(
        "--slots", type=int, default=1, help="requests worked on at once (default %(default)s)"
    )
    parser.add_argument("--name", default="demo", help="the name in the agent card")
    parser.add_argument("--a2ad", metavar="URL", help="a2ad's base URL, to send heartbeats to")
    parser.add_argument("--workspace", metavar="ID", help="this agent's workspace id in a2ad")
    parser.add_argument("--token", help="the workspace's heartbeat token")
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between heartbeats (default %(default)s)",
    )
    args = parser.parse_args(argv)
    heartbeat_args = (args.a2ad, args.workspace, args.token)
    if any(heartbeat_args) and not all(heartbeat_args):
        parser.error("--a2ad, --workspace and --token go together")
    if args.slots < 1:
        parser.error("--slots must be at least 1")
    if args.delay < 0:
        parser.error("--delay must not be negative")
    if args.heartbeat_interval <= 0:
        parser.error("--heartbeat-interval must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the demo agent until SIGINT or SIGTERM."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_demo_app(delay=args.delay, slots=args.slots, name=args.name)
    if args.a2ad:
        enable_heartbeats(
            app,
            a2ad_url=args.a2ad,
            workspace=args.workspace,
            token=args.token,
            interval=args.heartbeat_interval,
        )
    heartbeats = f", heartbeats to {args.a2ad} as {args.workspace!r}" if args.a2ad else ""

    def announce(*_: object) -> None:
        # run_app calls this once the socket is bound, in place of its own banner.
        logger.info(
            "demo agent %r listening on http://%s:%d/ (slots=%d, delay=%g s%s)",
            args.name,
            args.host,
            args.port,
            args.slots,
            args.delay,
            heartbeats,
        )

    web.run_app(app, host=args.host, port=args.port, print=announce)


if __name__ == "__main__":
    main()
