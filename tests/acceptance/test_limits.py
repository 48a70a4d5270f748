"""Client limits of the real `serve`: header sizes, slow clients, bad HTTP.

These are enforced below the application (aiohttp's parser and keep-alive timer),
so only the real process shows them; each must still be a JSON error a2ad owns."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher

CLIENT_TIMEOUT = 1.0


@pytest.fixture
def served(launcher: Launcher) -> A2adConfig:
    config = launcher.config(
        workspaces=[{"id": "w", "url": "http://127.0.0.1:9/", "heartbeat": False}],
        server={"client_timeout_seconds": CLIENT_TIMEOUT, "max_header_bytes": 4096},
    )
    launcher.a2ad(config)
    return config


def exchange(config: A2adConfig, data: bytes, *, drip: float = 0.0) -> tuple[bytes, float]:
    """Send raw bytes (one at a time every `drip` seconds if set); return what came
    back before the server closed, and how long that took."""
    started = time.monotonic()
    with socket.create_connection((config.host, config.port), timeout=10) as sock:
        try:
            if drip:
                for byte in data:
                    sock.send(bytes([byte]))
                    time.sleep(drip)
            else:
                sock.sendall(data)
        except OSError:
            pass  # the server closed the connection while we were sending
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - started


def split(response: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def test_an_oversized_header_line_is_431_in_json(served: A2adConfig) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    response, _ = exchange(served, request)
    status, body = split(response)
    assert status == 431
    assert body["error"]["code"] == "headers_too_large"
    assert "4096 bytes" in body["error"]["message"]


def test_too_many_headers_is_431_in_json(served: A2adConfig) -> None:
    lines = b"".join(b"X-H%d: 1\r\n" % i for i in range(200))
    response, _ = exchange(served, b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n")
    status, body = split(response)
    assert status == 431
    assert body["error"]["code"] == "headers_too_large"


def test_bytes_that_are_not_http_get_400_in_json(served: A2adConfig) -> None:
    response, _ = exchange(served, b"HELLO THERE\r\n\r\n")
    status, body = split(response)
    assert status == 400
    assert body["error"]["code"] == "bad_request"
    assert "Traceback" not in body["error"]["message"]


def test_headers_that_never_finish_are_cut_off(served: A2adConfig) -> None:
    """A slowloris client: one header byte every 0.2 s never finishes within the
    client timeout, so the server closes the socket instead of waiting forever."""
    request = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    response, took = exchange(served, request, drip=0.2)
    assert response == b""
    assert took < 200 * 0.2  # closed long before the client would have finished


def test_a_body_that_never_finishes_is_408_in_json(served: A2adConfig) -> None:
    head = (
        b"POST /workspaces/w/a2a HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    response, _ = exchange(served, head + b'{"jsonrpc": "2.0",')
    status, body = split(response)
    assert status == 408
    assert body["error"]["data"]["code"] == "request_timeout"
    assert "client_timeout_seconds" in body["error"]["message"]


def test_the_server_still_answers_after_all_of_that(served: A2adConfig) -> None:
    for request in (b"HELLO\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * 5000 + b"\r\n\r\n"):
        exchange(served, request)
    with urllib.request.urlopen(f"{served.url}/readyz", timeout=10) as resp:
        assert resp.status == 200
