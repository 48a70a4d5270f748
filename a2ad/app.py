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


def guarded(handler: Handler, *, a2a: bool = False) -> Handler:
    """`handler` with a2ad's error handling around it: every error becomes a JSON
    body with a stable code, never a traceback. Each route's handler is wrapped,
    rather than the app given a middleware, which costs every request two more
    frames and awaits (5 µs of a trivial aiohttp server's 45 per request, under
    wrk). `a2a`: an A2A route, which also takes `A2A-Version` as a query parameter."""

    async def guarded_handler(request: web.Request) -> web.StreamResponse:
        if a2a:
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

    return guarded_handler


async def _no_route(request: web.Request) -> web.StreamResponse:
    """What no route takes: 405 when routes take the path with other methods, else
    404 (with no middleware, aiohttp would answer these in plain text)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        match, methods = await resource.resolve(request)
        if match is None:
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def create_app(
    settings: Settings, *, clock: Clock | None = None, lock: StoreLock | None = None
) -> web.Application:
    """The aiohttp application for one a2ad; its start-up takes the store's lock."""
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    daemon = Daemon(settings, clock=clock, lock=lock)
    app[DAEMON] = daemon

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await daemon.start()
        yield
        await daemon.stop()

    app.cleanup_ctx.append(lifecycle)
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/healthz", admin.healthz),
        ("GET", "/readyz", admin.readyz),
        ("GET", "/metrics", admin.metrics),
        ("POST", "/workspaces/{workspace}/a2a", proxy.handle_rpc),
        *(
            ("GET", f"/workspaces/{{workspace}}/a2a/.well-known/{card}", agent_routes.handle_card)
            for card in ("agent-card.json", "agent.json")
        ),
        ("POST", "/workspaces/{workspace}/heartbeat", agent_routes.handle_heartbeat),
        ("POST", "/workspaces/{workspace}/pushes/{qid}", push_methods.agent_pushed),
        ("GET", "/workspaces", admin.list_workspaces),
        ("GET", "/workspaces/{workspace}", admin.get_workspace),
        ("PUT", "/workspaces/{workspace}", admin.put_workspace),
        ("DELETE", "/workspaces/{workspace}", admin.delete_workspace),
        ("POST", "/workspaces/{workspace}/reset", admin.reset_workspace),
        ("GET", "/workspaces/{workspace}/queue", admin.list_queue),
        ("GET", "/queue/pushes", admin.list_pushes),
        ("POST", "/queue/pushes/retry", admin.retry_pushes),
        ("POST", "/queue/pushes/{seq}/retry", admin.retry_pushes),
        ("GET", "/queue/{qid}", admin.get_item),
        ("DELETE", "/queue/{qid}", admin.delete_item),
        ("POST", "/queue/{qid}/retry", admin.retry_item),
        *ui.routes(),
    ]
    a2a_routes = (proxy.handle_rpc, agent_routes.handle_card)
    for method, path, handler in routes:
        wrapped = guarded(handler, a2a=handler in a2a_routes)
        if method == "GET":
            app.router.add_get(path, wrapped)  # and HEAD
        else:
            app.router.add_route(method, path, wrapped)
    # Last: the router tries it only after every other route. ([\s\S]: a path may
    # hold any character, an encoded newline too, which `.` would not match.)
    app.router.add_route("*", r"/{tail:[\s\S]*}", guarded(_no_route))
    app.router.add_route("*", "", guarded(_no_route))  # no path: a sub-app's bare prefix
    ui.setup(app)
    return app
