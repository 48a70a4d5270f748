"""Queue-on-busy and delivery, end to end through the HTTP API, with real agents.

Most tests give a2ad a ManualClock: its own timers (pauses, backoff, the
housekeeping loop) then never fire unless the test moves time, so whatever
gets delivered without moving it was delivered by a trigger, at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fakes import A2ad, FakeAgent, jsonrpc_task, store_query, store_write_lock, wait_until

from a2ad.clock import ManualClock
from a2ad.errors import StoreUnavailable
from a2ad.store import NewItem
from a2ad.store.postgres import PostgresStore

BOTH_STORES = True  # delivery behaves the same on SQLite and PostgreSQL

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
V1 = {"A2A-Version": "1.0"}


def ws(agent: FakeAgent, **extra: Any) -> dict[str, Any]:
    return {"id": "w", "url": agent.url, "heartbeat": False, **extra}


async def settle_loop() -> None:
    """Let every ready callback run (for asserting that nothing more happens)."""
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_direct_answer_passes_status_body_and_headers(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    body = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "bad params"}}
    agent.script = [(400, body, {})]
    a2ad = await a2ad_factory([ws(agent)])
    status, data = await a2ad.send(
        "w", "hi", headers={"A2A-Version": "1.0", "A2A-Extensions": "urn:x"}
    )
    assert (status, data) == (400, body)
    got = agent.received[0]
    assert got.headers["A2A-Version"] == "1.0"
    assert got.headers["A2A-Extensions"] == "urn:x"
    assert "Authorization" not in got.headers
    # A direct answer is not stored.
    assert await a2ad.daemon.store.counts() == {}


async def test_five_sends_to_a_one_slot_agent_one_direct_four_queued_all_in_order(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory(slots=1, gate=asyncio.Event())
    assert agent.gate is not None
    a2ad = await a2ad_factory([ws(agent)], clock=ManualClock())
    first = asyncio.create_task(a2ad.send("w", "m0", message_id="id-0"))
    await agent.wait_received(1)
    queued = []
    for i in range(1, 5):
        status, data = await a2ad.send("w", f"m{i}", message_id=f"id-{i}")
        assert status == 202, data
        task = jsonrpc_task(data)
        assert task["kind"] == "task"
        assert task["status"]["state"] == "submitted"
        meta = task["metadata"]["a2ad"]
        assert meta["queued"] is True and meta["queue_id"] == task["id"]
        assert meta["position"] == i
        assert task["id"].startswith("q-") and len(task["id"]) == 34
        queued.append(task["id"])
    agent.gate.set()
    status, direct = await first
    assert status == 200 and direct["result"]["parts"][0]["text"] == "echo: m0"
    items = [await a2ad.final(qid) for qid in queued]
    assert [i["state"] for i in items] == ["delivered"] * 4
    assert [r.text for r in agent.served] == ["m0", "m1", "m2", "m3", "m4"]
    assert agent.max_active == 1
    for i, item in enumerate(items, start=1):
        assert item["attempts"] == 0
        assert item["result"]["result"]["parts"][0]["text"] == f"echo: m{i}"
    # GetTask on a queue id, in both protocol versions.
    v03 = await a2ad.rpc("w", "tasks/get", {"id": queued[0]})
    assert v03["id"] == 7
    assert v03["result"]["kind"] == "task"
    assert v03["result"]["id"] == queued[0]
    assert v03["result"]["status"]["state"] == "completed"
    assert v03["result"]["status"]["message"]["parts"] == [{"kind": "text", "text": "echo: m1"}]
    v1 = await a2ad.rpc("w", "GetTask", {"id": queued[1]}, headers=V1)
    assert "kind" not in v1["result"] and "task" not in v1["result"]
    assert v1["result"]["status"]["state"] == "TASK_STATE_COMPLETED"
    assert v1["result"]["status"]["message"]["role"] == "ROLE_AGENT"
    assert v1["result"]["status"]["message"]["parts"] == [{"text": "echo: m2"}]


async def test_queued_answer_in_the_1_0_shape(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory(gate=asyncio.Event())
    a2ad = await a2ad_factory([ws(agent)], clock=ManualClock())
    first = asyncio.create_task(a2ad.send("w", "a", headers=V1))
    await agent.wait_received(1)
    status, data = await a2ad.send("w", "b", headers=V1, rpc_id="abc")
    assert status == 202 and data["id"] == "abc"
    task = data["result"]["task"]
    assert task["status"]["state"] == "TASK_STATE_SUBMITTED" and "kind" not in task
    assert task["contextId"]
    got = await a2ad.rpc("w", "GetTask", {"id": task["id"]}, headers=V1)
    assert got["result"]["status"]["state"] == "TASK_STATE_SUBMITTED"
    assert got["result"]["contextId"] == task["contextId"]
    assert agent.gate is not None
    agent.gate.set()
    await first
    await a2ad.final(task["id"])
    # The stored A2A-Version went with the queued request.
    assert agent.received[1].headers["A2A-Version"] == "1.0"


async def test_unknown_queue_id_is_task_not_found(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([ws(agent)])
    data = await a2ad.rpc("w", "tasks/get", {"id": "q-" + "0" * 32})
    assert data["error"]["code"] == -32001
    assert agent.received == []


async def test_next_item_goes_when_a_slot_frees_without_heartbeats(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """No timer may be needed between deliveries: time never moves here."""
    agent = await agent_factory(slots=1, gate=asyncio.Event())
    a2ad = await a2ad_factory([ws(agent)], clock=ManualClock())
    first = asyncio.create_task(a2ad.send("w", "m0"))
    await agent.wait_received(1)
    qids = [jsonrpc_task((await a2ad.send("w", f"m{i}"))[1])["id"] for i in range(1, 4)]
    assert agent.gate is not None
    agent.gate.set()
    await first
    for qid in qids:
        assert (await a2ad.final(qid))["state"] == "delivered"
    assert len(agent.received) == 4  # no busy answers: each went as the slot freed


async def test_next_item_goes_when_a_slot_frees_with_heartbeats(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """A heartbeat that reports the load (a2ad's own request included) does not
    stop the next item from going the moment a2ad's request ends."""
    agent = await agent_factory(slots=1, gate=asyncio.Event())
    a2ad = await a2ad_factory([ws(agent, heartbeat=True, token="hb")], clock=ManualClock())
    hb = {"Authorization": "Bearer hb"}
    first = asyncio.create_task(a2ad.send("w", "m0"))
    await agent.wait_received(1)
    # The agent reports one active task: a2ad's own, so no external load.
    resp = await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 1}, headers=hb)
    assert resp.status == 200
    qids = [jsonrpc_task((await a2ad.send("w", f"m{i}"))[1])["id"] for i in range(1, 4)]
    assert (await resp.json()) == {"queue_depth": 0}
    assert agent.gate is not None
    agent.gate.set()
    await first
    for qid in qids:
        assert (await a2ad.final(qid))["state"] == "delivered"
    assert len(agent.received) == 4


async def test_busy_three_times_then_ok_is_delivered_once_without_attempts(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """SPEC defect 1: a busy answer returns the same row; with a messageId too."""
    clock = ManualClock()
    agent = await agent_factory()
    busy = (503, {"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": "busy"}}, {})
    agent.script = [busy, busy, busy]
    a2ad = await a2ad_factory([ws(agent)], clock=clock)
    status, data = await a2ad.send("w", "hello", message_id="m-1")
    assert status == 202  # the direct send met a busy agent
    qid = jsonrpc_task(data)["id"]
    # Pauses of 0.5, 1 and 2 s, doubling; nothing is sent before a pause ends.
    for pause, received in ((0.5, 2), (1.0, 3), (2.0, 4)):
        await settle_loop()
        assert len(agent.received) == received - 1, "retried before the pause ended"
        await clock.advance(pause)
        await agent.wait_received(received)
    item = await a2ad.final(qid)
    assert item["state"] == "delivered"
    assert item["attempts"] == 0 and item["busy_answers"] == 3
    assert [r.text for r in agent.served] == ["hello"]
    counts = await a2ad.daemon.store.counts()
    assert counts == {"w": {"delivered": 1}}


async def test_retry_after_sets_the_pause(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    agent.script = [(429, {"error": "slow down"}, {"Retry-After": "7"})]
    a2ad = await a2ad_factory([ws(agent)], clock=clock)
    status, _ = await a2ad.send("w", "x")
    assert status == 202
    await clock.advance(6.5)
    await settle_loop()
    assert len(agent.received) == 1
    info = await (await a2ad.client.get("/workspaces/w")).json()
    assert info["paused_until"] is not None
    # A send during the pause queues behind, even with the slot free.
    status, _ = await a2ad.send("w", "y")
    assert status == 202
    await clock.advance(0.5)
    await agent.wait_received(3)
    assert [r.text for r in agent.received] == ["x", "x", "y"]


async def test_failures_use_attempts_back_off_and_end_failed(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    a2ad = await a2ad_factory(
        [ws(agent, heartbeat=True, token="hb")], clock=clock, queue={"max_attempts": 5}
    )
    hb = {"Authorization": "Bearer hb"}
    # Full with someone else's work: the send is queued.
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 1}, headers=hb)
    status, data = await a2ad.send("w", "doomed")
    assert status == 202
    qid = jsonrpc_task(data)["id"]
    bad_gateway = (502, {"error": "upstream down"}, {})
    agent.script = [bad_gateway] * 5
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 0}, headers=hb)
    for attempt in range(1, 5):
        await agent.wait_received(attempt)
        await wait_until(lambda: a2ad.daemon.registry.get("w").queued_total == 1)
        item = await a2ad.item(qid)
        assert item["state"] == "queued" and item["attempts"] == attempt
        assert "502" in item["last_error"]
        # Backoff: not retried until its not-before, which grows.
        await settle_loop()
        assert len(agent.received) == attempt
        await clock.advance(2.0**attempt)
    item = await a2ad.final(qid)
    assert item["state"] == "failed" and item["attempts"] == 5
    assert "502" in item["last_error"]
    task = (await a2ad.rpc("w", "tasks/get", {"id": qid}))["result"]
    assert task["status"]["state"] == "failed"
    assert "502" in task["status"]["message"]["parts"][0]["text"]


async def test_direct_failure_goes_back_to_the_caller_and_stores_nothing(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    agent.script = [
        (502, {"error": "x"}, {}),
        (200, b"not json", {}),
        # Looks like a JSON-RPC answer to a byte check, but is not JSON.
        (200, b'{"jsonrpc": "2.0", "id": 1, "result": oops}', {}),
    ]
    a2ad = await a2ad_factory([ws(agent)])
    status, data = await a2ad.send("w", "x", rpc_id=5)
    assert status == 502
    assert data["id"] == 5 and data["error"]["data"]["code"] == "upstream_failed"
    for _ in range(2):
        status, data = await a2ad.send("w", "x")
        assert status == 502 and "malformed" in data["error"]["message"]
    assert await a2ad.daemon.store.counts() == {}


async def test_direct_timeout_is_504(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory(delay=2.0)
    a2ad = await a2ad_factory([ws(agent, request_timeout_seconds=0.2)])
    status, data = await a2ad.send("w", "x")
    assert status == 504 and data["error"]["data"]["code"] == "upstream_timeout"


async def test_heartbeat_with_free_slots_fills_every_slot(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory(gate=asyncio.Event())
    a2ad = await a2ad_factory(
        [ws(agent, heartbeat=True, token="hb", max_concurrent=3)], clock=ManualClock()
    )
    hb = {"Authorization": "Bearer hb"}
    await a2ad.client.post(
        "/workspaces/w/heartbeat", json={"active_tasks": 3, "max_concurrent_tasks": 3}, headers=hb
    )
    for i in range(5):
        status, _ = await a2ad.send("w", f"m{i}")
        assert status == 202
    resp = await a2ad.client.post(
        "/workspaces/w/heartbeat", json={"active_tasks": 0, "max_concurrent_tasks": 3}, headers=hb
    )
    assert (await resp.json()) == {"queue_depth": 5}
    await agent.wait_received(3)
    await settle_loop()
    assert agent.active == 3 and len(agent.received) == 3
    assert [r.text for r in agent.received] == ["m0", "m1", "m2"]
    assert agent.gate is not None
    agent.gate.set()
    await agent.wait_received(5)


async def test_heartbeat_capacity_and_external_load(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([ws(agent, heartbeat=True, token="hb", max_concurrent=1)])
    hb = {"Authorization": "Bearer hb"}
    await a2ad.client.post(
        "/workspaces/w/heartbeat", json={"active_tasks": 2, "max_concurrent_tasks": 4}, headers=hb
    )
    info = await (await a2ad.client.get("/workspaces/w")).json()
    assert info["state"] == "online"
    assert info["capacity"] == 4 and info["free_slots"] == 2 and info["active_tasks"] == 2


async def test_sends_while_items_wait_queue_behind_them(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    agent.script = [(503, {}, {})]
    a2ad = await a2ad_factory([ws(agent)], clock=clock)
    s1, d1 = await a2ad.send("w", "first")
    s2, d2 = await a2ad.send("w", "second")
    assert (s1, s2) == (202, 202)
    assert len(agent.received) == 1  # the second never jumped the line
    assert jsonrpc_task(d2)["metadata"]["a2ad"]["position"] == 2
    await clock.advance(0.5)
    for data in (d1, d2):
        assert (await a2ad.final(jsonrpc_task(data)["id"]))["state"] == "delivered"
    assert [r.text for r in agent.served] == ["first", "second"]


async def test_duplicate_message_id_gets_the_same_queue_id(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    agent.script = [(503, {}, {})]
    a2ad = await a2ad_factory([ws(agent)], clock=clock)
    _, d1 = await a2ad.send("w", "x", message_id="same", rpc_id=1)
    status, d2 = await a2ad.send("w", "x", message_id="same", rpc_id=2)
    assert status == 202 and d2["id"] == 2
    assert jsonrpc_task(d1)["id"] == jsonrpc_task(d2)["id"]
    assert (await a2ad.daemon.store.counts())["w"] == {"queued": 1}
    await clock.advance(0.5)
    await a2ad.final(jsonrpc_task(d1)["id"])
    assert len(agent.served) == 1


async def test_a_delivery_longer_than_the_lease_is_delivered_once(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """Real time here: the lease is renewed while the sweeper runs every second."""
    agent = await agent_factory(delay=1.6)
    a2ad = await a2ad_factory([ws(agent, heartbeat=True, token="hb")], queue={"lease_seconds": 0.3})
    hb = {"Authorization": "Bearer hb"}
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 1}, headers=hb)
    _, data = await a2ad.send("w", "long")
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 0}, headers=hb)
    item = await a2ad.final(jsonrpc_task(data)["id"])
    assert item["state"] == "delivered" and item["attempts"] == 0
    assert len(agent.received) == 1


async def test_offline_workspace_queues_and_delivers_on_its_next_heartbeat(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    a2ad = await a2ad_factory(
        # The probe that going offline asks for says "not running", but a
        # heartbeat came recently: the debounce waits for a second observation.
        [ws(agent, heartbeat=True, token="hb", status_command=["false"])],
        clock=clock,
        liveness={"heartbeat_timeout_seconds": 10},
    )
    hb = {"Authorization": "Bearer hb"}
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 0}, headers=hb)
    await clock.advance(11)  # the housekeeping loop notices the silence
    info = await (await a2ad.client.get("/workspaces/w")).json()
    assert info["state"] == "offline"
    status, data = await a2ad.send("w", "while offline")
    assert status == 202 and agent.received == []
    await a2ad.client.post("/workspaces/w/heartbeat", json={"active_tasks": 0}, headers=hb)
    assert (await a2ad.final(jsonrpc_task(data)["id"]))["state"] == "delivered"


async def test_non_message_methods_are_forwarded_never_queued(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    agent.script = [(503, {}, {}), (200, {"jsonrpc": "2.0", "id": 7, "result": {"x": 1}}, {})]
    a2ad = await a2ad_factory([ws(agent)], clock=clock)
    await a2ad.send("w", "queued")  # busy: queued, the workspace paused
    data = await a2ad.rpc("w", "tasks/get", {"id": "agent-task-1"})
    assert data == {"jsonrpc": "2.0", "id": 7, "result": {"x": 1}}
    assert agent.received[1].body["method"] == "tasks/get"


async def test_answers_are_asked_for_uncompressed(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """a2ad relays and stores the agent's bytes as they are, so it must not offer
    gzip: an agent behind a compressing proxy would answer bytes a2ad cannot read."""
    agent = await agent_factory()
    a2ad = await a2ad_factory([ws(agent)])
    status, data = await a2ad.send("w", "hi")
    assert status == 200, data
    assert agent.received[0].headers.get("Accept-Encoding") == "identity"


async def test_a_send_whose_caller_left_mid_write_is_still_delivered(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """The caller's handler is cancelled (it disconnected) while its item's write
    is in the group commit: the write commits, so the item must be counted and
    delivered, not left in the store where the pump does not look."""
    agent = await agent_factory()
    a2ad = await a2ad_factory([ws(agent)], clock=ManualClock())  # no housekeeping recount
    workspace = a2ad.daemon.registry.get("w")
    body = (
        b'{"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message":'
        b' {"role": "user", "messageId": "m-left", "parts": [{"kind": "text", "text": "left"}]}}}'
    )
    new = NewItem(workspace="w", method="message/send", body=body, message_id="m-left")
    send = asyncio.create_task(a2ad.daemon.dispatcher.enqueue(workspace, new))
    await asyncio.sleep(0)  # the write is queued for the writer
    send.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await send
    await agent.wait_received(1)
    assert agent.received[0].text == "left"
    item = await a2ad.final(new.id)
    assert item["state"] == "delivered"
    assert workspace.queued_total == 0


async def test_a_send_cancelled_while_its_item_waits_for_the_store_ends_after_the_write(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """A send's write cannot be cancelled by its caller: a handler cancelled while
    its item waits for the store's lock (another process holds it) is told only
    once the write is done, and only then stops counting as a send being written,
    so no later send can overtake the item and no cap be overshot meanwhile."""
    agent = await agent_factory(slots=1, gate=asyncio.Event())
    assert agent.gate is not None
    a2ad = await a2ad_factory(
        [ws(agent, max_concurrent=1)],
        clock=ManualClock(),
        store={"busy_timeout_seconds": 3, "statement_timeout_seconds": 3},
    )
    workspace = a2ad.daemon.registry.get("w")
    first = asyncio.create_task(a2ad.send("w", "first"))
    await agent.wait_received(1)  # the one slot is taken: the next send is queued
    body = (
        b'{"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {"message":'
        b' {"role": "user", "messageId": "m-cut", "parts": [{"kind": "text", "text": "cut"}]}}}'
    )
    new = NewItem(workspace="w", method="message/send", body=body, message_id="m-cut")
    async with store_write_lock(a2ad.daemon.settings.store):
        send = asyncio.create_task(a2ad.daemon.dispatcher.enqueue(workspace, new))
        await wait_until(lambda: workspace.admission.enqueuing == 1)
        send.cancel()
        await settle_loop()
        assert not send.done()  # still waiting for its write
        assert workspace.admission.enqueuing == 1
    with pytest.raises(asyncio.CancelledError):
        await send
    assert workspace.admission.enqueuing == 0
    assert workspace.queued_total == 1
    agent.gate.set()
    assert (await first)[0] == 200
    item = await a2ad.final(new.id)
    assert item["state"] == "delivered"
    assert [r.text for r in agent.received] == ["first", "cut"]


async def test_sends_queued_together_during_a_pause_are_delivered_when_it_ends(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """The pump slept on an empty queue's plan (a minute) when the agent said busy
    to a send that would not queue; then several sends were stored in one commit
    during the pause. Each send's item wakes such a pump, so it plans for the
    pause's end and delivers then, not a minute later."""
    agent = await agent_factory()
    clock = ManualClock()
    a2ad = await a2ad_factory(
        [ws(agent, max_concurrent=1)],
        clock=clock,
        store={"busy_timeout_seconds": 5, "statement_timeout_seconds": 5},
    )
    workspace = a2ad.daemon.registry.get("w")
    assert (await a2ad.send("w", "first"))[0] == 200  # direct: the agent is online
    await settle_loop()  # the queue is empty: the pump sleeps on its longest plan
    agent.script.append((503, {"error": "busy"}, {"Retry-After": "2"}))
    status, _ = await a2ad.send("w", "refused", headers={"A2AD-Queue": "never"})
    assert status == 503 and workspace.paused(clock.monotonic()) and workspace.queued_total == 0
    async with store_write_lock(a2ad.daemon.settings.store):
        # Another write holds the writer while three callers send: one commit takes all.
        other = asyncio.create_task(a2ad.daemon.store.probe_write(clock.now()))
        await asyncio.sleep(0.05)
        sends = [asyncio.create_task(a2ad.send("w", f"s{i}")) for i in range(3)]
        await wait_until(lambda: workspace.admission.enqueuing == 3)
    await other
    assert [(await s)[0] for s in sends] == [202, 202, 202]
    assert workspace.queued_total == 3
    for _ in range(3):  # past the 2 s pause, short of the 5 s re-check
        await clock.advance(1)
        await settle_loop()
    await wait_until(lambda: workspace.queued_total == 0)
    assert [r.text for r in agent.received][-3:] == ["s0", "s1", "s2"]


@pytest.mark.sqlite_only
async def test_a_send_waiting_for_a_writer_that_stopped_ends_and_is_counted_out(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """A send's write cannot be cancelled by its caller, so it must end when the
    writer ends: here the store's close is itself cancelled while a batch waits
    for another process's lock (which cancels the writer). The send is told the
    store is unavailable, and admission stops counting it."""
    agent = await agent_factory()
    a2ad = await a2ad_factory([ws(agent)], store={"busy_timeout_seconds": 2})
    workspace = a2ad.daemon.registry.get("w")
    new = NewItem(workspace="w", method="message/send", body=b"{}", message_id="x")
    async with store_write_lock(a2ad.daemon.settings.store):
        send = asyncio.create_task(a2ad.daemon.dispatcher.enqueue(workspace, new))
        await wait_until(lambda: workspace.admission.enqueuing == 1)
        await asyncio.sleep(0.1)  # the batch waits on the writer thread for the lock
        closer = asyncio.create_task(a2ad.daemon.store.close())
        await asyncio.sleep(0.05)
        closer.cancel()  # a shutdown whose clean-up is itself cancelled
        await asyncio.gather(closer, return_exceptions=True)
    done, _ = await asyncio.wait({send}, timeout=5)
    assert done, "the send still waits for a writer that is gone"
    with pytest.raises(StoreUnavailable):
        send.result()
    assert workspace.admission.enqueuing == 0


async def test_a_claim_that_outlived_its_outcome_is_delivered_once_its_lease_lapses(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, store_kind: str
) -> None:
    """On PostgreSQL a server crash can keep a claim and lose its outcome while a2ad
    runs on: a `dispatching` row no delivery of this process holds. Once its stored
    lease has run out it goes back to the queue and is delivered."""
    if store_kind == "sqlite":
        pytest.skip("SQLite's writer is this process: no claim outlives it while a2ad runs")
    agent = await agent_factory(slots=1, gate=asyncio.Event())
    assert agent.gate is not None
    clock = ManualClock()
    a2ad = await a2ad_factory([ws(agent)], clock=clock)
    first = asyncio.create_task(a2ad.send("w", "m0"))
    await agent.wait_received(1)
    status, data = await a2ad.send("w", "m1")
    assert status == 202
    qid = jsonrpc_task(data)["id"]
    settings = a2ad.daemon.settings.store
    async with PostgresStore(settings.url, schema=settings.schema_name) as stranger:
        [stray] = await stranger.claim("w", now=clock.now(), lease_seconds=10, promote_after=60)
    assert stray.id == qid
    await clock.advance(1)  # housekeeping hears of it and counts again
    agent.gate.set()
    assert (await first)[0] == 200
    await settle_loop()
    assert [r.text for r in agent.served] == ["m0"]  # its lease still runs
    assert (await a2ad.item(qid))["state"] == "dispatching"
    for _ in range(12):  # a housekeeping pass a second, each let finish its queries
        await clock.advance(1)
        await asyncio.sleep(0.05)
    item = await asyncio.wait_for(a2ad.final(qid), 10)  # on real time: the clock stands
    assert (item["state"], item["attempts"]) == ("delivered", 1)
    assert [r.text for r in agent.served] == ["m0", "m1"]
    assert agent.max_active == 1


async def test_a_change_no_notification_told_of_is_found_by_the_slow_poll(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, store_kind: str
) -> None:
    """On PostgreSQL the daemon hears other processes' commits by LISTEN; one that
    sent no NOTIFY (a tool of the operator's own) is found by the slow recount."""
    if store_kind == "sqlite":
        pytest.skip("SQLite's data_version sees every other writer's commit at once")
    agent = await agent_factory()
    clock = ManualClock()
    a2ad = await a2ad_factory([ws(agent)], clock=clock)
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "message/send",
        "params": {"message": {"messageId": "m-x", "role": "user", "parts": [{"text": "x"}]}},
    }
    await asyncio.to_thread(
        store_query,
        a2ad.daemon.settings.store,
        "INSERT INTO items (id, workspace, method, body, message_id, enqueued_at, updated_at)"
        " VALUES ('q-outside', 'w', 'message/send', ?, 'm-x', ?, ?)",
        (json.dumps(body).encode(), clock.now(), clock.now()),
    )
    await clock.advance(1)
    await asyncio.sleep(0.1)
    assert agent.received == []  # not told, not counted yet
    for _ in range(61):
        await clock.advance(1)
        await asyncio.sleep(0.01)
    item = await asyncio.wait_for(a2ad.final("q-outside"), 10)
    assert item["state"] == "delivered"
    assert [r.text for r in agent.served] == ["x"]
