"""Operator endpoints: workspaces, queue items, health and readiness."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from . import a2a
from .a2a import timestamp
from .agent_urls import check_agent_url
from .daemon import DAEMON, Daemon
from .errors import Conflict, InvalidBody, InvalidRequest, NotFound
from .http_io import json_response, read_body
from .results import dead_push_views, item_view
from .settings import WorkspaceSettings
from .store import STATES, Item
from .workspaces import Workspace

MAX_WAIT_SECONDS = 300.0
MAX_PAGE = 1000


def workspace_view(daemon: Daemon, ws: Workspace, counts: dict[str, int]) -> dict[str, Any]:
    now = daemon.clock.monotonic()  # what a2ad keeps in memory is timed on it
    hb = ws.heartbeat
    last = ws.last_sign_of_life
    return {
        "id": ws.id,
        "url": ws.config.url,
        "state": ws.state.value,
        "capacity": ws.capacity(now),
        "in_flight": ws.in_flight,
        "free_slots": ws.free_slots(now),
        "active_tasks": hb.active_tasks if hb is not None else None,
        "last_sign_of_life_age_seconds": round(now - last, 3) if last is not None else None,
        "queue": {state: counts.get(state, 0) for state in STATES},
        "restarts": ws.restarts,
        "source": "config" if ws.from_config else "runtime",
        "paused_until": (timestamp(ws.admission.paused_until_wall()) if ws.paused(now) else None),
    }


def _float_param(request: web.Request, name: str, default: float, maximum: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= maximum:
        raise InvalidRequest(f"?{name}= must be a number from 0 to {maximum:g}")
    return value


def _int_param(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or not 0 <= int(raw) <= maximum:
        raise InvalidRequest(f"?{name}= must be an integer from 0 to {maximum}")
    return int(raw)


async def list_workspaces(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    counts = await daemon.store.counts()
    answer: dict[str, Any] = {
        "workspaces": [workspace_view(daemon, ws, counts.get(ws.id, {})) for ws in daemon.registry]
    }
    if daemon.replicas is not None:
        # Replicas share one store: which serve it, the duty each holds, and each
        # agent's requests over all of them (in_flight is this replica's).
        answer["replica"] = daemon.replica_id
        answer["replicas"] = await daemon.replicas.view()
        in_use = await daemon.replicas.store.slots_in_use()
        for view in answer["workspaces"]:
            view["in_flight_all_replicas"] = in_use.get(view["id"], 0)
    return json_response(answer)


async def get_workspace(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    ws = daemon.registry.get(request.match_info["workspace"])
    counts = await daemon.store.counts()
    return json_response(workspace_view(daemon, ws, counts.get(ws.id, {})))


async def list_queue(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    ws = daemon.registry.get(request.match_info["workspace"])
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise InvalidRequest(f"?state= must be one of {', '.join(STATES)}")
    limit = _int_param(request, "limit", 100, MAX_PAGE) or 100
    after = _int_param(request, "after", 0, 2**62)
    bodies = request.query.get("bodies") in ("1", "true")
    items = await daemon.store.list_items(
        workspace=ws.id, state=state, limit=limit + 1, after=after
    )
    page = items[:limit]
    return json_response(
        {
            "items": [item_view(i, with_body=bodies, with_result=bodies) for i in page],
            "next": str(page[-1].seq) if len(items) > limit else None,
        }
    )


async def get_item(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    caller = daemon.auth.reader(request)
    wait = _float_param(request, "wait", 0.0, MAX_WAIT_SECONDS)
    item_id = request.match_info["qid"]
    item = await daemon.store.get(item_id)
    # Another caller's item answers at once, as an unknown one does: waiting
    # first would tell that it exists.
    if item is None or (caller is not None and item.caller != caller):
        raise NotFound(f"no queue item {item_id!r}")
    if wait > 0 and not item.is_final:
        item = await daemon.watch.wait_final(item_id, wait) or item
    return json_response(item_view(item))


RUNTIME_FIELDS = frozenset(
    {"url", "max_concurrent", "token", "heartbeat", "request_timeout_seconds"}
)
# Credentials a2ad sends to an agent: from the config file only, never stored in the
# database nor named by an HTTP request.
AGENT_CREDENTIALS = frozenset({"agent_token", "agent_token_file", "agent_headers"})


async def put_workspace(request: web.Request) -> web.Response:
    """Register or update a workspace at run time (persisted across restarts)."""
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    workspace_id = request.match_info["workspace"]
    existing = daemon.registry.find(workspace_id)
    if existing is not None and existing.from_config:
        raise Conflict(f"workspace {workspace_id!r} comes from the config file; change it there")
    body = a2a.parse_json(await read_body(request))
    if not isinstance(body, dict):
        raise InvalidBody('the body is a JSON object: {"url": ..., "max_concurrent": ...}')
    if "restart_command" in body or "status_command" in body:
        raise InvalidBody(
            "restart_command and status_command come only from the config file:"
            " a2ad runs no command an HTTP request names"
        )
    credentials = sorted(AGENT_CREDENTIALS & set(body))
    if credentials:
        raise InvalidBody(
            f"{', '.join(credentials)}: agent credentials come only from the config file;"
            " a2ad sends an agent no credentials an HTTP request names"
        )
    unknown = sorted(set(body) - RUNTIME_FIELDS - {"id"})
    if unknown:
        raise InvalidBody(f"unknown fields: {', '.join(unknown)[:200]}")
    if body.get("id", workspace_id) != workspace_id:
        raise InvalidBody("the body's id differs from the one in the path")
    try:
        config = WorkspaceSettings(**{**body, "id": workspace_id})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidBody(f"{field}: {first['msg'].removeprefix('Value error, ')}") from None
    await check_agent_url(config.url, allow_link_local=daemon.settings.auth.allow_link_local_agents)
    if config.token and daemon.auth.token_taken(config.token, workspace_id):
        raise InvalidBody("token: already in use by another principal; choose another")
    created = await daemon.register(config)
    ws = daemon.registry.get(workspace_id)
    counts = await daemon.store.counts()
    return json_response(
        workspace_view(daemon, ws, counts.get(ws.id, {})), status=201 if created else 200
    )


async def delete_workspace(request: web.Request) -> web.Response:
    """Remove a run-time workspace; refused while items wait unless ?purge=true."""
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    ws = daemon.registry.get(request.match_info["workspace"])
    if ws.from_config:
        raise Conflict(f"workspace {ws.id!r} comes from the config file; remove it there")
    purge = request.query.get("purge") in ("1", "true")
    # Sends stop being admitted first, and those being written are committed, so
    # the count below is every item that waits: no 202 is left behind unserved.
    await ws.admission.close()
    waiting = ws.depth.live
    if waiting and not purge:
        ws.admission.closed = False
        raise Conflict(f"{waiting} items wait for {ws.id!r}; DELETE with ?purge=true drops them")
    deleted = await daemon.unregister(ws, purge=purge)
    return json_response({"id": ws.id, "deleted": True, "items_deleted": deleted})


async def reset_workspace(request: web.Request) -> web.Response:
    """Leave `failed`: the restart budget and the debounce start over, state unknown."""
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    ws = daemon.registry.get(request.match_info["workspace"])
    daemon.liveness.reset(ws)
    if daemon.replicas is not None:
        await daemon.replicas.reset(ws)
    counts = await daemon.store.counts()
    return json_response(workspace_view(daemon, ws, counts.get(ws.id, {})))


async def _item_or_404(daemon: Daemon, item_id: str) -> Item:
    item = await daemon.store.get(item_id)
    if item is None:
        raise NotFound(f"no queue item {item_id!r}")
    return item


async def retry(daemon: Daemon, item_id: str) -> Item:
    """A failed or expired item back to the queue: attempts reset, a fresh expiry.
    The item as it is now; NotFound or Conflict when it cannot be retried."""
    item = await _item_or_404(daemon, item_id)
    if daemon.registry.find(item.workspace) is None:
        raise Conflict(f"{item.id} belongs to workspace {item.workspace!r}, which is gone")
    outcome = await daemon.store.retry(
        item.id, now=daemon.clock.now(), max_age=daemon.settings.queue.max_age_seconds
    )
    if outcome == "duplicate":
        raise Conflict(f"{item.id} cannot be retried: a newer item with its messageId waits")
    if outcome == "not_final":
        raise Conflict(f"{item.id} is {item.state}; only failed or expired items are retried")
    ws = daemon.registry.find(item.workspace)
    if ws is not None:
        ws.wakeup.set()  # the store counted it queued as it committed
    return await _item_or_404(daemon, item.id)


async def retry_item(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    return json_response(item_view(await retry(daemon, request.match_info["qid"])))


async def delete_item(request: web.Request) -> web.Response:
    """Queued → cancelled; final → the row is deleted; being delivered → conflict."""
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    item = await _item_or_404(daemon, request.match_info["qid"])
    if await daemon.dispatcher.cancel(item):
        return json_response({"id": item.id, "state": "cancelled"})
    if item.is_final and await daemon.store.delete(item.id):
        return json_response({"id": item.id, "deleted": True})
    latest = await _item_or_404(daemon, item.id)
    raise Conflict(f"{item.id} is {latest.state}; it cannot be cancelled or deleted now")


# -- the push outbox's dead letters ---------------------------------------------


async def list_pushes(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    limit = _int_param(request, "limit", 100, MAX_PAGE) or 100
    views = await dead_push_views(daemon.store, item_id=request.query.get("item"), limit=limit)
    return json_response(
        {
            "pushes": views,
            "counts": await daemon.store.push_counts(),
        }
    )


async def retry_pushes(request: web.Request) -> web.Response:
    """Dead letters back to the outbox, due now: one (`/queue/pushes/{seq}/retry`) or all."""
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    seq = None
    if "seq" in request.match_info:
        try:
            seq = int(request.match_info["seq"])
        except ValueError:
            raise NotFound(f"no dead push {request.match_info['seq']!r}") from None
    retried = await daemon.store.retry_pushes(now=daemon.clock.now(), seq=seq)
    if seq is not None and not retried:
        raise NotFound(f"no dead push {seq}")
    daemon.pusher.wake()
    return json_response({"retried": retried})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text; SPEC lists it with the operator endpoints, so it needs the admin token."""
    daemon = request.app[DAEMON]
    daemon.auth.admin(request)
    body, content_type = daemon.metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    problems = []
    if not daemon.loops_running:
        problems.append("background loops are not running")
    if daemon.store.last_write_error:
        problems.append(f"the store cannot write: {daemon.store.last_write_error}")
    if problems:
        return json_response({"status": "unavailable", "problems": problems}, status=503)
    return json_response({"status": "ready"})
