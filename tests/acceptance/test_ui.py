"""The status page in a real browser (Debian's chromium, driven by playwright) against
the real `a2ad serve`: a person signs in with the admin token, sees the workspace, its
queue counts and a failed item with its error, and presses Retry (SPEC, Operators:
`GET /ui`). Saves test-artifacts/ui.png."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from a2ad_http import HB_TOKEN, WORKSPACE, heartbeat, http_json, item, send_body

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher, Process

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    why = (
        f"{CHROMIUM} is missing (make chromium installs Debian's); the status page's"
        " browser test needs it, playwright's own browser download cannot run here"
    )
    if os.environ.get("CI"):
        pytest.fail(why, pytrace=False)  # CI must run it, never skip it
    pytest.skip(why, allow_module_level=True)
from playwright import sync_api  # noqa: E402 - only once chromium is known to be there

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ADMIN_TOKEN = "ui-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ITEM_DEADLINE = 10.0
UI_TIMEOUT_MS = 10_000
STATES = ("queued", "dispatching", "delivered", "failed", "expired", "cancelled")


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never answers: every delivery times out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@dataclass
class Live:
    config: A2adConfig
    daemon: Process
    failed: str

    @property
    def base(self) -> str:
        return self.config.url


@pytest.fixture
def live(launcher: Launcher) -> Iterator[Live]:
    """`a2ad serve` with an admin token and one failed item; the agent then reports
    itself full, so a retried item stays queued where a person can see it."""
    with black_hole() as port:
        config = launcher.config(
            workspaces=[
                {
                    "id": WORKSPACE,
                    "url": f"http://127.0.0.1:{port}/",
                    "token": HB_TOKEN,
                    "request_timeout_seconds": 0.5,
                }
            ],
            queue={"max_attempts": 1},
            auth={"admin_token": ADMIN_TOKEN},
        )
        daemon = launcher.a2ad(config)
        base = config.url
        heartbeat(base, 1)
        send = send_body("hello", message_id="m-ui")
        status, data = http_json("POST", f"{base}/workspaces/{WORKSPACE}/a2a", send)
        assert status == 202, data
        qid: str = data["result"]["id"]
        heartbeat(base, 0)
        view = item(base, qid, wait=ITEM_DEADLINE, headers=ADMIN)
        assert view["state"] == "failed", view
        heartbeat(base, 1)
        yield Live(config, daemon, qid)


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def cells(row: Any) -> list[str]:
    texts: list[str] = row.locator("td").all_inner_texts()
    return [t.strip() for t in texts]


def test_sign_in_see_a_failed_item_and_retry_it(live: Live, browser: Any) -> None:
    qid, base = live.failed, live.base
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()

    # Without a session: a login form and nothing else.
    page.goto(f"{base}/ui")
    assert page.locator("input[name=token]").is_visible()
    assert qid not in page.content()

    # A wrong token does not sign in.
    page.fill("input[name=token]", "not-the-token")
    with page.expect_response(lambda r: r.url.endswith("/ui/login")) as answer:
        page.click("button:has-text('Sign in')")
    assert answer.value.status == 401
    assert page.get_by_text("That is not the admin token.").is_visible()
    assert not [c for c in context.cookies() if c["name"] == "a2ad_session"]

    # The right one does, with an HttpOnly, SameSite=Strict cookie on /ui.
    page.fill("input[name=token]", ADMIN_TOKEN)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{base}/ui")
    (session,) = [c for c in context.cookies() if c["name"] == "a2ad_session"]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert session["path"] == "/ui"
    assert ADMIN_TOKEN not in session["value"]

    # The workspace with its state and queue counts.
    row = page.locator(f'#workspaces tr[data-workspace="{WORKSPACE}"]')
    headers = [h.strip().lower() for h in page.locator("#workspaces th").all_inner_texts()]
    values = dict(zip(headers, cells(row), strict=True))
    assert values["workspace"] == WORKSPACE
    assert values["state"] == "online"
    assert {s: values[s] for s in STATES} == {s: "1" if s == "failed" else "0" for s in STATES}

    # The failed item with its attempts and error, and a Retry button.
    failed = page.locator(f'#failed tr[data-item="{qid}"]')
    item_id, workspace, attempts, error, when = cells(failed)[:5]
    assert (item_id, workspace, attempts) == (qid, WORKSPACE, "1")
    assert "no answer within 0.5 s" in error
    assert when.endswith("Z")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)

    # A POST with the session cookie but without the form's CSRF token is refused.
    for form in ({}, {"csrf": "forged"}):
        refused = context.request.post(f"{base}/ui/items/{qid}/retry", form=form, max_redirects=0)
        assert refused.status == 403
        assert "CSRF token is missing or does not match" in refused.text()
    assert item(base, qid, headers=ADMIN)["state"] == "failed"

    # Retry: the item is queued again, on the page and through the API.
    failed.get_by_role("button", name="Retry").click()
    page.wait_for_url(f"{base}/ui?retried={qid}")
    assert page.get_by_text(f"{qid} is queued again.").is_visible()
    assert page.locator("#no-failed").is_visible()
    values = dict(zip(headers, cells(row), strict=True))
    assert values["queued"] == "1" and values["failed"] == "0"
    view = item(base, qid, headers=ADMIN)
    assert view["state"] == "queued" and view["attempts"] == 0

    # Signing out ends the session: the login form again.
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{base}/ui")
    assert page.locator("input[name=token]").is_visible()
    assert not [c for c in context.cookies() if c["name"] == "a2ad_session"]
    context.close()
