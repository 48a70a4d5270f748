"""Forwarding to the agent: the headers that pass, the agent's answer relayed, and
every method a2ad does not answer itself."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from . import a2a
from .daemon import Daemon
from .errors import UpstreamFailed, UpstreamTimeout
from .http_io import REQUEST_ID
from .upstream import Answer
from .workspaces import Workspace


def passed_headers(headers: CIMultiDictProxy[str], names: tuple[str, ...]) -> dict[str, str]:
    """The request's headers among `names`; a list-valued one sent in several lines
    (W3C tracestate, baggage) goes on as one."""
    out = {}
    for name in names:
        if name in headers:
            many = name in a2a.LIST_HEADERS
            out[name] = ",".join(headers.getall(name)) if many else headers[name]
    return out


def forwarded_headers(headers: CIMultiDictProxy[str], request_id: str) -> dict[str, str]:
    """Only the headers SPEC passes on; hop-by-hop headers and tokens (a caller's
    Authorization) stay here. The agent's own credentials are upstream's to add."""
    out = passed_headers(headers, a2a.FORWARDED_HEADERS)
    out.setdefault("Content-Type", "application/json")
    out["X-Request-Id"] = request_id
    return out


def relay(answer: Answer) -> web.Response:
    """The agent's status and body, unchanged."""
    return web.Response(
        body=answer.body, status=answer.status or 502, headers={"Content-Type": answer.content_type}
    )


async def forward(
    request: web.Request,
    daemon: Daemon,
    ws: Workspace,
    rpc: a2a.RpcRequest,
    body: Any,
    raw: bytes | None,
    caller: str,
) -> web.StreamResponse:
    """Any other method goes straight to the agent, queue ids swapped for the agent's."""
    if raw is None:
        raw = json.dumps(body).encode()
    raw = await daemon.agent_ids.body_for_agent(raw, caller, ws.id, body)
    answer = await daemon.upstream.send(
        ws.config,
        raw,
        forwarded_headers(request.headers, request[REQUEST_ID]),
        expect_jsonrpc=False,
    )
    if answer.reached_agent:
        ws.note_answer(daemon.clock.monotonic())
    if answer.status is None:
        if answer.timed_out:
            raise UpstreamTimeout(f"workspace {ws.id!r}: {answer.error}")
        raise UpstreamFailed(f"workspace {ws.id!r}: {answer.error}")
    if answer.too_large:
        raise UpstreamFailed(f"workspace {ws.id!r}: {answer.error}")
    return web.Response(
        body=answer.body, status=answer.status, headers={"Content-Type": answer.content_type}
    )
