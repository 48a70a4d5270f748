"""The Daemon: builds a2ad's parts from Settings, starts and stops them in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from pydantic import ValidationError

from . import systemd
from .agent_ids import AgentIds
from .agent_urls import AgentResolver, refused_literal
from .auth import Auth
from .cards import Cards
from .clock import Cancellable, Clock
from .delivery import Dispatcher
from .direct import DirectPath
from .errors import StoreUnavailable
from .liveness import Liveness
from .metrics import Metrics
from .push import Pusher
from .replicas import Replicas
from .settings import Settings, WorkspaceSettings
from .shared_slots import SharedSlots
from .store import QueueStore, StoreLock, migrations_for, open_store
from .store.base import ReplicaStore
from .upstream import Upstream
from .watch import ResultWatch
from .workspaces import Registry, Workspace

log = logging.getLogger("a2ad")

HOUSEKEEPING_SECONDS = 1.0
# Another replica's commits are counted again this long after the first that told
# of them: soon enough that this replica's queue counts are near the store's (a
# send it would queue for items long delivered), seldom enough under load.
TOLD_RECOUNT_SECONDS = 0.1
CLOCK_CHECK_SECONDS = 60.0  # how often the store's clock is measured again
SLOW_RECOUNT_SECONDS = 60.0  # how often a server store is counted again, untold
# Not stored with a run-time workspace: a path, and agent credentials, which only
# the config file gives (PUT /workspaces/{id} refuses them).
RUNTIME_EXCLUDED = frozenset({"token_file", "agent_token", "agent_token_file", "agent_headers"})
RETENTION_EVERY_SECONDS = 60.0


class Daemon:
    """Everything one running a2ad holds: store, registry, dispatcher, upstream, auth."""

    def __init__(
        self, settings: Settings, *, clock: Clock | None = None, lock: StoreLock | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self.lock = lock
        self.store: QueueStore = open_store(settings.store)
        # Replicas serve a server store (PostgreSQL); each has its name there.
        self.replica_id = settings.store.replica_id if self.store.is_server else None
        self.registry = Registry(
            settings.liveness, self.clock, self.store.depths, replica=self.replica_id
        )
        for ws in settings.workspaces:
            self.registry.add(ws)
        self.auth = Auth(settings)
        self.cards = Cards(settings.server.base_url, self.clock)
        self.upstream = Upstream(
            max_result_bytes=settings.server.max_result_bytes,
            resolver=lambda: AgentResolver(
                trusted_urls=[ws.url for ws in settings.workspaces],
                allow_link_local=settings.auth.allow_link_local_agents,
            ),
        )
        self.metrics = Metrics(self.registry, replica=self.replica_id)
        self.watch = ResultWatch(self.store, self.clock, max_held=settings.queue.max_held)
        self.agent_ids = AgentIds(self.store)
        self.direct = DirectPath(settings, self.store, self.upstream, self.clock, self.metrics)
        self.shared_slots: SharedSlots | None = None
        if self.store.is_server:
            cast(ReplicaStore, self.store).on_change = self._told
            self.shared_slots = SharedSlots(
                cast(ReplicaStore, self.store),
                self.clock,
                lease_seconds=settings.queue.lease_seconds,
            )
        self.dispatcher = Dispatcher(
            settings,
            self.store,
            self.registry,
            self.upstream,
            self.clock,
            metrics=self.metrics,
            direct=self.direct,
            watch=self.watch,
            agent_ids=self.agent_ids,
        )
        self.pusher = Pusher(
            settings, self.store, self.clock, self.metrics, self.registry, self.upstream
        )
        self.watch.on_final = self.pusher.final
        self.pusher.agent_pushes = self.agent_pushes
        self.liveness = Liveness(settings.liveness, self.registry, self.clock)
        self.direct.on_failure_signal = self.liveness.signal
        self.replicas: Replicas | None = None
        if self.store.is_server:
            self.replicas = Replicas(
                cast(ReplicaStore, self.store),
                self.registry,
                self.clock,
                self.liveness,
                heartbeat_timeout=settings.liveness.heartbeat_timeout_seconds,
                workspace_changed=self._runtime_changed,
            )
            replicas = self.replicas
            self.dispatcher.sweeps_here = lambda: replicas.sweeps
            self.metrics.collector.duties = lambda: replicas.held
            self.direct.on_pause = replicas.paused
        self._loops: list[asyncio.Task[None]] = []
        self._owns_lock = False
        self._data_version: int | None = None
        self._told_recount: Cancellable | None = None
        self._recounting: asyncio.Future[None] | None = None
        self.loops_running = False

    async def start(self) -> None:
        """Take the store (lock, migrations, recovery), then start the loops."""
        postgres = self.settings.store.is_postgres
        if self.lock is None and not postgres:
            self.lock = StoreLock(self.settings.store.path)
            self.lock.acquire()
            self._owns_lock = True
        await self.store.open()
        try:
            await self.store.take_ownership(self.replica_id)  # PostgreSQL: advisory locks
            if postgres:
                await self._refuse_other_schema()
            else:
                for migration in await self.store.migrate():
                    log.info("store migrated to version %d (%s)", migration.version, migration.name)
            await self._follow_store_clock()
        except BaseException:
            await self.store.close()
            raise
        # Under the file's lock, every dispatching row belongs to a dead process; on
        # PostgreSQL, those whose lease lapsed (other replicas hold the live ones).
        recovered = await self.store.recover_dispatching(
            now=self.clock.now(), max_attempts=self.settings.queue.max_attempts
        )
        if recovered:
            log.warning("recovered %d items a previous a2ad was delivering", len(recovered))
        for saved in await self.store.load_workspaces():
            self._add_runtime(saved)
        if self.replicas is not None:
            await self.replicas.renew()  # its duties, before its loops act on them
            await self.replicas.load_heartbeats()
        await self.upstream.start()
        await self.liveness.start(self.upstream)
        # From here on, a commit by another process (the queue CLI) means a recount
        # (read before the start-up recount, so a commit between the two is seen).
        self._data_version = await self.store.data_version()
        await self.dispatcher.start()
        await self.pusher.start()
        self._loops = [
            asyncio.create_task(
                self._every(HOUSEKEEPING_SECONDS, self._housekeeping), name="a2ad-housekeeping"
            ),
            asyncio.create_task(
                self._every(RETENTION_EVERY_SECONDS, self._retention), name="a2ad-retention"
            ),
            asyncio.create_task(
                self._every(self.settings.liveness.probe_interval_seconds, self.liveness.tick),
                name="a2ad-probes",
            ),
        ]
        if self.shared_slots is not None and self.replicas is not None:
            self._loops += [
                asyncio.create_task(self.shared_slots.keep(), name="a2ad-slot-leases"),
                asyncio.create_task(
                    self._every(HOUSEKEEPING_SECONDS, self.replicas.renew), name="a2ad-duties"
                ),
                asyncio.create_task(
                    self._every(CLOCK_CHECK_SECONDS, self._follow_store_clock), name="a2ad-clock"
                ),
                # The slow poll behind LISTEN/NOTIFY, for a change no notification told of.
                asyncio.create_task(
                    self._every(SLOW_RECOUNT_SECONDS, self._slow_recount),
                    name="a2ad-recount",
                ),
            ]
        self.loops_running = True
        log.info("a2ad started: %d workspaces", len(self.registry))

    def begin_shutdown(self) -> None:
        """Stop claiming at once, before the listener and in-flight requests wind down;
        held blocking sends and long polls are answered with the item as it is."""
        self.dispatcher.stop_claiming()
        self.watch.close()

    async def stop(self) -> None:
        """Stop claiming, let deliveries finish within the grace period, close the store."""
        self.loops_running = False
        systemd.notify("STOPPING=1")
        if self._told_recount is not None:
            self._told_recount.cancel()
        jobs = [*self._loops, *([self._recounting] if self._recounting else [])]
        for task in jobs:
            task.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await self.liveness.stop()
        await self.dispatcher.stop(self.settings.server.shutdown_grace_seconds)
        await self.pusher.stop()
        if self.shared_slots is not None:
            await self.shared_slots.close()
        if self.replicas is not None:
            await self.replicas.stop()
        await self.upstream.close()
        await self.store.close()
        if self._owns_lock and self.lock is not None:
            self.lock.release()
        log.info("a2ad stopped")

    # -- run-time workspaces ------------------------------------------------

    def _add_runtime(self, saved: dict[str, Any]) -> Workspace | None:
        try:
            config = WorkspaceSettings(**saved)
        except ValidationError as exc:
            log.error("stored workspace %s is not valid any more: %s", saved.get("id"), exc)
            return None
        if self.registry.find(config.id) is not None:
            log.warning("stored workspace %s is now in the config file; the file wins", config.id)
            return None
        why = refused_literal(config.url)
        if why and not self.settings.auth.allow_link_local_agents:
            # Registered while the operator allowed it, refused now: not served.
            log.error(
                "stored workspace %s points at %s, %s, which a2ad refuses while"
                " auth.allow_link_local_agents = false; it is not served until"
                " PUT /workspaces/%s gives it another URL (its items stay in the store)",
                config.id,
                config.url,
                why,
                config.id,
            )
            return None
        ws = self.registry.add(config, from_config=False)
        self.auth.add_workspace_token(config.id, config.token)
        return ws

    async def register(self, config: WorkspaceSettings) -> bool:
        """Add or update a run-time workspace (persisted); True when it is new."""
        await self.store.save_workspace(
            config.id, config.model_dump(exclude=set(RUNTIME_EXCLUDED)), now=self.clock.now()
        )
        existing = self.registry.find(config.id)
        if existing is not None:
            self._update(existing, config)
        else:
            self.auth.add_workspace_token(config.id, config.token)
            self.cards.forget(config.id)
            await self._serve(self.registry.add(config, from_config=False))
        if self.replicas is not None:
            await self.replicas.workspace_changed(config.id)
        return existing is None

    async def unregister(self, ws: Workspace, *, purge: bool) -> int:
        """Remove a run-time workspace; with `purge`, its items too (their count)."""
        await self.dispatcher.remove_workspace(ws)
        deleted = await self.store.remove_workspace(ws.id, purge=purge)
        self._forget(ws)
        if self.replicas is not None:
            await self.replicas.workspace_changed(ws.id)
        return deleted

    def _update(self, ws: Workspace, config: WorkspaceSettings) -> None:
        """A run-time workspace's new settings, in force from now."""
        ws.config = config
        self.auth.add_workspace_token(config.id, config.token)
        self.cards.forget(config.id)
        ws.wakeup.set()

    async def _serve(self, ws: Workspace) -> None:
        """Start delivering for a workspace just added to the registry."""
        await self.dispatcher.load_history([ws])
        self.dispatcher.add_workspace(ws)

    def _forget(self, ws: Workspace) -> None:
        """What a removed workspace leaves here, once its pump is stopped."""
        self.registry.remove(ws.id)
        self.liveness.forget(ws.id)
        self.auth.add_workspace_token(ws.id, "")
        self.cards.forget(ws.id)

    def _told(self, changed: list[str], freed: list[str], finished: list[str]) -> None:
        """Another replica (or the queue CLI) committed: items it finished are
        answered to whoever waits for them here; pumps of workspaces whose queue
        it changed look at once (for items this replica has not counted yet),
        and those where it freed a slot, if they have items to deliver; the
        counts are taken again soon after a change."""
        for item_id in finished:
            self.watch.notify(item_id)
        for workspace_id in freed:
            ws = self.registry.find(workspace_id)
            if ws is not None and ws.depth.queued_total:
                ws.wakeup.set()
        for workspace_id in changed:
            ws = self.registry.find(workspace_id)
            if ws is not None:
                ws.admission.told = True
                ws.wakeup.set()
        if changed and self._told_recount is None and self.loops_running:
            self._told_recount = self.clock.call_later(TOLD_RECOUNT_SECONDS, self._recount_told)

    def _recount_told(self) -> None:
        self._told_recount = None  # what tells of later commits schedules another
        if self._recounting is None or self._recounting.done():
            self._recounting = asyncio.ensure_future(self._run(self._count_again))

    async def _count_again(self) -> None:
        self._data_version = await self.store.data_version()
        await self.dispatcher.recount()

    async def _slow_recount(self) -> None:
        await self.dispatcher.recount()
        if self.replicas is not None:
            await self.replicas.load_heartbeats()

    async def agent_pushes(self, ws: Workspace, headers: dict[str, str] | None = None) -> bool:
        """Does the workspace's agent card say it sends push notifications itself?"""
        card = await self.cards.get(self.upstream, ws, headers or {})
        return card is not None and card.agent_pushes

    async def heartbeat(self, ws: Workspace, active: int, capacity: int | None) -> None:
        """An agent's heartbeat; with replicas, every one of them learns it."""
        ws.record_heartbeat(active, capacity, self.clock.monotonic())
        if self.replicas is not None:
            try:
                await self.replicas.share_heartbeat(ws, active, capacity)
            except StoreUnavailable as exc:
                log.warning("workspace %s: cannot share its heartbeat: %s", ws.id, exc.message)

    async def _runtime_changed(self, workspace_id: str) -> None:
        """Another replica added, changed or removed a run-time workspace: the same here."""
        saved = next(
            (w for w in await self.store.load_workspaces() if w.get("id") == workspace_id), None
        )
        existing = self.registry.find(workspace_id)
        if existing is not None and existing.from_config:
            return  # the config file wins
        if saved is None:
            if existing is not None:
                await self.dispatcher.remove_workspace(existing)
                self._forget(existing)
            return
        if existing is None:
            ws = self._add_runtime(saved)
            if ws is not None:
                await self._serve(ws)
            return
        try:
            config = WorkspaceSettings(**saved)
        except ValidationError as exc:
            log.error("stored workspace %s is not valid any more: %s", workspace_id, exc)
            return
        self._update(existing, config)

    async def _refuse_other_schema(self) -> None:
        """A PostgreSQL schema is brought forward by `a2ad migrate`, not by serve:
        a database others use changes only when its operator says so."""
        current = await self.store.schema_version()
        latest = migrations_for(self.settings.store)[-1].version
        if current < latest:
            raise StoreUnavailable(
                f"{self.settings.store.where} is at schema {current}, this a2ad needs"
                f" {latest}: run a2ad migrate"
            )
        if current > latest:
            raise StoreUnavailable(
                f"{self.settings.store.where} is at schema {current}, written by a newer"
                f" a2ad (this one knows {latest})"
            )

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await self.clock.sleep(seconds)
            await self._run(job)

    @staticmethod
    async def _run(job: Callable[[], Awaitable[None]]) -> None:
        # Background jobs never die silently: they log, and their loop goes on.
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:
            log.warning("%s: %s", job.__name__.strip("_"), exc.message)
        except Exception:
            log.exception("%s failed; continuing", job.__name__.strip("_"))

    async def _follow_store_clock(self) -> None:
        """Stored times are on the store's clock (PostgreSQL's: every host that
        writes there agrees on it); say so when this host's is off by a second."""
        before = self.clock.server_offset
        offset = await self.clock.follow(self.store.server_time)
        if abs(offset) >= 1.0 and abs(offset - before) >= 1.0:
            log.warning(
                "this host's clock is %.1f s %s the store's; stored times follow the store's",
                abs(offset),
                "behind" if offset > 0 else "ahead of",
            )

    async def _housekeeping(self) -> None:
        now = self.clock.now()
        if self.store.last_write_error is not None:
            # An idle a2ad writes nothing, so it looks by itself whether the
            # store writes again (/readyz turns ready without any traffic).
            with contextlib.suppress(StoreUnavailable):
                await self.store.probe_write(now)
        for ws in self.registry:
            if ws.check_heartbeat_timeout(self.clock.monotonic()):
                self.liveness.signal(ws, "no heartbeat within heartbeat_timeout_seconds")
        await self.dispatcher.sweep()
        if self.replicas is None or self.replicas.sweeps:
            await self.store.tend()
        # Another process (the queue CLI) wrote to the store: recount and look again.
        version = await self.store.data_version()
        if self._data_version is not None and version != self._data_version:
            await self.dispatcher.recount()
        self._data_version = version

    async def _retention(self) -> None:
        if self.replicas is not None and not self.replicas.sweeps:
            return  # another replica holds the duty
        cutoff = self.clock.now() - self.settings.queue.retention_seconds
        deleted = await self.store.delete_finished(before=cutoff)
        if deleted:
            log.info("retention: deleted %d final items", deleted)


DAEMON = web.AppKey("a2ad_daemon", Daemon)
