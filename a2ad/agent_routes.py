"""Handlers for agents and their cards: heartbeats, and the agent card a2ad serves."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import a2a
from .cards import card_headers
from .daemon import DAEMON
from .errors import CardUnavailable, InvalidBody
from .http_io import json_response, read_body


async def handle_card(request: web.Request) -> web.StreamResponse:
    """The agent's card, pointing at a2ad; no token needed, as for the agent itself."""
    daemon = request.app[DAEMON]
    ws = daemon.registry.get(request.match_info["workspace"])
    card = await daemon.cards.get(daemon.upstream, ws, card_headers(request.headers))
    if card is None:
        raise CardUnavailable(
            f"workspace {ws.id!r}: the agent has not served its card yet"
            f" ({ws.config.url} is not answering); try again when it is up",
            retry_after=5,
        )
    cache = {"ETag": card.etag, "Cache-Control": "no-cache"}
    if card.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=cache)
    return web.Response(body=card.body, content_type="application/json", headers=cache)


def _heartbeat_fields(body: Any) -> tuple[int, int | None]:
    if not isinstance(body, dict):
        raise InvalidBody(
            "a heartbeat is a JSON object: "
            '{"active_tasks": int >= 0, "max_concurrent_tasks": int >= 1}'
        )
    unknown = sorted(set(body) - {"active_tasks", "max_concurrent_tasks"})
    if unknown:
        raise InvalidBody(f"unknown heartbeat fields: {', '.join(unknown)[:200]}")
    active = body.get("active_tasks")
    if not isinstance(active, int) or isinstance(active, bool) or not 0 <= active <= 1_000_000:
        raise InvalidBody("active_tasks must be an integer >= 0")
    capacity = body.get("max_concurrent_tasks")
    if capacity is not None and (
        not isinstance(capacity, int)
        or isinstance(capacity, bool)
        or not 1 <= capacity <= 1_000_000
    ):
        raise InvalidBody("max_concurrent_tasks must be an integer >= 1")
    return active, capacity


async def handle_heartbeat(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    workspace_id = request.match_info["workspace"]
    daemon.auth.workspace(request, workspace_id)
    ws = daemon.registry.get(workspace_id)
    raw = await read_body(request)
    active, capacity = _heartbeat_fields(a2a.parse_json(raw))
    await daemon.heartbeat(ws, active, capacity)
    now = daemon.clock.monotonic()
    if ws.free_slots(now) > 0 and ws.queued_total > 0:
        ws.wakeup.set()  # fill every free slot now, not at the next timer
    return json_response({"queue_depth": ws.queued_total})
