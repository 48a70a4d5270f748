"""HTTP for the acceptance tests, with urllib alone: what any client of a2ad sees."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any

TIMEOUT = 30.0
WORKSPACE = "w"  # the workspace most tests configure
HB_TOKEN = "hb-token"  # and its heartbeat token


def http_call(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> tuple[int, Any, dict[str, str]]:
    """One request: the status, the parsed JSON body and the headers, also for
    HTTP errors."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null"), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null"), dict(exc.headers)


def http_json(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> tuple[int, Any]:
    """One request; the status and the parsed JSON body, also for HTTP errors."""
    status, data, _ = http_call(method, url, body, headers, timeout)
    return status, data


def send_body(
    text: str, message_id: str | None = None, *, blocking: bool = False
) -> dict[str, Any]:
    """A v0.3 message/send request with one text part; not blocking unless asked (a
    queued one is answered 202 at once, a blocking one held until it ends)."""
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "message/send",
        "params": {
            "message": {
                "kind": "message",
                "role": "user",
                "messageId": message_id or str(uuid.uuid4()),
                "parts": [{"kind": "text", "text": text}],
            },
            "configuration": {"blocking": blocking},
        },
    }


def heartbeat(base: str, active: int, *, workspace: str = WORKSPACE, token: str = HB_TOKEN) -> None:
    """The agent's heartbeat: `active` requests at work."""
    status, data = http_json(
        "POST",
        f"{base}/workspaces/{workspace}/heartbeat",
        {"active_tasks": active},
        {"Authorization": f"Bearer {token}"},
    )
    assert status == 200, data


def item(
    base: str, qid: str, wait: float = 0.0, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """GET /queue/{qid}?wait=, which must answer 200."""
    status, data = http_json("GET", f"{base}/queue/{qid}?wait={wait}", headers=headers)
    assert status == 200, data
    view: dict[str, Any] = data
    return view
