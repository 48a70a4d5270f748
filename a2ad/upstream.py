"""Talking to agents: one client session, and every answer classified as
final, busy or failure (SPEC, Delivery)."""

from __future__ import annotations

import asyncio
import email.utils
import errno
import functools
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import aiohttp
import aiohttp.abc

from .settings import WorkspaceSettings

MAX_RETRY_AFTER = 3600.0


class Outcome(Enum):
    FINAL = "final"  # a delivery: the answer is the result, whatever it says
    BUSY = "busy"  # the agent is busy: same row back to queued, no attempt used
    FAILURE = "failure"  # uses an attempt


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: Outcome
    status: int | None = None
    body: bytes = b""
    content_type: str = "application/json"
    retry_after: float | None = None
    error: str | None = None  # why, for busy and failure
    timed_out: bool = False
    refused: bool = False
    too_large: bool = False
    parsed: dict[str, Any] | None = None  # the JSON body, when a2ad checked it

    @property
    def reached_agent(self) -> bool:
        """The agent answered something: a sign of life."""
        return self.status is not None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):  # "inf" or "nan" parse as floats, and mean nothing
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def _jsonrpc_response(body: bytes) -> dict[str, Any] | None:
    """The answer parsed, when it is a JSON object with a result or an error (SPEC:
    anything else is malformed, a failure). The byte check turns most bad answers
    away without a parse; the parse is kept, so no one parses the answer twice."""
    text = body.strip()
    if not (text.startswith(b"{") and text.endswith(b"}")):
        return None
    if b'"result"' not in text and b'"error"' not in text:
        return None
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):  # ValueError also covers UnicodeDecodeError
        return None
    if isinstance(parsed, dict) and ("result" in parsed or "error" in parsed):
        return parsed
    return None


@functools.lru_cache(maxsize=64)
def _timeout(limit: float, stream: bool) -> aiohttp.ClientTimeout:
    """A whole answer within `limit`; a stream may run long but never go quiet that long."""
    if stream:
        return aiohttp.ClientTimeout(total=None, sock_connect=limit, sock_read=limit)
    return aiohttp.ClientTimeout(total=limit)


@dataclass(frozen=True, slots=True)
class Opened:
    """What `Upstream.open` got: a classified answer, or an open event stream."""

    answer: Answer | None
    stream: aiohttp.ClientResponse | None = None


def to_agent(workspace: WorkspaceSettings, headers: Mapping[str, str]) -> Mapping[str, str]:
    """The headers of one request to the workspace's agent: the request's own (only
    those SPEC passes on, so never a caller's Authorization) and the credentials the
    config file gives it. Every request to an agent goes through here."""
    if not workspace.agent_token and not workspace.agent_headers:
        return headers
    # Config load refuses agent_headers that name a header a request carries.
    return {**headers, **workspace.agent_credentials}


def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    return resp.headers.get("Content-Type", "").startswith("text/event-stream")


def connection_failure(exc: BaseException, limit: float) -> Answer:
    """Classify an exception from talking to the agent (SPEC, Delivery)."""
    if isinstance(exc, TimeoutError):
        return Answer(Outcome.FAILURE, timed_out=True, error=f"no answer within {limit:g} s")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Answer(Outcome.BUSY, refused=True, error=f"cannot connect: {exc.os_error}")
    if isinstance(exc, aiohttp.ClientOSError) and exc.errno == errno.EPIPE:
        # A write that failed with a broken pipe never delivered the body:
        # the agent did not see the message, so it is busy, not failed.
        return Answer(Outcome.BUSY, refused=True, error=f"connection reset: {exc}")
    if isinstance(exc, (aiohttp.ClientError, asyncio.IncompleteReadError)):
        # Closed after the body was sent: the agent may have crashed on this
        # very message, so this uses an attempt.
        return Answer(Outcome.FAILURE, error=f"connection lost: {exc or type(exc).__name__}")
    raise exc


class Upstream:
    """The one aiohttp client session a2ad uses to reach agents."""

    def __init__(
        self,
        *,
        max_result_bytes: int,
        resolver: Callable[[], aiohttp.abc.AbstractResolver] | None = None,
    ) -> None:
        self.max_result_bytes = max_result_bytes
        self._resolver = resolver  # made in start(): resolvers want a running loop
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Idle keep-alive connections are dropped well before common agent
        # servers close theirs (uvicorn: 5 s), so a send rarely meets a socket
        # the agent is closing.
        connector = aiohttp.TCPConnector(
            limit=0,
            keepalive_timeout=4.0,
            resolver=self._resolver() if self._resolver is not None else None,
        )
        # Answers are relayed and stored as the agent sent them, so a2ad asks for
        # them uncompressed (aiohttp would otherwise offer gzip and deflate).
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            headers={"Accept-Encoding": "identity"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "upstream is not started"
        return self._session

    async def send(
        self,
        workspace: WorkspaceSettings,
        body: bytes,
        headers: Mapping[str, str],
        *,
        expect_jsonrpc: bool = True,
    ) -> Answer:
        """POST one JSON-RPC request to the agent and classify what comes back."""
        limit = workspace.request_timeout_seconds
        try:
            resp = await self._post(workspace, body, headers, _timeout(limit, False))
        except Exception as exc:
            return connection_failure(exc, limit)
        try:
            return await self._classify(resp, expect_jsonrpc)
        except Exception as exc:
            return connection_failure(exc, limit)
        finally:
            resp.release()

    async def open(
        self, workspace: WorkspaceSettings, body: bytes, headers: Mapping[str, str]
    ) -> Opened:
        """POST a streaming request: an event-stream answer comes back open (the
        caller reads and releases it); anything else is read and classified."""
        limit = workspace.request_timeout_seconds
        try:
            # A stream may run long: the agent must only never go quiet for `limit`.
            resp = await self._post(workspace, body, headers, _timeout(limit, True))
        except Exception as exc:
            return Opened(connection_failure(exc, limit))
        if resp.status == 200 and is_event_stream(resp):
            return Opened(None, resp)
        try:
            return Opened(await self._classify(resp, True))
        except Exception as exc:
            return Opened(connection_failure(exc, limit))
        finally:
            resp.release()

    def _post(
        self,
        workspace: WorkspaceSettings,
        body: bytes,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
    ) -> Awaitable[aiohttp.ClientResponse]:
        # Redirects are relayed to the caller, not followed: a2ad never sends a
        # message somewhere its operator did not configure.
        return self.session.post(
            workspace.url,
            data=body,
            headers=to_agent(workspace, headers),
            timeout=timeout,
            allow_redirects=False,
        )

    def get(
        self,
        workspace: WorkspaceSettings,
        url: str,
        timeout: aiohttp.ClientTimeout,
        headers: Mapping[str, str] | None = None,
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """GET one of the agent's own URLs (its card), with its credentials; for
        `async with`. No redirects followed, as for sends."""
        return self.session.get(
            url,
            headers=to_agent(workspace, headers or {}),
            timeout=timeout,
            allow_redirects=False,
        )

    async def _classify(self, resp: aiohttp.ClientResponse, expect_jsonrpc: bool) -> Answer:
        status = resp.status
        content_type = resp.headers.get("Content-Type", "application/json")
        if status in (429, 503):
            retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
            return Answer(
                Outcome.BUSY, status, retry_after=retry_after, error=f"agent busy (HTTP {status})"
            )
        payload, too_large = await self._read_limited(resp)
        if status in (502, 504):
            return Answer(
                Outcome.FAILURE,
                status,
                payload,
                content_type,
                error=f"agent answered HTTP {status}",
            )
        if too_large:
            return Answer(
                Outcome.FINAL,
                status,
                b"",
                content_type,
                too_large=True,
                error=f"answer over max_result_bytes ({self.max_result_bytes})",
            )
        parsed = None
        if expect_jsonrpc and 200 <= status < 300:
            parsed = _jsonrpc_response(payload)
            if parsed is None:
                return Answer(
                    Outcome.FAILURE,
                    status,
                    payload,
                    content_type,
                    error=f"malformed answer (HTTP {status}, not a JSON-RPC response)",
                )
        return Answer(Outcome.FINAL, status, payload, content_type, parsed=parsed)

    async def _read_limited(self, resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        limit = self.max_result_bytes
        length = resp.content_length
        if length is not None:
            if length > limit:
                return b"", True
            return await resp.read(), False
        chunks, size = [], 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                return b"", True
            chunks.append(chunk)
        return b"".join(chunks), False


async def iter_sse(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The `data` of each server-sent event, as the agent sends them."""
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # Comments (":"), event names and ids carry nothing a2ad needs here.
    if data:
        yield "\n".join(data)
