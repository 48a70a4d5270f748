"""create_app: builds the Daemon, wires routes and the error middleware, and
starts and stops the background work with the application."""

from __future__ import annotations

import itertools
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from . import admin, agent_routes, http_io, proxy, push_methods, ui
from .clock import Clock
from .daemon import DAEMON, Daemon
from .errors import A2adError, MethodNotAllowed, NotFound
from .settings import Settings
from .store import StoreLock

log = logging.getLogger("a2ad.http")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _is_rpc_path(request: web.Request) -> bool:
    return request.method == "POST" and request.path.endswith("/a2a")


def _error_response(request: web.Request, error: A2adError) -> web.Response:
    if ui.is_ui_path(request.path):
        return ui.error_page(error)  # a person reads these: HTML, not JSON
    status = error.status
    if _is_rpc_path(request):
        body = error.rpc_body(request.get(http_io.RPC_ID))
        status = error.proxy_status or status
    else:
        body = error.body()
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        content_type="application/json",
        headers=error.headers(),
    )


_REQUEST_PREFIX = uuid.uuid4().hex[:8]  # unique per process, so ids differ across restarts
_request_numbers = itertools.count(1)


def _new_request_id() -> str:
    """Cheaper than a uuid per request, and still unique: process prefix + counter."""
    return f"{_REQUEST_PREFIX}-{next(_request_numbers):x}"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes a JSON body with a stable code; never a traceback.
    (a2ad's one middleware: each layer costs every request a frame and an await.)"""
    request = proxy.version_from_query(request)
    given = request.headers.get("X-Request-Id")
    request_id = given if given and _REQUEST_ID_OK.match(given) else _new_request_id()
    request[http_io.REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except A2adError as exc:
        response = _error_response(request, exc)
    except web.HTTPNotFound:
        response = _error_response(request, NotFound(f"no endpoint {request.path[:200]}"))
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = _error_response(
            request, MethodNotAllowed(f"{request.method} is not allowed here; use {allowed}")
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = A2adError(exc.reason)
        error.status = exc.status  # type: ignore[misc]
        response = _error_response(request, error)
    except Exception:
        log.exception("request %s %s %s failed", request_id, request.method, request.path)
        response = _error_response(
            request,
            A2adError(f"internal error; the log has the details under request id {request_id}"),
        )
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


def create_app(
    settings: Settings, *, clock: Clock | None = None, lock: StoreLock | None = None
) -> web.Application:
    """The aiohttp application for one a2ad; its start-up takes the store's lock."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=settings.server.max_body_bytes,
    )
    daemon = Daemon(settings, clock=clock, lock=lock)
    app[DAEMON] = daemon

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await daemon.start()
        yield
        await daemon.stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/readyz", admin.readyz)
    app.router.add_get("/metrics", admin.metrics)
    app.router.add_post("/workspaces/{workspace}/a2a", proxy.handle_rpc)
    for card_path in ("agent-card.json", "agent.json"):
        app.router.add_get(
            f"/workspaces/{{workspace}}/a2a/.well-known/{card_path}", agent_routes.handle_card
        )
    app.router.add_post("/workspaces/{workspace}/heartbeat", agent_routes.handle_heartbeat)
    app.router.add_post("/workspaces/{workspace}/pushes/{qid}", push_methods.agent_pushed)
    app.router.add_get("/workspaces", admin.list_workspaces)
    app.router.add_get("/workspaces/{workspace}", admin.get_workspace)
    app.router.add_put("/workspaces/{workspace}", admin.put_workspace)
    app.router.add_delete("/workspaces/{workspace}", admin.delete_workspace)
    app.router.add_post("/workspaces/{workspace}/reset", admin.reset_workspace)
    app.router.add_get("/workspaces/{workspace}/queue", admin.list_queue)
    app.router.add_get("/queue/pushes", admin.list_pushes)
    app.router.add_post("/queue/pushes/retry", admin.retry_pushes)
    app.router.add_post("/queue/pushes/{seq}/retry", admin.retry_pushes)
    app.router.add_get("/queue/{qid}", admin.get_item)
    app.router.add_delete("/queue/{qid}", admin.delete_item)
    app.router.add_post("/queue/{qid}/retry", admin.retry_item)
    ui.setup(app)
    return app
