"""The push sender: POSTs the outbox's updates to callers' webhooks.

Each outbox row is one update of a queued task for one of its push configs
(made by the store in the statement that changed the item: store/outbox.py).
The sender takes due rows with a lease (a replica or a restarted a2ad takes
them again once it lapses: at least once), POSTs the A2A `StreamResponse`
(`{"task": …}`; for a config registered in v0.3 the v0.3 Task itself) under
the queue id, and records the outcome: sent, due again after a backoff with
jitter, or after `push.max_attempts` a dead letter an operator can retry. A
task's updates to one config go in order: a row waits for the one before it,
unless that one is dead (each push carries the whole Task, so a receiver
catches up from any later one).

A delivered task the agent has not finished (WORKING, INPUT_REQUIRED …) is
followed: a row with no config asks the agent for its Task from time to time
(GetTask, backing off to FOLLOW_MAX_SECONDS) and stores each change as an
update for every config, until the task is terminal or queue.max_age_seconds
have passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp

from . import a2a
from .agent_urls import WebhookResolver, webhook_refused_now
from .clock import Clock
from .errors import StoreUnavailable
from .metrics import Metrics
from .push_configs import authorization, configs_of
from .results import as_queue_task, item_task, stored_result
from .settings import Settings
from .store import Item, QueueStore
from .store.models import Push
from .upstream import Answer, Outcome, Upstream
from .workspaces import Registry, Workspace

log = logging.getLogger("a2ad.push")

MAX_SENDING = 64  # POSTs in flight at once
POLL_SECONDS = 1.0  # due rows nobody told of: backoffs ending, other processes' rows
LEASE_MARGIN = 5.0  # a row is held this long past its POST's time limit
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0  # a receiver that comes back is reached within about this
FOLLOW_FIRST_SECONDS = 1.0
FOLLOW_MAX_SECONDS = 30.0
COUNT_EVERY_SECONDS = 10.0
MAX_EXPECTED = 100_000  # items remembered to have configs, to wake for when they end
MAX_ANSWER_READ = 65_536  # of a receiver's answer body, read and dropped


def backoff(attempts: int) -> float:
    """Exponential, capped, with full jitter over its upper half."""
    ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** max(0, attempts - 1))
    return ceiling * random.uniform(0.5, 1.0)


def payload(item: Item, row: Push, config: dict[str, Any], latest: str | None = None) -> bytes:
    """The body of one push: the task as this update left it, under the queue id.
    `latest`: the agent's Task as a2ad last saw it while following it, which a
    late config's first update ('current') carries."""
    protocol: a2a.Protocol = "0.3" if config.get("protocol") == "0.3" else "1.0"
    told = latest if row.state == "current" else row.payload if row.state == "update" else None
    if told is not None:
        task = as_queue_task(item, json.loads(told), protocol)
    else:
        # The item may have moved on (a failed item retried): the state told of.
        if row.state not in ("current", item.state):
            item = replace(item, state=row.state, updated_at=row.created_at)  # type: ignore[arg-type]
        task = item_task(item, protocol)
    return json.dumps({"task": task} if protocol == "1.0" else task).encode()


def agent_task(item: Item) -> dict[str, Any] | None:
    """The agent's Task a delivery answered with, when it is not finished."""
    answer = a2a.read_answer(stored_result(item))
    if answer.kind != "task" or not item.agent_task_id:
        return None
    return None if a2a.is_terminal(answer.value) else answer.value


class Pusher:
    """The background sender of one a2ad (any number run on one store)."""

    def __init__(
        self,
        settings: Settings,
        store: QueueStore,
        clock: Clock,
        metrics: Metrics,
        registry: Registry,
        upstream: Upstream,
    ) -> None:
        self.settings = settings.push
        self.max_age = settings.queue.max_age_seconds
        self.max_bytes = settings.server.max_result_bytes
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.registry = registry
        self.upstream = upstream
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._handling: set[int] = set()  # outbox rows this sender is working on
        self._wake = asyncio.Event()
        self._expected: set[str] = set()  # items with configs, to wake for when final
        self._counted_at = float("-inf")
        self.public_url = settings.server.base_url.rstrip("/")
        # Does the workspace's agent push itself (its card)? Set by the daemon.
        self.agent_pushes: Callable[[Workspace], Awaitable[bool]] = _never

    async def start(self) -> None:
        if not self.store.is_server:
            # The store's only process: rows leased before a crash are due now.
            await self.store.release_pushes(now=self.clock.now())
        connector = aiohttp.TCPConnector(
            resolver=WebhookResolver(self.settings.allowed_hosts), limit=MAX_SENDING
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds),
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "a2ad"},
        )
        self._loop = asyncio.create_task(self._run(), name="a2ad-push")

    async def stop(self) -> None:
        tasks = [*([self._loop] if self._loop else []), *self._sending]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def expect(self, item_id: str, *, now: bool = False) -> None:
        """The item has push configs: look at once when it ends (or now)."""
        if len(self._expected) >= MAX_EXPECTED:
            self._expected.clear()  # items that ended elsewhere: the poll finds theirs
        self._expected.add(item_id)
        if now:
            self._wake.set()

    def final(self, item_id: str, pushes: bool = False) -> None:
        """An item ended here; if it has configs, its updates are due."""
        if pushes or item_id in self._expected:
            self._expected.discard(item_id)
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # -- the loop -----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            free = MAX_SENDING - len(self._sending)
            rows: list[Push] = []
            now = self.clock.now()
            try:
                if free > 0:
                    lease = now + self.settings.timeout_seconds + LEASE_MARGIN
                    rows = await self.store.claim_pushes(now=now, lease_until=lease, limit=free)
                if now - self._counted_at >= COUNT_EVERY_SECONDS:
                    self._counted_at = now
                    self.metrics.outbox = await self.store.push_counts()
            except StoreUnavailable as exc:
                log.warning("push: cannot read the outbox: %s", exc.message)
            except Exception:
                log.exception("push: reading the outbox failed; continuing")
            for row in rows:
                if row.seq in self._handling:
                    continue  # its lease lapsed under a slow agent: this one still has it
                self._handling.add(row.seq)
                task = asyncio.create_task(self._handle(row), name=f"a2ad-push-{row.seq}")
                self._sending.add(task)
                task.add_done_callback(functools.partial(self._sent, row.seq))
            if rows and len(rows) == free:
                continue  # more may be due
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await self._wake.wait()

    def _sent(self, seq: int, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._handling.discard(seq)
        self._wake.set()  # the task's next update may be due now

    async def _handle(self, row: Push) -> None:
        try:
            if row.config_id == "":
                await self._follow(row)
            else:
                await self._push(row)
        except asyncio.CancelledError:
            raise  # shutdown: the lease lapses and the row is taken again
        except StoreUnavailable as exc:
            log.warning("push %d: cannot record its outcome: %s", row.seq, exc.message)
        except Exception:
            log.exception("push %d failed", row.seq)

    async def _push(self, row: Push) -> None:
        item = await self.store.get(row.item_id)
        config = _config(item, row.config_id) if item is not None else None
        if item is None or config is None:
            await self.store.push_sent(row.seq, now=self.clock.now())  # nothing to tell
            return
        latest = None
        going_on = None  # the agent's unfinished Task the delivery answered with
        if row.state in ("delivered", "current") and item.state == "delivered":
            going_on = agent_task(item)
        if going_on is not None:
            followed = await self.store.followed(item.id)
            if followed is None:
                await self._start_following(item, going_on)  # the first config to hear of it
            elif row.state == "current":
                latest = followed.payload
        body = payload(item, row, config, latest)
        error = webhook_refused_now(config["url"], self.settings.allowed_hosts)
        if error is None and len(body) > self.max_bytes:
            error = f"the update is {len(body)} bytes, over server.max_result_bytes"
        if error is not None:
            await self._failed(row, item, error, attempts_left=False)
            return
        error = await self._post(config, body)
        if error is None:
            now = self.clock.now()
            await self.store.push_sent(row.seq, now=now)
            self.metrics.pushes["sent"].inc()
            self.metrics.push_delay.observe(max(0.0, now - row.created_at))
        else:
            await self._failed(row, item, error, attempts_left=True)

    async def _post(self, config: dict[str, Any], body: bytes) -> str | None:
        """POST one update; None when the receiver took it (any 2xx), else why not."""
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        if config.get("token"):
            headers["X-A2A-Notification-Token"] = config["token"]
        auth = authorization(config)
        if auth:
            headers["Authorization"] = auth
        try:
            async with self._session.post(
                config["url"], data=body, headers=headers, allow_redirects=False
            ) as resp:
                await resp.content.read(MAX_ANSWER_READ)
                if 200 <= resp.status < 300:
                    return None
                return f"the receiver answered HTTP {resp.status}"
        except TimeoutError:
            return f"no answer within {self.settings.timeout_seconds:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"cannot reach the receiver: {exc or type(exc).__name__}"
        except ValueError as exc:  # a header value aiohttp refuses: it never will take it
            return f"cannot send it: {exc}"

    async def _failed(self, row: Push, item: Item, error: str, *, attempts_left: bool) -> None:
        self.metrics.pushes["failed"].inc()
        dead = await self.store.push_failed(
            row.seq,
            next_at=self.clock.now() + backoff(row.attempts),
            error=error,
            max_attempts=self.settings.max_attempts if attempts_left else 0,
        )
        if dead:
            self.metrics.pushes["dead"].inc()
            log.warning(
                "push %d of %s to config %s is a dead letter after %d attempts: %s",
                row.seq,
                item.id,
                row.config_id,
                row.attempts,
                error,
                extra={"item": item.id, "workspace": item.workspace},
            )

    # -- following a task the agent goes on with ---------------------------------

    async def _start_following(self, item: Item, task: dict[str, Any]) -> None:
        """A delivered task the agent goes on with (`task`, its answer): follow it
        (before the delivery's push, so a crash between the two loses nothing), and
        when the agent's card says it pushes, ask it to push its updates to a2ad too."""
        token = secrets.token_urlsafe(24)
        now = self.clock.now()
        made = await self.store.follow_push(
            item.id, json.dumps(task), next_at=now + FOLLOW_FIRST_SECONDS, now=now, token=token
        )
        ws = self.registry.find(item.workspace)
        if made and ws is not None and await self.agent_pushes(ws):
            registering = asyncio.create_task(self._register(item, ws, token))
            self._sending.add(registering)
            registering.add_done_callback(self._sending.discard)

    async def _register(self, item: Item, ws: Workspace, token: str) -> None:
        """Give the agent a2ad's receiver for the item's task (push_methods.agent_pushed).
        Best effort: whatever the agent answers, polling goes on."""
        url = f"{self.public_url}/workspaces/{ws.id}/pushes/{item.id}"
        config = {"id": "a2ad", "url": url, "token": token}
        params: dict[str, Any]
        if a2a.protocol_of(item.headers) == "1.0":
            method, params = "CreateTaskPushNotificationConfig", {"taskId": item.agent_task_id}
            params.update(config)
        else:
            method = "tasks/pushNotificationConfig/set"
            params = {"taskId": item.agent_task_id, "pushNotificationConfig": config}
        answer = await self._ask_agent(ws, item, method, params)
        if answer.outcome is not Outcome.FINAL or answer.parsed is None or "error" in answer.parsed:
            log.info(
                "item %s: the agent did not take a2ad's push config (%s); polling its task",
                item.id,
                answer.error or (answer.parsed or {}).get("error"),
            )

    async def _follow(self, row: Push) -> None:
        item = await self.store.get(row.item_id)
        if item is None or item.state != "delivered" or not item.agent_task_id:
            await self.store.push_sent(row.seq, now=self.clock.now())
            return
        now = self.clock.now()
        if now - row.created_at > self.max_age:
            await self.store.push_failed(
                row.seq,
                next_at=now,
                error=f"gave up following the agent's task after {self.max_age:g} s",
                max_attempts=0,
            )
            return
        last = row.payload or "{}"
        seen, error = await self._agent_task(item)
        looks = row.attempts  # looks at the agent since its task last changed
        if seen is not None:
            latest = json.dumps(seen)
            if _gist(seen) != _gist(json.loads(last)):
                await self.store.add_push_update(item.id, latest, now=now)
                self._wake.set()
                last, looks = latest, 0
            if a2a.is_terminal(seen):
                await self.store.follow_done(row.seq, task=latest, now=now)
                return
        wait = min(FOLLOW_MAX_SECONDS, FOLLOW_FIRST_SECONDS * 2 ** max(0, looks))
        await self.store.follow_again(
            row.seq, next_at=now + wait, task=last, attempts=looks, error=error
        )

    async def _agent_task(self, item: Item) -> tuple[dict[str, Any] | None, str | None]:
        """The agent's Task for the item now, or why not."""
        ws = self.registry.find(item.workspace)
        if ws is None:
            return None, f"workspace {item.workspace} is not served"
        method = "GetTask" if a2a.protocol_of(item.headers) == "1.0" else "tasks/get"
        answer = await self._ask_agent(ws, item, method, {"id": item.agent_task_id})
        if answer.outcome is not Outcome.FINAL or answer.parsed is None:
            return None, answer.error or "the agent's answer was not a JSON-RPC result"
        result = answer.parsed.get("result")
        if not isinstance(result, dict) or result.get("id") != item.agent_task_id:
            return None, "the agent's answer was not its Task"
        return result, None

    async def _ask_agent(
        self, ws: Workspace, item: Item, method: str, params: dict[str, Any]
    ) -> Answer:
        """One JSON-RPC request about the item's task, in the item's protocol version."""
        request = {"jsonrpc": "2.0", "id": f"a2ad-{item.id}", "method": method, "params": params}
        headers = {k: v for k, v in item.headers.items() if k != "Accept"}
        headers["Content-Type"] = "application/json"
        return await self.upstream.send(ws.config, json.dumps(request).encode(), headers)


def _gist(task: dict[str, Any]) -> tuple[Any, Any]:
    """What a caller is told of when it changes: the status and the artifacts (a
    GetTask that only adds history, as many agents' do, is no news)."""
    return task.get("status"), task.get("artifacts")


def _config(item: Item, config_id: str) -> dict[str, Any] | None:
    return next((c for c in configs_of(item) if c.get("id") == config_id), None)


async def _never(ws: Workspace) -> bool:
    return False
