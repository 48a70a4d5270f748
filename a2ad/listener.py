"""The HTTP listener of `serve`: aiohttp's runner with a2ad's client limits.

Two things aiohttp does below the application, where a2ad's error middleware
never runs, are brought in line here:
- a request aiohttp's parser refuses (a header line over `max_header_bytes`,
  too many headers, not HTTP at all) gets a2ad's JSON error body instead of
  aiohttp's text/plain one, and one log line instead of a traceback;
- a connection that never completes a request's headers is closed after
  `client_timeout_seconds` (aiohttp's keep-alive timer, which also runs from
  the moment a connection opens), so slow clients cannot hold sockets open.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from a2ad.settings import ServerSettings

log = logging.getLogger("a2ad.http")

# aiohttp's own limit on the number of header lines; a2ad keeps it.
MAX_HEADERS = 128


def _error_body(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering parser errors in a2ad's shape."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of a response is out already; aiohttp closes the connection.
            raise ConnectionError("the response was already started")
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "headers" in str(exc.message)
        ):
            status, code = 431, "headers_too_large"
            text = (
                f"request headers too large: at most {self.max_field_size} bytes a line"
                f" and {self.max_headers} lines"
            )
        elif status < 500:
            code = "bad_request"
            text = " ".join(f"not a valid HTTP request: {message or exc}".split())[:300]
        else:
            code, text = "internal", "internal error; see the a2ad log"
        if status >= 500:
            log.error("HTTP error from %s", request.remote, exc_info=exc)
        else:
            log.info("refused a malformed request from %s: %s", request.remote, text)
        response = web.Response(
            status=status, text=_error_body(code, text), content_type="application/json"
        )
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An AppRunner whose connections use a2ad's limits and error bodies."""

    def __init__(self, app: web.Application, server: ServerSettings, **kwargs: Any) -> None:
        super().__init__(
            app,
            max_line_size=server.max_header_bytes,
            max_field_size=server.max_header_bytes,
            max_headers=MAX_HEADERS,
            keepalive_timeout=server.client_timeout_seconds,
            **kwargs,
        )

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        # aiohttp builds its Server in Application._make_handler with no hook for
        # the connection handler class; this subclass adds only the class choice.
        made.__class__ = _Server
        return made
