"""The dispatcher: enqueue, triggers, claim, send, settle; and waiting for results.

Each workspace has one pump task. It sleeps until a trigger sets the
workspace's wakeup event (a heartbeat with free slots, a request finishing,
a sign of life after offline, new work) or until its next timer (end of a
busy pause, a due not-before), then claims as many items as there are free
slots and starts one delivery task per item.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import a2a, logs
from .clock import Clock
from .errors import QueueFull, StoreUnavailable
from .metrics import Metrics
from .settings import Settings
from .store import Enqueued, Item, NewItem, Store
from .upstream import Answer, Opened, Outcome, Upstream, connection_failure, iter_sse
from .workspaces import Registry, Workspace

log = logging.getLogger("a2ad.delivery")

IDLE_RECHECK_SECONDS = 5.0  # a pump with queued items re-checks at least this often
STORE_RETRY_SECONDS = 1.0


def _about(item: Item) -> dict[str, Any]:
    """Log fields naming an item and the request that brought it."""
    return logs.context(item.request_id, item.id, item.workspace)


@dataclass(frozen=True, slots=True)
class Queued:
    """The answer to a queued send: the item and where it stands."""

    item: Item
    created: bool
    depth: int
    position: int


def result_for(answer: Answer, max_result_bytes: int) -> bytes:
    """What is stored as an item's result for a final answer."""
    if answer.too_large:
        error = a2a.rpc_error(
            None,
            -32000,
            f"the agent's answer was over max_result_bytes ({max_result_bytes})",
            {"code": "result_too_large"},
        )
        return json.dumps(error).encode()
    return answer.body


def agent_ids_in(result: bytes, parsed: Any = None) -> tuple[str | None, str | None]:
    """The agent's own task and context ids in its answer (`parsed`, when the
    body was parsed already), when it made a Task."""
    try:
        answer = a2a.read_answer(json.loads(result) if parsed is None else parsed)
    except (ValueError, RecursionError):
        return None, None
    if answer.kind != "task":
        return None, None
    task_id, context_id = answer.value.get("id"), answer.value.get("contextId")
    return (
        task_id if isinstance(task_id, str) else None,
        context_id if isinstance(context_id, str) else None,
    )


class Dispatcher:
    """Moves queued items to agents, one pump per workspace."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: Registry,
        upstream: Upstream,
        clock: Clock,
        *,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.queue_settings = settings.queue
        self.store = store
        self.registry = registry
        self.upstream = upstream
        self.clock = clock
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._deliveries: set[asyncio.Task[None]] = set()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any] | None]]] = {}
        self._wake_at: dict[str, float] = {}
        self._claims: dict[str, str] = {}  # running deliveries: item id → claim token
        self._lease_keeper: asyncio.Task[None] | None = None
        self._stopping = False
        # Liveness listens here for refused connections, timeouts and long busy spells.
        self.on_failure_signal: Callable[[Workspace, str], None] = lambda ws, reason: None

    # -- life --------------------------------------------------------------

    async def start(self) -> None:
        await self.recount()
        for ws in self.registry:
            self.add_workspace(ws)
        self._lease_keeper = asyncio.create_task(self._keep_leases(), name="a2ad-leases")

    def add_workspace(self, ws: Workspace) -> None:
        self._pumps[ws.id] = asyncio.create_task(self._pump(ws), name=f"a2ad-pump-{ws.id}")
        self.metrics.of(ws.id)  # its series read 0 from the start, not absent
        ws.wakeup.set()  # start-up is a trigger

    async def remove_workspace(self, ws: Workspace) -> None:
        pump = self._pumps.pop(ws.id, None)
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        self._wake_at.pop(ws.id, None)
        self.metrics.forget(ws.id)

    def stop_claiming(self) -> None:
        self._stopping = True
        for pump in self._pumps.values():
            pump.cancel()

    async def stop(self, grace: float) -> None:
        """Stop claiming; let deliveries finish for `grace` seconds, then hand them back."""
        self.stop_claiming()
        await asyncio.gather(*self._pumps.values(), return_exceptions=True)
        self._pumps.clear()
        if self._deliveries:
            log.info("waiting up to %g s for %d deliveries", grace, len(self._deliveries))
            _, pending = await asyncio.wait(set(self._deliveries), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._lease_keeper is not None:
            self._lease_keeper.cancel()
            await asyncio.gather(self._lease_keeper, return_exceptions=True)

    # -- counters ----------------------------------------------------------

    async def recount(self) -> None:
        """Set every workspace's counters from the store (start-up, CLI writes)."""
        queued = await self.store.queued_by_priority()
        counts = await self.store.counts()
        latest = await self.store.last_enqueued()
        for ws in self.registry:
            ws.last_queued_at = latest.get(ws.id)
            ws.set_counts(queued.get(ws.id, {}), counts.get(ws.id, {}).get("dispatching", 0))
            ws.wakeup.set()

    # -- enqueue -------------------------------------------------------------

    async def enqueue(self, ws: Workspace, new: NewItem) -> Queued:
        """Store one item durably (the caller answers 202 only after this returns)."""
        q = self.queue_settings
        if ws.queued_total + ws.dispatching >= q.max_depth_per_workspace:
            raise QueueFull(
                f"workspace {ws.id!r} has {q.max_depth_per_workspace} items waiting"
                " (queue.max_depth_per_workspace); try again later",
                retry_after=5,
            )
        if self.registry.totals.live >= q.max_depth:
            raise QueueFull(
                f"a2ad holds {q.max_depth} items (queue.max_depth); try again later", retry_after=5
            )
        # Counted before the write, so concurrent sends cannot overshoot a cap,
        # and each learns its place in the order the store will commit them.
        ws.add_queued(new.priority, 1)
        depth = ws.queued_total
        position = sum(n for p, n in ws.queued.items() if p >= new.priority)
        try:
            write = self.store.submit_enqueue(
                new, now=self.clock.now(), replay_window=q.replay_window_seconds
            )
            done: Enqueued = await asyncio.shield(write)
        except asyncio.CancelledError:  # only the await is cancelled: `write` exists
            # The caller left, but the write goes on and may commit: count the item
            # by what the store did, or the pump would not know it waits.
            write.add_done_callback(lambda w: self._count_enqueued(ws, new.priority, w))
            raise
        except BaseException:
            ws.add_queued(new.priority, -1)
            raise
        self._count_enqueued(ws, new.priority, write)
        if not done.created:
            depth, position = ws.queued_total, 0
        return Queued(done.item, done.created, depth, position)

    def _count_enqueued(
        self, ws: Workspace, priority: int, write: asyncio.Future[Enqueued]
    ) -> None:
        """Settle the count taken before an enqueue's write by what the write did."""
        failed = write.cancelled() or write.exception() is not None
        if failed or not write.result().created:
            ws.add_queued(priority, -1)
        else:
            ws.last_queued_at = self.clock.now()
            self.metrics.of(ws.id).enqueued.inc()
        ws.wakeup.set()

    # -- the agent's ids ---------------------------------------------------------

    async def agent_ids(self, body: Any, caller: str) -> dict[str, Any] | None:
        """The request with queue ids, and the context ids a2ad made, replaced by the
        agent's own ids; None when nothing names them. Only the caller's own items."""
        params = body.get("params") if isinstance(body, dict) else None
        if not isinstance(params, dict):
            return None
        new_params = dict(params)
        message = params.get("message")
        new_message = dict(message) if isinstance(message, dict) else None
        changed = False
        for holder in (new_params, new_message):
            if holder is None:
                continue
            for key in ("id", "taskId", "contextId"):
                value = holder.get(key)
                if not isinstance(value, str):
                    continue
                if key == "contextId" and value.startswith(a2a.CONTEXT_PREFIX):
                    mapped = await self.store.agent_context(value, caller)
                elif key != "contextId" and value.startswith("q-"):
                    item = await self.store.get(value)
                    ok = item is not None and item.caller == caller
                    mapped = item.agent_task_id if ok and item is not None else None
                else:
                    continue
                if mapped:
                    holder[key] = mapped
                    changed = True
        if not changed:
            return None
        if new_message is not None:
            new_params["message"] = new_message
        return {**body, "params": new_params}

    async def body_for_agent(self, raw: bytes, caller: str, body: Any = None) -> bytes:
        """`raw`, unless it names ids the agent knows by other names (stored bodies
        are never rewritten; this is what goes on the wire)."""
        if not a2a.may_name_a2ad_ids(raw):
            return raw  # nothing to look up or parse
        rewritten = await self.agent_ids(json.loads(raw) if body is None else body, caller)
        return raw if rewritten is None else json.dumps(rewritten).encode()

    # -- what answers tell -------------------------------------------------------

    def observe(self, ws: Workspace, answer: Answer, now: float | None = None) -> None:
        """Learn from an agent's answer: a busy pause, a sign of life, a failure signal."""
        if now is None:
            now = self.clock.now()
        if answer.outcome is Outcome.BUSY:
            self.metrics.of(ws.id).busy.inc()
            ws.note_busy(answer.retry_after, now, answered=answer.reached_agent)
            window = self.settings.liveness.debounce_window_seconds
            if ws.busy_since is not None and now - ws.busy_since > window:
                self.on_failure_signal(ws, f"busy for over {window:g} s")
        elif answer.reached_agent:
            ws.note_answer(now)
        if answer.refused or answer.timed_out:
            self.on_failure_signal(ws, answer.error or "no answer")

    # -- the direct path -------------------------------------------------------

    def may_replay(self, ws: Workspace) -> bool:
        """Could a send to `ws` repeat a messageId that went through the queue within
        the replay window? Only then does `seen_before` need the store; the fast
        path pays nothing while the workspace has queued nothing within the window."""
        last = ws.last_queued_at
        window = self.queue_settings.replay_window_seconds
        return bool(ws.dispatching) or (last is not None and self.clock.now() - last <= window)

    async def seen_before(self, ws: Workspace, caller: str, message_id: str | None) -> bool:
        """Does this messageId belong to an item that is live, or was delivered within
        the replay window? Then the send takes the queue path, which answers for it
        instead of delivering it again."""
        if message_id is None or not self.may_replay(ws):
            return False
        item = await self.store.find_message(ws.id, caller, message_id)
        if item is None:
            return False
        if item.state in ("queued", "dispatching"):
            return True
        window = self.queue_settings.replay_window_seconds
        return item.state == "delivered" and (
            item.finished_at is not None and self.clock.now() - item.finished_at <= window
        )

    async def send_direct(self, ws: Workspace, body: bytes, headers: Mapping[str, str]) -> Answer:
        """Forward a message send in a slot of its own, free again when it returns."""
        ws.in_flight += 1
        try:
            started = self.clock.now()
            answer = await self.upstream.send(ws.config, body, headers)
            ended = self.clock.now()
            self.metrics.of(ws.id).proxy[answer.outcome].observe(ended - started)
            self.observe(ws, answer, ended)
            return answer
        finally:
            self._slot_freed(ws)

    @contextlib.asynccontextmanager
    async def open_direct(
        self, ws: Workspace, body: bytes, headers: Mapping[str, str]
    ) -> AsyncIterator[Opened]:
        """Forward a streaming send in a slot of its own. The slot is held while the
        block runs (the relayed stream) and is free again, at once, when it ends."""
        ws.in_flight += 1
        opened: Opened | None = None
        try:
            started = self.clock.now()
            opened = await self.upstream.open(ws.config, body, headers)
            ended = self.clock.now()
            outcome = Outcome.FINAL if opened.answer is None else opened.answer.outcome
            self.metrics.of(ws.id).proxy[outcome].observe(ended - started)
            if opened.answer is not None:
                self.observe(ws, opened.answer, ended)
            else:
                ws.note_answer(ended)
            yield opened
        finally:
            if opened is not None and opened.stream is not None:
                opened.stream.release()
            self._slot_freed(ws)

    def _slot_freed(self, ws: Workspace) -> None:
        ws.in_flight -= 1
        if ws.queued_total:
            ws.wakeup.set()  # a slot freed for the items that wait

    # -- results -------------------------------------------------------------

    async def cancel(self, item: Item) -> bool:
        """A queued item → cancelled, never delivered; False when it is not queued."""
        if item.state != "queued" or not await self.store.cancel(item.id, now=self.clock.now()):
            return False
        ws = self.registry.find(item.workspace)
        if ws is not None:
            ws.add_queued(item.priority, -1)
        self.notify(item.id)
        return True

    def notify(self, item_id: str) -> None:
        """The item is final: wake its waiters and end its streams."""
        for future in self._waiters.pop(item_id, ()):
            if not future.done():
                future.set_result(None)
        for queue in self._subscribers.get(item_id, ()):
            queue.put_nowait(None)

    def subscribe(self, item_id: str) -> asyncio.Queue[dict[str, Any] | None]:
        """Events of the item's one Task (v0.3 shape), then None when it is final."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._subscribers.setdefault(item_id, set()).add(queue)
        return queue

    def unsubscribe(self, item_id: str, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        queues = self._subscribers.get(item_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[item_id]

    def publish(self, item_id: str, event: dict[str, Any]) -> None:
        for queue in self._subscribers.get(item_id, ()):
            queue.put_nowait(event)

    async def wait_final(self, item_id: str, seconds: float) -> Item | None:
        """The item, once final or after `seconds` (None if it does not exist)."""
        deadline = self.clock.now() + seconds
        while True:
            # Listen before reading, so a settle between the two is not missed.
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters = self._waiters.setdefault(item_id, set())
            waiters.add(future)
            try:
                item = await self.store.get(item_id)
                remaining = deadline - self.clock.now()
                if item is None or item.is_final or remaining <= 0:
                    return item
                # Re-read at least once a second: the queue CLI may settle it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(future, min(remaining, 1.0))
            finally:
                waiters.discard(future)
                if not waiters and self._waiters.get(item_id) is waiters:
                    del self._waiters[item_id]

    # -- the pump ------------------------------------------------------------

    async def _pump(self, ws: Workspace) -> None:
        while True:
            try:
                await self._sleep_until_trigger(ws)
                ws.wakeup.clear()
                await self._fill(ws)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                log.warning("workspace %s: cannot claim: %s", ws.id, exc.message)
                self._wake_at[ws.id] = self.clock.now() + STORE_RETRY_SECONDS
            except Exception:
                log.exception("workspace %s: dispatcher error; continuing", ws.id)
                self._wake_at[ws.id] = self.clock.now() + STORE_RETRY_SECONDS

    async def _sleep_until_trigger(self, ws: Workspace) -> None:
        if ws.wakeup.is_set():
            return
        now = self.clock.now()
        timers = [self._wake_at.get(ws.id, now + IDLE_RECHECK_SECONDS)]
        if ws.paused(now):
            timers.append(ws.paused_until)
        delay = max(0.0, min(timers) - now)
        if ws.queued_total == 0 and not ws.paused(now):
            delay = IDLE_RECHECK_SECONDS * 12
        # A timer that sets the same event: no task per wait on the hot path.
        timer = self.clock.call_later(delay, ws.wakeup.set)
        try:
            await ws.wakeup.wait()
        finally:
            timer.cancel()

    async def _fill(self, ws: Workspace) -> None:
        """Claim while slots are free and items are due."""
        self._wake_at.pop(ws.id, None)
        while not self._stopping:
            now = self.clock.now()
            if ws.queued_total <= 0 or not ws.can_deliver(now):
                return
            slots = ws.free_slots(now)
            ws.in_flight += slots  # reserved while the claim runs
            try:
                items = await self.store.claim(
                    ws.id,
                    now=now,
                    lease_seconds=self.queue_settings.lease_seconds,
                    promote_after=self.queue_settings.promote_after_seconds,
                    limit=slots,
                )
            finally:
                ws.in_flight -= slots
            for item in items:
                self._start_delivery(ws, item)
            if len(items) < slots:
                await self._plan_next(ws, now)
                return

    async def _plan_next(self, ws: Workspace, now: float) -> None:
        """Nothing more is due now: wake at the next not-before, or recount."""
        due = await self.store.next_due(ws.id, now=now)
        if due is not None:
            self._wake_at[ws.id] = due
        elif ws.queued_total > 0:
            # The counters say items wait but none is due and none is in
            # backoff: another process changed the store. Trust the store.
            queued = await self.store.queued_by_priority()
            ws.set_counts(queued.get(ws.id, {}), ws.dispatching)

    # -- one delivery --------------------------------------------------------

    def _start_delivery(self, ws: Workspace, item: Item) -> None:
        ws.in_flight += 1
        ws.add_queued(item.priority, -1)
        ws.add_dispatching(1)
        if self._subscribers.get(item.id):
            event = a2a.status_event(item.id, item.context_id or "", "working", at=self.clock.now())
            self.publish(item.id, event)
        task = asyncio.create_task(self._deliver(ws, item), name=f"a2ad-deliver-{item.id}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, ws: Workspace, item: Item) -> None:
        token = item.claim_token
        assert token is not None
        slot_held = True

        def free_slot() -> None:
            nonlocal slot_held
            if slot_held:
                slot_held = False
                ws.in_flight -= 1
                ws.wakeup.set()  # a slot freed: the next item goes now

        self._claims[item.id] = token  # the lease keeper renews it while we work
        try:
            headers = dict(item.headers)
            headers.setdefault("Content-Type", "application/json")
            if item.request_id:
                headers["X-Request-Id"] = item.request_id
            body = await self.body_for_agent(item.body, item.caller)
            started = self.clock.now()
            if item.method in a2a.STREAM_METHODS:
                answer = await self._send_stream(ws, item, body, headers)
            else:
                answer = await self.upstream.send(ws.config, body, headers)
            self._claims.pop(item.id, None)
            now = self.clock.now()
            metrics = self.metrics.of(ws.id)
            metrics.delivery[answer.outcome].observe(now - started)
            # Before the slot frees, so the wakeup finds a busy pause in place.
            self.observe(ws, answer)
            free_slot()
            if answer.outcome is Outcome.BUSY:
                log.info(
                    "item %s: %s; workspace %s paused until %s",
                    item.id,
                    answer.error,
                    ws.id,
                    a2a.timestamp(ws.paused_until),
                    extra=_about(item),
                )
                await self._settle_back(
                    ws, item, token, now=now, busy=True, last_error=answer.error
                )
                return
            if answer.outcome is Outcome.FAILURE:
                await self._failed_attempt(ws, item, token, answer, now)
                return
            result = result_for(answer, self.upstream.max_result_bytes)
            task_id, context_id = agent_ids_in(result, answer.parsed)
            settled = await self.store.settle(
                item.id,
                token,
                state="delivered",
                now=now,
                result=result,
                agent_task_id=task_id,
                agent_context_id=context_id,
                last_error=answer.error,
            )
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "item %s delivered to %s (HTTP %s; request %s)",
                    item.id,
                    ws.id,
                    answer.status,
                    item.request_id,
                    extra=_about(item),
                )
            if settled:  # else the sweeper took it back: it is counted when delivered again
                metrics.delivered.inc()
                metrics.wait.observe(started - item.enqueued_at)
            self._settled(ws, item)
        except asyncio.CancelledError:
            # Shutdown past the grace period: hand it back without using an attempt.
            free_slot()
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._settle_back(
                        ws, item, token, now=self.clock.now(), last_error="a2ad shut down"
                    )
                )
            raise
        except StoreUnavailable as exc:
            # The answer could not be recorded: the lease runs out and the
            # sweeper hands the item back, so it is delivered again later.
            log.error(
                "item %s: cannot record the outcome: %s", item.id, exc.message, extra=_about(item)
            )
            free_slot()
        except Exception:
            log.exception("item %s: delivery error", item.id, extra=_about(item))
            free_slot()
        finally:
            self._claims.pop(item.id, None)

    async def _failed_attempt(
        self, ws: Workspace, item: Item, token: str, answer: Answer, now: float
    ) -> None:
        attempts = item.attempts + 1
        if attempts >= self.queue_settings.max_attempts:
            settled = await self.store.settle(
                item.id, token, state="failed", now=now, last_error=answer.error, attempt_used=True
            )
            if settled:
                self.metrics.of(ws.id).failed.inc()
            log.warning(
                "item %s failed after %d attempts (request %s): %s",
                item.id,
                attempts,
                item.request_id,
                answer.error,
                extra=_about(item),
            )
            self._settled(ws, item)
            return
        delay = self.backoff(attempts)
        log.info(
            "item %s: attempt %d failed (%s); next in %.1f s",
            item.id,
            attempts,
            answer.error,
            delay,
            extra=_about(item),
        )
        await self._settle_back(
            ws,
            item,
            token,
            now=now,
            not_before=now + delay,
            attempt_used=True,
            last_error=answer.error,
        )

    async def _send_stream(
        self, ws: Workspace, item: Item, body: bytes, headers: dict[str, str]
    ) -> Answer:
        """Deliver a streaming send: relay the agent's events to the item's
        subscribers under the queue id, and keep the Task they add up to."""
        opened = await self.upstream.open(ws.config, body, headers)
        if opened.answer is not None:
            return opened.answer
        assert opened.stream is not None
        context_id = item.context_id or ""
        assembler = a2a.TaskAssembler(item.agent_task_id or "", context_id)
        try:
            async for data in iter_sse(opened.stream):
                try:
                    message = json.loads(data)
                except ValueError:
                    log.warning("item %s: the agent sent an event that is not JSON", item.id)
                    continue
                if isinstance(message, dict) and isinstance(message.get("error"), dict):
                    return Answer(Outcome.FINAL, 200, json.dumps(message).encode())
                event = a2a.read_event(message.get("result") if isinstance(message, dict) else None)
                if event is None:
                    continue
                assembler.add(event)
                for relabelled in a2a.relabel(event, item.id, context_id, at=self.clock.now()):
                    self.publish(item.id, relabelled)
        except Exception as exc:
            return connection_failure(exc, ws.config.request_timeout_seconds)
        finally:
            opened.stream.release()
        try:
            rpc_id = json.loads(item.body).get("id")
        except (ValueError, AttributeError):
            rpc_id = None
        result = json.dumps(a2a.rpc_result(rpc_id, assembler.task)).encode()
        if len(result) > self.upstream.max_result_bytes:
            return Answer(Outcome.FINAL, 200, too_large=True)
        return Answer(Outcome.FINAL, 200, result)

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with full jitter in its upper half."""
        q = self.queue_settings
        ceiling = min(q.backoff_max_seconds, q.backoff_base_seconds * 2 ** (attempts - 1))
        return float(ceiling / 2 + random.random() * ceiling / 2)

    async def _settle_back(
        self,
        ws: Workspace,
        item: Item,
        token: str,
        *,
        now: float,
        not_before: float = 0.0,
        attempt_used: bool = False,
        busy: bool = False,
        last_error: str | None = None,
    ) -> None:
        if await self.store.hand_back(
            item.id,
            token,
            now=now,
            not_before=not_before,
            attempt_used=attempt_used,
            busy=busy,
            last_error=last_error,
        ):
            ws.add_queued(item.priority, 1)
        ws.add_dispatching(-1)
        if not_before:
            self._wake_at[ws.id] = min(self._wake_at.get(ws.id, not_before), not_before)
        ws.wakeup.set()

    def _settled(self, ws: Workspace, item: Item) -> None:
        ws.add_dispatching(-1)
        self.notify(item.id)

    async def _keep_leases(self) -> None:
        """Renew every running delivery's lease each lease_seconds / 3, all in one
        write, so a long call is never taken for a dead one."""
        lease = self.queue_settings.lease_seconds
        while True:
            await self.clock.sleep(lease / 3)
            if not self._claims:
                continue
            now = self.clock.now()
            try:
                lost = await self.store.renew(dict(self._claims), lease_until=now + lease, now=now)
            except StoreUnavailable as exc:
                log.warning("cannot renew leases: %s", exc.message)
                continue
            except Exception:
                log.exception("lease renewal failed; continuing")
                continue
            for item_id in lost:
                log.warning("item %s: claim lost while delivering", item_id)
                self._claims.pop(item_id, None)

    # -- housekeeping ---------------------------------------------------------

    async def sweep(self) -> None:
        """Expire due items and return items with lapsed leases (once a second)."""
        now = self.clock.now()
        expired = await self.store.expire_due(now=now)
        swept = await self.store.sweep_leases(
            now=now, max_attempts=self.queue_settings.max_attempts
        )
        for released in expired:
            log.info(
                "item %s expired before delivery",
                released.id,
                extra=logs.context(item=released.id, workspace=released.workspace),
            )
            self.metrics.of(released.workspace).expired.inc()
            self.notify(released.id)
        for released in swept:
            log.warning(
                "item %s: lease expired; now %s",
                released.id,
                released.state,
                extra=logs.context(item=released.id, workspace=released.workspace),
            )
            if released.state == "failed":
                self.metrics.of(released.workspace).failed.inc()
            self.notify(released.id)
        if expired or swept:
            await self.recount()
