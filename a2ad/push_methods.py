"""The push-config methods on a2ad's own tasks (queue ids), in both protocol
versions: Create/Get/List/Delete (1.0), tasks/pushNotificationConfig/set|get|
list|delete (v0.3). A config is checked against the webhook policy when it is
registered (agent_urls.webhook_refusal) and kept until the item is deleted."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from . import a2a
from .agent_urls import webhook_refusal
from .daemon import Daemon
from .errors import InvalidParams, StoreUnavailable
from .http_io import json_response
from .own_tasks import find_item, task_not_found
from .push_configs import CREATE, DELETE, LIST, configs_of, read_config, shown, task_of
from .store import Item
from .workspaces import Workspace

SET_RETRIES = 8  # concurrent changes to one item's configs: read again and retry


async def agent_pushes(daemon: Daemon, ws: Workspace, headers: Mapping[str, str]) -> bool:
    """Does the workspace's agent card say it sends push notifications itself?"""
    wanted = {k: headers[k] for k in ("A2A-Version", "A2A-Extensions") if k in headers}
    card = await daemon.cards.get(daemon.upstream, ws, wanted)
    return card is not None and card.agent_pushes


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
        daemon.pusher.expect(item.id, now=item.is_final)
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
    raise StoreUnavailable("the task's push configs kept changing; try again", retry_after=1)
