"""An A2A-ish JSON-RPC agent that misbehaves on purpose, for the fault acceptance tests.

Run as a subprocess:

    python tests/acceptance/fault_agent.py --port 9001 --log agent.log --seed 7 \\
        --fault-rate 0.3 --poison-rate 0.04 --storm-every 120 --stall 2.5

It answers `message/send` and `SendMessage` (POST /), and for each one picks what
to do from the seed, the message's messageId and how often it has seen that
messageId before, so a retry of the same message can fare differently:

- final answers, which a2ad must deliver: `ok` (the echo), `slow_ok` (the echo,
  dribbled over `--slow` seconds), `rpc_error` (a JSON-RPC error, HTTP 200),
  `http_500` (a JSON-RPC error, HTTP 500), `text_plain_json` (the echo, labelled
  text/plain);
- failures, which must use an attempt and never count as a delivery: `stall`
  (silent for `--stall` seconds, then the connection is dropped), `slow_stall`
  (part of a body dribbled over `--stall` seconds, then dropped), `reset` (half
  the body, then a TCP reset), `cut` (half the body, then a plain close),
  `garbage` (HTTP 200, application/json, not JSON), `html` (HTTP 200, text/html);
- busy answers, in storms: every `--storm-every` requests a stretch of
  `--storm-length` requests is answered 503, with `Retry-After: 1`
  (`busy_retry_after`) and without (`busy_bare`) by turns.

A `--poison-rate` share of messageIds fail every time (reset, cut, garbage or
html), so a2ad must end them `failed`. Every answer that carries a body names the
messageId, so a stored result can be matched to its message.

One JSON line per request fully received (its body read) is appended to `--log`
with one write(2) before the agent answers: {"n", "pid", "messageId", "outcome"}.
A killed agent loses none of them. A restarted agent reads the log back, so the
request count and the per-messageId counts go on where they stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

SEND_METHODS = frozenset({"message/send", "SendMessage"})

FINAL_OUTCOMES = frozenset({"ok", "slow_ok", "rpc_error", "http_500", "text_plain_json"})
FAILURE_OUTCOMES = frozenset({"stall", "slow_stall", "reset", "cut", "garbage", "html"})
BUSY_OUTCOMES = frozenset({"busy_retry_after", "busy_bare"})
POISON_OUTCOMES = ("reset", "cut", "garbage", "html")
# Relative weights of the faults a request that is not `ok` gets.
FAULT_WEIGHTS = {
    "stall": 2,
    "slow_stall": 1,
    "reset": 2,
    "cut": 2,
    "garbage": 2,
    "html": 2,
    "slow_ok": 2,
    "rpc_error": 2,
    "http_500": 1,
    "text_plain_json": 1,
}
AGENT_NAME = "fault-agent"
DRIBBLE_CHUNK = 8  # bytes per write of a slow body


def unit(*parts: object) -> float:
    """A number in [0, 1) that depends only on `parts`."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    value: int = struct.unpack(">Q", digest[:8])[0]
    return value / 2**64


@dataclass(frozen=True)
class Faults:
    """What the agent does with each request: a pure function of the seed and counts,
    importable by a test that wants to know which messages are poison."""

    seed: int = 0
    fault_rate: float = 0.0
    poison_rate: float = 0.0
    storm_every: int = 0
    storm_length: int = 3

    def is_poison(self, message_id: str) -> bool:
        return unit(self.seed, "poison", message_id) < self.poison_rate

    def storm(self, n: int) -> str | None:
        """The busy answer for the `n`th message request, when it falls in a storm."""
        if self.storm_every <= 0:
            return None
        start = self.storm_every // 2
        if not start <= n % self.storm_every < start + self.storm_length:
            return None
        return "busy_retry_after" if (n // self.storm_every) % 2 == 0 else "busy_bare"

    def choose(self, message_id: str, seen: int, n: int) -> str:
        """The outcome for the `n`th request, the `seen`th time of this messageId."""
        busy = self.storm(n)
        if busy is not None:
            return busy
        if self.is_poison(message_id):
            pick = int(unit(self.seed, "poison-kind", message_id, seen) * len(POISON_OUTCOMES))
            return POISON_OUTCOMES[pick]
        if unit(self.seed, "fault", message_id, seen) >= self.fault_rate:
            return "ok"
        point = unit(self.seed, "kind", message_id, seen) * sum(FAULT_WEIGHTS.values())
        for outcome, weight in FAULT_WEIGHTS.items():
            point -= weight
            if point < 0:
                return outcome
        return "ok"


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every whole line of an agent log (a line cut short is skipped)."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


class Agent:
    """The agent's state: the log, the counts, and how it answers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.faults = Faults(
            seed=args.seed,
            fault_rate=args.fault_rate,
            poison_rate=args.poison_rate,
            storm_every=args.storm_every,
            storm_length=args.storm_length,
        )
        self.delay = args.delay
        self.stall = args.stall
        self.slow = args.slow
        self.log_path = Path(args.log)
        past = read_log(self.log_path)
        self.requests = len(past)
        self.seen = Counter(str(entry.get("messageId")) for entry in past)
        self.active = 0
        self.log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self.log_path.stat().st_size and not self.log_path.read_bytes().endswith(b"\n"):
            os.write(self.log_fd, b"\n")  # the previous agent was killed mid-line

    def record(self, entry: dict[str, Any]) -> None:
        # One write(2) on an O_APPEND descriptor: whole, in order, and kept by the
        # kernel even when the process is killed right after.
        os.write(self.log_fd, (json.dumps(entry) + "\n").encode())

    # -- answers ---------------------------------------------------------------

    @staticmethod
    def echo(rpc_id: Any, message_id: str, v1: bool) -> dict[str, Any]:
        text = f"ok {message_id}"
        reply: dict[str, Any] = {"messageId": f"reply-{message_id}"}
        if v1:
            reply |= {"role": "ROLE_AGENT", "parts": [{"text": text}]}
            return {"jsonrpc": "2.0", "id": rpc_id, "result": {"message": reply}}
        reply |= {"kind": "message", "role": "agent", "parts": [{"kind": "text", "text": text}]}
        return {"jsonrpc": "2.0", "id": rpc_id, "result": reply}

    @staticmethod
    def error(rpc_id: Any, message_id: str, outcome: str) -> dict[str, Any]:
        return {
            "jsonrpc": "2.0",
            "id": rpc_id,
            "error": {
                "code": -32603,
                "message": f"{outcome} for {message_id}",
                "data": {"agent": AGENT_NAME, "messageId": message_id},
            },
        }

    async def answer(
        self, request: web.Request, outcome: str, rpc_id: Any, message_id: str
    ) -> web.StreamResponse:
        v1 = request.headers.get("A2A-Version", "").strip().startswith("1")
        echo = json.dumps(self.echo(rpc_id, message_id, v1)).encode()
        if outcome == "ok":
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(body=echo, content_type="application/json")
        if outcome == "text_plain_json":
            return web.Response(body=echo, content_type="text/plain")
        if outcome in ("rpc_error", "http_500"):
            body = json.dumps(self.error(rpc_id, message_id, outcome)).encode()
            status = 500 if outcome == "http_500" else 200
            return web.Response(body=body, status=status, content_type="application/json")
        if outcome in BUSY_OUTCOMES:
            busy = json.dumps(self.error(rpc_id, message_id, "busy")).encode()
            headers = {"Retry-After": "1"} if outcome == "busy_retry_after" else {}
            return web.Response(
                body=busy, status=503, headers=headers, content_type="application/json"
            )
        if outcome == "garbage":
            return web.Response(
                body=f"<<not json for {message_id}>> {{".encode(), content_type="application/json"
            )
        if outcome == "html":
            page = f"<html><body>502 Bad Gateway ({message_id})</body></html>"
            return web.Response(text=page, content_type="text/html")
        if outcome == "slow_ok":
            return await self.dribble(request, echo, self.slow, finish=True)
        if outcome == "slow_stall":
            return await self.dribble(request, echo, self.stall, finish=False)
        if outcome == "stall":
            await asyncio.sleep(self.stall)
            return self.drop(request, web.StreamResponse(), rst=False)
        if outcome in ("reset", "cut"):
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(echo)
            await response.prepare(request)
            await response.write(echo[: len(echo) // 2])
            await asyncio.sleep(0.01)  # let the half reach the wire first
            return self.drop(request, response, rst=outcome == "reset")
        raise AssertionError(f"unknown outcome {outcome}")

    async def dribble(
        self, request: web.Request, body: bytes, seconds: float, *, finish: bool
    ) -> web.StreamResponse:
        """`body` a few bytes at a time over `seconds`; without `finish`, only part of
        it, and then the connection is dropped."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunks = [body[i : i + DRIBBLE_CHUNK] for i in range(0, len(body), DRIBBLE_CHUNK)]
        if not finish:
            chunks = chunks[: len(chunks) // 2]
        pause = seconds / max(1, len(chunks))
        try:
            for chunk in chunks:
                await response.write(chunk)
                await asyncio.sleep(pause)
            if finish:
                await response.write_eof()
                return response
        except (ConnectionError, RuntimeError):
            return response  # a2ad gave up first: its timeout
        return self.drop(request, response, rst=False)

    @staticmethod
    def drop(
        request: web.Request, response: web.StreamResponse, *, rst: bool
    ) -> web.StreamResponse:
        """Close the connection under the answer: a reset (RST) or a plain close."""
        transport = request.transport
        if transport is not None and not transport.is_closing():
            sock = transport.get_extra_info("socket")
            if rst and sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return response

    # -- handlers ----------------------------------------------------------------

    async def handle_rpc(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return web.json_response(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}}
            )
        rpc_id = body.get("id") if isinstance(body, dict) else None
        method = body.get("method") if isinstance(body, dict) else None
        params = body.get("params") if isinstance(body, dict) else None
        message = params.get("message") if isinstance(params, dict) else None
        message_id = message.get("messageId") if isinstance(message, dict) else None
        if method not in SEND_METHODS or not isinstance(message_id, str):
            error = {"code": -32601, "message": f"only message sends with a messageId: {method}"}
            return web.json_response({"jsonrpc": "2.0", "id": rpc_id, "error": error})
        n = self.requests
        self.requests += 1
        seen = self.seen[message_id]
        self.seen[message_id] += 1
        outcome = self.faults.choose(message_id, seen, n)
        self.record({"n": n, "pid": os.getpid(), "messageId": message_id, "outcome": outcome})
        self.active += 1
        try:
            return await self.answer(request, outcome, rpc_id, message_id)
        finally:
            self.active -= 1

    async def handle_card(self, request: web.Request) -> web.Response:
        url = f"http://{request.host}/"
        return web.json_response(
            {
                "name": AGENT_NAME,
                "description": "answers message/send, with injected faults",
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
                "skills": [],
            }
        )

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"pid": os.getpid(), "requests": self.requests, "active": self.active}
        )


def build_app(args: argparse.Namespace) -> web.Application:
    agent = Agent(args)
    app = web.Application()
    app.router.add_post("/", agent.handle_rpc)
    app.router.add_get("/.well-known/agent-card.json", agent.handle_card)
    app.router.add_get("/.well-known/agent.json", agent.handle_card)
    app.router.add_get("/stats", agent.handle_stats)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True, help="file to append one JSON line per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of requests faulted")
    parser.add_argument(
        "--poison-rate", type=float, default=0.0, help="messageIds that always fail"
    )
    parser.add_argument("--storm-every", type=int, default=0, help="requests between 503 storms")
    parser.add_argument("--storm-length", type=int, default=3, help="requests per 503 storm")
    parser.add_argument("--stall", type=float, default=3.0, help="seconds a stall lasts")
    parser.add_argument("--slow", type=float, default=0.3, help="seconds a slow_ok body takes")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds an ok answer takes")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    web.run_app(build_app(args), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
