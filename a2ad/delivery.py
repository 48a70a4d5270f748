"""The dispatcher: enqueue, the pumps, claims, deliveries, backoff, leases, the sweep.

Each workspace has one pump task. It sleeps until a trigger sets the
workspace's wakeup event (a heartbeat with free slots, a request finishing,
a sign of life after offline, new work) or until its next timer (end of a
busy pause, a due not-before), then claims as many items as admission gives
it slots for and starts one delivery task per item, each holding its slot.

Queue counts are not kept here: the store changes them as it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from . import a2a, logs
from .admission import Slot
from .agent_ids import AgentIds, agent_ids_in
from .clock import Clock
from .direct import DirectPath
from .errors import StoreUnavailable
from .metrics import Metrics
from .settings import Settings
from .store import Enqueued, Item, NewItem, QueueStore
from .upstream import Answer, Outcome, Upstream, connection_failure, iter_sse
from .watch import ResultWatch
from .workspaces import Registry, Workspace

log = logging.getLogger("a2ad.delivery")

IDLE_RECHECK_SECONDS = 5.0  # a pump with queued items re-checks at least this often
STORE_RETRY_SECONDS = 1.0


def _about(item: Item) -> dict[str, object]:
    """Log fields naming an item and the request that brought it."""
    return logs.context(item.request_id, item.id, item.workspace)


@dataclass(frozen=True, slots=True)
class Queued:
    """The answer to a queued send: the item and where it stands."""

    item: Item
    created: bool
    depth: int
    position: int


@dataclass(slots=True)
class _Claim:
    """A claim this process holds, with its lease on the monotonic clock."""

    token: str
    lapses_at: float
    running: bool = True  # renewed while its delivery runs


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


class Dispatcher:
    """Moves queued items to agents, one pump per workspace."""

    def __init__(
        self,
        settings: Settings,
        store: QueueStore,
        registry: Registry,
        upstream: Upstream,
        clock: Clock,
        *,
        metrics: Metrics,
        direct: DirectPath,
        watch: ResultWatch,
        agent_ids: AgentIds,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.queue_settings = settings.queue
        self.store = store
        self.registry = registry
        self.upstream = upstream
        self.clock = clock
        self.direct = direct
        self.watch = watch
        self.agent_ids = agent_ids
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._deliveries: set[asyncio.Task[None]] = set()
        self._returning: set[asyncio.Task[None]] = set()  # claims handed back after a cancel
        self._wake_at: dict[str, float] = {}
        self._claims: dict[str, _Claim] = {}  # item id → the claim this process holds
        self._lease_keeper: asyncio.Task[None] | None = None
        self._stopping = False
        # Replicas: whether this one holds the duty of the store's sweeps (expiry,
        # lapsed leases); a claim of its own whose delivery ended it sweeps itself.
        self.sweeps_here: Callable[[], bool] = lambda: True

    # -- life --------------------------------------------------------------

    async def start(self) -> None:
        await self.recount()
        await self.load_history(list(self.registry))
        for ws in self.registry:
            self.add_workspace(ws)
        self._lease_keeper = asyncio.create_task(self._keep_leases(), name="a2ad-leases")

    async def load_history(self, workspaces: list[Workspace]) -> None:
        """When each workspace last had an item delivered, for the replay check."""
        last = await self.store.last_delivered([ws.id for ws in workspaces])
        for ws in workspaces:
            at = last.get(ws.id)
            if at is not None and (ws.depth.last_replayable or 0.0) < at:
                ws.depth.last_replayable = at

    def add_workspace(self, ws: Workspace) -> None:
        self._pumps[ws.id] = asyncio.create_task(self._pump(ws), name=f"a2ad-pump-{ws.id}")
        self.metrics.of(ws.id)  # its series read 0 from the start, not absent
        ws.wakeup.set()  # start-up is a trigger

    async def remove_workspace(self, ws: Workspace) -> None:
        pump = self._pumps.pop(ws.id, None)
        if pump is not None:
            pump.cancel()  # a claim it was waiting for is handed back (_fill)
            await asyncio.gather(pump, return_exceptions=True)
        await self._claims_returned()
        self._wake_at.pop(ws.id, None)
        self.metrics.forget(ws.id)

    def stop_claiming(self) -> None:
        """No new claims. Pumps are woken to end, not cancelled: a claim in the
        writer would commit with no one to deliver it."""
        self._stopping = True
        for ws in self.registry:
            ws.wakeup.set()

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
        await self._claims_returned()
        # Claims whose outcome could not be written: back as they were, no attempt
        # used (the next start would charge one).
        now = self.clock.now()
        for item_id, claim in list(self._claims.items()):
            with contextlib.suppress(StoreUnavailable):
                await self.store.hand_back(item_id, claim.token, now=now)
            self._claims.pop(item_id, None)
        if self._lease_keeper is not None:
            self._lease_keeper.cancel()
            await asyncio.gather(self._lease_keeper, return_exceptions=True)

    async def recount(self) -> None:
        """Set the queue counts from the store, in the writer's order (at start-up,
        and after another process, the queue CLI, wrote to it)."""
        await self.store.recount()
        for ws in self.registry:
            ws.wakeup.set()

    # -- enqueue -------------------------------------------------------------

    async def enqueue(self, ws: Workspace, new: NewItem) -> Queued:
        """Store one item durably (the caller answers 202 only after this returns)."""
        q = self.queue_settings
        admission = ws.admission
        admission.begin_enqueue(
            self.registry.depths, max_per_workspace=q.max_depth_per_workspace, max_total=q.max_depth
        )
        try:
            write = self.store.submit_enqueue(
                new,
                now=self.clock.now(),
                replay_window=q.replay_window_seconds,
                caps=(q.max_depth_per_workspace, q.max_depth),
            )
        except BaseException:
            admission.end_enqueue()
            raise
        # The store counts the item when it commits; until then admission counts it
        # waiting, so no later send overtakes it. The write's future cannot be
        # cancelled (a Settled): a caller that leaves still waits here for the
        # write, so the count is ended once, after it, on every path.
        try:
            done: Enqueued = await write
        finally:
            self._enqueue_done(ws, write)
        if not done.created:
            return Queued(done.item, False, ws.depth.queued_total, 0)
        return Queued(done.item, True, done.depth, done.position)

    def _enqueue_done(self, ws: Workspace, write: asyncio.Future[Enqueued]) -> None:
        ws.admission.end_enqueue()
        if write.exception() is None and write.result().created:
            self.metrics.of(ws.id).enqueued.inc()

    async def cancel(self, item: Item) -> bool:
        """A queued item → cancelled, never delivered; False when it is not queued."""
        if item.state != "queued" or not await self.store.cancel(item.id, now=self.clock.now()):
            return False
        self.watch.notify(item.id, pushes=item.push is not None)
        return True

    # -- the pump ------------------------------------------------------------

    async def _pump(self, ws: Workspace) -> None:
        while not self._stopping:
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
        # Delays, each from its own clock: stored times (a not-before) on the wall
        # clock, the busy pause on the monotonic one.
        now, mono = self.clock.now(), self.clock.monotonic()
        delays = [self._wake_at.get(ws.id, now + IDLE_RECHECK_SECONDS) - now]
        paused = ws.paused(mono)
        if paused:
            delays.append(ws.paused_until - mono)
        due = ws.depth.next_due(now)
        if due is not None:
            delays.append(due - now)
        delay = max(0.0, min(delays))
        idle = ws.depth.queued_total == 0 and not paused
        if idle:
            delay = IDLE_RECHECK_SECONDS * 12
        # A timer that sets the same event: no task per wait on the hot path.
        timer = self.clock.call_later(delay, ws.wakeup.set)
        ws.admission.pump_idle = idle  # a send's item wakes it (Admission.end_enqueue)
        try:
            await ws.wakeup.wait()
        finally:
            ws.admission.pump_idle = False
            timer.cancel()

    async def _fill(self, ws: Workspace) -> None:
        """Claim while slots are free and items are due."""
        self._wake_at.pop(ws.id, None)
        admission = ws.admission
        while not self._stopping:
            reserved = admission.reserve(self.clock.monotonic())
            if not reserved:
                return
            now = self.clock.now()
            claim = self.store.submit_claim(
                ws.id,
                now=now,
                lease_seconds=self.queue_settings.lease_seconds,
                promote_after=self.queue_settings.promote_after_seconds,
                limit=reserved,
                # A store replicas share counts the agent's slots over all of them.
                cap=admission.shared_capacity(self.clock.monotonic()),
                # Awaited as it is (a shield would cost the hot path a loop turn): if
                # this pump is cancelled, the claim commits all the same, and what it
                # took is handed back.
                if_cancelled=self._return_orphaned_claim,
            )
            try:
                items = await claim
            except BaseException:
                admission.claimed(reserved, 0)
                raise
            slots = admission.claimed(reserved, len(items))
            if self._stopping:
                for slot in slots:
                    slot.release()
                await self._hand_back_unsent(items)
                return
            for item, slot in zip(items, slots, strict=True):
                self._start_delivery(ws, item, slot)
            if len(items) < reserved:
                return

    def _return_orphaned_claim(self, items: list[Item]) -> None:
        if not items:
            return
        task = asyncio.ensure_future(self._hand_back_unsent(items))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    async def _hand_back_unsent(self, items: list[Item]) -> None:
        """Claimed items never sent go back as they were: no attempt used."""
        now = self.clock.now()
        for item in items:
            assert item.claim_token is not None
            with contextlib.suppress(StoreUnavailable):  # else recovered at the next start
                await self.store.hand_back(item.id, item.claim_token, now=now)

    async def _claims_returned(self) -> None:
        while self._returning:
            await asyncio.gather(*self._returning, return_exceptions=True)

    # -- one delivery --------------------------------------------------------

    def _start_delivery(self, ws: Workspace, item: Item, slot: Slot) -> None:
        assert item.claim_token is not None
        lapses_at = self.clock.monotonic() + self.queue_settings.lease_seconds
        self._claims[item.id] = _Claim(item.claim_token, lapses_at)
        if self.watch.watched(item.id):
            event = a2a.status_event(item.id, item.context_id or "", "working", at=self.clock.now())
            self.watch.publish(item.id, event)
        task = asyncio.create_task(self._deliver(ws, item, slot), name=f"a2ad-deliver-{item.id}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, ws: Workspace, item: Item, slot: Slot) -> None:
        token = item.claim_token
        assert token is not None
        recorded = False  # the outcome is in the store: the claim is over
        try:
            with slot:
                headers = dict(item.headers)
                headers.setdefault("Content-Type", "application/json")
                if item.request_id:
                    headers["X-Request-Id"] = item.request_id
                body = await self.agent_ids.body_for_agent(item.body, item.caller, item.workspace)
                body = a2a.without_push(body)  # a2ad pushes for the queue id
                started = self.clock.now()
                if item.method in a2a.STREAM_METHODS:
                    answer = await self._send_stream(ws, item, body, headers)
                else:
                    answer = await self.upstream.send(ws.config, body, headers)
                now = self.clock.now()
                self.metrics.of(ws.id).delivery[answer.outcome].observe(now - started)
                # Before the slot frees, so the wakeup finds a busy pause in place.
                self.direct.observe(ws, answer)
            await self._record(ws, item, token, answer, started, now)
            recorded = True
        except asyncio.CancelledError:
            # Shutdown past the grace period: hand it back without using an attempt.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._settle_back(
                        ws, item, token, now=self.clock.now(), last_error="a2ad shut down"
                    )
                )
            recorded = True
            raise
        except StoreUnavailable as exc:
            # The answer could not be recorded: the lease runs out and the
            # sweep hands the item back, so it is delivered again later.
            log.error(
                "item %s: cannot record the outcome: %s", item.id, exc.message, extra=_about(item)
            )
        except Exception:
            log.exception("item %s: delivery error", item.id, extra=_about(item))
        finally:
            claim = self._claims.get(item.id)
            if claim is not None and claim.token == token:  # not a later claim of the item
                if recorded:
                    del self._claims[item.id]
                else:
                    claim.running = False  # no renewals: it lapses and the sweep takes it

    async def _record(
        self, ws: Workspace, item: Item, token: str, answer: Answer, started: float, now: float
    ) -> None:
        if answer.outcome is Outcome.BUSY:
            log.info(
                "item %s: %s; workspace %s paused until %s",
                item.id,
                answer.error,
                ws.id,
                a2a.timestamp(ws.admission.paused_until_wall()),
                extra=_about(item),
            )
            await self._settle_back(ws, item, token, now=now, busy=True, last_error=answer.error)
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
        if settled:  # else the sweep took it back: it is counted when delivered again
            metrics = self.metrics.of(ws.id)
            metrics.delivered.inc()
            metrics.wait.observe(started - item.enqueued_at)
        self.watch.notify(item.id, pushes=item.push is not None)

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
            self.watch.notify(item.id, pushes=item.push is not None)
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
                    self.watch.publish(item.id, relabelled)
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
        await self.store.hand_back(
            item.id,
            token,
            now=now,
            not_before=not_before,
            attempt_used=attempt_used,
            busy=busy,
            last_error=last_error,
        )
        ws.wakeup.set()  # the pump plans its next wake (a pause, a backoff) anew

    # -- leases ----------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Renew every running delivery's lease each lease_seconds / 3, all in one
        write, so a long call is never taken for a dead one."""
        lease = self.queue_settings.lease_seconds
        while True:
            await self.clock.sleep(lease / 3)
            running = {i: c.token for i, c in self._claims.items() if c.running}
            if not running:
                continue
            renewed_at = self.clock.monotonic()
            try:
                lost = await self.store.renew(
                    running, lease_until=self.clock.now() + lease, now=self.clock.now()
                )
            except StoreUnavailable as exc:
                log.warning("cannot renew leases: %s", exc.message)
                continue
            except Exception:
                log.exception("lease renewal failed; continuing")
                continue
            for item_id, token in running.items():
                claim = self._claims.get(item_id)
                if claim is None or claim.token != token:
                    continue
                if item_id in lost:
                    log.warning("item %s: claim lost while delivering", item_id)
                    self._claims.pop(item_id, None)
                else:
                    claim.lapses_at = renewed_at + lease

    # -- housekeeping ---------------------------------------------------------

    async def sweep(self) -> None:
        """Expire due items and return claims whose lease lapsed (once a second).
        Within this process a delivery that still runs is alive by definition
        (its own timeout bounds it), so only claims whose delivery ended without
        an outcome lapse; on the monotonic clock, so a step of the wall clock
        changes nothing."""
        now = self.clock.now()
        sweeps = self.sweeps_here()
        expired = await self.store.expire_due(now=now) if sweeps else []
        for released in expired:
            log.info(
                "item %s expired before delivery",
                released.id,
                extra=logs.context(item=released.id, workspace=released.workspace),
            )
            self.metrics.of(released.workspace).expired.inc()
            self.watch.notify(released.id)
        mono = self.clock.monotonic()
        lapsed = {
            i: c.token for i, c in self._claims.items() if not c.running and c.lapses_at < mono
        }
        swept = []
        if lapsed:
            swept = await self.store.release_claims(
                lapsed, now=now, max_attempts=self.queue_settings.max_attempts
            )
            for item_id, token in lapsed.items():
                claim = self._claims.get(item_id)
                if claim is not None and claim.token == token:
                    del self._claims[item_id]
        if self.store.is_server and sweeps:
            # A claim no delivery of this process holds: the server crashed and
            # kept a claim but not its outcome, or a claim committed while its
            # answer was lost. Its stored lease says when it is free again.
            swept += await self.store.sweep_leases(
                now=now,
                max_attempts=self.queue_settings.max_attempts,
                except_tokens=[c.token for c in self._claims.values()],
            )
        for released in swept:
            log.warning(
                "item %s: lease expired; now %s",
                released.id,
                released.state,
                extra=logs.context(item=released.id, workspace=released.workspace),
            )
            if released.state == "failed":
                self.metrics.of(released.workspace).failed.inc()
            self.watch.notify(released.id)
            ws = self.registry.find(released.workspace)
            if ws is not None:
                ws.wakeup.set()
