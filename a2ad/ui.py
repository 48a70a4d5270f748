"""The status page: `GET /ui` shows workspaces, queue counts and failed items with a
Retry button; a login form with the admin token opens a cookie session.

Server-rendered HTML with a little inline CSS, no script. Everything shown is
escaped: workspace ids, item ids and agents' errors are not ours to trust.

Sessions and CSRF:
- A login makes a random session id, kept in memory only (never the token), in an
  HttpOnly, SameSite=Strict cookie on Path=/ui; a restart logs everyone out.
- Each session has its own random CSRF token, carried by its forms (retry, logout).
- Forms shown without a session (the login form, and every form while the page is
  open) carry a signed double-submit token: a random nonce in a cookie and, in the
  form, an HMAC of it under a per-process key. A forged form has neither.
- A POST whose CSRF token is missing or wrong is refused with 403.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from html import escape
from typing import Any, Literal
from urllib.parse import parse_qs

from aiohttp import web
from aiohttp.typedefs import Handler

from . import admin
from .a2a import timestamp
from .clock import Clock
from .daemon import DAEMON, Daemon
from .errors import A2adError, Conflict, NotFound
from .http_io import read_body
from .results import dead_push_views
from .store import STATES, Item

SESSION_COOKIE = "a2ad_session"
NONCE_COOKIE = "a2ad_csrf"
CSRF_FIELD = "csrf"
SESSION_SECONDS = 12 * 3600.0
MAX_SESSIONS = 64  # oldest dropped first; only the admin can make sessions
FAILED_SHOWN = 50
ERROR_SHOWN_CHARS = 300
_TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{20,100}$")
_QUEUE_ID = re.compile(r"^q-[0-9a-f]{32}$")

Purpose = Literal["login", "open"]


@dataclass(slots=True)
class Session:
    csrf: str
    expires_at: float


class Sessions:
    """Logged-in browsers (in memory) and the key that signs session-less forms."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._by_id: dict[str, Session] = {}
        self._key = secrets.token_bytes(32)

    def create(self) -> str:
        now = self._clock.now()
        for sid in [s for s, session in self._by_id.items() if session.expires_at <= now]:
            del self._by_id[sid]
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]  # dicts keep insertion order
        sid = secrets.token_urlsafe(32)
        self._by_id[sid] = Session(secrets.token_urlsafe(32), now + SESSION_SECONDS)
        return sid

    def get(self, sid: str | None) -> Session | None:
        if sid is None:
            return None
        session = self._by_id.get(sid)
        if session is not None and session.expires_at <= self._clock.now():
            del self._by_id[sid]
            return None
        return session

    def drop(self, sid: str | None) -> None:
        if sid is not None:
            self._by_id.pop(sid, None)

    def sign(self, purpose: Purpose, nonce: str) -> str:
        """The form half of a double-submit token whose cookie half is `nonce`."""
        return hmac.new(self._key, f"{purpose}:{nonce}".encode(), hashlib.sha256).hexdigest()


SESSIONS = web.AppKey("a2ad_ui_sessions", Sessions)


def setup(app: web.Application) -> None:
    """The status page's session state; call after app[DAEMON] is set."""
    app[SESSIONS] = Sessions(app[DAEMON].clock)


def routes() -> list[tuple[str, str, Handler]]:
    """The status page's routes: method, path, handler."""
    return [
        ("GET", "/ui", page),
        ("POST", "/ui/login", login),
        ("POST", "/ui/logout", logout),
        ("POST", "/ui/items/{qid}/retry", retry),
        ("POST", "/ui/pushes/retry", retry_pushes),
    ]


def is_ui_path(path: str) -> bool:
    """Paths whose errors are HTML pages, not JSON."""
    return path == "/ui" or path.startswith("/ui/")


# -- cookies and CSRF ---------------------------------------------------------------


def _cookie(response: web.StreamResponse, name: str, value: str, max_age: float) -> None:
    # Secure is left off on purpose: a2ad serves plain http on loopback, and a browser
    # would never send a Secure cookie back over http. HttpOnly keeps it from scripts,
    # SameSite=Strict keeps it off every cross-site request.
    response.set_cookie(
        name, value, max_age=int(max_age), path="/ui", httponly=True, samesite="Strict"
    )


def _nonce(request: web.Request) -> str | None:
    value = request.cookies.get(NONCE_COOKIE)
    return value if value is not None and _TOKEN_SHAPE.match(value) else None


@dataclass(slots=True)
class Visitor:
    """Who is looking at the page, and the CSRF token their forms carry."""

    session_id: str | None
    session: Session | None
    open_mode: bool
    csrf: str
    new_nonce: str | None = None  # set the nonce cookie with the response

    @property
    def allowed(self) -> bool:
        return self.open_mode or self.session is not None


def _visitor(request: web.Request) -> Visitor:
    daemon = request.app[DAEMON]
    sessions = request.app[SESSIONS]
    open_mode = daemon.auth.admin_open
    sid = request.cookies.get(SESSION_COOKIE)
    session = None if open_mode else sessions.get(sid)
    if session is not None:
        return Visitor(sid, session, open_mode, session.csrf)
    nonce = _nonce(request)
    new_nonce = None
    if nonce is None:
        nonce = new_nonce = secrets.token_urlsafe(24)
    purpose: Purpose = "open" if open_mode else "login"
    return Visitor(None, None, open_mode, sessions.sign(purpose, nonce), new_nonce)


def _csrf_ok(request: web.Request, visitor: Visitor, given: str | None) -> bool:
    """Does the form's token match this browser's session, or its nonce cookie?"""
    if not given:
        return False
    if visitor.session is not None:
        return hmac.compare_digest(given.encode(), visitor.session.csrf.encode())
    nonce = _nonce(request)
    if nonce is None:
        return False
    purpose: Purpose = "open" if visitor.open_mode else "login"
    expected = request.app[SESSIONS].sign(purpose, nonce)
    return hmac.compare_digest(given.encode(), expected.encode())


async def _form(request: web.Request) -> dict[str, str]:
    # The same size and time limits as every other body (a form here is tiny).
    form = parse_qs((await read_body(request)).decode("utf-8", "replace"))
    return {k: v[0] for k, v in form.items()}


# -- HTML ---------------------------------------------------------------------------

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
color:#1d2330;background:#f4f6f9}
header{display:flex;align-items:center;justify-content:space-between;padding:12px 28px;
background:#1d2736;color:#fff}
header h1{font-size:18px;margin:0;font-weight:600}
header .who{display:flex;gap:14px;align-items:center;font-size:13px;color:#c9d2e0}
main{max-width:1150px;margin:0 auto;padding:20px 28px 40px}
h2{font-size:16px;margin:26px 0 10px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde2ea;
border-radius:6px;overflow:hidden}
th,td{padding:8px 11px;text-align:left;border-bottom:1px solid #e8ebf0;vertical-align:middle}
time{font-size:13px;color:#4a5568;white-space:nowrap}
th{background:#eef1f6;font-size:12px;text-transform:uppercase;letter-spacing:.04em;
color:#4a5568}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.zero{color:#a0a8b5}td.alarm{color:#b42318;font-weight:600}
code{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.err{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#8a1c1c;
word-break:break-word;max-width:420px}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;
font-weight:600;background:#e2e8f0;color:#2d3748}
.s-online{background:#d5f5e3;color:#17603a}.s-unknown{background:#e2e8f0;color:#4a5568}
.s-offline,.s-restarting{background:#fdf0d5;color:#7a5200}
.s-dead,.s-failed{background:#fbdcdc;color:#8a1c1c}
button{font:inherit;font-size:13px;padding:4px 12px;border-radius:5px;cursor:pointer;
border:1px solid #3759a8;background:#3f66c2;color:#fff}
button.quiet{background:transparent;border-color:#8593a8;color:#e6ebf3}
.note{padding:9px 13px;border-radius:6px;margin:14px 0;background:#e3edfb;
border:1px solid #b9cdef}
.note.bad{background:#fbe4e4;border-color:#efb9b9;color:#7a1414}
.muted{color:#6b7585;font-size:13px}
form.inline{display:inline;margin:0}
.login h2{margin-top:0}
.login{max-width:380px;margin:70px auto;background:#fff;padding:24px 28px;
border:1px solid #dde2ea;border-radius:8px}
.login label{display:block;font-size:13px;margin-bottom:6px;color:#4a5568}
.login input[type=password]{width:100%;box-sizing:border-box;padding:7px 9px;
font:inherit;border:1px solid #b8c1cf;border-radius:5px;margin-bottom:14px}
a{color:#2f56b0}
"""

# The page runs no script and loads nothing; framing it is refused (clickjacking).
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _document(title: str, header_right: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>a2ad status</h1><div class=who>{header_right}</div></header>"
        f"<main>{body}</main></body></html>\n"
    )


def _html(
    text: str,
    status: int = 200,
    visitor: Visitor | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    response = web.Response(
        text=text, status=status, content_type="text/html", headers={**_HEADERS, **(headers or {})}
    )
    if visitor is not None and visitor.new_nonce is not None:
        _cookie(response, NONCE_COOKIE, visitor.new_nonce, SESSION_SECONDS)
    return response


def _csrf_input(token: str) -> str:
    return f'<input type=hidden name="{CSRF_FIELD}" value="{escape(token)}">'


def _note(message: str, *, bad: bool = False) -> str:
    return f'<div class="note{" bad" if bad else ""}" role=status>{escape(message)}</div>'


def _login_page(visitor: Visitor, error: str | None = None, status: int = 200) -> web.Response:
    body = (
        '<form class=login method=post action="/ui/login">'
        "<h2>Sign in</h2>"
        + (_note(error, bad=True) if error else "")
        + "<label for=token>Admin token</label>"
        '<input type="password" id="token" name="token" autocomplete="current-password"'
        " required autofocus>"
        + _csrf_input(visitor.csrf)
        + "<button type=submit>Sign in</button></form>"
    )
    return _html(_document("a2ad — sign in", "", body), status, visitor)


def _count_cell(state: str, n: int) -> str:
    look = " zero" if n == 0 else " alarm" if state in ("failed", "expired") else ""
    return f'<td class="num{look}">{n}</td>'


def _workspaces_table(daemon: Daemon, counts: dict[str, dict[str, int]]) -> str:
    now = daemon.clock.monotonic()
    head = (
        "<tr><th>Workspace</th><th>State</th><th class=num>Capacity</th>"
        "<th class=num>In flight</th>"
        + "".join(f"<th class=num>{escape(s)}</th>" for s in STATES)
        + "</tr>"
    )
    rows = []
    for ws in sorted(daemon.registry, key=lambda w: w.id):
        state = ws.state.value
        mine = counts.get(ws.id, {})
        rows.append(
            f'<tr data-workspace="{escape(ws.id)}"><td><code>{escape(ws.id)}</code></td>'
            f'<td><span class="badge s-{escape(state)}">{escape(state)}</span></td>'
            f"<td class=num>{ws.capacity(now)}</td><td class=num>{ws.in_flight}</td>"
            + "".join(_count_cell(s, mine.get(s, 0)) for s in STATES)
            + "</tr>"
        )
    if not rows:
        return "<p class=muted>No workspaces are registered.</p>"
    return f"<table id=workspaces><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _failed_table(items: list[Item], total: int, csrf: str) -> str:
    if not items:
        return "<p class=muted id=no-failed>No failed items.</p>"
    rows = []
    for item in items:
        error = item.last_error or ""
        shown = error if len(error) <= ERROR_SHOWN_CHARS else error[:ERROR_SHOWN_CHARS] + "…"
        when = item.finished_at or item.updated_at
        qid = escape(item.id)
        rows.append(
            f'<tr data-item="{qid}"><td><code>{qid}</code></td>'
            f"<td><code>{escape(item.workspace)}</code></td>"
            f"<td class=num>{item.attempts}</td>"
            f'<td class=err title="{escape(error)}">{escape(shown)}</td>'
            f"<td><time>{escape(timestamp(when))}</time></td>"
            f'<td><form class=inline method=post action="/ui/items/{qid}/retry">'
            f"{_csrf_input(csrf)}<button type=submit>Retry</button></form></td></tr>"
        )
    more = (
        f"<p class=muted>The newest {len(items)} of {total} failed items.</p>"
        if total > len(items)
        else ""
    )
    return (
        "<table id=failed><thead><tr><th>Item</th><th>Workspace</th>"
        "<th class=num>Attempts</th><th>Last error</th><th>Failed at</th><th></th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>{more}"
    )


def _dead_pushes_table(views: list[dict[str, Any]], total: int, csrf: str) -> str:
    if not views:
        return "<p class=muted id=no-dead-pushes>No dead push updates.</p>"
    rows = []
    for view in views:
        error = view["last_error"] or ""
        shown = error if len(error) <= ERROR_SHOWN_CHARS else error[:ERROR_SHOWN_CHARS] + "…"
        rows.append(
            f'<tr data-push="{view["seq"]}"><td><code>{escape(view["item_id"])}</code></td>'
            f"<td><code>{escape(view['url'] or '(config deleted)')}</code></td>"
            f"<td>{escape(view['update'])}</td><td class=num>{view['attempts']}</td>"
            f'<td class=err title="{escape(error)}">{escape(shown)}</td></tr>'
        )
    more = f"<p class=muted>The newest {len(views)} of {total}.</p>" if total > len(views) else ""
    return (
        "<table id=dead-pushes><thead><tr><th>Item</th><th>Webhook</th><th>Update</th>"
        "<th class=num>Attempts</th><th>Last error</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>{more}"
        '<form class=inline method=post action="/ui/pushes/retry">'
        f"{_csrf_input(csrf)}<button type=submit>Retry all</button></form>"
    )


async def _dead_pushes(daemon: Daemon) -> tuple[list[dict[str, Any]], int]:
    total = (await daemon.store.push_counts())["dead"]
    if total == 0:
        return [], 0
    return await dead_push_views(daemon.store, limit=FAILED_SHOWN), total


async def _newest_failed(daemon: Daemon, total: int) -> list[Item]:
    """The newest failed items, newest first."""
    if total == 0:
        return []
    return await daemon.store.list_items(state="failed", limit=FAILED_SHOWN, newest_first=True)


async def _status_page(
    request: web.Request, visitor: Visitor, notice: str = "", status: int = 200
) -> web.Response:
    daemon = request.app[DAEMON]
    counts = await daemon.store.counts()
    total_failed = sum(c.get("failed", 0) for c in counts.values())
    failed = await _newest_failed(daemon, total_failed)
    dead, dead_total = await _dead_pushes(daemon)
    if visitor.open_mode:
        who = "<span>open: no admin token is configured</span>"
    else:
        who = (
            '<span>signed in</span><form class=inline method=post action="/ui/logout">'
            f"{_csrf_input(visitor.csrf)}"
            "<button class=quiet type=submit>Sign out</button></form>"
        )
    body = (
        notice + f"<p class=muted>As of <time>{escape(timestamp(daemon.clock.now()))}</time> · "
        '<a href="/ui">Refresh</a></p>'
        + "<h2>Workspaces</h2>"
        + _workspaces_table(daemon, counts)
        + f"<h2>Failed items <span class=muted>({total_failed})</span></h2>"
        + _failed_table(failed, total_failed, visitor.csrf)
        + f"<h2>Dead push updates <span class=muted>({dead_total})</span></h2>"
        + _dead_pushes_table(dead, dead_total, visitor.csrf)
    )
    return _html(_document("a2ad status", who, body), status, visitor)


def error_page(error: A2adError) -> web.Response:
    """An error on a /ui path, as a page a person reads (the middleware calls this)."""
    body = _note(f"{error.status}: {error.message}", bad=True) + (
        '<p><a href="/ui">Back to the status page</a></p>'
    )
    return _html(_document(f"a2ad — {error.status}", "", body), error.status, None, error.headers())


def _redirect(location: str) -> web.Response:
    """303 See Other: after a form, the browser GETs the page again."""
    return web.Response(status=303, headers={**_HEADERS, "Location": location})


def _refused(visitor: Visitor) -> web.Response:
    message = (
        "Refused: this form's CSRF token is missing or does not match your session."
        " Reload the status page and try again."
    )
    if not visitor.allowed:
        return _login_page(visitor, message, status=403)
    body = _note(message, bad=True) + '<p><a href="/ui">Back to the status page</a></p>'
    return _html(_document("a2ad — refused", "", body), 403, visitor)


# -- handlers -----------------------------------------------------------------------


async def page(request: web.Request) -> web.Response:
    """GET /ui: the status page, or the login form without a session."""
    visitor = _visitor(request)
    if not visitor.allowed:
        return _login_page(visitor)
    notice = ""
    retried = request.query.get("retried", "")
    if _QUEUE_ID.match(retried):
        notice = _note(f"{retried} is queued again.")
    elif retried.isdigit():
        notice = _note(f"{retried} push updates are due again.")
    return await _status_page(request, visitor, notice)


async def login(request: web.Request) -> web.Response:
    """POST /ui/login: the admin token (field `token`) opens a session."""
    visitor = _visitor(request)
    form = await _form(request)
    if visitor.open_mode or visitor.session is not None:
        return _redirect("/ui")
    if not _csrf_ok(request, visitor, form.get(CSRF_FIELD)):
        return _refused(visitor)
    daemon = request.app[DAEMON]
    if not daemon.auth.admin_token_matches(form.get("token", "")):
        return _login_page(visitor, "That is not the admin token.", status=401)
    sid = request.app[SESSIONS].create()
    response = _redirect("/ui")
    _cookie(response, SESSION_COOKIE, sid, SESSION_SECONDS)
    return response


async def logout(request: web.Request) -> web.Response:
    """POST /ui/logout: ends the session."""
    visitor = _visitor(request)
    form = await _form(request)
    if visitor.session is None:
        return _redirect("/ui")
    if not _csrf_ok(request, visitor, form.get(CSRF_FIELD)):
        return _refused(visitor)
    request.app[SESSIONS].drop(visitor.session_id)
    response = _redirect("/ui")
    response.del_cookie(SESSION_COOKIE, path="/ui")
    return response


async def _operator_form(request: web.Request) -> tuple[Visitor, web.Response | None]:
    """The visitor of a form that changes something, and the page to answer instead
    when they may not: not signed in, or the form's CSRF token does not match."""
    visitor = _visitor(request)
    form = await _form(request)
    if not visitor.allowed:
        return visitor, _login_page(visitor, "Sign in first.", status=401)
    if not _csrf_ok(request, visitor, form.get(CSRF_FIELD)):
        return visitor, _refused(visitor)
    return visitor, None


async def retry(request: web.Request) -> web.Response:
    """POST /ui/items/{qid}/retry: a failed item back to the queue, as POST
    /queue/{qid}/retry does."""
    visitor, refused = await _operator_form(request)
    if refused is not None:
        return refused
    try:
        item = await admin.retry(request.app[DAEMON], request.match_info["qid"])
    except (NotFound, Conflict) as exc:
        return await _status_page(request, visitor, _note(exc.message, bad=True), exc.status)
    return _redirect(f"/ui?retried={item.id}")


async def retry_pushes(request: web.Request) -> web.Response:
    """POST /ui/pushes/retry: every dead push update back to the outbox, as POST
    /queue/pushes/retry does."""
    _, refused = await _operator_form(request)
    if refused is not None:
        return refused
    daemon = request.app[DAEMON]
    count = await daemon.store.retry_pushes(now=daemon.clock.now())
    daemon.pusher.wake()
    return _redirect(f"/ui?retried={count}")
