"""Invariants of admission and the queue, under generated interleavings.

Hypothesis draws a run: concurrent direct and queued sends (some repeating a
messageId, some with a short TTL, some to an agent that refuses connections),
answers from the agent (final, busy, failure), heartbeats with any load and
capacity, clock moves, operator cancels and retries, writes by another process
(the queue CLI) and the housekeeping that notices them. a2ad runs for real
(aiohttp, a real store, a real agent on 127.0.0.1) on the manual clock: a SQLite
file, and (fewer examples) a schema of its own on the throwaway PostgreSQL server.

After every step:
- no request of a2ad's started at the agent without a free slot (checked as
  each arrives, against a2ad's own capacity and external load);
- no send went direct while an older deliverable item of its workspace was
  queued (checked at the moment admission gave the send its slot);
- the queue counts in memory equal the store's rows.
When the run settles, every acknowledged item is final, with a reason unless
it was delivered.

`make test` runs a fixed set of examples; A2AD_FUZZ_EXPLORE=N (make soak) runs
N times as many, freshly random.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fakes import make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from pgserver import PgServer

from a2ad import create_app
from a2ad.admission import Admission, Slot
from a2ad.clock import ManualClock
from a2ad.daemon import DAEMON, Daemon
from a2ad.settings import StoreSettings
from a2ad.store.postgres import PostgresStore
from a2ad.workspaces import Workspace

EXPLORE = int(os.environ.get("A2AD_FUZZ_EXPLORE", "0"))
EXAMPLES = 50
EXAMPLES_POSTGRES = 12  # each example migrates a fresh schema: fewer, to keep the time
HEARTBEAT_TOKEN = "hb-token"
ADMIN = {"Authorization": "Bearer admin"}


@pytest.fixture(autouse=True, scope="module")
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


# -- the agent -------------------------------------------------------------------


@dataclass
class Held:
    message_id: str
    answer: asyncio.Future[str] = field(default_factory=lambda: asyncio.Future())


@dataclass
class CountingAgent:
    """Holds each message send until the run answers it; at each arrival, checks
    that a2ad had a free slot for it (by a2ad's own capacity and external load)."""

    clock: ManualClock
    ws: Workspace | None = None
    held: list[Held] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    auto: str | None = None  # answer everything at once, as the run settles
    received: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        rpc = await request.json()
        message_id = rpc["params"]["message"].get("messageId", "")
        assert self.ws is not None
        now = self.clock.now()
        limit = self.ws.capacity(now) - self.ws.external_load(now)
        if len(self.held) + 1 > limit:
            self.violations.append(
                f"{message_id} arrived while the agent held {len(self.held)} of {limit} slots"
            )
        self.received.append(message_id)
        held = Held(message_id)
        self.held.append(held)
        try:
            outcome = self.auto or await held.answer
        finally:
            self.held.remove(held)
        if outcome == "busy":
            return web.json_response({"error": "busy"}, status=503)
        if outcome == "fail":
            return web.json_response({"error": "bad gateway"}, status=502)
        message = {"kind": "message", "messageId": f"r-{message_id}", "role": "agent", "parts": []}
        return web.json_response({"jsonrpc": "2.0", "id": rpc.get("id"), "result": message})

    def answer(self, n: int, outcome: str) -> None:
        for held in [h for h in self.held if not h.answer.done()][:n]:
            held.answer.set_result(outcome)


# -- the store, as another process sees it --------------------------------------------


class StoreView:
    """A connection of the test's own to a2ad's store: reads at any moment (sync, in
    the middle of admission's decision), and writes as `a2ad queue` makes them."""

    def __init__(self, store: StoreSettings) -> None:
        self.store = store
        self._pg: psycopg.Connection[Any] | None = None
        if store.is_postgres:
            self._pg = psycopg.connect(store.url, autocommit=True, options=self._options)

    @property
    def _options(self) -> str:
        return f"-c search_path={self.store.schema_name}"

    def rows(self, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """A read (`?` placeholders); PostgreSQL's never waits for a2ad's writer."""
        if self._pg is None:
            with contextlib.closing(sqlite3.connect(self.store.path)) as conn:
                return conn.execute(statement, params).fetchall()
        return self._pg.execute(statement.replace("?", "%s").encode(), params).fetchall()

    async def cli_write(self, statement: str, params: tuple[Any, ...]) -> None:
        """A write from another process, committed; one that would break the one-live-
        item-per-messageId rule changes nothing (SQLite's UPDATE OR IGNORE)."""
        if self._pg is None:
            with contextlib.closing(sqlite3.connect(self.store.path, timeout=5)) as conn, conn:
                conn.execute(statement.replace("UPDATE ", "UPDATE OR IGNORE ", 1), params)
            return
        # In a thread: the row may be a2ad's writer's until its commit, which needs
        # the event loop. And, as the queue CLI does, tell the daemon by NOTIFY.
        await asyncio.to_thread(self._pg_write, statement.replace("?", "%s"), params)

    def _pg_write(self, statement: str, params: tuple[Any, ...]) -> None:
        with psycopg.connect(self.store.url, options=self._options) as conn:
            with contextlib.suppress(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute(statement.encode(), params)
            conn.execute("SELECT pg_notify(%s, 'cli')", (f"a2ad_changes_{self.store.schema_name}",))
            conn.commit()

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()


# -- the run -------------------------------------------------------------------------

Step = tuple[Any, ...]

SEND: st.SearchStrategy[Step] = st.tuples(
    st.just("send"),
    st.integers(1, 6),  # how many at once
    st.sampled_from(["task", "critical", "info"]),
    st.sampled_from([None, None, "1", "30"]),  # A2AD-TTL
    st.sampled_from(["w", "w", "w", "x"]),  # x refuses connections
    st.booleans(),  # repeat an earlier messageId
    st.booleans(),  # blocking: the caller is held until the item ends
)
ANSWER: st.SearchStrategy[Step] = st.tuples(
    st.just("answer"), st.integers(1, 3), st.sampled_from(["ok", "ok", "busy", "fail"])
)
# Sends and answers drawn most often, so that runs hold queue episodes.
STEPS: st.SearchStrategy[Step] = st.one_of(
    SEND,
    SEND,
    ANSWER,
    ANSWER,
    st.tuples(st.just("heartbeat"), st.integers(0, 2), st.sampled_from([None, 1, 2, 3])),
    st.tuples(st.just("advance"), st.sampled_from([0.001, 0.6, 2.0, 10.0, 40.0])),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("retry"), st.integers(0, 50)),
    st.tuples(st.just("cli"), st.integers(0, 50), st.sampled_from(["cancel", "requeue"])),
    st.tuples(st.just("housekeeping")),
)


class Run:
    """One a2ad, its agent, and what the run has been told so far."""

    def __init__(self, daemon: Daemon, client: TestClient[Any, Any], agent: CountingAgent) -> None:
        self.daemon = daemon
        self.client = client
        self.agent = agent
        self.clock = agent.clock
        self.view = StoreView(daemon.settings.store)
        self.sends: list[asyncio.Task[None]] = []
        self.acknowledged: list[str] = []  # queue ids answered 202
        self.message_ids: list[str] = []
        self.violations = agent.violations
        self.counter = 0
        for ws in daemon.registry:
            self._watch_admission(ws.admission, ws)

    def _watch_admission(self, admission: Admission, ws: Workspace) -> None:
        """Check, each time admission gives a send its slot, that no older deliverable
        item of the workspace waits in the store (read at that very moment)."""
        decide = admission.try_direct

        def checked(now: float) -> Slot | None:
            slot = decide(now)
            if slot is None:
                return None
            if admission.free_slots(now) < 0:
                self.violations.append(f"{ws.id}: a direct send took a slot that was not free")
            ((older,),) = self.view.rows(
                "SELECT COUNT(*) FROM items WHERE workspace = ? AND state = 'queued'"
                " AND updated_at < ? AND not_before <= ?"
                " AND (expires_at IS NULL OR expires_at > ?)",
                (ws.id, now, now, now),
            )
            if older and not admission.paused(now):
                self.violations.append(f"{ws.id}: a send went direct past {older} queued items")
            return slot

        admission.try_direct = checked  # type: ignore[method-assign]

    async def _send(
        self, workspace: str, message_id: str, priority: str, ttl: str | None, blocking: bool
    ) -> None:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "message/send",
            "params": {
                "message": {
                    "role": "user",
                    "messageId": message_id,
                    "parts": [{"kind": "text", "text": message_id}],
                },
                "configuration": {"blocking": blocking},
            },
        }
        headers = {"A2AD-Priority": priority}
        if ttl is not None:
            headers["A2AD-TTL"] = ttl
        resp = await self.client.post(f"/workspaces/{workspace}/a2a", json=body, headers=headers)
        data = await resp.json()
        assert resp.status in (200, 202, 502, 503), (resp.status, data)
        if resp.status == 202 or (resp.status == 200 and data["result"].get("kind") == "task"):
            self.acknowledged.append(data["result"]["id"])  # queued (and held, when 200)

    def _item(self, index: int) -> str | None:
        return self.acknowledged[index % len(self.acknowledged)] if self.acknowledged else None

    async def step(self, step: Step) -> None:
        # Each step at its own time, so "older" (queued at an earlier step) is
        # plain from the rows' updated_at; what one step does is concurrent.
        await self.clock.advance(0.0001)
        kind = step[0]
        if kind == "send":
            _, n, priority, ttl, workspace, repeat, blocking = step
            for _ in range(n):
                if repeat and self.message_ids:
                    message_id = self.message_ids[self.counter % len(self.message_ids)]
                else:
                    message_id = f"m-{self.counter}"
                    self.message_ids.append(message_id)
                self.counter += 1
                send = self._send(workspace, message_id, priority, ttl, blocking)
                self.sends.append(asyncio.create_task(send))
        elif kind == "answer":
            self.agent.answer(step[1], step[2])
        elif kind == "heartbeat":
            await self._heartbeat(extra=step[1], capacity=step[2])
        elif kind == "advance":
            await self.clock.advance(step[1])
        elif kind == "cancel" and (qid := self._item(step[1])):
            resp = await self.client.delete(f"/queue/{qid}", headers=ADMIN)
            assert resp.status in (200, 404, 409), await resp.text()  # 404: deleted before
        elif kind == "retry" and (qid := self._item(step[1])):
            resp = await self.client.post(f"/queue/{qid}/retry", headers=ADMIN)
            assert resp.status in (200, 404, 409), await resp.text()
        elif kind == "cli" and (qid := self._item(step[1])):
            await self._cli_write(qid, step[2])
            await self.daemon._housekeeping()  # a2ad notices within a second
        elif kind == "housekeeping":
            await self.daemon._housekeeping()
        await self._settle()
        self.check()

    async def _heartbeat(self, *, extra: int, capacity: int | None) -> None:
        """The agent's load as it reports it: what it holds, plus `extra` of its own.
        Taken when none of a2ad's requests is on its way and recorded in the same
        step (a heartbeat that crosses a request is a race the agent itself would
        have, and its stale count would misstate its load): what
        POST /workspaces/w/heartbeat does, without the HTTP in between."""
        ws = self.daemon.registry.get("w")
        for _ in range(100):
            if ws.in_flight == len(self.agent.held) and ws.admission.reserved == 0:
                break
            await asyncio.sleep(0.002)
        else:
            return
        now = self.clock.now()
        ws.record_heartbeat(len(self.agent.held) + extra, capacity, now)
        if ws.free_slots(now) > 0 and ws.queued_total > 0:
            ws.wakeup.set()

    async def _cli_write(self, qid: str, action: str) -> None:
        """What `a2ad queue` does beside a running daemon: its own connection."""
        now = self.clock.now()
        before = await self.daemon.store.data_version()
        if action == "cancel":
            await self.view.cli_write(
                "UPDATE items SET state = 'cancelled', finished_at = ?, updated_at = ?,"
                " last_error = 'cancelled by the CLI' WHERE id = ? AND state = 'queued'",
                (now, now, qid),
            )
        else:
            await self.view.cli_write(  # as the CLI's retry: not past a newer live item
                "UPDATE items SET state = 'queued', attempts = 0, not_before = 0,"
                " finished_at = NULL, updated_at = ?"
                " WHERE id = ? AND state IN ('failed', 'expired')",
                (now, qid),
            )
        if self.view.store.is_postgres:  # heard by LISTEN, a moment later
            for _ in range(500):
                if await self.daemon.store.data_version() != before:
                    break
                await asyncio.sleep(0.002)

    async def _settle(self) -> None:
        """Let what the step set going run: sends reach the agent or the store."""
        for _ in range(4):
            await asyncio.sleep(0.003)

    def check(self) -> None:
        assert self.violations == [], self.violations
        self.check_counts()

    def check_counts(self) -> None:
        """The counts in memory equal the store's rows (read while no write is in
        the writer, so every commit's moves are applied)."""
        writer = getattr(self.daemon.store, "_writer", None)
        if not writer or not writer.idle:
            return
        store_counts: dict[str, tuple[dict[int, int], int]] = {}
        for workspace, state, priority, n in self.view.rows(
            "SELECT workspace, state, priority, COUNT(*) FROM items"
            " WHERE state IN ('queued', 'dispatching') GROUP BY 1, 2, 3"
        ):
            queued, dispatching = store_counts.get(workspace, ({}, 0))
            if state == "queued":
                queued[priority] = n
            else:
                dispatching += n
            store_counts[workspace] = (queued, dispatching)
        for ws in self.daemon.registry:
            seen = (dict(ws.depth.queued), ws.depth.dispatching)
            assert seen == store_counts.get(ws.id, ({}, 0)), (ws.id, seen, store_counts)

    async def finish(self) -> None:
        """Let every acknowledged item end: the agent answers everything, time
        passes beyond every pause and backoff, housekeeping runs."""
        self.agent.auto = "ok"
        self.agent.answer(len(self.agent.held), "ok")
        await self._heartbeat(extra=0, capacity=None)
        for _ in range(60):
            await self.clock.advance(31)
            await self.daemon._housekeeping()
            await self._settle()
            self.check()
            # Held sends are acknowledged only when they end: wait for them too.
            if all(send.done() for send in self.sends) and not await self._unfinished():
                break
        await asyncio.wait_for(asyncio.gather(*self.sends), 10)
        unfinished = await self._unfinished()
        assert unfinished == [], unfinished
        for qid in self.acknowledged:
            item = await self.daemon.store.get(qid)
            if item is not None and item.state != "delivered":
                assert item.last_error, item

    async def _unfinished(self) -> list[str]:
        out = []
        for qid in self.acknowledged:
            item = await self.daemon.store.get(qid)
            if item is not None and not item.is_final:
                out.append(f"{qid}: {item.state}")
        return out


async def one_run(
    tmp_path: Path, capacity: int, steps: list[Step], pg_url: str | None = None
) -> None:
    clock = ManualClock()
    agent = CountingAgent(clock)
    agent_app = web.Application()
    agent_app.router.add_post("/", agent.handle)
    agent_server = TestServer(agent_app, host="127.0.0.1")
    await agent_server.start_server()
    store: dict[str, Any] = {}
    if pg_url is not None:
        store = {"url": pg_url, "schema": f"t_{uuid.uuid4().hex[:12]}"}
        async with PostgresStore(pg_url, schema=store["schema"]) as fresh:
            await fresh.migrate()  # as `a2ad migrate` would, before serve
    settings = make_settings(
        tmp_path,
        [
            {
                "id": "w",
                "url": str(agent_server.make_url("/")),
                "max_concurrent": capacity,
                "token": HEARTBEAT_TOKEN,
                "heartbeat": True,
            },
            # Nothing listens here: refused connections, busy pauses, expiries.
            {"id": "x", "url": "http://127.0.0.1:9/", "heartbeat": False},
        ],
        auth={"admin_token": "admin"},
        queue={
            "max_attempts": 3,
            "backoff_base_seconds": 1.0,
            "backoff_max_seconds": 8.0,
            # x's agent never comes back: its items end by expiring.
            "max_age_seconds": 600,
        },
        liveness={"heartbeat_timeout_seconds": 100_000, "probe_interval_seconds": 100_000},
        store=store,
    )
    app = create_app(settings, clock=clock)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    run: Run | None = None
    try:
        daemon = app[DAEMON]
        agent.ws = daemon.registry.get("w")
        run = Run(daemon, client, agent)
        for step in steps:
            await run.step(step)
        await run.finish()
    finally:
        agent.auto = "ok"
        agent.answer(len(agent.held), "ok")
        await client.close()
        await agent_server.close()
        if run is not None:
            run.view.close()


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
async def test_admission_and_queue_invariants_hold_under_interleavings(
    tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    loop = asyncio.get_running_loop()
    runs = iter(range(1_000_000))
    pg_url: str | None = None
    examples = EXAMPLES
    if store_kind == "postgres":
        server: PgServer = request.getfixturevalue("pg_server")
        pg_url, examples = server.url, EXAMPLES_POSTGRES

    @settings(
        max_examples=examples * max(1, EXPLORE),
        deadline=None,
        database=None,
        derandomize=not EXPLORE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.integers(1, 3), st.lists(STEPS, min_size=12, max_size=40))
    def run(capacity: int, steps: list[Step]) -> None:
        path = tmp_path / f"run-{next(runs)}"
        path.mkdir()
        future = asyncio.run_coroutine_threadsafe(one_run(path, capacity, steps, pg_url), loop)
        future.result(timeout=120)

    await asyncio.to_thread(run)
