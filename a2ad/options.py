"""A send's options: the A2AD-* request headers and params.metadata.a2ad."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import InvalidHeader, InvalidParams
from .store import PRIORITIES

METADATA_OPTIONS = ("priority", "ttl_seconds", "queue")
MAX_TTL_SECONDS = 10 * 365 * 86400.0


@dataclass(frozen=True, slots=True)
class SendOptions:
    """A send's options: the A2AD-* request headers, or params.metadata.a2ad."""

    priority: int = PRIORITIES["task"]
    ttl: float | None = None
    never_queue: bool = False


def _shown(value: Any) -> str:
    return json.dumps(value)[:40]


def metadata_options(params: Mapping[str, Any]) -> SendOptions:
    """The options in params.metadata.a2ad (for clients that set request metadata
    more easily than headers); raise InvalidParams naming the key and its values."""
    metadata = params.get("metadata")
    given = metadata.get("a2ad") if isinstance(metadata, dict) else None
    if given is None:
        return SendOptions()
    where = "params.metadata.a2ad"
    if not isinstance(given, dict):
        raise InvalidParams(f"{where} must be an object with keys {', '.join(METADATA_OPTIONS)}")
    unknown = sorted(set(given) - set(METADATA_OPTIONS))
    if unknown:
        raise InvalidParams(
            f"{where} has an unknown key {_shown(unknown[0])}; "
            f"its keys are {', '.join(METADATA_OPTIONS)}"
        )
    options = SendOptions()
    value = given.get("priority")
    if value is not None:
        name = value.strip().lower() if isinstance(value, str) else None
        if name not in PRIORITIES:
            raise InvalidParams(
                f"{where}.priority must be one of critical, task, info (got {_shown(value)})"
            )
        options = replace(options, priority=PRIORITIES[name])
    value = given.get("ttl_seconds")
    if value is not None:
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not 0 < value <= MAX_TTL_SECONDS
        ):
            raise InvalidParams(
                f"{where}.ttl_seconds must be a number of seconds above 0 (got {_shown(value)})"
            )
        options = replace(options, ttl=float(value))
    value = given.get("queue")
    if value is not None:
        if value not in ("never", "allow"):
            raise InvalidParams(f"{where}.queue must be never or allow (got {_shown(value)})")
        options = replace(options, never_queue=value == "never")
    return options


def read_options(headers: Mapping[str, str], params: Mapping[str, Any]) -> SendOptions:
    """The send's options: each A2AD-* header, else its params.metadata.a2ad key (SPEC:
    headers win). Both are checked: a bad header is invalid_header (400), a bad
    metadata value invalid_params (-32602)."""
    options = metadata_options(params)
    if "A2AD-Priority" in headers:
        priority_name = headers["A2AD-Priority"].strip().lower()
        if priority_name not in PRIORITIES:
            raise InvalidHeader(
                f"A2AD-Priority must be one of critical, task, info (got {priority_name[:40]!r})"
            )
        options = replace(options, priority=PRIORITIES[priority_name])
    if "A2AD-TTL" in headers:
        raw = headers["A2AD-TTL"].strip()
        ttl: float | None
        try:
            ttl = float(raw)
        except ValueError:
            ttl = None
        if ttl is None or not 0 < ttl <= MAX_TTL_SECONDS:
            raise InvalidHeader(f"A2AD-TTL must be a number of seconds above 0 (got {raw[:40]!r})")
        options = replace(options, ttl=ttl)
    queue = headers.get("A2AD-Queue", "").strip().lower()
    if queue not in ("", "never", "allow"):
        raise InvalidHeader(f"A2AD-Queue must be never or allow (got {queue[:40]!r})")
    if queue:
        options = replace(options, never_queue=queue == "never")
    return options
