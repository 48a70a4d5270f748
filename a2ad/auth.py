"""Bearer tokens: admin, named callers, one per workspace for heartbeats."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from .errors import Forbidden, Unauthorized
from .settings import Settings

Kind = Literal["admin", "caller", "workspace"]


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Kind
    name: str  # caller name, workspace id, or "admin"


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Auth:
    """Who a request's token belongs to, and what each endpoint lets in."""

    def __init__(self, settings: Settings) -> None:
        tokens: list[tuple[bytes, Principal]] = []
        if settings.auth.admin_token:
            tokens.append((settings.auth.admin_token.encode(), Principal("admin", "admin")))
        for caller in settings.auth.callers:
            tokens.append((caller.token.encode(), Principal("caller", caller.name)))
        for ws in settings.workspaces:
            if ws.token:
                tokens.append((ws.token.encode(), Principal("workspace", ws.id)))
        self._tokens = tokens
        self.proxy_open = not settings.auth.callers
        self.admin_open = not settings.auth.admin_token

    def add_workspace_token(self, workspace_id: str, token: str) -> None:
        self._tokens = [
            (t, p)
            for t, p in self._tokens
            if not (p.kind == "workspace" and p.name == workspace_id)
        ]
        if token:
            self._tokens.append((token.encode(), Principal("workspace", workspace_id)))

    def token_taken(self, token: str, workspace_id: str) -> bool:
        """Does anyone but this workspace hold `token`?"""
        given = token.encode()
        return any(
            hmac.compare_digest(given, known)
            for known, p in self._tokens
            if not (p.kind == "workspace" and p.name == workspace_id)
        )

    def identify(self, request: web.Request) -> Principal | None:
        """The token's owner; None without a token. Unknown tokens → Unauthorized."""
        token = bearer_token(request)
        if token is None:
            return None
        found = self._owner(token)
        if found is None:
            raise Unauthorized("unknown token")
        return found

    def admin_token_matches(self, token: str) -> bool:
        """Is `token` the admin token? For the status page's login form."""
        found = self._owner(token)
        return found is not None and found.kind == "admin"

    def _owner(self, token: str) -> Principal | None:
        """Whose token this is, compared against every token, each in constant time,
        so timing tells nothing."""
        # Header bytes that are not UTF-8 arrive as lone surrogates: keep them as
        # bytes so they compare (unequal) instead of failing to encode.
        given = token.encode("utf-8", "surrogateescape")
        found: Principal | None = None
        for known, principal in self._tokens:
            if hmac.compare_digest(given, known):
                found = principal
        return found

    def _require(self, request: web.Request, *kinds: Kind) -> Principal:
        principal = self.identify(request)
        if principal is None:
            raise Unauthorized("this endpoint needs a token: send Authorization: Bearer <token>")
        if principal.kind not in kinds:
            raise Forbidden(f"a {principal.kind} token cannot use this endpoint")
        return principal

    def caller(self, request: web.Request) -> str:
        """The caller's name for the proxy ('' while the proxy is open)."""
        if self.proxy_open:
            return ""
        return self._require(request, "caller").name

    def admin(self, request: web.Request) -> None:
        if not self.admin_open:
            self._require(request, "admin")

    def reader(self, request: web.Request) -> str | None:
        """Operator reads of items: the admin sees all (None), a caller its own (name)."""
        if self.admin_open:
            return None
        principal = self._require(request, "admin", "caller")
        return principal.name if principal.kind == "caller" else None

    def workspace(self, request: web.Request, workspace_id: str) -> None:
        principal = self._require(request, "workspace")
        if principal.name != workspace_id:
            raise Forbidden("this token belongs to another workspace")
