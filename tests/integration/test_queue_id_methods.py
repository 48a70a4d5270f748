"""A2A methods that name a queue id: answered from the item's own workspace and
agent, and from the stored Task when the agent's answer cannot be read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import A2ad, FakeAgent, Reply, jsonrpc_task

from a2ad.clock import ManualClock

BOTH_STORES = True  # delivery behaves the same on SQLite and PostgreSQL

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
V1 = {"A2A-Version": "1.0"}
UNKNOWN_QID = "q-" + "0" * 32
WORKING = {"kind": "task", "id": "t-1", "contextId": "c-1", "status": {"state": "working"}}


async def heartbeat(a2ad: A2ad, workspace: str, active_tasks: int) -> None:
    resp = await a2ad.client.post(
        f"/workspaces/{workspace}/heartbeat",
        json={"active_tasks": active_tasks},
        headers={"Authorization": f"Bearer hb-{workspace}"},
    )
    assert resp.status == 200


async def queue(
    a2ad: A2ad, workspace: str, text: str, headers: dict[str, str] | None = None
) -> str:
    """A queued item's id: someone else's work fills the workspace's only slot."""
    await heartbeat(a2ad, workspace, 1)
    status, data = await a2ad.send(workspace, text, headers=headers)
    assert status == 202, data
    return str(jsonrpc_task(data)["id"])


async def deliver_working_task(a2ad: A2ad, agent: FakeAgent, workspace: str) -> str:
    """An item whose delivery the agent answered with a Task that is not final
    (so GetTask asks the agent again)."""
    agent.script.append((200, {"jsonrpc": "2.0", "id": 1, "result": WORKING}, {}))
    qid = await queue(a2ad, workspace, "think")
    await heartbeat(a2ad, workspace, 0)
    item = await a2ad.final(qid)
    assert item["state"] == "delivered" and item["result"]["result"]["id"] == "t-1"
    return qid


async def serve(agent: FakeAgent) -> TestServer:
    """`agent` on a server this test can stop (agent_factory's stop at teardown)."""
    app = web.Application()
    app.router.add_post("/", agent.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    agent.url = str(server.make_url("/"))
    return server


# -- GetTask: an agent answer a2ad cannot read ---------------------------------------

HTML_500: Reply = (500, b"<html>Internal Server Error</html>", {"Content-Type": "text/html"})
NOT_JSON: Reply = (200, b"this is not JSON", {"Content-Type": "text/plain"})
RPC_ERROR: Reply = (200, {"jsonrpc": "2.0", "id": 7, "error": {"code": -32603, "message": "x"}}, {})
JSON_LIST_500: Reply = (500, [1, 2, 3], {})
NOT_A_TASK: Reply = (200, {"jsonrpc": "2.0", "id": 7, "result": {"hello": "world"}}, {})
ANOTHER_TASK: Reply = (
    200,
    {"jsonrpc": "2.0", "id": 7, "result": {**WORKING, "id": "t-2", "status": {"state": "failed"}}},
    {},
)


@pytest.mark.parametrize(
    "unreadable",
    [HTML_500, NOT_JSON, RPC_ERROR, JSON_LIST_500, NOT_A_TASK, ANOTHER_TASK, "refused", "timeout"],
    ids=[
        "HTTP 500 text/html",
        "HTTP 200 not JSON",
        "JSON-RPC error",
        "HTTP 500 JSON not an object",
        "a result that is not a Task",
        "another task's Task",
        "connection refused",
        "timeout",
    ],
)
async def test_get_task_answers_the_stored_task_when_the_agents_answer_cannot_be_read(
    a2ad_factory: A2adFactory, unreadable: Reply | str
) -> None:
    agent = FakeAgent()
    server = await serve(agent)
    try:
        a2ad = await a2ad_factory(
            [{"id": "a", "url": agent.url, "token": "hb-a", "request_timeout_seconds": 0.5}],
            clock=ManualClock(),
        )
        qid = await deliver_working_task(a2ad, agent, "a")
        if unreadable == "refused":
            await server.close()
        elif unreadable == "timeout":
            agent.gate = asyncio.Event()  # the agent never answers the refresh
        else:
            assert not isinstance(unreadable, str)
            agent.script.append(unreadable)
        resp = await a2ad.client.post(
            "/workspaces/a/a2a",
            json={"jsonrpc": "2.0", "id": 7, "method": "GetTask", "params": {"id": qid}},
            headers=V1,
        )
        assert resp.status == 200, await resp.text()
        task = (await resp.json())["result"]
        # The Task a2ad stored at delivery, under the queue id.
        assert task["id"] == qid and task["status"]["state"] == "TASK_STATE_WORKING"
        assert task["metadata"]["a2ad"]["agent_task_id"] == "t-1"
        if unreadable != "refused":  # the agent was asked, and its answer set aside
            await agent.wait_received(2)
            asked = agent.received[1].body
            assert asked["method"] == "GetTask" and asked["params"]["id"] == "t-1"
    finally:
        if agent.gate is not None:
            agent.gate.set()
        await server.close()


# -- a queue id is a task of its own workspace's agent ---------------------------------


async def test_a_queue_id_through_another_workspaces_url_reads_like_an_unknown_task(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """Workspace b's URL does not reach a's items: every method naming one of a's queue
    ids answers as for an id never used, sends nothing to b's agent (it would carry
    a's agent task id) and nothing to a's, and changes nothing."""
    agent_a, agent_b = await agent_factory(), await agent_factory()
    a2ad = await a2ad_factory(
        [
            {"id": "a", "url": agent_a.url, "token": "hb-a"},
            {"id": "b", "url": agent_b.url, "token": "hb-b"},
        ],
        clock=ManualClock(),
    )
    delivered = await deliver_working_task(a2ad, agent_a, "a")
    queued = await queue(a2ad, "a", "wait")  # a's slot stays taken
    methods = [
        ("tasks/get", {}),
        ("GetTask", V1),
        ("tasks/cancel", {}),
        ("CancelTask", V1),
        ("tasks/resubscribe", {}),
        ("SubscribeToTask", V1),
        ("tasks/pushNotificationConfig/get", {}),
    ]
    seen: dict[object, object] = {}
    expected: dict[object, object] = {}
    for name, qid in (("queued", queued), ("delivered", delivered)):
        for method, headers in methods:
            theirs = await a2ad.client.post(
                "/workspaces/b/a2a",
                json={"jsonrpc": "2.0", "id": 7, "method": method, "params": {"id": qid}},
                headers=headers,
            )
            nobodys = await a2ad.client.post(
                "/workspaces/b/a2a",
                json={"jsonrpc": "2.0", "id": 7, "method": method, "params": {"id": UNKNOWN_QID}},
                headers=headers,
            )
            nobodys_text = (await nobodys.text()).replace(UNKNOWN_QID, "ID")
            if theirs.content_type != "application/json":  # a stream of a's item
                seen[name, method] = (theirs.status, theirs.content_type)
                theirs.close()
            else:
                code = (await theirs.json()).get("error", {}).get("code")
                their_text = (await theirs.text()).replace(qid, "ID")
                seen[name, method] = (theirs.status, code, their_text == nobodys_text)
            expected[name, method] = (200, -32001, True)
    seen["sent to agent b"] = [(r.body["method"], r.body["params"]) for r in agent_b.received]
    expected["sent to agent b"] = []
    assert seen == expected
    assert len(agent_a.received) == 1  # the delivery only: no refresh, no cancel
    assert (await a2ad.item(queued))["state"] == "queued"
    # Through its own URL the same CancelTask reaches a's agent, with its task id.
    canceled = {**WORKING, "status": {"state": "canceled"}}
    agent_a.script.append((200, {"jsonrpc": "2.0", "id": 7, "result": canceled}, {}))
    answer = await a2ad.rpc("a", "CancelTask", {"id": delivered}, headers=V1)
    assert answer["result"]["status"]["state"] == "canceled"
    asked = agent_a.received[-1].body
    assert asked["method"] == "CancelTask" and asked["params"]["id"] == "t-1"
    assert agent_b.received == []


async def test_a_push_config_method_naming_a_queue_id_is_a2ads_own_and_stays_with_its_workspace(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """A push-config set naming a queue id in `taskId` is answered by a2ad (it pushes
    that task's updates), only through the item's own workspace URL, and never
    forwarded to either agent."""
    agent_a, agent_b = await agent_factory(), await agent_factory()
    a2ad = await a2ad_factory(
        [
            {"id": "a", "url": agent_a.url, "token": "hb-a"},
            {"id": "b", "url": agent_b.url, "token": "hb-b"},
        ],
        clock=ManualClock(),
        push={"allowed_hosts": ["127.0.0.1"]},
    )
    qid = await deliver_working_task(a2ad, agent_a, "a")
    params = {"taskId": qid, "pushNotificationConfig": {"url": "http://127.0.0.1:9/x"}}
    method = "tasks/pushNotificationConfig/set"
    resp = await a2ad.client.post(
        "/workspaces/b/a2a", json={"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
    )
    assert agent_b.received == []
    assert resp.status == 200 and (await resp.json())["error"]["code"] == -32001
    seen = len(agent_a.received)
    answer = await a2ad.rpc("a", method, params)
    assert answer["result"] == {
        "taskId": qid,
        "pushNotificationConfig": {"id": qid, "url": "http://127.0.0.1:9/x"},
    }
    assert agent_b.received == []
    assert all(r.body["method"] != method for r in agent_a.received[seen:])
