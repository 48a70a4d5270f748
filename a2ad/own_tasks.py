"""A2A methods on a2ad's own tasks (queue ids), answered by a2ad: GetTask, CancelTask,
SubscribeToTask and ListTasks; the queued stream; a held blocking send's answer."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any

from aiohttp import web

from . import a2a, a2a_params
from .daemon import Daemon
from .errors import UnsupportedOperation
from .forward import forward, forwarded_headers
from .http_io import REQUEST_ID, json_response
from .ids import is_queue_id
from .results import (
    as_queue_task,
    item_task,
    list_result,
    list_states,
    listed_tasks,
    read_page_token,
    stored_result,
)
from .store import Item
from .upstream import Outcome
from .workspaces import Workspace

log = logging.getLogger("a2ad.proxy")


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
KEEPALIVE_SECONDS = 15.0


async def hold(daemon: Daemon, item: Item) -> Item:
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


def held_answer(item: Item, rpc: a2a.RpcRequest, protocol: a2a.Protocol) -> web.Response:
    """What a send gets, with HTTP 200, for an item that ended: a held caller, or the
    same messageId sent again. The agent's own answer, a Task under the queue id
    (as GetTask shows it), a Message or a JSON-RPC error as the agent sent it; or
    the FAILED or CANCELED Task, also when the agent's answer was not an A2A
    result (an HTML error page), never a bare `null`."""
    if item.state == "delivered":
        stored = stored_result(item)
        if a2a.read_answer(stored).kind in ("message", "error"):
            return json_response({**stored, "id": rpc.id})  # under this request's id
    task = item_task(item, protocol)
    return json_response(a2a.rpc_result(rpc.id, a2a.send_result(task, protocol)))


def sse(rpc_id: Any, result: Any) -> bytes:
    return b"data: " + json.dumps(a2a.rpc_result(rpc_id, result)).encode() + b"\n\n"


async def item_stream(
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
        await response.write(sse(rpc.id, a2a.write_event(snapshot, protocol)))
        # It ends when the item is final: after the agent's stream ended and the
        # result is stored, so a GetTask right after the stream sees it.
        final_sent = ended = item.is_final
        while not ended:
            try:
                event = await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                # The slow poll behind being told: another process (a replica, the
                # queue CLI) may have ended it, and a lost notification said nothing.
                latest = await daemon.store.get(item.id)
                if latest is None or latest.is_final:
                    events.put_nowait(None)
                continue
            if event is None:  # the item is final
                ended = True
                if final_sent:
                    break
                event = await final_event(daemon, item)
                if event is None:
                    break
            elif final_sent:
                continue  # nothing follows a final event in one Task's stream
            await response.write(sse(rpc.id, a2a.write_event(event, protocol)))
            final_sent = bool(event.get("final"))
        await response.write_eof()
    except ConnectionResetError:
        log.info("request %s: the caller left the stream of %s", request[REQUEST_ID], item.id)
    finally:
        daemon.watch.unsubscribe(item.id, events)
    return response


async def final_event(daemon: Daemon, item: Item) -> dict[str, Any] | None:
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


async def find_item(daemon: Daemon, ws: Workspace, item_id: str, caller: str) -> Item | None:
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


async def unknown_queue_id(
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
            if await find_item(daemon, ws, value, caller) is None:
                return value
    return None


def refuse_if_terminal(item: Item, protocol: a2a.Protocol) -> None:
    """The A2A error for an action on a task that is already terminal (completed,
    canceled, failed, rejected): UnsupportedOperationError, as the agent answers."""
    if not item.is_final:
        return
    state = item_task(item, protocol)["status"]["state"]
    if a2a.canonical_state(state) in a2a.FINAL_TASK_STATES:
        raise UnsupportedOperation(f"Task {item.id} is in terminal state: {state}")


async def refuse_ended_task(
    daemon: Daemon, ws: Workspace, rpc: a2a.RpcRequest, caller: str, protocol: a2a.Protocol
) -> None:
    """A message to one of the caller's queue items that ended without reaching the
    agent (cancelled, failed, expired) is a2ad's to answer: that task is a2ad's and
    terminal, and the agent knows nothing of its q- id. A delivered item's task goes
    on at the agent, which gets the message under its own task id."""
    task_id = rpc.message.get("taskId")
    if not isinstance(task_id, str) or not is_queue_id(task_id):
        return
    item = await find_item(daemon, ws, task_id, caller)
    if item is not None and item.state in ("cancelled", "failed", "expired"):
        refuse_if_terminal(item, protocol)


def task_not_found(rpc: a2a.RpcRequest, task_id: str | None = None) -> web.Response:
    named = task_id or rpc.task_id
    return json_response(a2a.rpc_error(rpc.id, a2a.TASK_NOT_FOUND, f"task {named} not found"))


async def get_task(
    request: web.Request,
    daemon: Daemon,
    ws: Workspace,
    rpc: a2a.RpcRequest,
    caller: str,
    protocol: a2a.Protocol,
) -> web.Response:
    history_length = a2a_params.history_length(rpc.params)  # checked first, as the agent does
    item = await find_item(daemon, ws, rpc.task_id or "", caller)
    if item is None:
        return task_not_found(rpc)
    task = item_task(item, protocol)
    if item.agent_task_id and not a2a.is_final_state(task["status"]["state"]):
        task = await refreshed(request, daemon, item, rpc, protocol) or task
    return json_response(a2a.rpc_result(rpc.id, a2a_params.limit_history(task, history_length)))


async def list_tasks(
    daemon: Daemon, ws: Workspace, rpc: a2a.RpcRequest, caller: str, protocol: a2a.Protocol
) -> web.Response:
    """ListTasks: the caller's own queue items of this workspace, never forwarded (a2ad
    reaches the agent with one credential for every caller, so the agent's list would
    hold every caller's tasks). Most recently updated first, as the specification
    orders them; a delivered item shows its stored Task, not refreshed from the agent."""
    query = a2a_params.list_query(rpc.params)
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


async def refreshed(
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


async def cancel_task(
    request: web.Request,
    daemon: Daemon,
    ws: Workspace,
    rpc: a2a.RpcRequest,
    caller: str,
    protocol: a2a.Protocol,
) -> web.StreamResponse:
    item = await find_item(daemon, ws, rpc.task_id or "", caller)
    if item is None:
        return task_not_found(rpc)
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
        # `ws` is the item's own workspace (`find_item` returns no other), so this
        # reaches the agent that knows `agent_task_id`.
        return await forward(request, daemon, ws, rpc, body, None, caller)
    if item.state in ("queued", "dispatching"):
        return json_response(
            a2a.rpc_error(rpc.id, a2a.TASK_NOT_CANCELABLE, f"task {item.id} is being delivered")
        )
    return json_response(
        a2a.rpc_error(rpc.id, a2a.TASK_NOT_CANCELABLE, f"task {item.id} is already {item.state}")
    )
