"""The push-config methods on a2ad's own tasks (queue ids), in both protocol
versions: Create/Get/List/Delete (1.0), tasks/pushNotificationConfig/set|get|
list|delete (v0.3). A config is checked against the webhook policy when it is
registered (agent_urls.webhook_refusal) and kept until the item is deleted."""

from __future__ import annotations

import asyncio
import hmac
import json
import random
from typing import Any

from aiohttp import web

from . import a2a
from .agent_urls import webhook_refusal
from .daemon import DAEMON, Daemon
from .errors import InvalidBody, InvalidParams, StoreUnavailable, Unauthorized
from .http_io import json_response, read_body
from .own_tasks import find_item, task_not_found
from .push import FOLLOW_MAX_SECONDS
from .push_configs import CREATE, DELETE, LIST, configs_of, read_config, shown, task_of
from .store import Item
from .workspaces import Workspace

SET_RETRIES = 8  # concurrent changes to one item's configs: read again and retry


async def checked(daemon: Daemon, raw: Any, protocol: a2a.Protocol, task_id: str) -> dict[str, Any]:
    config = read_config(raw, protocol, task_id)
    why = await webhook_refusal(config["url"], daemon.settings.push.allowed_hosts)
    if why:
        raise InvalidParams(f"push notification url refused: {why}")
    return config


async def handle(
    daemon: Daemon,
    ws: Workspace,
    rpc: a2a.RpcRequest,
    caller: str,
    protocol: a2a.Protocol,
) -> web.Response:
    """A push-config method on one of the caller's queue ids."""
    task_id = task_of(rpc) or ""
    item = await find_item(daemon, ws, task_id, caller)
    if item is None:
        return task_not_found(rpc, task_id)
    if rpc.method in LIST:
        listed = [shown(c, item.id, protocol) for c in configs_of(item)]
        result: Any = {"configs": listed} if protocol == "1.0" else listed
        return json_response(a2a.rpc_result(rpc.id, result))
    if rpc.method in CREATE:
        raw = rpc.params.get("pushNotificationConfig", rpc.params)
        config = await checked(daemon, raw, protocol, item.id)
        await _change(daemon, item, config["id"], config)
        daemon.pusher.expect(item.id, now=True)  # a final item's update is due at once
        return json_response(a2a.rpc_result(rpc.id, shown(config, item.id, protocol)))
    key = "id" if protocol == "1.0" and "/" not in rpc.method else "pushNotificationConfigId"
    config_id = rpc.params.get(key)
    if config_id is not None and not isinstance(config_id, str):
        raise InvalidParams(f"{key} must be a string")
    if rpc.method in DELETE:
        await _change(daemon, item, config_id or item.id, None)
        return json_response(a2a.rpc_result(rpc.id, None))
    configs = configs_of(item)
    found = next((c for c in configs if c["id"] == config_id), None)
    if config_id is None and protocol == "0.3" and configs:
        found = configs[0]  # v0.3's get without a config id: the task's config
    if found is None:
        return task_not_found(rpc, task_id)
    return json_response(a2a.rpc_result(rpc.id, shown(found, item.id, protocol)))


async def attach(daemon: Daemon, item: Item, config: dict[str, Any], new_id: str) -> None:
    """A send answered by an item that exists (its messageId again) attaches the
    config it carried to that item: every config a caller was answered for is
    pushed to. A config without an id of its own takes that item's id."""
    if config["id"] == new_id:
        config = {**config, "id": item.id}
    await _change(daemon, item, config["id"], config)
    daemon.pusher.expect(item.id, now=True)


async def _change(
    daemon: Daemon, item: Item, config_id: str, config: dict[str, Any] | None
) -> None:
    """Put (or, with None, remove) one config of the item; another request changing
    the same item's configs meanwhile makes this read again and retry."""
    limit = daemon.settings.push.max_configs_per_task
    for _ in range(SET_RETRIES):
        configs = [c for c in configs_of(item) if c.get("id") != config_id]
        if config is not None:
            configs.append(config)
            if len(configs) > limit:
                raise InvalidParams(f"a task holds at most {limit} push notification configs")
        written = json.dumps(configs) if configs else None
        if written == item.push or await daemon.store.set_push(item.id, written, before=item.push):
            return
        latest = await daemon.store.get(item.id)
        if latest is None:
            return
        item = latest
        await asyncio.sleep(random.uniform(0, 0.01))  # many at once: spread them out
    raise StoreUnavailable("the task's push configs kept changing; try again", retry_after=1)


# -- a2ad as the agent's webhook --------------------------------------------------


async def agent_pushed(request: web.Request) -> web.Response:
    """POST /workspaces/{id}/pushes/{qid}: the agent pushes an update of a delivered
    task it goes on with (a2ad registered this URL with it: push.py). Authenticated by
    the token a2ad gave the agent for this item alone; the update goes to the
    caller's webhooks under the queue id, through the outbox."""
    daemon = request.app[DAEMON]
    ws = daemon.registry.get(request.match_info["workspace"])
    item = await daemon.store.get(request.match_info["qid"])
    followed = await daemon.store.followed(item.id) if item is not None else None
    given = request.headers.get("X-A2A-Notification-Token", "")
    if (
        item is None
        or item.workspace != ws.id
        or followed is None
        or followed.status != "pending"
        or not followed.token
        or not hmac.compare_digest(given.encode(), followed.token.encode())
    ):
        raise Unauthorized("no task of this workspace is followed with this token")
    raw = await read_body(request, daemon.settings.server.max_result_bytes)
    event = a2a.read_event(a2a.parse_json(raw))
    last = json.loads(followed.payload or "{}")
    task = _updated(last, event) if event is not None else None
    if task is None or task.get("id") != item.agent_task_id:
        raise InvalidBody(f"not an update of the agent's task {item.agent_task_id}")
    now = daemon.clock.now()
    latest = json.dumps(task)
    await daemon.store.add_push_update(item.id, latest, now=now)
    if a2a.is_terminal(task):
        await daemon.store.follow_done(followed.seq, task=latest, now=now)  # no more to follow
    else:
        await daemon.store.follow_again(
            followed.seq, next_at=now + FOLLOW_MAX_SECONDS, task=latest, attempts=0
        )
    daemon.pusher.wake()
    return json_response({"ok": True})


def _updated(last: dict[str, Any], event: dict[str, Any]) -> dict[str, Any] | None:
    """The agent's Task after one of its events (v0.3 shape, as read_event gives it):
    a Task replaces it, a status-update its status, an artifact-update adds or
    replaces one artifact."""
    kind = event.get("kind")
    if kind == "task":
        return event
    if event.get("taskId") != last.get("id"):
        return None
    if kind == "status-update":
        return {**last, "status": event.get("status")}
    if kind == "artifact-update" and isinstance(event.get("artifact"), dict):
        artifact = event["artifact"]
        kept = [
            a
            for a in last.get("artifacts") or []
            if not (isinstance(a, dict) and a.get("artifactId") == artifact.get("artifactId"))
        ]
        return {**last, "artifacts": [*kept, artifact]}
    return None
