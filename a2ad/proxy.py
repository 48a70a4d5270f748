"""Handlers for callers and agents: POST /workspaces/{id}/a2a and heartbeats."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from aiohttp import ClientError, ClientResponse, web

from . import a2a, a2a_params, logs, push_configs, push_methods
from .cards import card_headers
from .daemon import DAEMON, Daemon
from .errors import (
    QueueFull,
    UpstreamFailed,
    UpstreamTimeout,
)
from .forward import forward, forwarded_headers, passed_headers, relay
from .http_io import REQUEST_ID, RPC_ID, json_response, read_body
from .ids import is_queue_id
from .options import read_options
from .own_tasks import (
    SSE_HEADERS,
    cancel_task,
    find_item,
    get_task,
    held_answer,
    hold,
    item_stream,
    list_tasks,
    refuse_ended_task,
    refuse_if_terminal,
    task_not_found,
    unknown_queue_id,
)
from .results import (
    item_task,
)
from .store import PRIORITIES, NewItem
from .store.models import new_queue_id
from .upstream import Answer, Outcome
from .workspaces import Workspace

log = logging.getLogger("a2ad.proxy")

# Per-request values: the request id for logs, the JSON-RPC id errors echo.


# -- POST /workspaces/{id}/a2a ------------------------------------------------


def version_from_query(request: web.Request) -> web.Request:
    """`A2A-Version` may come as a query parameter instead of a header (A2A 1.0,
    section 3.6.1); the header wins when both are given. Taken into the request's
    headers before anything reads them, so the protocol a2ad answers in, the
    headers it forwards and the ones it stores with a queued item all have it, and
    the agent gets it as the header it needs. (A step of the A2A routes' error
    handling, app.guarded, not a layer of its own: a layer costs every request.)"""
    if not request.query_string:
        return request
    version = request.query.get("A2A-Version")
    if version and "A2A-Version" not in request.headers:
        headers = request.headers.copy()
        headers["A2A-Version"] = version
        return request.clone(headers=headers)
    return request


async def handle_rpc(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    caller = daemon.auth.caller(request)
    ws = daemon.registry.get(request.match_info["workspace"])
    raw = await read_body(request, daemon.settings.server.max_body_bytes)
    body = a2a.parse_json(raw)
    request[RPC_ID] = a2a.readable_id(body)
    protocol = a2a.protocol_of(request.headers)
    rpc = a2a.parse_request(body, protocol)
    if rpc.is_message:
        a2a_params.check_message(rpc, protocol)
        await refuse_ended_task(daemon, ws, rpc, caller, protocol)
        return await _send_message(request, daemon, ws, rpc, raw, body, caller, protocol)
    if push_configs.names_queue_id(rpc):
        return await push_methods.handle(daemon, ws, rpc, caller, protocol)
    if is_queue_id(rpc.task_id):
        if rpc.method in a2a.GET_TASK_METHODS:
            return await get_task(request, daemon, ws, rpc, caller, protocol)
        if rpc.method in a2a.CANCEL_TASK_METHODS:
            return await cancel_task(request, daemon, ws, rpc, caller, protocol)
        if rpc.method in a2a.SUBSCRIBE_METHODS:
            item = await find_item(daemon, ws, rpc.task_id or "", caller)
            if item is None:
                return task_not_found(rpc)
            refuse_if_terminal(item, protocol)
            return await item_stream(request, daemon, item, rpc, protocol)
    if rpc.method in a2a_params.LIST_TASKS_METHODS:
        return await list_tasks(daemon, ws, rpc, caller, protocol)
    unknown = await unknown_queue_id(daemon, ws, rpc, caller)
    if unknown is not None:
        return task_not_found(rpc, unknown)
    return await forward(request, daemon, ws, rpc, body, raw, caller)


async def _send_message(
    request: web.Request,
    daemon: Daemon,
    ws: Workspace,
    rpc: a2a.RpcRequest,
    raw: bytes,
    body: dict[str, Any],
    caller: str,
    protocol: a2a.Protocol,
) -> web.StreamResponse:
    options = read_options(request.headers, rpc.params)
    request_id = request[REQUEST_ID]
    now = daemon.clock.now()
    busy_answers = 0
    answer: Answer | None = None
    # A push config goes to the agent with a direct send when the agent pushes
    # itself; else the send is queued and a2ad pushes (push.py).
    push = push_configs.in_send(rpc, protocol)
    direct_ok = push is None or await daemon.agent_pushes(ws, card_headers(request.headers))
    # Admission decides and takes the slot in one step; the slot is held across
    # every await below and returned on every path, cancellation included.
    slot = ws.admission.try_direct(daemon.clock.monotonic()) if direct_ok else None
    if slot is not None:
        with slot:
            direct = daemon.direct
            shared = daemon.shared_slots  # replicas: the store counts slots over all
            if not (
                direct.may_replay(ws) and await direct.seen_before(ws, caller, rpc.message_id)
            ) and (shared is None or await shared.take(ws, slot, arrived=now)):
                headers = forwarded_headers(request.headers, request_id)
                outgoing = raw
                if a2a.may_name_a2ad_ids(raw):
                    outgoing = await daemon.agent_ids.body_for_agent(raw, caller, ws.id, body)
                if rpc.is_stream:
                    async with direct.open(ws, slot, outgoing, headers) as opened:
                        if opened.stream is not None:
                            return await _relay_stream(request, opened.stream, ws)
                        answer = opened.answer
                        assert answer is not None
                else:
                    answer = await direct.send(ws, slot, outgoing, headers)
    if answer is not None:
        if answer.outcome is Outcome.FINAL:
            return relay(answer)
        if answer.outcome is Outcome.FAILURE:
            log.warning(
                "request %s to %s failed: %s",
                request_id,
                ws.id,
                answer.error,
                extra=logs.context(request_id, workspace=ws.id),
            )
            if answer.timed_out:
                raise UpstreamTimeout(f"workspace {ws.id!r}: {answer.error}")
            raise UpstreamFailed(f"workspace {ws.id!r}: {answer.error}")
        log.info(
            "request %s: %s busy (%s); queueing",
            request_id,
            ws.id,
            answer.error,
            extra=logs.context(request_id, workspace=ws.id),
        )
        busy_answers = 1
    if options.never_queue and not direct_ok:
        raise QueueFull(
            f"workspace {ws.id!r}: its agent does not send push notifications, so a send"
            " with a push config goes through a2ad's queue, and A2AD-Queue: never was given"
        )
    if options.never_queue:
        wait = max(1.0, ws.paused_until - daemon.clock.monotonic())
        raise QueueFull(
            f"workspace {ws.id!r} has no free slot and A2AD-Queue: never was given",
            retry_after=wait,
        )
    queue = daemon.settings.queue
    ttl = options.ttl
    if ttl is None and options.priority == PRIORITIES["info"]:
        ttl = queue.info_ttl_seconds
    ttl = min(ttl, queue.max_age_seconds) if ttl is not None else queue.max_age_seconds
    item_id = new_queue_id()
    config = configs = None
    if push is not None:
        config = await push_methods.checked(daemon, push, protocol, item_id)
        configs = json.dumps([config])
    new = NewItem(
        id=item_id,
        push=configs,
        workspace=ws.id,
        method=rpc.method,
        body=raw,
        headers=passed_headers(request.headers, a2a.STORED_HEADERS),
        caller=caller,
        message_id=rpc.message_id,
        context_id=rpc.context_id or a2a.new_context_id(),
        request_id=request_id,
        priority=options.priority,
        ttl_seconds=ttl,
        expires_at=now + ttl,
        busy_answers=busy_answers,
    )
    queued = await daemon.dispatcher.enqueue(ws, new)
    item = queued.item
    if config is not None:
        if queued.created:
            daemon.pusher.expect(item.id, now=True)
        else:
            await push_methods.attach(daemon, item, config, item_id)
    if queued.created and log.isEnabledFor(logging.DEBUG):
        # DEBUG, as every per-message success line: thousands a second would
        # swamp the log (journald drops lines past its rate limit).
        log.debug(
            "request %s queued as %s for %s (position %d)",
            request_id,
            item.id,
            ws.id,
            queued.position,
            extra=logs.context(request_id, item.id, ws.id),
        )
    queue_info = {"queued": True, "queue_depth": queued.depth, "position": queued.position}
    if rpc.is_stream:
        return await item_stream(request, daemon, item, rpc, protocol, queue_info)
    if not queued.created and item.state == "delivered":
        return held_answer(item, rpc, protocol)  # the same messageId, already answered
    if rpc.is_blocking:
        item = await hold(daemon, item)
        if item.is_final:
            return held_answer(item, rpc, protocol)
    task = item_task(item, protocol)
    task["metadata"]["a2ad"].update(queue_info)
    return json_response(a2a.rpc_result(rpc.id, a2a.send_result(task, protocol)), status=202)


async def _relay_stream(
    request: web.Request, upstream: ClientResponse, ws: Workspace
) -> web.StreamResponse:
    """The agent's event stream, byte for byte as it arrives (comments and
    keep-alives included). A caller that leaves ends the agent request."""
    response = web.StreamResponse(
        status=200, headers={**SSE_HEADERS, "Content-Type": upstream.headers["Content-Type"]}
    )
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except ConnectionResetError:
        log.info("request %s: the caller left a stream from %s", request[REQUEST_ID], ws.id)
        return response
    except (ClientError, TimeoutError) as exc:
        log.warning("request %s: the stream from %s broke: %s", request[REQUEST_ID], ws.id, exc)
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


# -- GET /workspaces/{id}/a2a/.well-known/agent-card.json -----------------------


# -- POST /workspaces/{id}/heartbeat -------------------------------------------
