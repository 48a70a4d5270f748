"""Blocking sends: a queued send whose caller waits (A2A 1.0 without
returnImmediately, v0.3 without blocking: false) is held through the queue and
the delivery and answered with the agent's own answer, as a slower agent would."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fakes import A2ad, FakeAgent

from a2ad.clock import ManualClock

BOTH_STORES = True  # delivery behaves the same on SQLite and PostgreSQL

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
V1 = {"A2A-Version": "1.0"}


def ws(agent: FakeAgent, **extra: Any) -> dict[str, Any]:
    return {"id": "w", "url": agent.url, "heartbeat": False, **extra}


async def busy_agent_and_a2ad(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, **sections: dict[str, Any]
) -> tuple[FakeAgent, A2ad, asyncio.Task[tuple[int, dict[str, Any]]]]:
    """A 1-slot agent held by a first send, so the next ones are queued."""
    agent = await agent_factory(gate=asyncio.Event())
    a2ad = await a2ad_factory([ws(agent)], clock=ManualClock(), **sections)
    first = asyncio.create_task(a2ad.send("w", "first", message_id="first"))
    await agent.wait_received(1)
    return agent, a2ad, first


async def test_a_blocking_send_that_is_queued_gets_the_agents_answer_with_200(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad, first = await busy_agent_and_a2ad(agent_factory, a2ad_factory)
    held = asyncio.create_task(a2ad.send("w", "held", message_id="held", blocking=True))
    await asyncio.sleep(0.1)
    assert not held.done()  # queued, and its caller waits
    assert agent.gate is not None
    agent.gate.set()
    status, data = await asyncio.wait_for(held, 10)
    assert status == 200, data
    # The agent's own answer (a Message), as the agent itself would have given it.
    assert data["result"]["kind"] == "message"
    assert data["result"]["parts"][0]["text"] == "echo: held"
    assert [r.text for r in agent.received] == ["first", "held"]
    await first


async def test_a_1_0_blocking_send_gets_the_agents_task_under_the_queue_id(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad, first = await busy_agent_and_a2ad(agent_factory, a2ad_factory)
    task = {"id": "agent-t", "contextId": "agent-c", "status": {"state": "TASK_STATE_COMPLETED"}}
    done = {"kind": "message", "messageId": "r", "role": "agent", "parts": []}
    agent.script = [  # the first send's answer (it waits at the gate), then the held one's
        (200, {"jsonrpc": "2.0", "id": 1, "result": done}, {}),
        (200, {"jsonrpc": "2.0", "id": 1, "result": {"task": task}}, {}),
    ]
    held = asyncio.create_task(
        a2ad.send("w", "held", message_id="held", blocking=True, headers=V1, method="SendMessage")
    )
    await asyncio.sleep(0.1)
    assert agent.gate is not None
    agent.gate.set()
    await first
    status, data = await asyncio.wait_for(held, 10)
    assert status == 200, data
    assert "task" in data["result"], data
    got = data["result"]["task"]
    assert got["id"].startswith("q-")
    assert got["status"]["state"] == "TASK_STATE_COMPLETED"
    assert got["metadata"]["a2ad"]["agent_task_id"] == "agent-t"


async def test_return_immediately_and_blocking_false_get_the_submitted_task_at_once(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad, first = await busy_agent_and_a2ad(agent_factory, a2ad_factory)
    status, data = await a2ad.send("w", "v03", message_id="v03")  # blocking: false
    assert status == 202
    assert data["result"]["status"]["state"] == "submitted"
    status, data = await a2ad.send("w", "v1", message_id="v1", headers=V1, method="SendMessage")
    assert status == 202  # returnImmediately: true
    assert data["result"]["task"]["status"]["state"] == "TASK_STATE_SUBMITTED"
    assert agent.gate is not None
    agent.gate.set()
    await first


async def test_a_held_send_past_the_wait_gets_the_current_task_with_202(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad, first = await busy_agent_and_a2ad(
        agent_factory, a2ad_factory, queue={"blocking_wait_seconds": 0}
    )
    status, data = await a2ad.send("w", "held", message_id="held", blocking=True)
    assert status == 202, data
    assert data["result"]["status"]["state"] == "submitted"
    assert agent.gate is not None
    agent.gate.set()
    await first


async def test_past_max_held_a_blocking_send_is_answered_at_once(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad, first = await busy_agent_and_a2ad(
        agent_factory, a2ad_factory, queue={"max_held": 1}
    )
    held = asyncio.create_task(a2ad.send("w", "one", message_id="one", blocking=True))
    await asyncio.sleep(0.1)
    status, data = await a2ad.send("w", "two", message_id="two", blocking=True)
    assert status == 202, data  # the one place is taken
    assert not held.done()
    assert agent.gate is not None
    agent.gate.set()
    assert (await asyncio.wait_for(held, 10))[0] == 200
    await first


async def test_a_held_caller_that_leaves_and_sends_again_reattaches_to_the_same_item(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad, first = await busy_agent_and_a2ad(agent_factory, a2ad_factory)
    held = asyncio.create_task(a2ad.send("w", "m", message_id="m", blocking=True))
    await asyncio.sleep(0.1)
    held.cancel()  # the caller leaves
    await asyncio.gather(held, return_exceptions=True)
    again = asyncio.create_task(a2ad.send("w", "m", message_id="m", blocking=True))
    await asyncio.sleep(0.1)
    assert not again.done()
    assert agent.gate is not None
    agent.gate.set()
    status, data = await asyncio.wait_for(again, 10)
    assert status == 200, data
    assert data["result"]["parts"][0]["text"] == "echo: m"
    await first
    assert [r.text for r in agent.received] == ["first", "m"]  # the message went once


async def test_a_held_send_whose_item_is_cancelled_gets_the_canceled_task(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad, first = await busy_agent_and_a2ad(agent_factory, a2ad_factory)
    held = asyncio.create_task(a2ad.send("w", "m", message_id="m", blocking=True))
    await asyncio.sleep(0.1)
    [item] = await a2ad.daemon.store.list_items(state="queued")
    assert (await a2ad.client.delete(f"/queue/{item.id}")).status == 200
    status, data = await asyncio.wait_for(held, 10)
    assert status == 200, data
    assert data["result"]["id"] == item.id
    assert data["result"]["status"]["state"] == "canceled"
    assert agent.gate is not None
    agent.gate.set()
    await first


async def test_shutdown_answers_held_sends_with_the_current_task(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad, first = await busy_agent_and_a2ad(agent_factory, a2ad_factory)
    held = asyncio.create_task(a2ad.send("w", "m", message_id="m", blocking=True))
    await asyncio.sleep(0.1)
    a2ad.daemon.begin_shutdown()
    status, data = await asyncio.wait_for(held, 5)
    assert status == 202, data
    assert data["result"]["status"]["state"] == "submitted"
    assert agent.gate is not None
    agent.gate.set()
    await first


DONE = {
    "jsonrpc": "2.0",
    "id": 1,
    "result": {"kind": "message", "messageId": "r", "role": "agent", "parts": []},
}


def v03_send(message_id: str, *, blocking: bool = True, rpc_id: int = 5) -> dict[str, Any]:
    params: dict[str, Any] = {
        "message": {
            "role": "user",
            "messageId": message_id,
            "parts": [{"kind": "text", "text": "x"}],
        }
    }
    if not blocking:
        params["configuration"] = {"blocking": False}
    return {"jsonrpc": "2.0", "id": rpc_id, "method": "message/send", "params": params}


async def test_an_answer_that_is_not_a2a_reaches_a_held_or_returning_caller_as_failed(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """The agent answers a delivery with an HTML 500 (a final answer): the held
    caller, and a caller sending the same messageId later, get a JSON-RPC answer
    with the FAILED Task under the queue id, as GetTask shows it; never `null`."""
    agent, a2ad, first = await busy_agent_and_a2ad(agent_factory, a2ad_factory)
    html = (500, b"<html>Internal Server Error</html>", {"Content-Type": "text/html"})
    agent.script = [(200, DONE, {}), html]
    held = asyncio.create_task(a2ad.client.post("/workspaces/w/a2a", json=v03_send("held")))
    await asyncio.sleep(0.1)
    assert agent.gate is not None
    agent.gate.set()
    await first
    resp = await asyncio.wait_for(held, 10)
    assert resp.status == 200
    data = await resp.json()
    assert data["id"] == 5 and data["result"]["status"]["state"] == "failed", data
    qid = data["result"]["id"]
    assert qid.startswith("q-")
    again = await a2ad.client.post("/workspaces/w/a2a", json=v03_send("held", rpc_id=6))
    assert again.status == 200
    replayed = await again.json()
    assert replayed["id"] == 6 and replayed["result"]["id"] == qid, replayed
    assert replayed["result"]["status"]["state"] == "failed"
    assert len(agent.received) == 2  # the agent saw it once


async def test_the_same_message_id_after_delivery_gets_the_task_under_the_queue_id(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """A held caller leaves, its item is delivered with the agent's Task, and the
    caller sends the messageId again: the Task it gets is named by the queue id, as
    a caller that stayed and GetTask see it, not by the agent's own task id."""
    agent, a2ad, first = await busy_agent_and_a2ad(agent_factory, a2ad_factory)
    task = {
        "kind": "task",
        "id": "agent-t",
        "contextId": "agent-c",
        "status": {"state": "completed"},
    }
    agent.script = [(200, DONE, {}), (200, {"jsonrpc": "2.0", "id": 1, "result": task}, {})]
    leaving = asyncio.create_task(a2ad.send("w", "m", message_id="leave", blocking=True))
    await asyncio.sleep(0.1)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert agent.gate is not None
    agent.gate.set()
    await first
    [item] = [i for i in await a2ad.daemon.store.list_items() if i.message_id == "leave"]
    await a2ad.final(item.id)
    for blocking in (True, False):
        status, data = await a2ad.send("w", "m", message_id="leave", blocking=blocking)
        assert status == 200, data
        assert data["result"]["id"] == item.id, data
        assert data["result"]["metadata"]["a2ad"]["agent_task_id"] == "agent-t"
    got = await a2ad.rpc("w", "tasks/get", {"id": item.id})
    assert got["result"]["id"] == item.id
    assert len(agent.received) == 2


async def test_each_version_reads_only_its_own_field_for_not_waiting(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """A 1.0 send with v0.3's `blocking: false` is held (a 1.0 agent ignores that
    field and waits); a v0.3 send with 1.0's `returnImmediately` is held too."""
    agent, a2ad, first = await busy_agent_and_a2ad(agent_factory, a2ad_factory)
    v1 = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "SendMessage",
        "params": {
            "message": {"role": "ROLE_USER", "messageId": "v1", "parts": [{"text": "x"}]},
            "configuration": {"blocking": False},
        },
    }
    v03 = v03_send("v03")
    v03["params"]["configuration"] = {"returnImmediately": True}
    sends = [
        asyncio.create_task(a2ad.client.post("/workspaces/w/a2a", json=v1, headers=V1)),
        asyncio.create_task(a2ad.client.post("/workspaces/w/a2a", json=v03)),
    ]
    await asyncio.sleep(0.2)
    assert not any(s.done() for s in sends)  # both held
    assert agent.gate is not None
    agent.gate.set()
    await first
    for send in sends:
        resp = await asyncio.wait_for(send, 10)
        assert resp.status == 200, await resp.text()
