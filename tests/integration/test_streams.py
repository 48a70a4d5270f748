"""Streams, cards, cancel and the agent's ids, through a2ad to real agents."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientResponse
from fakes import A2ad, FakeAgent, jsonrpc_task, wait_until

from a2ad.clock import ManualClock

BOTH_STORES = True  # the same behaviour on SQLite and PostgreSQL

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
V1 = {"A2A-Version": "1.0"}


def stream_body(text: str, method: str = "message/stream", **message: Any) -> dict[str, Any]:
    msg = {
        "messageId": f"m-{uuid.uuid4().hex}",
        "role": "user",
        "parts": [{"kind": "text", "text": text}],
        **message,
    }
    return {"jsonrpc": "2.0", "id": 11, "method": method, "params": {"message": msg}}


async def events(resp: ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON-RPC responses in an SSE stream, as they arrive."""
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line and data:
            yield json.loads("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].strip())


async def collect(resp: ClientResponse) -> list[dict[str, Any]]:
    return [e async for e in events(resp)]


async def busy(a2ad: A2ad) -> None:
    """Someone else's work fills the only slot."""
    resp = await a2ad.client.post(
        "/workspaces/w/heartbeat", json={"active_tasks": 1}, headers={"Authorization": "Bearer hb"}
    )
    assert resp.status == 200


async def free(a2ad: A2ad) -> None:
    resp = await a2ad.client.post(
        "/workspaces/w/heartbeat", json={"active_tasks": 0}, headers={"Authorization": "Bearer hb"}
    )
    assert resp.status == 200


async def setup(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, **agent_args: Any
) -> tuple[FakeAgent, A2ad]:
    agent = await agent_factory(**agent_args)
    a2ad = await a2ad_factory([{"id": "w", "url": agent.url, "token": "hb"}], clock=ManualClock())
    return agent, a2ad


async def test_direct_stream_relays_the_first_event_before_the_agent_ends(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad = await setup(agent_factory, a2ad_factory, before_last=asyncio.Event())
    assert agent.before_last is not None
    resp = await a2ad.client.post("/workspaces/w/a2a", json=stream_body("hi"))
    assert resp.status == 200
    stream = events(resp)
    async with asyncio.timeout(5):  # a2ad buffering the stream would hang here
        first = await anext(stream)
    assert first["result"]["kind"] == "task" and first["result"]["id"] == "agent-task-0"
    assert not agent.before_last.is_set()  # the agent has not sent its last event yet
    agent.before_last.set()
    rest = [e async for e in stream]
    assert [e["result"]["kind"] for e in rest] == [
        "status-update",
        "artifact-update",
        "status-update",
    ]
    assert rest[-1]["result"]["final"] is True
    assert a2ad.daemon.registry.get("w").in_flight == 0


async def test_a_caller_leaving_a_direct_stream_frees_the_slot(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad = await setup(agent_factory, a2ad_factory, before_last=asyncio.Event())
    ws = a2ad.daemon.registry.get("w")
    resp = await a2ad.client.post("/workspaces/w/a2a", json=stream_body("hi"))
    await anext(events(resp))
    assert ws.in_flight == 1
    resp.close()  # the caller goes away mid-stream
    assert agent.before_last is not None
    agent.before_last.set()  # the agent's next write finds no reader
    await wait_until(lambda: ws.in_flight == 0)


@pytest.mark.parametrize("protocol", ["0.3", "1.0"])
async def test_queued_stream_is_one_task_under_the_queue_id(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, protocol: str
) -> None:
    agent, a2ad = await setup(agent_factory, a2ad_factory)
    await busy(a2ad)
    headers = V1 if protocol == "1.0" else {}
    body = stream_body("later")
    if protocol == "1.0":
        body = stream_body(
            "later", "SendStreamingMessage", role="ROLE_USER", parts=[{"text": "later"}]
        )
    resp = await a2ad.client.post("/workspaces/w/a2a", json=body, headers=headers)
    assert resp.status == 200
    stream = events(resp)
    first = (await anext(stream))["result"]
    task = first["task"] if protocol == "1.0" else first
    qid = task["id"]
    assert qid.startswith("q-")
    assert task["status"]["state"] in ("submitted", "TASK_STATE_SUBMITTED")
    assert task["metadata"]["a2ad"]["queued"] is True
    await free(a2ad)
    rest = [e["result"] async for e in stream]
    if protocol == "1.0":
        assert [next(iter(e)) for e in rest] == [
            "statusUpdate",
            "statusUpdate",
            "statusUpdate",
            "artifactUpdate",
            "statusUpdate",
        ]
        bodies = [next(iter(e.values())) for e in rest]
        states = [b["status"]["state"] for b in bodies if "status" in b]
        # Never back to submitted once delivery started.
        assert states == [
            "TASK_STATE_WORKING",
            "TASK_STATE_WORKING",
            "TASK_STATE_WORKING",
            "TASK_STATE_COMPLETED",
        ]
        assert bodies[3]["artifact"]["parts"] == [{"text": "echo: later"}]
    else:
        assert [e["kind"] for e in rest] == [
            "status-update",
            "status-update",
            "status-update",
            "artifact-update",
            "status-update",
        ]
        bodies = rest
        # v0.3 clients need these on every status-update, or their stream ends.
        assert all("final" in e for e in rest if e["kind"] == "status-update")
        assert all("contextId" in e and "taskId" in e for e in rest)
        assert rest[-1]["final"] is True and rest[-1]["status"]["state"] == "completed"
    assert {b["taskId"] for b in bodies} == {qid}
    assert {b["contextId"] for b in bodies} == {task["contextId"]}
    # The result is the Task the events add up to, under the queue id for callers.
    item = await a2ad.final(qid)
    assert item["state"] == "delivered"
    got = await a2ad.rpc(
        "w", "GetTask" if protocol == "1.0" else "tasks/get", {"id": qid}, headers=headers
    )
    result = got["result"]
    assert result["id"] == qid and result["contextId"] == task["contextId"]
    assert result["status"]["state"] in ("completed", "TASK_STATE_COMPLETED")
    assert result["metadata"]["a2ad"]["agent_task_id"] == "agent-task-0"
    assert len(agent.served) == 1


async def test_a_caller_that_leaves_a_queued_stream_loses_nothing(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    _, a2ad = await setup(agent_factory, a2ad_factory)
    await busy(a2ad)
    resp = await a2ad.client.post("/workspaces/w/a2a", json=stream_body("keep me"))
    qid = (await anext(events(resp)))["result"]["id"]
    resp.close()
    await free(a2ad)
    item = await a2ad.final(qid)
    assert item["state"] == "delivered"
    assert item["result"]["result"]["artifacts"][0]["parts"][0]["text"] == "echo: keep me"
    # The result is kept: GetTask gives the final Task. (Subscribing to a task already
    # terminal is the specification's -32004, UnsupportedOperationError, not a stream.)
    task = (await a2ad.rpc("w", "tasks/get", {"id": qid}))["result"]
    assert task["status"]["state"] == "completed" and task["id"] == qid
    resp = await a2ad.client.post(
        "/workspaces/w/a2a",
        json={"jsonrpc": "2.0", "id": 2, "method": "tasks/resubscribe", "params": {"id": qid}},
    )
    assert resp.status == 200 and (await resp.json())["error"]["code"] == -32004


async def test_cancel_a_queued_item_ends_its_stream_and_it_is_never_delivered(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad = await setup(agent_factory, a2ad_factory)
    await busy(a2ad)
    resp = await a2ad.client.post("/workspaces/w/a2a", json=stream_body("never"))
    stream = events(resp)
    qid = (await anext(stream))["result"]["id"]
    cancelled = await a2ad.rpc("w", "tasks/cancel", {"id": qid})
    assert cancelled["result"]["status"]["state"] == "canceled"
    last = [e["result"] async for e in stream]
    assert last[-1]["kind"] == "status-update" and last[-1]["final"] is True
    assert last[-1]["status"]["state"] == "canceled"
    await free(a2ad)
    assert (await a2ad.item(qid))["state"] == "cancelled"
    again = await a2ad.rpc("w", "CancelTask", {"id": qid}, headers=V1)
    assert again["error"]["code"] == -32002
    await asyncio.sleep(0.05)
    assert agent.received == []


async def test_cancel_while_being_delivered_is_not_cancelable(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad = await setup(agent_factory, a2ad_factory, gate=asyncio.Event())
    await busy(a2ad)
    _, data = await a2ad.send("w", "slow")
    qid = jsonrpc_task(data)["id"]
    await free(a2ad)
    await agent.wait_received(1)
    answer = await a2ad.rpc("w", "CancelTask", {"id": qid}, headers=V1)
    assert answer["error"]["code"] == -32002
    assert agent.gate is not None
    agent.gate.set()
    assert (await a2ad.final(qid))["state"] == "delivered"


async def test_later_requests_use_the_agents_ids(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad = await setup(agent_factory, a2ad_factory)
    await busy(a2ad)
    resp = await a2ad.client.post("/workspaces/w/a2a", json=stream_body("first"))
    first = (await anext(events(resp)))["result"]
    qid, context_id = first["id"], first["contextId"]
    assert context_id.startswith("ctx-")  # a2ad made it: the caller gave none
    await free(a2ad)
    await a2ad.final(qid)
    resp.close()
    # A follow-up naming a2ad's ids reaches the agent with the agent's own.
    follow = stream_body("second", method="message/send", taskId=qid, contextId=context_id)
    await a2ad.client.post("/workspaces/w/a2a", json=follow)
    sent = agent.received[-1].body["params"]["message"]
    assert (sent["taskId"], sent["contextId"]) == ("agent-task-0", "agent-ctx-0")
    # The stored request itself was never rewritten.
    stored = await (await a2ad.client.get("/workspaces/w/queue", params={"bodies": "1"})).json()
    assert "taskId" not in stored["items"][0]["body"]["params"]["message"]


async def test_agent_card_points_at_a2ad_and_is_cached(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    card = {
        "name": "x",
        "url": "http://agent.internal/",
        "supportedInterfaces": [
            {
                "url": "http://agent.internal/",
                "protocolBinding": "JSONRPC",
                "protocolVersion": "1.0",
            },
            {"url": "grpc://agent.internal", "protocolBinding": "GRPC", "protocolVersion": "1.0"},
        ],
        "additionalInterfaces": [
            {"url": "http://agent.internal/", "transport": "JSONRPC"},
            {"url": "http://agent.internal/rest", "transport": "HTTP+JSON"},
        ],
    }

    async def serve_card(request: web.Request) -> web.Response:
        return web.json_response(card)

    app = web.Application()
    app.router.add_get("/.well-known/agent-card.json", serve_card)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    a2ad = await a2ad_factory(
        [{"id": "w", "url": str(server.make_url("/")), "heartbeat": False}], clock=ManualClock()
    )
    public = "http://127.0.0.1:8470/workspaces/w/a2a"
    for path in ("agent-card.json", "agent.json"):
        resp = await a2ad.client.get(f"/workspaces/w/a2a/.well-known/{path}")
        assert resp.status == 200
        got = await resp.json()
        assert got["url"] == public
        assert got["supportedInterfaces"] == [
            {"url": public, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}
        ]
        assert got["additionalInterfaces"] == [{"url": public, "transport": "JSONRPC"}]
    etag = resp.headers["ETag"]
    resp = await a2ad.client.get(
        "/workspaces/w/a2a/.well-known/agent-card.json", headers={"If-None-Match": etag}
    )
    assert resp.status == 304
    await server.close()  # the agent goes down: the cached card is still served
    await a2ad.daemon.clock.advance(60)  # type: ignore[attr-defined]
    resp = await a2ad.client.get("/workspaces/w/a2a/.well-known/agent-card.json")
    assert resp.status == 200 and (await resp.json())["url"] == public


async def test_a_card_never_fetched_is_503(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    a2ad = await a2ad_factory([{"id": "w", "url": "http://127.0.0.1:9/", "heartbeat": False}])
    resp = await a2ad.client.get("/workspaces/w/a2a/.well-known/agent-card.json")
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert "card" in error["message"] and "Retry-After" in resp.headers


async def test_get_task_refreshes_an_agent_task_that_was_not_final(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    agent, a2ad = await setup(agent_factory, a2ad_factory)
    working = {"kind": "task", "id": "t-9", "contextId": "c-9", "status": {"state": "working"}}
    done = {
        **working,
        "status": {"state": "completed"},
        "artifacts": [{"artifactId": "a", "parts": [{"kind": "text", "text": "42"}]}],
    }
    agent.script = [
        (200, {"jsonrpc": "2.0", "id": 1, "result": working}, {}),
        (200, {"jsonrpc": "2.0", "id": 7, "result": done}, {}),
    ]
    await busy(a2ad)
    _, data = await a2ad.send("w", "think")
    qid = jsonrpc_task(data)["id"]
    await free(a2ad)
    assert (await a2ad.final(qid))["state"] == "delivered"
    got = (await a2ad.rpc("w", "GetTask", {"id": qid}, headers=V1))["result"]
    assert got["id"] == qid and got["status"]["state"] == "TASK_STATE_COMPLETED"
    assert got["artifacts"][0]["parts"] == [{"text": "42"}]
    asked = agent.received[-1]
    assert asked.body["method"] == "GetTask" and asked.body["params"]["id"] == "t-9"
    assert asked.headers["A2A-Version"] == "1.0"
