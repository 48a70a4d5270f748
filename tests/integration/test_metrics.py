"""GET /metrics as Prometheus scrapes it: counters, gauges and histograms moving as
messages go direct, wait in the queue, meet a busy agent, expire, fail, or the
agent dies and is restarted."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from fakes import A2ad, FakeAgent, jsonrpc_task, wait_until
from prometheus_client.parser import text_string_to_metric_families

from a2ad.clock import ManualClock

BOTH_STORES = True  # the counters and depths come the same from either store

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
HB = {"Authorization": "Bearer hb"}
BUSY: tuple[int, Any, dict[str, str]] = (
    503,
    {"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": "busy"}},
    {},
)


class Scrape:
    """One scrape of /metrics: sample values by name and exact label set."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
                # On PostgreSQL a replica's own series also carry its name: found
                # without it too, so one test reads both stores' scrapes.
                labels = {k: v for k, v in sample.labels.items() if k != "replica"}
                self.samples.setdefault((sample.name, frozenset(labels.items())), sample.value)

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def workspaces(self) -> set[str]:
        return {v for _, labels in self.samples for k, v in labels if k == "workspace"}


async def scrape(a2ad: A2ad, headers: dict[str, str] | None = None) -> Scrape:
    resp = await a2ad.client.get("/metrics", headers=headers or {})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(await resp.text())


def ws(agent: FakeAgent, **extra: Any) -> dict[str, Any]:
    return {"id": "w", "url": agent.url, "heartbeat": False, **extra}


async def test_a_new_workspace_has_every_series_at_zero(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([ws(agent)], clock=ManualClock())
    m = await scrape(a2ad)
    for counter in ("enqueued", "delivered", "failed", "expired", "busy_answers", "restarts"):
        assert m(f"a2ad_{counter}_total", workspace="w") == 0, counter
    assert m("a2ad_queue_depth", workspace="w", state="queued") == 0
    assert m("a2ad_queue_depth", workspace="w", state="dispatching") == 0
    assert m("a2ad_in_flight", workspace="w") == 0
    assert m("a2ad_queue_wait_seconds_count") == 0
    assert m("a2ad_workspace_state", workspace="w", state="unknown") == 1
    for state in ("online", "offline", "dead", "restarting", "failed"):
        assert m("a2ad_workspace_state", workspace="w", state=state) == 0


async def test_one_direct_and_three_queued_deliveries(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory(slots=1, gate=asyncio.Event())
    assert agent.gate is not None
    a2ad = await a2ad_factory([ws(agent)], clock=clock)
    first = asyncio.create_task(a2ad.send("w", "m0"))
    await agent.wait_received(1)
    qids = []
    for i in range(1, 4):
        status, data = await a2ad.send("w", f"m{i}")
        assert status == 202
        qids.append(jsonrpc_task(data)["id"])

    waiting = await scrape(a2ad)
    assert waiting("a2ad_enqueued_total", workspace="w") == 3
    assert waiting("a2ad_queue_depth", workspace="w", state="queued") == 3
    assert waiting("a2ad_in_flight", workspace="w") == 1
    assert waiting("a2ad_delivered_total", workspace="w") == 0

    await clock.advance(2.0)  # each item waits 2 s before its delivery starts
    agent.gate.set()
    assert (await first)[0] == 200
    for qid in qids:
        assert (await a2ad.final(qid))["state"] == "delivered"
    await wait_until(lambda: a2ad.daemon.registry.get("w").dispatching == 0)

    m = await scrape(a2ad)
    assert m("a2ad_enqueued_total", workspace="w") == 3
    assert m("a2ad_delivered_total", workspace="w") == 3
    assert m("a2ad_queue_depth", workspace="w", state="queued") == 0
    assert m("a2ad_queue_depth", workspace="w", state="dispatching") == 0
    assert m("a2ad_in_flight", workspace="w") == 0
    assert m("a2ad_busy_answers_total", workspace="w") == 0
    assert m("a2ad_failed_total", workspace="w") == 0
    # One queue wait per delivered item, 2 s each.
    assert m("a2ad_queue_wait_seconds_count") == 3
    assert m("a2ad_queue_wait_seconds_sum") == 6.0
    assert m("a2ad_queue_wait_seconds_bucket", le="1.0") == 0
    assert m("a2ad_queue_wait_seconds_bucket", le="5.0") == 3
    # The direct send is the proxy's latency; the three queued ones are deliveries.
    assert m("a2ad_proxy_seconds_count", outcome="final") == 1
    assert m("a2ad_delivery_seconds_count", outcome="final") == 3
    assert m("a2ad_delivery_seconds_count", outcome="busy") == 0
    assert m("a2ad_workspace_state", workspace="w", state="online") == 1
    assert m("a2ad_workspace_state", workspace="w", state="unknown") == 0


async def test_a_busy_answer_is_counted_on_either_path(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    agent.script = [BUSY, BUSY]
    a2ad = await a2ad_factory([ws(agent)], clock=clock)
    status, data = await a2ad.send("w", "x")
    assert status == 202  # the direct send met a busy agent and was queued
    m = await scrape(a2ad)
    assert m("a2ad_busy_answers_total", workspace="w") == 1
    assert m("a2ad_proxy_seconds_count", outcome="busy") == 1
    assert m("a2ad_enqueued_total", workspace="w") == 1

    await clock.advance(0.5)  # the pause ends: the delivery is busy too, then 1 s more
    await agent.wait_received(2)
    await wait_until(lambda: a2ad.daemon.registry.get("w").queued_total == 1)
    await clock.advance(1.0)
    assert (await a2ad.final(jsonrpc_task(data)["id"]))["state"] == "delivered"
    m = await scrape(a2ad)
    assert m("a2ad_busy_answers_total", workspace="w") == 2
    assert m("a2ad_delivery_seconds_count", outcome="busy") == 1
    assert m("a2ad_delivery_seconds_count", outcome="final") == 1
    assert m("a2ad_delivered_total", workspace="w") == 1
    assert m("a2ad_enqueued_total", workspace="w") == 1  # the same row went back


async def test_an_expired_item_is_counted(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    a2ad = await a2ad_factory([ws(agent, heartbeat=True, token="hb")], clock=clock)
    # The agent's only slot is someone else's: the send waits in the queue.
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 1}, headers=HB)
    status, data = await a2ad.send("w", "doomed", headers={"A2AD-TTL": "5"})
    assert status == 202
    await clock.advance(6.0)  # the housekeeping loop's sweep finds it past its TTL
    assert (await a2ad.final(jsonrpc_task(data)["id"]))["state"] == "expired"
    await wait_until(lambda: a2ad.daemon.registry.get("w").queued_total == 0)
    m = await scrape(a2ad)
    assert m("a2ad_expired_total", workspace="w") == 1
    assert m("a2ad_delivered_total", workspace="w") == 0
    assert m("a2ad_queue_depth", workspace="w", state="queued") == 0
    assert agent.received == []


async def test_an_item_that_spends_its_attempts_is_counted_failed(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory(
        [ws(agent, heartbeat=True, token="hb")], clock=ManualClock(), queue={"max_attempts": 1}
    )
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 1}, headers=HB)
    status, data = await a2ad.send("w", "doomed")
    assert status == 202
    agent.script = [(502, {"error": "upstream down"}, {})]
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 0}, headers=HB)
    assert (await a2ad.final(jsonrpc_task(data)["id"]))["state"] == "failed"
    m = await scrape(a2ad)
    assert m("a2ad_failed_total", workspace="w") == 1
    assert m("a2ad_delivered_total", workspace="w") == 0
    assert m("a2ad_delivery_seconds_count", outcome="failure") == 1
    assert m("a2ad_queue_wait_seconds_count") == 0  # delivered items only


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_a_dead_agent_is_restarted_and_its_state_shows(a2ad_factory: A2adFactory) -> None:
    """Nothing listens: the send is refused (busy), the probe finds no agent, the
    workspace is dead at once and its restart_command runs."""
    url = f"http://127.0.0.1:{closed_port()}/"
    restart = [sys.executable, "-c", "pass"]
    a2ad = await a2ad_factory(
        [{"id": "w", "url": url, "heartbeat": False, "restart_command": restart}],
        clock=ManualClock(),
    )
    status, _ = await a2ad.send("w", "hello?")
    assert status == 202
    await wait_until(lambda: a2ad.daemon.registry.get("w").restarts == 1)
    m = await scrape(a2ad)
    assert m("a2ad_restarts_total", workspace="w") == 1
    assert m("a2ad_workspace_state", workspace="w", state="restarting") == 1
    assert m("a2ad_workspace_state", workspace="w", state="online") == 0
    assert m("a2ad_busy_answers_total", workspace="w") == 1
    assert m("a2ad_queue_depth", workspace="w", state="queued") == 1


async def test_metrics_need_the_admin_token_when_one_is_set(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory(
        [ws(agent)],
        auth={"admin_token": "admin-secret", "callers": [{"name": "c", "token": "c-secret"}]},
    )
    assert (await a2ad.client.get("/metrics")).status == 401
    caller = {"Authorization": "Bearer c-secret"}
    assert (await a2ad.client.get("/metrics", headers=caller)).status == 403
    m = await scrape(a2ad, {"Authorization": "Bearer admin-secret"})
    assert m("a2ad_enqueued_total", workspace="w") == 0
    assert (await a2ad.client.get("/healthz")).status == 200  # still open


async def test_openmetrics_when_the_scraper_asks_for_it(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([ws(agent)])
    resp = await a2ad.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).endswith("# EOF\n")


async def test_a_removed_workspace_leaves_no_series(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([ws(agent)])
    resp = await a2ad.client.put("/workspaces/extra", json={"url": agent.url, "heartbeat": False})
    assert resp.status == 201
    status, _ = await a2ad.send("extra", "hi")
    assert status == 200
    m = await scrape(a2ad)
    assert m.workspaces() == {"w", "extra"}
    assert m("a2ad_enqueued_total", workspace="extra") == 0
    assert (await a2ad.client.delete("/workspaces/extra")).status == 200
    assert (await scrape(a2ad)).workspaces() == {"w"}


async def test_a_replica_names_itself_and_its_duties(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, store_kind: str
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([ws(agent)], store={"replica_id": "r-7"})
    m = await scrape(a2ad)
    if store_kind == "sqlite":
        assert not any(name == "a2ad_replica" for name, _ in m.samples)
        return
    assert m("a2ad_replica", replica="r-7") == 1
    assert m("a2ad_duty_held", replica="r-7", duty="sweeps") == 1
    assert m("a2ad_duty_held", replica="r-7", duty="agent:w") == 1
    assert m("a2ad_in_flight", workspace="w", replica="r-7") == 0
