"""Agent cards: fetched from the agent, rewritten to point at a2ad, cached so
they are served (and sends queued) while the agent is down."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .clock import Clock
from .upstream import Upstream
from .workspaces import Workspace

log = logging.getLogger("a2ad.cards")

CARD_PATH = "/.well-known/agent-card.json"
LEGACY_CARD_PATH = "/.well-known/agent.json"
FRESH_SECONDS = 30.0  # a cached card younger than this is served without asking the agent
MISSING_SECONDS = 5.0  # an agent that served no card is not asked again sooner
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=5)
MAX_CARD_BYTES = 1_048_576


@dataclass(frozen=True, slots=True)
class Card:
    body: bytes
    etag: str
    fetched_at: float
    agent_pushes: bool = False  # the agent's own card says it sends push notifications


def card_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers a card fetch passes on to the agent."""
    return {k: headers[k] for k in ("A2A-Version", "A2A-Extensions") if k in headers}


def card_urls(agent_url: str) -> list[str]:
    """Where an agent serving JSON-RPC at `agent_url` may publish its card."""
    base = agent_url.rstrip("/")
    parts = urlsplit(agent_url)
    root = urlunsplit((parts.scheme, parts.netloc, "", "", "")).rstrip("/")
    urls = [base + CARD_PATH]
    if root != base:
        urls.append(root + CARD_PATH)
    urls += [u.replace(CARD_PATH, LEGACY_CARD_PATH) for u in urls]
    return urls


def rewrite(card: dict[str, Any], public_url: str) -> dict[str, Any]:
    """Point the card at a2ad: `url` and every JSONRPC interface; drop other bindings,
    since a2ad proxies JSON-RPC only. Push notifications work through a2ad for
    every agent (it pushes for queued tasks itself: push.py), so it says so."""
    out = dict(card)
    capabilities = out.get("capabilities")
    out["capabilities"] = {
        **(capabilities if isinstance(capabilities, dict) else {}),
        "pushNotifications": True,
    }
    if "url" in out:
        out["url"] = public_url
    if "preferredTransport" in out:
        out["preferredTransport"] = "JSONRPC"
    interfaces = out.get("supportedInterfaces")
    if isinstance(interfaces, list):
        out["supportedInterfaces"] = [
            {**i, "url": public_url}
            for i in interfaces
            if isinstance(i, dict) and str(i.get("protocolBinding", "")).upper() == "JSONRPC"
        ]
    additional = out.get("additionalInterfaces")
    if isinstance(additional, list):
        out["additionalInterfaces"] = [
            {**i, "url": public_url}
            for i in additional
            if isinstance(i, dict) and str(i.get("transport", "")).upper() == "JSONRPC"
        ]
    return out


class Cards:
    """One cached, rewritten card per workspace."""

    def __init__(self, base_url: str, clock: Clock) -> None:
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self._cache: dict[str, Card] = {}
        self._missing: dict[str, float] = {}  # workspace → when its agent served no card

    def public_url(self, workspace_id: str) -> str:
        return f"{self.base_url}/workspaces/{workspace_id}/a2a"

    def forget(self, workspace_id: str) -> None:
        self._cache.pop(workspace_id, None)
        self._missing.pop(workspace_id, None)

    async def get(self, upstream: Upstream, ws: Workspace, headers: dict[str, str]) -> Card | None:
        """The card: fresh from the agent when it answers, else the cached one."""
        cached = self._cache.get(ws.id)
        now = self.clock.now()
        if cached is not None and now - cached.fetched_at < FRESH_SECONDS:
            return cached
        if cached is None and now - self._missing.get(ws.id, -math.inf) < MISSING_SECONDS:
            return None  # each send with a push config asks: not four requests each time
        card = await self._fetch(upstream, ws, headers)
        if card is None:
            if cached is None:
                self._missing[ws.id] = now
            return cached
        self._missing.pop(ws.id, None)
        if cached is not None and cached.etag == card.etag:
            card = Card(cached.body, cached.etag, now, card.agent_pushes)
        self._cache[ws.id] = card
        return card

    async def _fetch(
        self, upstream: Upstream, ws: Workspace, headers: dict[str, str]
    ) -> Card | None:
        for url in card_urls(ws.config.url):
            try:
                async with upstream.get(ws.config, url, FETCH_TIMEOUT, headers) as resp:
                    ws.sign_of_life(self.clock.monotonic())
                    if resp.status != 200:
                        continue
                    raw = await resp.content.read(MAX_CARD_BYTES + 1)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("workspace %s: card not fetched from %s: %s", ws.id, url, exc)
                return None
            try:
                card = json.loads(raw) if len(raw) <= MAX_CARD_BYTES else None
            except ValueError:
                card = None
            if not isinstance(card, dict):
                log.warning("workspace %s: %s is not a JSON agent card", ws.id, url)
                continue
            body = json.dumps(rewrite(card, self.public_url(ws.id))).encode()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            capabilities = card.get("capabilities")
            pushes = (
                isinstance(capabilities, dict) and capabilities.get("pushNotifications") is True
            )
            return Card(body, etag, self.clock.now(), pushes)
        return None
