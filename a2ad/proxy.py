"""Handlers for callers and agents: POST /workspaces/{id}/a2a and heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import ClientError, ClientResponse, web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from . import a2a, logs
from .daemon import DAEMON, Daemon
from .errors import (
    BodyTooLarge,
    CardUnavailable,
    InvalidBody,
    InvalidHeader,
    InvalidParams,
    ParseError,
    QueueFull,
    RequestTimeout,
    UnsupportedOperation,
    UpstreamFailed,
    UpstreamTimeout,
)
from .results import (
    as_queue_task,
    item_task,
    list_result,
    list_states,
    listed_tasks,
    read_page_token,
    stored_result,
)
from .store import PRIORITIES, Item, NewItem
from .upstream import Answer, Outcome
from .workspaces import Workspace

log = logging.getLogger("a2ad.proxy")

# Per-request values: the request id for logs, the JSON-RPC id errors echo.
REQUEST_ID = web.RequestKey("a2ad_request_id", str)
RPC_ID = web.RequestKey("a2ad_rpc_id", object)
QUEUE_ID_PREFIX = "q-"
MAX_TTL_SECONDS = 10 * 365 * 86400.0


@dataclass(frozen=True, slots=True)
class SendOptions:
    """A send's options: the A2AD-* request headers, or params.metadata.a2ad."""

    priority: int = PRIORITIES["task"]
    ttl: float | None = None
    never_queue: bool = False


METADATA_OPTIONS = ("priority", "ttl_seconds", "queue")


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


def passed_headers(headers: CIMultiDictProxy[str], names: tuple[str, ...]) -> dict[str, str]:
    """The request's headers among `names`; a list-valued one sent in several lines
    (W3C tracestate, baggage) goes on as one."""
    out = {}
    for name in names:
        if name in headers:
            many = name in a2a.LIST_HEADERS
            out[name] = ",".join(headers.getall(name)) if many else headers[name]
    return out


def forwarded_headers(headers: CIMultiDictProxy[str], request_id: str) -> dict[str, str]:
    """Only the headers SPEC passes on; hop-by-hop headers and tokens (a caller's
    Authorization) stay here. The agent's own credentials are upstream's to add."""
    out = passed_headers(headers, a2a.FORWARDED_HEADERS)
    out.setdefault("Content-Type", "application/json")
    out["X-Request-Id"] = request_id
    return out


def is_queue_id(value: str | None) -> bool:
    return value is not None and value.startswith(QUEUE_ID_PREFIX)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data).encode(), status=status, content_type="application/json"
    )


SMALL_BODY_LIMIT = 65536  # heartbeats and workspace registrations


async def read_body(request: web.Request, limit: int = SMALL_BODY_LIMIT) -> bytes:
    """The body, refused when over `limit` or when the client sends it too slowly
    (a slow body would otherwise hold a connection and a handler forever)."""
    settings = request.app[DAEMON].settings.server

    def too_large() -> BodyTooLarge:
        setting = " (server.max_body_bytes)" if limit == settings.max_body_bytes else ""
        return BodyTooLarge(f"the body is over {limit} bytes{setting}")

    length = request.content_length  # parsed from the header at each access
    if length is not None and length > limit:
        raise too_large()
    timeout = settings.client_timeout_seconds
    try:
        if request.content.is_eof():
            # The whole body came with the headers (the usual small request):
            # no timer to arm.
            return await request.read()
        async with asyncio.timeout(timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large() from None
    except RequestPayloadError:
        encoding = request.headers.get("Content-Encoding", "none")[:20]
        raise ParseError(f"the body does not decode as its Content-Encoding ({encoding})") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the body did not arrive within {timeout:g} s (server.client_timeout_seconds)"
        ) from None


def relay(answer: Answer) -> web.Response:
    """The agent's status and body, unchanged."""
    return web.Response(
        body=answer.body, status=answer.status or 502, headers={"Content-Type": answer.content_type}
    )


# -- POST /workspaces/{id}/a2a ------------------------------------------------


@web.middleware
async def version_from_query(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`A2A-Version` may come as a query parameter instead of a header (A2A 1.0,
    section 3.6.1); the header wins when both are given. Taken into the request's
    headers before anything reads them, so the protocol a2ad answers in, the
    headers it forwards and the ones it stores with a queued item all have it, and
    the agent gets it as the header it needs. (Outermost middleware: the request
    the error middleware and the handler share is this one.)"""
    version = request.query.get("A2A-Version") if request.query_string else None
    if (
        version
        and "A2A-Version" not in request.headers
        and request.match_info.handler in (handle_rpc, handle_card)
    ):
        headers = request.headers.copy()
        headers["A2A-Version"] = version
        request = request.clone(headers=headers)
    return await handler(request)


async def handle_rpc(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    caller = daemon.auth.caller(request)
    ws = daemon.registry.get(request.match_info["workspace"])
    raw = await read_body(request, daemon.settings.server.max_body_bytes)
    body = a2a.parse_json(raw)
    request[RPC_ID] = a2a.readable_id(body)
    rpc = a2a.parse_request(body)
    protocol = a2a.protocol_of(request.headers)
    if rpc.is_message:
        a2a.check_message(rpc, protocol)
        await _refuse_ended_task(daemon, ws, rpc, caller, protocol)
        return await _send_message(request, daemon, ws, rpc, raw, body, caller, protocol)
    if is_queue_id(rpc.task_id):
        if rpc.method in a2a.GET_TASK_METHODS:
            return await _get_task(request, daemon, ws, rpc, caller, protocol)
        if rpc.method in a2a.CANCEL_TASK_METHODS:
            return await _cancel_task(request, daemon, ws, rpc, caller, protocol)
        if rpc.method in a2a.SUBSCRIBE_METHODS:
            item = await _find_item(daemon, ws, rpc.task_id or "", caller)
            if item is None:
                return _task_not_found(rpc)
            _refuse_if_terminal(item, protocol)
            return await _item_stream(request, daemon, item, rpc, protocol)
    if rpc.method in a2a.LIST_TASKS_METHODS:
        return await _list_tasks(daemon, ws, rpc, caller, protocol)
    unknown = await _unknown_queue_id(daemon, ws, rpc, caller)
    if unknown is not None:
        return _task_not_found(rpc, unknown)
    return await _forward(request, daemon, ws, rpc, body, raw, caller)


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
    # Admission decides and takes the slot in one step; the slot is held across
    # every await below and returned on every path, cancellation included.
    slot = ws.admission.try_direct(daemon.clock.monotonic())
    if slot is not None:
        with slot:
            direct = daemon.direct
            if not (direct.may_replay(ws) and await direct.seen_before(ws, caller, rpc.message_id)):
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
    new = NewItem(
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
        return await _item_stream(request, daemon, item, rpc, protocol, queue_info)
    if not queued.created and item.state == "delivered":
        return _replay(item, rpc)
    if rpc.is_blocking:
        item = await _hold(daemon, item)
        if item.is_final:
            return _held_answer(item, rpc, protocol)
    task = item_task(item, protocol)
    task["metadata"]["a2ad"].update(queue_info)
    return json_response(a2a.rpc_result(rpc.id, a2a.send_result(task, protocol)), status=202)


async def _hold(daemon: Daemon, item: Item) -> Item:
    """Hold a blocking send's caller until its item ends, as the agent would have
    held it: up to queue.blocking_wait_seconds, for at most queue.max_held callers
    at once, and not past shutdown. The item as it is then. A caller that leaves
    changes nothing for the item; the same messageId sent again holds again."""
    watch = daemon.watch
    if not watch.hold():
        return item
    try:
        seconds = daemon.settings.queue.blocking_wait_seconds
        return await watch.wait_final(item.id, seconds) or item
    finally:
        watch.unhold()


def _held_answer(item: Item, rpc: a2a.RpcRequest, protocol: a2a.Protocol) -> web.Response:
    """What a held caller gets when its item ends, with HTTP 200: the agent's own
    answer (its Task under the queue id), or the FAILED or CANCELED Task."""
    if item.state == "delivered":
        answer = a2a.read_answer(stored_result(item))
        if answer.kind != "task":
            return _replay(item, rpc)  # a Message or a JSON-RPC error, as the agent sent it
        task = as_queue_task(item, answer.value, protocol)
    else:
        task = item_task(item, protocol)
    return json_response(a2a.rpc_result(rpc.id, a2a.send_result(task, protocol)))


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
KEEPALIVE_SECONDS = 15.0


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


def _sse(rpc_id: Any, result: Any) -> bytes:
    return b"data: " + json.dumps(a2a.rpc_result(rpc_id, result)).encode() + b"\n\n"


async def _item_stream(
    request: web.Request,
    daemon: Daemon,
    item: Item,
    rpc: a2a.RpcRequest,
    protocol: a2a.Protocol,
    queue_info: dict[str, Any] | None = None,
) -> web.StreamResponse:
    """A queue item as one Task's event stream: its Task now, a status-update when
    delivery starts, the agent's events under the queue id, and a final
    status-update if it fails, expires or is cancelled. A caller that leaves
    loses nothing: delivery goes on and the result is kept."""
    events = daemon.watch.subscribe(item.id)
    try:
        # Read again after subscribing, so no change falls between the two.
        item = await daemon.store.get(item.id) or item
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(request)
        snapshot = item_task(item, "0.3")
        if queue_info:
            snapshot["metadata"]["a2ad"].update(queue_info)
        await response.write(_sse(rpc.id, a2a.write_event(snapshot, protocol)))
        # It ends when the item is final: after the agent's stream ended and the
        # result is stored, so a GetTask right after the stream sees it.
        final_sent = ended = item.is_final
        while not ended:
            try:
                event = await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if event is None:  # the item is final
                ended = True
                if final_sent:
                    break
                event = await _final_event(daemon, item)
                if event is None:
                    break
            elif final_sent:
                continue  # nothing follows a final event in one Task's stream
            await response.write(_sse(rpc.id, a2a.write_event(event, protocol)))
            final_sent = bool(event.get("final"))
        await response.write_eof()
    except ConnectionResetError:
        log.info("request %s: the caller left the stream of %s", request[REQUEST_ID], item.id)
    finally:
        daemon.watch.unsubscribe(item.id, events)
    return response


async def _final_event(daemon: Daemon, item: Item) -> dict[str, Any] | None:
    """The closing status-update of an item that ended without the agent's own
    final event: failed, expired, cancelled, or answered without a stream."""
    final = await daemon.store.get(item.id)
    if final is None:
        return None
    task = item_task(final, "0.3")
    event = a2a.status_event(
        item.id,
        task["contextId"],
        task["status"]["state"],
        at=final.updated_at,
        message=task["status"].get("message"),
    )
    event["final"] = True
    if task.get("metadata"):
        event["metadata"] = task["metadata"]
    return event


def _replay(item: Item, rpc: a2a.RpcRequest) -> web.Response:
    """The stored answer of an already delivered messageId, under the new request's id."""
    try:
        stored = json.loads(item.result or b"null")
    except ValueError:
        stored = None
    if isinstance(stored, dict):
        stored["id"] = rpc.id
    return json_response(stored)


async def _find_item(daemon: Daemon, ws: Workspace, item_id: str, caller: str) -> Item | None:
    """The caller's item queued for `ws`. Another workspace's item reads as no item,
    as another caller's does: a queue id is a task of one agent, and acting on it
    through another workspace's URL would send that agent's task id to the wrong
    agent (or cancel the item from a URL that does not lead to it)."""
    item = await daemon.store.get(item_id)
    if item is None or item.workspace != ws.id:
        return None
    if not daemon.auth.proxy_open and item.caller != caller:
        return None
    return item


async def _unknown_queue_id(
    daemon: Daemon, ws: Workspace, rpc: a2a.RpcRequest, caller: str
) -> str | None:
    """A queue id a forwarded request names (where `body_for_agent` swaps it for the
    agent's task id) that is not the caller's item of `ws`, or None."""
    message = rpc.params.get("message")
    for holder in (rpc.params, message if isinstance(message, dict) else {}):
        for key in ("id", "taskId"):
            value = holder.get(key)
            if not isinstance(value, str) or not is_queue_id(value):
                continue
            if await _find_item(daemon, ws, value, caller) is None:
                return value
    return None


def _refuse_if_terminal(item: Item, protocol: a2a.Protocol) -> None:
    """The A2A error for an action on a task that is already terminal (completed,
    canceled, failed, rejected): UnsupportedOperationError, as the agent answers."""
    if not item.is_final:
        return
    state = item_task(item, protocol)["status"]["state"]
    if a2a.canonical_state(state) in a2a.FINAL_TASK_STATES:
        raise UnsupportedOperation(f"Task {item.id} is in terminal state: {state}")


async def _refuse_ended_task(
    daemon: Daemon, ws: Workspace, rpc: a2a.RpcRequest, caller: str, protocol: a2a.Protocol
) -> None:
    """A message to one of the caller's queue items that ended without reaching the
    agent (cancelled, failed, expired) is a2ad's to answer: that task is a2ad's and
    terminal, and the agent knows nothing of its q- id. A delivered item's task goes
    on at the agent, which gets the message under its own task id."""
    task_id = rpc.message.get("taskId")
    if not isinstance(task_id, str) or not is_queue_id(task_id):
        return
    item = await _find_item(daemon, ws, task_id, caller)
    if item is not None and item.state in ("cancelled", "failed", "expired"):
        _refuse_if_terminal(item, protocol)


def _task_not_found(rpc: a2a.RpcRequest, task_id: str | None = None) -> web.Response:
    named = task_id or rpc.task_id
    return json_response(a2a.rpc_error(rpc.id, a2a.TASK_NOT_FOUND, f"task {named} not found"))


async def _get_task(
    request: web.Request,
    daemon: Daemon,
    ws: Workspace,
    rpc: a2a.RpcRequest,
    caller: str,
    protocol: a2a.Protocol,
) -> web.Response:
    history_length = a2a.history_length(rpc.params)  # checked first, as the agent does
    item = await _find_item(daemon, ws, rpc.task_id or "", caller)
    if item is None:
        return _task_not_found(rpc)
    task = item_task(item, protocol)
    if item.agent_task_id and not a2a.is_final_state(task["status"]["state"]):
        task = await _refreshed(request, daemon, item, rpc, protocol) or task
    return json_response(a2a.rpc_result(rpc.id, a2a.limit_history(task, history_length)))


async def _list_tasks(
    daemon: Daemon, ws: Workspace, rpc: a2a.RpcRequest, caller: str, protocol: a2a.Protocol
) -> web.Response:
    """ListTasks: the caller's own queue items of this workspace, never forwarded (a2ad
    reaches the agent with one credential for every caller, so the agent's list would
    hold every caller's tasks). Most recently updated first, as the specification
    orders them; a delivered item shows its stored Task, not refreshed from the agent."""
    query = a2a.list_query(rpc.params)
    before = read_page_token(query.page_token) if query.page_token else None
    read = functools.partial(
        daemon.store.caller_items,
        ws.id,
        caller,
        context_id=query.context_id,
        updated_from=query.updated_from,
    )
    if query.state is None:
        items, total = await read(before=before, limit=query.page_size + 1)
        page = listed_tasks(items, query, protocol)
    else:
        # A delivered item's state is in its stored answer, which SQL does not read:
        # the caller's candidates are read whole, then counted and paged here.
        items, _ = await read(states=list_states(query.state))
        page = listed_tasks(items, query, protocol)
        total = len(page)
        if before is not None:
            page = [(item, task) for item, task in page if (item.updated_at, item.seq) < before]
    more = len(page) > query.page_size
    result = list_result(page[: query.page_size], query, total, more=more)
    return json_response(a2a.rpc_result(rpc.id, result))


async def _refreshed(
    request: web.Request,
    daemon: Daemon,
    item: Item,
    rpc: a2a.RpcRequest,
    protocol: a2a.Protocol,
) -> dict[str, Any] | None:
    """The agent's Task as it is now (it was not final when delivered), or None."""
    ws = daemon.registry.find(item.workspace)
    if ws is None:
        return None
    params = {**rpc.params, "id": item.agent_task_id}
    body = json.dumps({"jsonrpc": "2.0", "id": rpc.id, "method": rpc.method, "params": params})
    headers = forwarded_headers(request.headers, request[REQUEST_ID])
    answer = await daemon.upstream.send(ws.config, body.encode(), headers)
    # Only a JSON-RPC result that is this task's Task replaces the stored one. Any
    # other answer (an error page, a JSON-RPC error, no answer, another task) tells
    # nothing new, and the caller gets the Task a2ad holds rather than a 5xx.
    # `parsed` is set only for a 2xx JSON-RPC response that fits max_result_bytes.
    if answer.outcome is not Outcome.FINAL or answer.parsed is None:
        return None
    result = answer.parsed.get("result")
    if not isinstance(result, dict) or result.get("id") != item.agent_task_id:
        return None
    if not isinstance(result.get("status"), dict):
        return None
    return as_queue_task(item, result, protocol)


async def _cancel_task(
    request: web.Request,
    daemon: Daemon,
    ws: Workspace,
    rpc: a2a.RpcRequest,
    caller: str,
    protocol: a2a.Protocol,
) -> web.StreamResponse:
    item = await _find_item(daemon, ws, rpc.task_id or "", caller)
    if item is None:
        return _task_not_found(rpc)
    if await daemon.dispatcher.cancel(item):
        item = await daemon.store.get(item.id) or item
        return json_response(a2a.rpc_result(rpc.id, item_task(item, protocol)))
    if item.state == "delivered" and item.agent_task_id:
        body = {
            "jsonrpc": "2.0",
            "id": rpc.id,
            "method": rpc.method,
            "params": {**rpc.params, "id": item.agent_task_id},
        }
        # `ws` is the item's own workspace (`_find_item` returns no other), so this
        # reaches the agent that knows `agent_task_id`.
        return await _forward(request, daemon, ws, rpc, body, None, caller)
    if item.state in ("queued", "dispatching"):
        return json_response(
            a2a.rpc_error(rpc.id, a2a.TASK_NOT_CANCELABLE, f"task {item.id} is being delivered")
        )
    return json_response(
        a2a.rpc_error(rpc.id, a2a.TASK_NOT_CANCELABLE, f"task {item.id} is already {item.state}")
    )


async def _forward(
    request: web.Request,
    daemon: Daemon,
    ws: Workspace,
    rpc: a2a.RpcRequest,
    body: Any,
    raw: bytes | None,
    caller: str,
) -> web.StreamResponse:
    """Any other method goes straight to the agent, queue ids swapped for the agent's."""
    if raw is None:
        raw = json.dumps(body).encode()
    raw = await daemon.agent_ids.body_for_agent(raw, caller, ws.id, body)
    answer = await daemon.upstream.send(
        ws.config,
        raw,
        forwarded_headers(request.headers, request[REQUEST_ID]),
        expect_jsonrpc=False,
    )
    if answer.reached_agent:
        ws.note_answer(daemon.clock.monotonic())
    if answer.status is None:
        if answer.timed_out:
            raise UpstreamTimeout(f"workspace {ws.id!r}: {answer.error}")
        raise UpstreamFailed(f"workspace {ws.id!r}: {answer.error}")
    if answer.too_large:
        raise UpstreamFailed(f"workspace {ws.id!r}: {answer.error}")
    return web.Response(
        body=answer.body, status=answer.status, headers={"Content-Type": answer.content_type}
    )


# -- GET /workspaces/{id}/a2a/.well-known/agent-card.json -----------------------


async def handle_card(request: web.Request) -> web.StreamResponse:
    """The agent's card, pointing at a2ad; no token needed, as for the agent itself."""
    daemon = request.app[DAEMON]
    ws = daemon.registry.get(request.match_info["workspace"])
    headers = {
        k: request.headers[k] for k in ("A2A-Version", "A2A-Extensions") if k in request.headers
    }
    card = await daemon.cards.get(daemon.upstream, ws, headers)
    if card is None:
        raise CardUnavailable(
            f"workspace {ws.id!r}: the agent has not served its card yet"
            f" ({ws.config.url} is not answering); try again when it is up",
            retry_after=5,
        )
    cache = {"ETag": card.etag, "Cache-Control": "no-cache"}
    if card.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=cache)
    return web.Response(body=card.body, content_type="application/json", headers=cache)


# -- POST /workspaces/{id}/heartbeat -------------------------------------------


def _heartbeat_fields(body: Any) -> tuple[int, int | None]:
    if not isinstance(body, dict):
        raise InvalidBody(
            "a heartbeat is a JSON object: "
            '{"active_tasks": int >= 0, "max_concurrent_tasks": int >= 1}'
        )
    unknown = sorted(set(body) - {"active_tasks", "max_concurrent_tasks"})
    if unknown:
        raise InvalidBody(f"unknown heartbeat fields: {', '.join(unknown)[:200]}")
    active = body.get("active_tasks")
    if not isinstance(active, int) or isinstance(active, bool) or not 0 <= active <= 1_000_000:
        raise InvalidBody("active_tasks must be an integer >= 0")
    capacity = body.get("max_concurrent_tasks")
    if capacity is not None and (
        not isinstance(capacity, int)
        or isinstance(capacity, bool)
        or not 1 <= capacity <= 1_000_000
    ):
        raise InvalidBody("max_concurrent_tasks must be an integer >= 1")
    return active, capacity


async def handle_heartbeat(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    workspace_id = request.match_info["workspace"]
    daemon.auth.workspace(request, workspace_id)
    ws = daemon.registry.get(workspace_id)
    raw = await read_body(request)
    active, capacity = _heartbeat_fields(a2a.parse_json(raw))
    now = daemon.clock.monotonic()
    ws.record_heartbeat(active, capacity, now)
    if ws.free_slots(now) > 0 and ws.queued_total > 0:
        ws.wakeup.set()  # fill every free slot now, not at the next timer
    return json_response({"queue_depth": ws.queued_total})
