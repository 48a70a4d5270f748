"""A JSON-RPC agent that counts how many requests it holds at once, for the
replica acceptance tests: `python counting_agent.py --port P --delay S`.

It answers every POST / after `--delay` seconds (a text that starts with
"hold": one second) with the echo of the message's text, and never refuses one,
so only what a2ad sends decides its concurrency.
GET /stats: {"active", "max_active", "served", "texts"} (texts in arrival order).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from aiohttp import web


class Counting:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.active = 0
        self.max_active = 0
        self.texts: list[str] = []

    async def handle_rpc(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        message = body["params"]["message"]
        text = "".join(part.get("text", "") for part in message.get("parts", []))
        self.texts.append(text)
        try:
            await asyncio.sleep(1.0 if text.startswith("hold") else self.delay)
        finally:
            self.active -= 1
        reply = {
            "kind": "message",
            "role": "agent",
            "messageId": f"reply-{message.get('messageId', '')}",
            "parts": [{"kind": "text", "text": text}],
        }
        return web.json_response({"jsonrpc": "2.0", "id": body.get("id"), "result": reply})

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "active": self.active,
                "max_active": self.max_active,
                "served": len(self.texts),
                "texts": self.texts,
            }
        )

    async def handle_card(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "counting", "url": str(request.url.origin()) + "/"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()
    agent = Counting(args.delay)
    app = web.Application()
    app.router.add_post("/", agent.handle_rpc)
    app.router.add_get("/stats", agent.handle_stats)
    app.router.add_get("/.well-known/agent-card.json", agent.handle_card)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
