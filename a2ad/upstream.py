"""Talking to agents: one client session, and every answer classified as
final, busy or failure (SPEC, Delivery)."""

from __future__ import annotations

import asyncio
import email.utils
import errno
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import aiohttp

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
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def _is_jsonrpc_response(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and ("result" in data or "error" in data)


class Upstream:
    """The one aiohttp client session a2ad uses to reach agents."""

    def __init__(self, *, max_result_bytes: int) -> None:
        self.max_result_bytes = max_result_bytes
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Idle keep-alive connections are dropped well before common agent
        # servers close theirs (uvicorn: 5 s), so a send rarely meets a socket
        # the agent is closing.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
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
        timeout = aiohttp.ClientTimeout(total=workspace.request_timeout_seconds)
        try:
            async with self.session.post(
                workspace.url,
                data=body,
                headers=dict(headers),
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                content_type = resp.headers.get("Content-Type", "application/json")
                if status in (429, 503):
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                    return Answer(
                        Outcome.BUSY,
                        status,
                        retry_after=retry_after,
                        error=f"agent busy (HTTP {status})",
                    )
                payload, too_large = await self._read_limited(resp)
        except TimeoutError:
            return Answer(
                Outcome.FAILURE,
                timed_out=True,
                error=f"no answer within {workspace.request_timeout_seconds:g} s",
            )
        except aiohttp.ClientConnectorError as exc:
            return Answer(Outcome.BUSY, refused=True, error=f"cannot connect: {exc.os_error}")
        except aiohttp.ClientOSError as exc:
            # A write that failed with a broken pipe never delivered the body:
            # the agent did not see the message, so it is busy, not failed.
            if exc.errno == errno.EPIPE:
                return Answer(Outcome.BUSY, refused=True, error=f"connection reset: {exc}")
            return Answer(Outcome.FAILURE, error=f"connection lost: {exc}")
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            # Closed after the body was sent: the agent may have crashed on
            # this very message, so this uses an attempt.
            return Answer(Outcome.FAILURE, error=f"connection lost: {exc or type(exc).__name__}")
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
        if expect_jsonrpc and 200 <= status < 300 and not _is_jsonrpc_response(payload):
            return Answer(
                Outcome.FAILURE,
                status,
                payload,
                content_type,
                error=f"malformed answer (HTTP {status}, not a JSON-RPC response)",
            )
        return Answer(Outcome.FINAL, status, payload, content_type)

    async def _read_limited(self, resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        limit = self.max_result_bytes
        if resp.content_length is not None and resp.content_length > limit:
            return b"", True
        chunks, size = [], 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                return b"", True
            chunks.append(chunk)
        return b"".join(chunks), False
