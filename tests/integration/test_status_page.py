"""The status page in-process: what it escapes, which forms it refuses, and the
login cookie it sets (SPEC, Operators: `GET /ui`)."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable

from aiohttp import ClientResponse
from fakes import A2ad, FakeAgent, jsonrpc_task, wait_until

from a2ad.clock import ManualClock
from a2ad.store import NewItem

BOTH_STORES = True  # the page reads the queue the same from either store

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]

ADMIN_TOKEN = "admin-secret-for-the-ui"
HB = {"Authorization": "Bearer hb-secret"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HOSTILE_WORKSPACE = '<img src=x onerror="alert(1)">'
HOSTILE_ERROR = "<script>alert('owned')</script> & \"quotes\""


def csrf_of(html: str) -> str:
    """The CSRF token the page's forms carry (all forms of one page carry the same)."""
    tokens: set[str] = set(re.findall(r'name="csrf" value="([^"]*)"', html))
    assert len(tokens) == 1, tokens
    return tokens.pop()


async def failed_item(a2ad: A2ad, agent: FakeAgent) -> str:
    """A send that is queued, delivered once, answered 502 and, with max_attempts = 1,
    failed; afterwards the agent reports itself full, so a retried item stays queued."""
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 1}, headers=HB)
    status, data = await a2ad.send("w", "doomed")
    assert status == 202, data
    qid: str = jsonrpc_task(data)["id"]
    agent.script = [(502, {"error": "upstream down"}, {})]
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 0}, headers=HB)
    item = await a2ad.item(qid, wait=10, headers=ADMIN)
    assert item["state"] == "failed", item
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 1}, headers=HB)
    return qid


async def make(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, *, admin: bool
) -> tuple[FakeAgent, A2ad]:
    agent = await agent_factory()
    auth = {"admin_token": ADMIN_TOKEN} if admin else {}
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "token": "hb-secret"}],
        clock=ManualClock(),
        queue={"max_attempts": 1},
        auth=auth,
    )
    return agent, a2ad


async def login(a2ad: A2ad, token: str = ADMIN_TOKEN) -> ClientResponse:
    page = await a2ad.client.get("/ui")
    return await a2ad.client.post(
        "/ui/login",
        data={"token": token, "csrf": csrf_of(await page.text())},
        allow_redirects=False,
    )


async def test_hostile_workspace_ids_and_errors_are_escaped(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    _, a2ad = await make(agent_factory, a2ad_factory, admin=False)
    store, now = a2ad.daemon.store, a2ad.daemon.clock.now()
    # No registered workspace has this id, so no dispatcher races this test for it.
    new = NewItem(workspace=HOSTILE_WORKSPACE, method="message/send", body=b"{}")
    await store.enqueue(new, now=now, replay_window=60)
    (claimed,) = await store.claim(HOSTILE_WORKSPACE, now=now, lease_seconds=60, promote_after=120)
    assert claimed.claim_token is not None
    await store.settle(
        claimed.id,
        claimed.claim_token,
        state="failed",
        now=now,
        last_error=HOSTILE_ERROR,
        attempt_used=True,
    )
    resp = await a2ad.client.get("/ui")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;" in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert claimed.id in html
    # Defence in depth: the page runs no script and cannot be framed.
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY"
    # The retried-notice shows queue ids only, nothing else from the query.
    resp = await a2ad.client.get("/ui", params={"retried": "<b>injected-notice</b>"})
    assert "injected-notice" not in await resp.text()


async def test_forms_without_a_valid_csrf_token_are_refused(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad = await make(agent_factory, a2ad_factory, admin=False)
    qid = await failed_item(a2ad, agent)
    html = await (await a2ad.client.get("/ui")).text()
    assert f'action="/ui/items/{qid}/retry"' in html
    token = csrf_of(html)
    for data in ({}, {"csrf": ""}, {"csrf": "0" * len(token)}):
        resp = await a2ad.client.post(f"/ui/items/{qid}/retry", data=data, allow_redirects=False)
        assert resp.status == 403
        assert resp.content_type == "text/html"
        assert "CSRF token is missing or does not match" in await resp.text()
    # The right token with another browser's nonce cookie is refused too.
    resp = await a2ad.client.post(
        f"/ui/items/{qid}/retry",
        data={"csrf": token},
        cookies={"a2ad_csrf": "another-browsers-nonce-0123456789"},
        allow_redirects=False,
    )
    assert resp.status == 403
    assert (await a2ad.item(qid))["state"] == "failed"
    resp = await a2ad.client.post(
        f"/ui/items/{qid}/retry", data={"csrf": token}, allow_redirects=False
    )
    assert resp.status == 303
    assert resp.headers["Location"] == f"/ui?retried={qid}"
    item = await a2ad.item(qid)
    assert item["state"] == "queued" and item["attempts"] == 0
    # Retrying it again does not fit its state: an HTML page says why.
    resp = await a2ad.client.post(f"/ui/items/{qid}/retry", data={"csrf": token})
    assert resp.status == 409
    assert "only failed or expired items are retried" in await resp.text()


async def test_login_sets_a_strict_http_only_session_cookie(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad = await make(agent_factory, a2ad_factory, admin=True)
    qid = await failed_item(a2ad, agent)
    resp = await a2ad.client.get("/ui")
    html = await resp.text()
    assert resp.status == 200 and 'name="token"' in html
    assert qid not in html and "Workspaces" not in html
    # Not logged in: no retry, whatever the form carries.
    resp = await a2ad.client.post(
        f"/ui/items/{qid}/retry", data={"csrf": csrf_of(html)}, allow_redirects=False
    )
    assert resp.status == 401
    # A login without the form's CSRF token is refused before the token is looked at.
    resp = await a2ad.client.post("/ui/login", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert resp.status == 403
    assert "a2ad_session" not in resp.cookies

    resp = await login(a2ad, "wrong-token")
    assert resp.status == 401
    assert "That is not the admin token." in await resp.text()
    assert "a2ad_session" not in resp.cookies

    resp = await login(a2ad)
    assert resp.status == 303 and resp.headers["Location"] == "/ui"
    (set_cookie,) = [h for h in resp.headers.getall("Set-Cookie") if h.startswith("a2ad_session=")]
    attributes = {a.strip().split("=")[0].lower(): a for a in set_cookie.split(";")}
    assert "httponly" in attributes
    assert attributes["samesite"].strip() == "SameSite=Strict"
    assert attributes["path"].strip() == "Path=/ui"
    assert ADMIN_TOKEN not in set_cookie

    html = await (await a2ad.client.get("/ui")).text()
    assert qid in html and "Sign out" in html
    # The session's own CSRF token: a retry with it works, without it is refused.
    resp = await a2ad.client.post(f"/ui/items/{qid}/retry", allow_redirects=False)
    assert resp.status == 403
    resp = await a2ad.client.post(
        f"/ui/items/{qid}/retry", data={"csrf": csrf_of(html)}, allow_redirects=False
    )
    assert resp.status == 303
    await wait_until(lambda: a2ad.daemon.registry.get("w").queued_total == 1)

    resp = await a2ad.client.post("/ui/logout", data={"csrf": csrf_of(html)}, allow_redirects=False)
    assert resp.status == 303
    html = await (await a2ad.client.get("/ui")).text()
    assert 'name="token"' in html and qid not in html


async def test_ui_errors_are_html_pages(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    _, a2ad = await make(agent_factory, a2ad_factory, admin=True)
    resp = await a2ad.client.get("/ui/nothing-here")
    assert resp.status == 404 and resp.content_type == "text/html"
    resp = await a2ad.client.get("/ui/login")
    assert resp.status == 405 and resp.content_type == "text/html"
    # Outside /ui errors stay JSON.
    resp = await a2ad.client.get("/nothing-here")
    assert resp.status == 404
    assert json.loads(await resp.text())["error"]["code"] == "not_found"
