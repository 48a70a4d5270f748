"""Push-notification configs of a2ad's own tasks (queue ids): how either protocol
version writes them, in the four methods (push_methods.py) and in a send. They
are stored with the item (its `push` column, JSON); the store's triggers turn
each update of the item into outbox rows for them, and push.py sends those."""

from __future__ import annotations

import json
import re
from typing import Any

from . import a2a
from .errors import InvalidParams
from .ids import is_queue_id
from .store import Item

CREATE = frozenset({"CreateTaskPushNotificationConfig", "tasks/pushNotificationConfig/set"})
GET = frozenset({"GetTaskPushNotificationConfig", "tasks/pushNotificationConfig/get"})
LIST = frozenset({"ListTaskPushNotificationConfigs", "tasks/pushNotificationConfig/list"})
DELETE = frozenset({"DeleteTaskPushNotificationConfig", "tasks/pushNotificationConfig/delete"})
METHODS = CREATE | GET | LIST | DELETE

MAX_URL = 2048
MAX_SECRET = 4096  # a token, or authentication credentials


def task_of(rpc: a2a.RpcRequest) -> str | None:
    """The task a push-config method names: `taskId` (1.0, and v0.3's set), else
    `id` (v0.3's get, list and delete)."""
    for key in ("taskId", "id") if rpc.method.startswith("tasks/") else ("taskId",):
        value = rpc.params.get(key)
        if isinstance(value, str):
            return value
    return None


def names_queue_id(rpc: a2a.RpcRequest) -> bool:
    return rpc.method in METHODS and is_queue_id(task_of(rpc))


def configs_of(item: Item) -> list[dict[str, Any]]:
    """The item's push configs, as stored."""
    configs = json.loads(item.push) if item.push else []
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


# Control characters: a header value cannot carry them (CR/LF would split it, and
# aiohttp refuses them), and PostgreSQL's jsonb refuses NUL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_SCHEMES = 8


def _text(value: Any, name: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidParams(f"{name} must be a string of at most {limit} characters")
    if _CONTROL.search(value):
        raise InvalidParams(f"{name} must not hold control characters (CR, LF, NUL …)")
    return value


def read_config(raw: Any, protocol: a2a.Protocol, task_id: str) -> dict[str, Any]:
    """A push config as a2ad stores it, from either version's shape; InvalidParams
    when it is not one. Its id defaults to the task id, as the a2a-sdk's does."""
    if not isinstance(raw, dict):
        raise InvalidParams("the push notification config must be an object")
    url = _text(raw.get("url"), "url", MAX_URL)
    if not url:
        raise InvalidParams("the push notification config needs a url")
    config: dict[str, Any] = {
        "id": _text(raw.get("id"), "id", 256) or task_id,
        "url": url,
        "protocol": protocol,
    }
    token = _text(raw.get("token"), "token", MAX_SECRET)
    if token:
        config["token"] = token
    auth = raw.get("authentication")
    if auth is not None:
        config["authentication"] = _authentication(auth)
    return config


def _authentication(auth: Any) -> dict[str, Any]:
    """1.0's {scheme, credentials} or v0.3's {schemes, credentials}: those keys only,
    each a header-safe string of bounded size."""
    if not isinstance(auth, dict):
        raise InvalidParams("authentication must be an object")
    kept: dict[str, Any] = {}
    for key in ("scheme", "credentials"):
        value = _text(
            auth.get(key), f"authentication.{key}", 256 if key == "scheme" else MAX_SECRET
        )
        if value is not None:
            kept[key] = value
    schemes = auth.get("schemes")
    if schemes is not None:
        if not isinstance(schemes, list) or len(schemes) > MAX_SCHEMES:
            raise InvalidParams(f"authentication.schemes must be a list of at most {MAX_SCHEMES}")
        kept["schemes"] = [_text(s, "authentication.schemes[]", 256) or "" for s in schemes]
    return kept


def authorization(config: dict[str, Any]) -> str | None:
    """The Authorization header a config's `authentication` gives: `<scheme>
    <credentials>` (1.0's scheme, or v0.3's first of schemes)."""
    auth = config.get("authentication")
    if not isinstance(auth, dict):
        return None
    scheme = auth.get("scheme")
    if not scheme and isinstance(auth.get("schemes"), list) and auth["schemes"]:
        scheme = auth["schemes"][0]
    credentials = auth.get("credentials")
    if not scheme or not credentials:
        return None
    return f"{scheme} {credentials}"


def in_send(rpc: a2a.RpcRequest, protocol: a2a.Protocol) -> Any:
    """The push config a send carries in its configuration, or None: 1.0's
    `taskPushNotificationConfig` (the specification's example says
    `pushNotificationConfig`; both are read), v0.3's `pushNotificationConfig`."""
    configuration = rpc.params.get("configuration")
    if not isinstance(configuration, dict):
        return None
    if protocol == "1.0" and "/" not in rpc.method:
        found = configuration.get("taskPushNotificationConfig")
        return found if found is not None else configuration.get("pushNotificationConfig")
    return configuration.get("pushNotificationConfig")


def shown(config: dict[str, Any], task_id: str, protocol: a2a.Protocol) -> dict[str, Any]:
    """A config as the methods answer it, in the request's version."""
    body: dict[str, Any] = {
        k: config[k] for k in ("id", "url", "token", "authentication") if k in config
    }
    if protocol == "1.0":
        return {"taskId": task_id, **body}
    return {"taskId": task_id, "pushNotificationConfig": body}
