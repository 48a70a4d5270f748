"""What every HTTP handler of a2ad shares: per-request keys, JSON answers, bounded bodies."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .daemon import DAEMON
from .errors import BodyTooLarge, ParseError, RequestTimeout

# Per-request values: the request id for logs, the JSON-RPC id errors echo.
REQUEST_ID = web.RequestKey("a2ad_request_id", str)
RPC_ID = web.RequestKey("a2ad_rpc_id", object)


SMALL_BODY_LIMIT = 65536  # heartbeats and workspace registrations


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data).encode(), status=status, content_type="application/json"
    )


async def read_body(request: web.Request, limit: int = SMALL_BODY_LIMIT) -> bytes:
    """The body, refused when over `limit` or when the client sends it too slowly
    (a slow body would otherwise hold a connection and a handler forever)."""
    settings = request.app[DAEMON].settings.server

    def too_large() -> BodyTooLarge:
        setting = " (server.max_body_bytes)" if limit == settings.max_body_bytes else ""
        return BodyTooLarge(f"the body is over {limit} bytes{setting}")

    length = request.content_length  # parsed from the header at each access
    if length is not None and length > limit:
        raise too_large()
    timeout = settings.client_timeout_seconds
    try:
        if request.content.is_eof():
            # The whole body came with the headers (the usual small request):
            # no timer to arm.
            return await request.read()
        async with asyncio.timeout(timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large() from None
    except RequestPayloadError:
        encoding = request.headers.get("Content-Encoding", "none")[:20]
        raise ParseError(f"the body does not decode as its Content-Encoding ({encoding})") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the body did not arrive within {timeout:g} s (server.client_timeout_seconds)"
        ) from None
