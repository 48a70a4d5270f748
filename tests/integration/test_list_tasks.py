"""ListTasks is a2ad's: it lists the caller's own queue items of the URL's workspace,
with the specification's filters and paging, and never asks the agent (which a2ad
reaches with one credential for every caller, so its list would hold them all)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from fakes import A2ad, FakeAgent

from a2ad.clock import ManualClock

BOTH_STORES = True  # the same behaviour on SQLite and PostgreSQL

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
AUTH = {
    "admin_token": "tok-admin-list-1",
    "callers": [
        {"name": "planner", "token": "tok-planner-list-1"},
        {"name": "writer", "token": "tok-writer-list-1"},
    ],
}
PLANNER = {"Authorization": "Bearer tok-planner-list-1", "A2A-Version": "1.0"}
WRITER = {"Authorization": "Bearer tok-writer-list-1", "A2A-Version": "1.0"}


@dataclass
class World:
    agent: FakeAgent
    a2ad: A2ad
    clock: ManualClock


@pytest.fixture
async def world(agent_factory: AgentFactory, a2ad_factory: A2adFactory) -> AsyncIterator[World]:
    """Workspaces w and v on one agent whose one slot each is held by a send at its
    gate, so every further send is queued."""
    agent = await agent_factory(gate=asyncio.Event())
    clock = ManualClock()
    workspaces = [
        {"id": w, "url": agent.url, "heartbeat": False, "max_concurrent": 1} for w in ("w", "v")
    ]
    a2ad = await a2ad_factory(workspaces, clock=clock, auth=AUTH)
    held = [asyncio.create_task(queue(a2ad, w, PLANNER, expect=None)) for w in ("w", "v")]
    await agent.wait_received(2)
    yield World(agent, a2ad, clock)
    assert agent.gate is not None
    agent.gate.set()
    await asyncio.gather(*held)


async def queue(
    a2ad: A2ad,
    workspace: str,
    headers: dict[str, str],
    *,
    context_id: str | None = None,
    expect: int | None = 202,
) -> str:
    """A non-blocking 1.0 send; its queue id when it was queued."""
    message: dict[str, Any] = {
        "messageId": f"m-{uuid.uuid4().hex}",
        "role": "ROLE_USER",
        "parts": [{"text": "hello"}],
    }
    if context_id is not None:
        message["contextId"] = context_id
    params = {"message": message, "configuration": {"returnImmediately": True}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": params}
    resp = await a2ad.client.post(f"/workspaces/{workspace}/a2a", json=body, headers=headers)
    data = await resp.json()
    if expect is None:
        return ""
    assert resp.status == expect, data
    qid: str = data["result"]["task"]["id"]
    return qid


async def list_tasks(
    a2ad: A2ad,
    workspace: str,
    headers: dict[str, str],
    method: str = "ListTasks",
    **params: Any,
) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": "l", "method": method, "params": params}
    resp = await a2ad.client.post(f"/workspaces/{workspace}/a2a", json=body, headers=headers)
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = await resp.json()
    assert data["id"] == "l"
    return data


def ids(data: dict[str, Any]) -> list[str]:
    return [t["id"] for t in data["result"]["tasks"]]


async def test_a_caller_lists_only_its_own_items_of_this_workspace(world: World) -> None:
    a2ad, clock = world.a2ad, world.clock
    mine = []
    for _ in range(3):
        mine.append(await queue(a2ad, "w", PLANNER))
        clock.step_wall(1)
    theirs = [await queue(a2ad, "w", WRITER) for _ in range(2)]
    elsewhere = await queue(a2ad, "v", PLANNER)

    data = await list_tasks(a2ad, "w", PLANNER)
    result = data["result"]
    assert ids(data) == mine[::-1]  # most recently updated first
    assert result["totalSize"] == 3 and result["pageSize"] == 50
    assert result["nextPageToken"] == ""
    task = result["tasks"][0]
    assert task["status"]["state"] == "TASK_STATE_SUBMITTED"
    assert task["metadata"]["a2ad"]["queue_id"] == mine[-1]
    assert "kind" not in task  # the 1.0 shape

    assert sorted(ids(await list_tasks(a2ad, "w", WRITER))) == sorted(theirs)
    assert ids(await list_tasks(a2ad, "v", PLANNER)) == [elsewhere]
    assert ids(await list_tasks(a2ad, "v", WRITER)) == []
    # The agent saw the two sends holding the slots, and no ListTasks.
    assert len(world.agent.received) == 2
    assert all(r.body.get("method") == "SendMessage" for r in world.agent.received)


async def test_pages_follow_next_page_token_to_the_end(world: World) -> None:
    a2ad, clock = world.a2ad, world.clock
    queued = []
    for _ in range(5):
        queued.append(await queue(a2ad, "w", PLANNER))
        clock.step_wall(0.5)
    await queue(a2ad, "w", WRITER)  # another caller's: never on a page, never counted

    seen, token, pages = [], "", 0
    while True:
        data = await list_tasks(a2ad, "w", PLANNER, pageSize=2, pageToken=token)
        result = data["result"]
        assert result["totalSize"] == 5 and result["pageSize"] == 2
        assert len(result["tasks"]) <= 2
        seen += ids(data)
        pages += 1
        token = result["nextPageToken"]
        if not token:
            break
    assert pages == 3
    assert seen == queued[::-1]


async def test_items_updated_at_the_same_time_page_without_loss(world: World) -> None:
    """The clock stands still: the order falls back on the item's age, newest first."""
    queued = [await queue(world.a2ad, "w", PLANNER) for _ in range(3)]
    first = await list_tasks(world.a2ad, "w", PLANNER, pageSize=2)
    token = first["result"]["nextPageToken"]
    assert token
    rest = await list_tasks(world.a2ad, "w", PLANNER, pageSize=2, pageToken=token)
    assert ids(first) + ids(rest) == queued[::-1]
    assert rest["result"]["nextPageToken"] == ""


async def test_context_status_and_time_filters(world: World) -> None:
    a2ad, clock = world.a2ad, world.clock
    in_c1 = [await queue(a2ad, "w", PLANNER, context_id="c1") for _ in range(2)]
    other = await queue(a2ad, "w", PLANNER, context_id="c2")
    await queue(a2ad, "w", WRITER, context_id="c1")  # another caller's, same context
    clock.step_wall(10)
    cancelled = await a2ad.rpc("w", "CancelTask", {"id": in_c1[0]}, headers=PLANNER)
    assert cancelled["result"]["status"]["state"] == "TASK_STATE_CANCELED"

    by_context = await list_tasks(a2ad, "w", PLANNER, contextId="c1")
    assert sorted(ids(by_context)) == sorted(in_c1)
    assert by_context["result"]["totalSize"] == 2
    assert {t["contextId"] for t in by_context["result"]["tasks"]} == {"c1"}

    submitted = await list_tasks(a2ad, "w", PLANNER, status="TASK_STATE_SUBMITTED")
    assert sorted(ids(submitted)) == sorted([in_c1[1], other])
    assert submitted["result"]["totalSize"] == 2
    canceled = await list_tasks(a2ad, "w", PLANNER, status="TASK_STATE_CANCELED", contextId="c1")
    assert ids(canceled) == [in_c1[0]] and canceled["result"]["totalSize"] == 1
    assert ids(await list_tasks(a2ad, "w", PLANNER, status=5)) == [in_c1[0]]  # proto number
    both = await list_tasks(a2ad, "w", PLANNER, status="TASK_STATE_SUBMITTED", contextId="c2")
    assert ids(both) == [other]
    assert ids(await list_tasks(a2ad, "w", PLANNER, status="TASK_STATE_COMPLETED")) == []

    # statusTimestampAfter: only the cancel happened after the clock moved on.
    after = a2ad.daemon.clock.now() - 5
    stamp = datetime.fromtimestamp(after, tz=UTC).isoformat()
    recent = await list_tasks(a2ad, "w", PLANNER, statusTimestampAfter=stamp)
    assert ids(recent) == [in_c1[0]] and recent["result"]["totalSize"] == 1


async def test_a_delivered_item_lists_in_the_agents_state(world: World) -> None:
    a2ad = world.a2ad
    qid = await queue(a2ad, "w", PLANNER)
    assert world.agent.gate is not None
    world.agent.gate.set()
    item = await a2ad.item(qid, wait=10, headers={"Authorization": PLANNER["Authorization"]})
    assert item["state"] == "delivered", item
    completed = await list_tasks(a2ad, "w", PLANNER, status="TASK_STATE_COMPLETED")
    assert ids(completed) == [qid]
    task = completed["result"]["tasks"][0]
    assert task["status"]["message"]["parts"][0]["text"] == "echo: hello"
    assert ids(await list_tasks(a2ad, "w", PLANNER, status="TASK_STATE_SUBMITTED")) == []
    # historyLength 0 leaves history out; artifacts only when asked for.
    cut = await list_tasks(a2ad, "w", PLANNER, historyLength=0, includeArtifacts=True)
    assert all("history" not in t for t in cut["result"]["tasks"])


@pytest.mark.parametrize(
    "params",
    [
        {"pageSize": 0},
        {"pageSize": 101},
        {"pageSize": -1},
        {"pageSize": "ten"},
        {"pageSize": 2.5},
        {"status": "TASK_STATE_BOGUS"},
        {"status": 42},
        {"historyLength": -1},
        {"pageToken": "not-a-token!"},
        {"statusTimestampAfter": "yesterday"},
        {"statusTimestampAfter": "2026-01-01T00:00:00"},  # no offset
        {"includeArtifacts": "yes"},
        {"contextId": 7},
    ],
)
async def test_invalid_params_get_32602_with_200(world: World, params: dict[str, Any]) -> None:
    await queue(world.a2ad, "w", PLANNER)
    data = await list_tasks(world.a2ad, "w", PLANNER, **params)
    assert data["error"]["code"] == -32602, data
    assert "result" not in data
    assert len(world.agent.received) == 2  # nothing reached the agent


async def test_v03_callers_list_with_tasks_list_and_get_v03_tasks(world: World) -> None:
    """ListTasks is a 1.0 method: without A2A-Version it is refused as the agent
    refuses it (-32009); the v0.3 name gets the v0.3 shape, and neither is forwarded."""
    a2ad = world.a2ad
    qid = await queue(a2ad, "w", PLANNER)
    v03 = {"Authorization": PLANNER["Authorization"]}
    data = await list_tasks(a2ad, "w", v03, method="tasks/list")
    assert ids(data) == [qid]
    task = data["result"]["tasks"][0]
    assert task["kind"] == "task" and task["status"]["state"] == "submitted"
    refused = await list_tasks(a2ad, "w", v03, method="ListTasks")
    assert refused["error"]["code"] == -32009, refused
    assert refused["error"]["data"]["code"] == "version_not_supported"
    assert len(world.agent.received) == 2


async def test_list_tasks_needs_a_caller_token(world: World) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "ListTasks", "params": {}}
    resp = await world.a2ad.client.post(
        "/workspaces/w/a2a", json=body, headers={"A2A-Version": "1.0"}
    )
    assert resp.status == 401
    assert len(world.agent.received) == 2
