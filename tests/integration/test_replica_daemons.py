"""Replicas of one PostgreSQL store, side by side in one process (each its own
daemon, connections and name): a heartbeat any of them takes counts for all, one
acts for each agent, run-time workspaces and finished items reach every one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from fakes import A2ad, FakeAgent
from test_liveness import Agent, eventually
from test_liveness import agents as agents  # the fixture: its processes die at the end
from test_streams import events

from a2ad import own_tasks
from a2ad.workspaces import State

pytestmark = pytest.mark.parametrize("store_kind", ["postgres"])

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
HB_TOKEN = "hb-secret"
ADMIN = {"Authorization": "Bearer admin-secret"}


async def replicas(
    a2ad_factory: A2adFactory, workspaces: list[dict[str, Any]], n: int = 2, **sections: Any
) -> list[A2ad]:
    made = []
    for name in "abc"[:n]:
        store = {"replica_id": name, **sections.pop("store", {})}
        made.append(await a2ad_factory(workspaces, store=store, **sections))
    for one in made:  # as each does every second: each learns the others are live
        assert one.daemon.replicas is not None
        await one.daemon.replicas.renew()
    return made


async def heartbeat(a2ad: A2ad, active: int) -> None:
    resp = await a2ad.client.post(
        "/workspaces/w/heartbeat",
        json={"active_tasks": active},
        headers={"Authorization": f"Bearer {HB_TOKEN}"},
    )
    assert resp.status == 200, await resp.text()


async def test_a_heartbeat_to_one_replica_frees_the_slot_another_uses(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    workspace = {"id": "w", "url": agent.url, "max_concurrent": 1, "token": HB_TOKEN}
    a, b = await replicas(a2ad_factory, [workspace])
    w_on_b = b.daemon.registry.get("w")

    await heartbeat(a, active=1)  # someone else's request holds the agent's one slot
    await eventually(
        lambda: _async(w_on_b.heartbeat is not None and w_on_b.heartbeat.external == 1),
        "b learns the heartbeat a took",
    )
    status, data = await b.send("w", "waits for the slot")
    assert status == 202, data
    await asyncio.sleep(0.2)
    assert agent.received == []
    await heartbeat(a, active=0)  # it is free: b's item goes at once
    await agent.wait_received(1, within=2.0)
    assert agent.received[0].text == "waits for the slot"


async def gated(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> tuple[FakeAgent, A2ad, A2ad]:
    """A 1-slot agent that holds requests until its gate opens, and two replicas."""
    agent = await agent_factory(gate=asyncio.Event())
    workspace = {"id": "w", "url": agent.url, "max_concurrent": 1, "heartbeat": False}
    a, b = await replicas(a2ad_factory, [workspace])
    return agent, a, b


async def queued_behind(
    agent: FakeAgent, a: A2ad
) -> tuple[asyncio.Task[tuple[int, dict[str, Any]]], str]:
    """A send that holds the agent's slot, and an item queued on a behind it."""
    held = asyncio.create_task(a.send("w", "holds the slot"))
    await agent.wait_received(1)
    status, data = await a.send("w", "queued on a")
    assert status == 202, data
    return held, data["result"]["id"]


async def test_a_send_waiting_on_one_replica_for_an_item_another_delivered_is_answered(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """b holds a long poll for an item a delivers: a's commit names it, and b
    answers at once (its fallback, a read each second, is not what answers)."""
    agent, a, b = await gated(agent_factory, a2ad_factory)
    held, qid = await queued_behind(agent, a)
    view = (await (await b.client.get("/workspaces")).json())["workspaces"][0]
    assert (view["in_flight"], view["in_flight_all_replicas"]) == (0, 1)  # a's, seen from b
    told: list[str] = []
    notify = b.daemon.watch.notify
    b.daemon.watch.notify = lambda item_id: (told.append(item_id), notify(item_id))[1]  # type: ignore[method-assign]
    poll = asyncio.create_task(b.item(qid, wait=30))
    await asyncio.sleep(0.2)
    assert agent.gate is not None
    agent.gate.set()
    view = await asyncio.wait_for(poll, 10)
    assert view["state"] == "delivered"
    assert qid in told
    assert (await held)[0] == 200


async def test_a_subscription_on_one_replica_ends_with_the_task_another_delivered(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """SubscribeToTask on b for an item a queued and delivers: b's stream gives
    the Task as it stands, then its final state once a delivered it."""
    agent, a, b = await gated(agent_factory, a2ad_factory)
    held, qid = await queued_behind(agent, a)
    body = {"jsonrpc": "2.0", "id": 2, "method": "SubscribeToTask", "params": {"id": qid}}
    resp = await b.client.post("/workspaces/w/a2a", json=body, headers={"A2A-Version": "1.0"})
    stream = events(resp)
    first = (await anext(stream))["result"]
    assert first["task"]["id"] == qid
    assert agent.gate is not None
    agent.gate.set()
    last = [event["result"] async for event in stream][-1]
    assert last["statusUpdate"]["status"]["state"] == "TASK_STATE_COMPLETED", last
    assert (await held)[0] == 200


async def test_a_subscription_ends_though_the_notification_was_lost(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b never hears that a finished the item (a NOTIFY lost while b's listening
    connection was down): its stream reads the item again at each keep-alive."""
    monkeypatch.setattr(own_tasks, "KEEPALIVE_SECONDS", 0.2)
    agent, a, b = await gated(agent_factory, a2ad_factory)
    b.daemon.watch.notify = lambda item_id: None  # type: ignore[method-assign]
    held, qid = await queued_behind(agent, a)
    body = {"jsonrpc": "2.0", "id": 2, "method": "tasks/resubscribe", "params": {"id": qid}}
    stream = events(await b.client.post("/workspaces/w/a2a", json=body))
    assert (await anext(stream))["result"]["id"] == qid
    assert agent.gate is not None
    agent.gate.set()
    last = await asyncio.wait_for(_last(stream), 10)
    assert last["result"]["status"]["state"] == "completed", last
    assert (await held)[0] == 200


async def _last(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    return [event async for event in stream][-1]


async def test_a_runtime_workspace_put_on_one_replica_is_served_by_all(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a, b = await replicas(a2ad_factory, [], auth={"admin_token": "admin-secret"})
    config = {"url": agent.url, "max_concurrent": 2, "heartbeat": False}
    resp = await a.client.put("/workspaces/late", json=config, headers=ADMIN)
    assert resp.status in (200, 201), await resp.text()
    await eventually(
        lambda: _async(b.daemon.registry.find("late") is not None), "b serves the workspace"
    )
    status, data = await b.send("late", "through b")
    assert status == 200, data
    resp = await b.client.delete("/workspaces/late", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    await eventually(
        lambda: _async(a.daemon.registry.find("late") is None), "a drops the workspace"
    )


async def test_one_replica_holds_each_duty_and_the_other_takes_it_over_when_it_stops(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    workspace = {"id": "w", "url": agent.url, "heartbeat": False}
    a, b = await replicas(a2ad_factory, [workspace], auth={"admin_token": "admin-secret"})
    resp = await b.client.get("/workspaces", headers=ADMIN)
    view = await resp.json()
    assert view["replica"] == "b"
    duties = {r["replica"]: r["duties"] for r in view["replicas"] if r["live"]}
    assert duties == {"a": ["agent:w", "sweeps"], "b": []}
    assert [w["in_flight_all_replicas"] for w in view["workspaces"]] == [0]
    assert a.daemon.replicas is not None and b.daemon.replicas is not None
    await a.daemon.replicas.stop()  # a stops: its duties go at once
    await eventually(
        lambda: _async(b.daemon.replicas is not None and b.daemon.replicas.sweeps),
        "b takes the sweeps over",
    )
    assert b.daemon.replicas.acts_for(b.daemon.registry.get("w"))


async def test_an_agent_three_replicas_see_fail_is_restarted_once(
    agents: Callable[..., Agent],
    a2ad_factory: A2adFactory,
) -> None:
    """The agent dies while every replica sends to it: each sees refused
    connections, one acts for it and restarts it, once; the others learn it.
    (`agents` first: the replicas stop before its processes are killed.)"""
    agent = agents(["--delay", "0"])
    agent.start()
    await agent.wait_up()
    workspace = {
        "id": "w",
        "url": agent.url,
        "heartbeat": False,
        "restart_command": agent.restart_command,
    }
    three = await replicas(
        a2ad_factory,
        [workspace],
        n=3,
        liveness={"restart_backoff_seconds": 0, "restart_budget_per_hour": 5},
    )
    for one in three:
        assert (await one.send("w", "alive", blocking=True))[0] == 200
    await agent.kill()
    for one in three:  # each sees a refused connection, and queues the send
        status, data = await one.send("w", "after the crash")
        assert status == 202, data
    await eventually(lambda: _async(len(agent.restarts()) >= 1), "the agent is restarted")
    await agent.wait_up()
    await asyncio.sleep(1.5)  # time for a second restart, which must not come
    assert agent.restarts() == ["w"]
    for one in three:
        await eventually(
            lambda one=one: _async(one.daemon.registry.get("w").state is not State.DEAD),  # type: ignore[misc]
            "every replica sees it back",
        )


async def test_a_busy_pause_one_replica_began_holds_every_replica(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """The agent tells a it is busy for 2 s: a queues the send and pauses the
    workspace, and so does b (a tells it): no replica delivers before the pause
    ends, and a send to b meanwhile waits behind the first."""
    busy = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": "busy"}}
    agent = await agent_factory(script=[(503, busy, {"Retry-After": "2"})])
    workspace = {"id": "w", "url": agent.url, "max_concurrent": 1, "heartbeat": False}
    a, b = await replicas(a2ad_factory, [workspace])
    loop = asyncio.get_running_loop()
    status, data = await a.send("w", "first")
    told_busy = loop.time()
    assert status == 202, data  # the agent was busy: queued
    await asyncio.sleep(0.3)
    status, data = await b.send("w", "second")
    assert status == 202, data
    await agent.wait_received(2, within=10)
    # The second attempt came after the pause the agent asked for, from whichever replica.
    assert loop.time() - told_busy >= 1.5
    await agent.wait_received(3, within=10)
    assert [r.text for r in agent.received] == ["first", "first", "second"]
    assert agent.served[0].text == "first"


async def test_a_send_that_leaves_while_its_slot_is_taken_returns_it(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """The caller goes while the store takes the send's slot lease: the take
    commits all the same, and the lease is returned, not held until it lapses."""
    agent = await agent_factory()
    workspace = {"id": "w", "url": agent.url, "max_concurrent": 1, "heartbeat": False}
    (a,) = await replicas(a2ad_factory, [workspace], n=1)
    shared, ws = a.daemon.shared_slots, a.daemon.registry.get("w")
    assert shared is not None
    for _ in range(10):
        slot = ws.admission.try_direct(a.daemon.clock.monotonic())
        assert slot is not None
        with slot:
            taking = asyncio.create_task(shared.take(ws, slot, arrived=a.daemon.clock.now()))
            await asyncio.sleep(0)  # the take is in the writer's hands
            taking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await taking
    await eventually(lambda: _free_in_store(a), "every lease returned")
    assert (await a.send("w", "goes direct"))[0] == 200


async def _free_in_store(a2ad: A2ad) -> bool:
    rows = await a2ad.daemon.store._rows(  # type: ignore[attr-defined]
        "SELECT (SELECT count(*) FROM slot_leases), COALESCE(max(in_use), 0) FROM slots"
    )
    return bool(rows[0] == (0, 0))


async def test_an_agent_only_one_replica_reaches_is_delivered_by_that_one(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """workspaces[].replicas names a: b accepts and queues sends for the agent
    (it never sends to it), a delivers them; a acts for the agent, with the duty."""
    agent = await agent_factory()
    workspace = {"id": "w", "url": agent.url, "heartbeat": False, "replicas": ["a"]}
    a, b = await replicas(a2ad_factory, [workspace])
    status, data = await b.send("w", "through b")
    assert status == 202, data  # b may not deliver: queued
    assert (await a.final(data["result"]["id"]))["state"] == "delivered"
    status, _ = await a.send("w", "through a", blocking=True)
    assert status == 200
    assert [r.text for r in agent.received] == ["through b", "through a"]
    assert a.daemon.replicas is not None and b.daemon.replicas is not None
    assert "agent:w" in a.daemon.replicas.held and "agent:w" not in b.daemon.replicas.held


async def test_the_replica_that_can_restart_an_agent_acts_for_it(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """Only b has a restart_command for the agent (the replicas' configs differ):
    b takes the agent's duty from a, which held it first."""
    agent = await agent_factory()
    plain = {"id": "w", "url": agent.url, "heartbeat": False}
    a = await a2ad_factory([plain], store={"replica_id": "a"})
    assert a.daemon.replicas is not None and "agent:w" in a.daemon.replicas.held
    able = {**plain, "restart_command": ["true"]}
    b = await a2ad_factory([able], store={"replica_id": "b"})
    assert b.daemon.replicas is not None and "agent:w" in b.daemon.replicas.held
    await a.daemon.replicas.renew()
    assert "agent:w" not in a.daemon.replicas.held
    await b.daemon.replicas.renew()
    assert "agent:w" in b.daemon.replicas.held  # and it keeps it


async def test_a_depth_cap_holds_over_every_replicas_sends(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """max_depth_per_workspace = 5 and 12 sends at once through two replicas while
    the agent's one slot is held: 5 are queued, the others refused queue_full,
    however each replica's own counts stood."""
    agent = await agent_factory(gate=asyncio.Event())
    workspace = {"id": "w", "url": agent.url, "max_concurrent": 1, "heartbeat": False}
    a, b = await replicas(a2ad_factory, [workspace], queue={"max_depth_per_workspace": 5})
    held, _ = await queued_behind(agent, a)  # 1 of the 5 waits already
    sends = [(a, b)[i % 2].send("w", f"m{i}") for i in range(12)]
    answers = await asyncio.gather(*sends)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [202] * 4 + [503] * 8, answers
    refused = [data for status, data in answers if status == 503]
    assert all("max_depth_per_workspace" in str(data) for data in refused), refused
    assert agent.gate is not None
    agent.gate.set()
    assert (await held)[0] == 200


async def _async(value: bool) -> bool:
    return value
