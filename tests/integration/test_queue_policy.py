"""Queue policy end to end through the HTTP API: priorities, promotion, TTL, backoff,
busy pauses, dead letters, caps, replay and retention (SPEC, Delivery and Operators).

Every test gives a2ad a ManualClock, so a2ad's own timers (pauses, backoff, the
housekeeping loop every second, the retention loop every minute) fire only when
the test moves time. The slot is held by external load through a heartbeat
({"active_tasks": 1}); {"active_tasks": 0} frees it."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fakes import A2ad, FakeAgent, jsonrpc_task

from a2ad.clock import ManualClock

BOTH_STORES = True  # the same behaviour on SQLite and PostgreSQL

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
T = TypeVar("T")

V1 = {"A2A-Version": "1.0"}
MS = 0.001  # stored times are shown with millisecond precision
BAD_GATEWAY = (502, {"error": "upstream down"}, {})


# -- helpers -----------------------------------------------------------------


def hb_ws(agent: FakeAgent, workspace: str = "w", **extra: Any) -> dict[str, Any]:
    """A workspace that reports its load with heartbeats."""
    token = f"hb-{workspace}"
    return {"id": workspace, "url": agent.url, "heartbeat": True, "token": token, **extra}


async def heartbeat(a2ad: A2ad, active: int, workspace: str = "w") -> None:
    resp = await a2ad.client.post(
        f"/workspaces/{workspace}/heartbeat",
        json={"active_tasks": active},
        headers={"Authorization": f"Bearer hb-{workspace}"},
    )
    assert resp.status == 200, await resp.text()


async def busy_a2ad(
    agent_factory: AgentFactory,
    a2ad_factory: A2adFactory,
    clock: ManualClock,
    *,
    agent: FakeAgent | None = None,
    **queue: Any,
) -> tuple[FakeAgent, A2ad]:
    """One agent behind a2ad, its only slot taken by someone else's work."""
    agent = agent or await agent_factory()
    a2ad = await a2ad_factory([hb_ws(agent)], clock=clock, queue=queue)
    await heartbeat(a2ad, 1)
    return agent, a2ad


async def post_send(
    a2ad: A2ad,
    text: str,
    *,
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
    rpc_id: Any = 1,
    workspace: str = "w",
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """message/send: the status, the response headers and the JSON body."""
    message: dict[str, Any] = {"role": "user", "parts": [{"kind": "text", "text": text}]}
    message["messageId"] = message_id if message_id is not None else f"m-{uuid.uuid4().hex}"
    body = {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "method": "message/send",
        # Not blocking: a queued send is answered 202 at once.
        "params": {"message": message, "configuration": {"blocking": False}},
    }
    resp = await a2ad.client.post(f"/workspaces/{workspace}/a2a", json=body, headers=headers or {})
    return resp.status, dict(resp.headers), await resp.json()


async def enqueue(a2ad: A2ad, text: str, **kwargs: Any) -> str:
    """Send a message that must be queued; its queue id."""
    status, _, data = await post_send(a2ad, text, **kwargs)
    assert status == 202, data
    qid: str = jsonrpc_task(data)["id"]
    return qid


async def final(a2ad: A2ad, qid: str, within: float = 10.0) -> dict[str, Any]:
    """The item once it is final (GET /queue/{qid}?wait=), with a real-time deadline."""
    async with asyncio.timeout(within):
        return await a2ad.final(qid, within=within)


async def poll(
    read: Callable[[], Awaitable[T]], until: Callable[[T], bool], within: float = 5.0
) -> T:
    """Read until `until` holds: for outcomes a2ad records without an event to await.
    The clock does not move while this waits."""
    async with asyncio.timeout(within):
        while True:
            value = await read()
            if until(value):
                return value
            await asyncio.sleep(0.005)


async def settle() -> None:
    """Let every ready callback and store write run (before asserting that nothing happens)."""
    for _ in range(20):
        await asyncio.sleep(0.01)


async def advance(clock: ManualClock, total: float, step: float = 1.0) -> None:
    """Move the clock in steps, letting the loops due at each step run."""
    while total > 1e-9:
        dt = min(step, total)
        await clock.advance(dt)
        total -= dt
        for _ in range(3):
            await asyncio.sleep(0.005)


def seconds(rfc3339: str | None) -> float:
    assert rfc3339 is not None
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def workspace_view(a2ad: A2ad, workspace: str = "w") -> dict[str, Any]:
    resp = await a2ad.client.get(f"/workspaces/{workspace}")
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def get_task(a2ad: A2ad, qid: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    method = "GetTask" if headers else "tasks/get"
    task: dict[str, Any] = (await a2ad.rpc("w", method, {"id": qid}, headers=headers))["result"]
    return task


def task_reason(task: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in task["status"]["message"]["parts"])


def texts(agent: FakeAgent) -> list[str]:
    return [r.text for r in agent.received]


# -- priority ------------------------------------------------------------------


async def test_critical_first_then_task_then_info_each_in_age_order(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    sent = [
        ("task-1", "task"),
        ("info-1", "info"),
        ("critical-1", "critical"),
        ("task-2", None),  # no header: task
        ("critical-2", "CRITICAL"),  # names are not case-sensitive
    ]
    qids = []
    for text, priority in sent:
        headers = {"A2AD-Priority": priority} if priority else {}
        qids.append(await enqueue(a2ad, text, headers=headers))
    assert texts(agent) == []
    views = [await a2ad.item(qid) for qid in qids]
    assert [v["priority"] for v in views] == ["task", "info", "critical", "task", "critical"]

    await heartbeat(a2ad, 0)

    for qid in qids:
        assert (await final(a2ad, qid))["state"] == "delivered"
    assert texts(agent) == ["critical-1", "critical-2", "task-1", "task-2", "info-1"]
    assert agent.max_active == 1


async def test_a_critical_send_is_told_it_is_first_in_line(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    _, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    for text in ("a", "b"):
        await enqueue(a2ad, text)
    status, _, data = await post_send(a2ad, "c", headers={"A2AD-Priority": "critical"})
    assert status == 202
    meta = jsonrpc_task(data)["metadata"]["a2ad"]
    assert meta["position"] == 1 and meta["queue_depth"] == 3


@pytest.mark.parametrize("value", ["urgent", "", "100", "critical,task"])
async def test_an_unknown_priority_is_invalid_header_listing_the_allowed_values(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, value: str
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    status, _, data = await post_send(a2ad, "x", headers={"A2AD-Priority": value}, rpc_id=42)
    assert status == 400, data
    assert data["id"] == 42
    assert data["error"]["data"]["code"] == "invalid_header"
    message = data["error"]["message"]
    assert "A2AD-Priority" in message
    for allowed in ("critical", "task", "info"):
        assert allowed in message
    assert await a2ad.daemon.store.counts() == {}
    # Nor does a bad header go straight to an agent with a free slot.
    await heartbeat(a2ad, 0)
    status, _, _ = await post_send(a2ad, "x", headers={"A2AD-Priority": value})
    assert status == 400
    assert agent.received == []


# -- promotion -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "waited", "new", "old_first"),
    [
        ("task", 10.0, "critical", True),  # one full promote_after: task → critical
        ("task", 9.9, "critical", False),  # not yet a full one
        ("info", 10.0, "task", True),  # info → task, and older
        ("info", 10.0, "critical", False),  # one level only
        ("info", 20.0, "critical", True),  # two full periods: two levels
        ("info", 60.0, "critical", True),  # never above critical, and older
    ],
)
async def test_an_old_item_moves_up_one_level_per_promote_after(
    agent_factory: AgentFactory,
    a2ad_factory: A2adFactory,
    old: str,
    waited: float,
    new: str,
    old_first: bool,
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock, promote_after_seconds=10)
    old_id = await enqueue(a2ad, "old", headers={"A2AD-Priority": old})
    await advance(clock, waited, step=waited)
    new_ids = [await enqueue(a2ad, f"new-{i}", headers={"A2AD-Priority": new}) for i in range(3)]
    await heartbeat(a2ad, 0)
    for qid in [old_id, *new_ids]:
        assert (await final(a2ad, qid))["state"] == "delivered"
    expected = (
        ["old", "new-0", "new-1", "new-2"] if old_first else ["new-0", "new-1", "new-2", "old"]
    )
    assert texts(agent) == expected


async def test_a_steady_stream_of_critical_items_does_not_starve_a_task_item(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """A critical item arrives every 2 s and the agent has room for one item every
    2 s: without promotion the task item would never go."""
    clock = ManualClock()
    gate = asyncio.Event()
    agent, a2ad = await busy_a2ad(
        agent_factory,
        a2ad_factory,
        clock,
        agent=await agent_factory(gate=gate),
        promote_after_seconds=10,
    )
    task_id = await enqueue(a2ad, "task")
    for n in range(10):
        await enqueue(a2ad, f"critical-{n}", headers={"A2AD-Priority": "critical"})
        # The agent takes exactly one item: while a2ad's request runs it reports
        # two active tasks, one of them someone else's, so no slot frees after it.
        await heartbeat(a2ad, 0)
        await agent.wait_received(n + 1)
        await heartbeat(a2ad, 2)
        gate.set()
        await poll(
            lambda: a2ad.daemon.store.counts(),
            lambda c, n=n: c["w"].get("delivered", 0) == n + 1,
        )
        gate.clear()
        if agent.received[-1].text == "task":
            break
        await advance(clock, 2.0)
    assert (await final(a2ad, task_id))["state"] == "delivered"
    # Waiting 10 s (one promote_after) made it critical, and the oldest critical.
    assert texts(agent) == [f"critical-{n}" for n in range(5)] + ["task"]


# -- TTL and expiry ------------------------------------------------------------


async def test_expiry_comes_from_a2ad_ttl_info_ttl_and_max_age(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    t0 = clock.now()
    _, a2ad = await busy_a2ad(
        agent_factory, a2ad_factory, clock, info_ttl_seconds=30, max_age_seconds=600
    )
    cases = {
        "info, no TTL": ({"A2AD-Priority": "info"}, 30),
        "info, A2AD-TTL": ({"A2AD-Priority": "info", "A2AD-TTL": "5"}, 5),
        "task, no TTL": ({}, 600),
        "task, A2AD-TTL": ({"A2AD-TTL": "12.5"}, 12.5),
        "critical, A2AD-TTL over max_age": ({"A2AD-Priority": "critical", "A2AD-TTL": "9999"}, 600),
        "info, A2AD-TTL over info TTL": ({"A2AD-Priority": "info", "A2AD-TTL": "90"}, 90),
    }
    for name, (headers, ttl) in cases.items():
        qid = await enqueue(a2ad, name, headers=headers)
        item = await a2ad.item(qid)
        assert seconds(item["expires_at"]) == pytest.approx(t0 + ttl, abs=MS), name


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf"])
async def test_a_bad_ttl_is_invalid_header(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, value: str
) -> None:
    clock = ManualClock()
    _, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    status, _, data = await post_send(a2ad, "x", headers={"A2AD-TTL": value})
    assert status == 400, data
    assert data["error"]["data"]["code"] == "invalid_header"
    assert "A2AD-TTL" in data["error"]["message"]
    assert await a2ad.daemon.store.counts() == {}


async def test_an_info_item_expires_at_its_ttl_and_gettask_says_why(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    doomed = await enqueue(a2ad, "doomed", headers={"A2AD-Priority": "info", "A2AD-TTL": "5"})
    kept = await enqueue(a2ad, "kept", headers={"A2AD-Priority": "info"})  # info_ttl: 300 s

    await advance(clock, 4.0)
    await settle()
    assert (await a2ad.item(doomed))["state"] == "queued"

    await advance(clock, 2.0)
    item = await final(a2ad, doomed)
    assert item["state"] == "expired"
    assert "expired" in item["last_error"]
    assert seconds(item["finished_at"]) <= clock.now()
    v03 = await get_task(a2ad, doomed)
    assert v03["id"] == doomed
    assert v03["status"]["state"] == "failed"
    assert "expired" in task_reason(v03)
    v1 = await get_task(a2ad, doomed, headers=V1)
    assert v1["status"]["state"] == "TASK_STATE_FAILED"
    assert "expired" in task_reason(v1)
    info = await workspace_view(a2ad)
    assert info["queue"]["expired"] == 1 and info["queue"]["queued"] == 1

    # The slot frees: the other item goes, the expired one never does.
    await heartbeat(a2ad, 0)
    assert (await final(a2ad, kept))["state"] == "delivered"
    await settle()
    assert texts(agent) == ["kept"]
    assert (await a2ad.item(doomed))["state"] == "expired"


async def test_an_item_past_its_ttl_is_not_delivered_when_the_slot_frees_at_that_moment(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    """Expiry is checked at claim too: whichever runs first, the sweep or the claim,
    the item is never delivered."""
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    doomed = await enqueue(a2ad, "doomed", headers={"A2AD-TTL": "5"})
    await clock.advance(5.0)
    await heartbeat(a2ad, 0)
    assert (await final(a2ad, doomed))["state"] == "expired"
    await settle()
    assert agent.received == []


async def test_max_age_expires_every_item_even_while_the_workspace_is_paused(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    agent.script = [(503, {}, {"Retry-After": "60"})]
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "heartbeat": False}],
        clock=clock,
        queue={"max_age_seconds": 8, "info_ttl_seconds": 300},
    )
    # The first send meets a busy agent: queued, the workspace paused for 60 s.
    first = await enqueue(a2ad, "first")
    assert (await workspace_view(a2ad))["paused_until"] is not None
    rest = [
        await enqueue(a2ad, "info", headers={"A2AD-Priority": "info"}),
        await enqueue(a2ad, "critical", headers={"A2AD-Priority": "critical"}),
        await enqueue(a2ad, "long ttl", headers={"A2AD-TTL": "3600"}),
    ]
    await advance(clock, 7.0)
    await settle()
    for qid in [first, *rest]:
        assert (await a2ad.item(qid))["state"] == "queued"
    await advance(clock, 2.0)
    for qid in [first, *rest]:
        item = await final(a2ad, qid)
        assert item["state"] == "expired", item
    # The pause ends; nothing is left to deliver.
    await advance(clock, 60.0, step=10.0)
    await settle()
    assert len(agent.received) == 1


# -- backoff after failures ------------------------------------------------------


async def test_failed_attempts_back_off_exponentially_with_jitter(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(
        agent_factory, a2ad_factory, clock, max_attempts=6, backoff_base_seconds=1
    )
    qid = await enqueue(a2ad, "flaky")
    agent.script = [BAD_GATEWAY] * 4  # then it answers
    await heartbeat(a2ad, 0)
    delays = []
    for attempt in range(1, 5):
        await agent.wait_received(attempt)
        item = await poll(lambda: a2ad.item(qid), lambda i, n=attempt: i["attempts"] == n)
        assert item["state"] == "queued"
        assert "502" in item["last_error"]
        # The clock has not moved since the attempt: this is the backoff chosen.
        delay = seconds(item["not_before"]) - clock.now()
        ceiling = 1.0 * 2 ** (attempt - 1)
        assert 0.5 * ceiling - MS <= delay <= ceiling + MS, (attempt, delay)
        delays.append(delay)
        # Nothing is sent before its not-before, whatever else happens.
        await heartbeat(a2ad, 0)
        await advance(clock, delay - 0.05, step=1.0)
        await settle()
        assert len(agent.received) == attempt, f"retried before its not-before ({attempt})"
        await clock.advance(0.1)
    item = await final(a2ad, qid)
    assert item["state"] == "delivered" and item["attempts"] == 4
    assert len(agent.received) == 5
    assert delays == sorted(delays)  # the gap grows
    assert delays[-1] >= 4 * 0.5


async def test_backoff_is_capped_by_backoff_max(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(
        agent_factory,
        a2ad_factory,
        clock,
        max_attempts=10,
        backoff_base_seconds=1,
        backoff_max_seconds=2,
    )
    qid = await enqueue(a2ad, "flaky")
    agent.script = [BAD_GATEWAY] * 5
    await heartbeat(a2ad, 0)
    for attempt in range(1, 6):
        await agent.wait_received(attempt)
        item = await poll(lambda: a2ad.item(qid), lambda i, n=attempt: i["attempts"] == n)
        delay = seconds(item["not_before"]) - clock.now()
        ceiling = min(2.0, 2 ** (attempt - 1))
        assert 0.5 * ceiling - MS <= delay <= ceiling + MS, (attempt, delay)
        await clock.advance(delay + 0.01)
    assert (await final(a2ad, qid))["state"] == "delivered"


# -- busy answers pause the workspace --------------------------------------------


async def test_a_busy_answer_with_retry_after_pauses_the_whole_workspace(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    first = await enqueue(a2ad, "first")
    second = await enqueue(a2ad, "second")
    agent.script = [(503, {"error": "busy"}, {"Retry-After": "7"})]
    t_busy = clock.now()
    await heartbeat(a2ad, 0)
    await agent.wait_received(1)
    item = await poll(lambda: a2ad.item(first), lambda i: i["busy_answers"] == 1)
    assert item["state"] == "queued"
    assert item["attempts"] == 0  # busy is not a failed attempt
    assert item["not_before"] is None  # the item's own not-before stays unset
    info = await workspace_view(a2ad)
    assert seconds(info["paused_until"]) == pytest.approx(t_busy + 7, abs=MS)

    # No trigger ends the pause early: not a heartbeat with free slots, not a send.
    await heartbeat(a2ad, 0)
    third = await enqueue(a2ad, "third")
    await advance(clock, 6.9)
    await settle()
    assert texts(agent) == ["first"]

    await advance(clock, 0.2)
    for qid in (first, second, third):
        assert (await final(a2ad, qid))["state"] == "delivered"
    # Order kept: the item that met the busy agent was not overtaken.
    assert texts(agent) == ["first", "first", "second", "third"]
    assert (await workspace_view(a2ad))["paused_until"] is None


async def test_busy_answers_without_retry_after_pause_half_a_second_doubling(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    qid = await enqueue(a2ad, "x")
    agent.script = [(503, {}, {}), (429, {}, {}), (503, {}, {})]
    await heartbeat(a2ad, 0)
    for n, pause in enumerate((0.5, 1.0, 2.0), start=1):
        await agent.wait_received(n)
        item = await poll(lambda: a2ad.item(qid), lambda i, n=n: i["busy_answers"] == n)
        assert item["attempts"] == 0 and item["not_before"] is None
        info = await workspace_view(a2ad)
        assert seconds(info["paused_until"]) == pytest.approx(clock.now() + pause, abs=MS)
        await clock.advance(pause - 0.05)
        await settle()
        assert len(agent.received) == n
        await clock.advance(0.1)
    item = await final(a2ad, qid)
    assert item["state"] == "delivered"
    assert item["attempts"] == 0 and item["busy_answers"] == 3


# -- dead letters -----------------------------------------------------------------


async def fail_one(a2ad: A2ad, agent: FakeAgent, text: str, **kwargs: Any) -> str:
    """Queue an item, let the agent fail it (max_attempts = 1), the slot taken again."""
    qid = await enqueue(a2ad, text, **kwargs)
    agent.script.append(BAD_GATEWAY)
    await heartbeat(a2ad, 0)
    item = await final(a2ad, qid)
    assert item["state"] == "failed", item
    await heartbeat(a2ad, 1)
    return qid


async def test_a_failed_item_is_listed_retried_and_delivered(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(
        agent_factory, a2ad_factory, clock, max_attempts=2, max_age_seconds=3600
    )
    qid = await enqueue(a2ad, "important")
    agent.script = [BAD_GATEWAY, BAD_GATEWAY]
    await heartbeat(a2ad, 0)
    await poll(lambda: a2ad.item(qid), lambda i: i["attempts"] == 1)
    await advance(clock, 1.0)
    item = await final(a2ad, qid)
    assert item["state"] == "failed" and item["attempts"] == 2
    assert "502" in item["last_error"]
    assert len(agent.received) == 2

    resp = await a2ad.client.get("/workspaces/w/queue", params={"state": "failed"})
    listed = (await resp.json())["items"]
    assert [i["id"] for i in listed] == [qid]

    await advance(clock, 50.0, step=10.0)
    resp = await a2ad.client.post(f"/queue/{qid}/retry")
    assert resp.status == 200, await resp.text()
    retried = await resp.json()
    assert retried["state"] in ("queued", "dispatching", "delivered")
    assert retried["attempts"] == 0
    # A fresh expiry: the item's TTL (max_age here) counted from the retry.
    assert seconds(retried["expires_at"]) == pytest.approx(clock.now() + 3600, abs=MS)

    # The agent works again and the slot is free: delivered, without moving time.
    item = await final(a2ad, qid)
    assert item["state"] == "delivered" and item["attempts"] == 0
    assert item["result"]["result"]["parts"][0]["text"] == "echo: important"
    assert texts(agent) == ["important"] * 3
    task = await get_task(a2ad, qid)
    assert task["status"]["state"] == "completed"


async def test_an_expired_item_is_retried_with_a_fresh_expiry_from_its_ttl(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    qid = await enqueue(a2ad, "late", headers={"A2AD-TTL": "5"})
    await advance(clock, 6.0)
    assert (await final(a2ad, qid))["state"] == "expired"
    resp = await a2ad.client.post(f"/queue/{qid}/retry")
    assert resp.status == 200, await resp.text()
    retried = await resp.json()
    assert retried["state"] == "queued"
    assert seconds(retried["expires_at"]) == pytest.approx(clock.now() + 5, abs=MS)
    await heartbeat(a2ad, 0)
    assert (await final(a2ad, qid))["state"] == "delivered"
    assert texts(agent) == ["late"]


async def test_retry_of_an_item_that_is_not_failed_or_expired_is_a_conflict(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    queued = await enqueue(a2ad, "queued")
    resp = await a2ad.client.post(f"/queue/{queued}/retry")
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "conflict"

    await heartbeat(a2ad, 0)
    assert (await final(a2ad, queued))["state"] == "delivered"
    resp = await a2ad.client.post(f"/queue/{queued}/retry")
    assert resp.status == 409
    body = await resp.json()
    assert body["error"]["code"] == "conflict" and "delivered" in body["error"]["message"]
    assert len(agent.received) == 1

    resp = await a2ad.client.post("/queue/q-" + "0" * 32 + "/retry")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_delete_cancels_a_queued_item_and_it_is_never_delivered(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    dropped = await enqueue(a2ad, "dropped")
    kept = await enqueue(a2ad, "kept")
    resp = await a2ad.client.delete(f"/queue/{dropped}")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["state"] == "cancelled"
    item = await a2ad.item(dropped)
    assert item["state"] == "cancelled"
    assert (await get_task(a2ad, dropped))["status"]["state"] == "canceled"

    await heartbeat(a2ad, 0)
    assert (await final(a2ad, kept))["state"] == "delivered"
    await settle()
    assert texts(agent) == ["kept"]
    # Cancelling again: it is final now, so the row goes.
    resp = await a2ad.client.delete(f"/queue/{dropped}")
    assert resp.status == 200
    assert (await resp.json())["deleted"] is True


@pytest.mark.parametrize("how", ["delivered", "failed", "expired"])
async def test_delete_of_a_final_item_deletes_the_row(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, how: str
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock, max_attempts=1)
    if how == "failed":
        qid = await fail_one(a2ad, agent, "x")
    elif how == "expired":
        qid = await enqueue(a2ad, "x", headers={"A2AD-TTL": "1"})
        await advance(clock, 2.0)
        assert (await final(a2ad, qid))["state"] == "expired"
    else:
        qid = await enqueue(a2ad, "x")
        await heartbeat(a2ad, 0)
        assert (await final(a2ad, qid))["state"] == "delivered"
    resp = await a2ad.client.delete(f"/queue/{qid}")
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"id": qid, "deleted": True}
    resp = await a2ad.client.get(f"/queue/{qid}")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    assert await a2ad.daemon.store.counts() == {}
    resp = await a2ad.client.delete(f"/queue/{qid}")
    assert resp.status == 404


async def test_delete_of_an_item_being_delivered_is_a_conflict(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    gate = asyncio.Event()
    agent, a2ad = await busy_a2ad(
        agent_factory, a2ad_factory, clock, agent=await agent_factory(gate=gate)
    )
    qid = await enqueue(a2ad, "in delivery")
    await heartbeat(a2ad, 0)
    await agent.wait_received(1)
    assert (await a2ad.item(qid))["state"] == "dispatching"
    resp = await a2ad.client.delete(f"/queue/{qid}")
    assert resp.status == 409
    body = await resp.json()
    assert body["error"]["code"] == "conflict" and "dispatching" in body["error"]["message"]
    gate.set()
    assert (await final(a2ad, qid))["state"] == "delivered"


# -- caps and A2AD-Queue: never ---------------------------------------------------


async def test_max_depth_per_workspace_answers_queue_full_and_stores_nothing(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock, max_depth_per_workspace=2)
    await enqueue(a2ad, "one")
    await enqueue(a2ad, "two")
    status, headers, data = await post_send(a2ad, "three", rpc_id="r3", message_id="m3")
    assert status == 503, data
    assert int(headers["Retry-After"]) >= 1
    assert data["id"] == "r3"
    assert data["error"]["data"]["code"] == "queue_full"
    assert "max_depth_per_workspace" in data["error"]["message"]
    assert await a2ad.daemon.store.counts() == {"w": {"queued": 2}}
    assert (await workspace_view(a2ad))["queue"]["queued"] == 2
    # The cap counts waiting items: once they are delivered there is room again.
    await heartbeat(a2ad, 0)
    await poll(lambda: a2ad.daemon.store.counts(), lambda c: c == {"w": {"delivered": 2}})
    await heartbeat(a2ad, 1)
    await enqueue(a2ad, "three", message_id="m3")
    assert texts(agent) == ["one", "two"]


async def test_max_depth_across_workspaces_answers_queue_full_and_stores_nothing(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    a2ad = await a2ad_factory(
        [hb_ws(agent, "a"), hb_ws(agent, "b")], clock=clock, queue={"max_depth": 2}
    )
    for workspace in ("a", "b"):
        await heartbeat(a2ad, 1, workspace)
    await enqueue(a2ad, "a1", workspace="a")
    await enqueue(a2ad, "b1", workspace="b")
    for workspace in ("a", "b"):
        status, headers, data = await post_send(a2ad, "more", workspace=workspace)
        assert status == 503, data
        assert int(headers["Retry-After"]) >= 1
        assert data["error"]["data"]["code"] == "queue_full"
        assert "(queue.max_depth)" in data["error"]["message"]
    assert await a2ad.daemon.store.counts() == {"a": {"queued": 1}, "b": {"queued": 1}}
    assert agent.received == []


async def test_queue_never_while_busy_answers_queue_full_and_stores_nothing(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    status, headers, data = await post_send(a2ad, "now or never", headers={"A2AD-Queue": "never"})
    assert status == 503, data
    assert int(headers["Retry-After"]) >= 1
    assert data["error"]["data"]["code"] == "queue_full"
    assert "A2AD-Queue" in data["error"]["message"]
    assert await a2ad.daemon.store.counts() == {}
    assert agent.received == []
    # With a free slot it goes straight to the agent.
    await heartbeat(a2ad, 0)
    status, _, data = await post_send(a2ad, "now", headers={"A2AD-Queue": "never"})
    assert status == 200 and data["result"]["parts"][0]["text"] == "echo: now"
    assert await a2ad.daemon.store.counts() == {}


async def test_queue_never_during_a_pause_says_when_to_come_back(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    agent.script = [(503, {}, {"Retry-After": "30"})]
    a2ad = await a2ad_factory([{"id": "w", "url": agent.url, "heartbeat": False}], clock=clock)
    # A direct send that meets a busy agent with A2AD-Queue: never is not queued either.
    status, headers, data = await post_send(a2ad, "x", headers={"A2AD-Queue": "never"})
    assert status == 503, data
    assert data["error"]["data"]["code"] == "queue_full"
    assert 29 <= int(headers["Retry-After"]) <= 30
    status, headers, _ = await post_send(a2ad, "y", headers={"A2AD-Queue": "never"})
    assert status == 503
    assert 29 <= int(headers["Retry-After"]) <= 30
    assert await a2ad.daemon.store.counts() == {}
    assert len(agent.received) == 1


# -- replay ------------------------------------------------------------------------


async def deliver_through_the_queue(a2ad: A2ad, text: str, message_id: str) -> dict[str, Any]:
    qid = await enqueue(a2ad, text, message_id=message_id, rpc_id="first")
    await heartbeat(a2ad, 0)
    item = await final(a2ad, qid)
    assert item["state"] == "delivered"
    return item


async def test_a_delivered_message_id_sent_again_while_busy_gets_the_stored_result(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    item = await deliver_through_the_queue(a2ad, "pay once", "m-pay")
    await heartbeat(a2ad, 1)
    await advance(clock, 30.0, step=10.0)

    status, _, data = await post_send(a2ad, "pay once", message_id="m-pay", rpc_id="again")
    assert status == 200, data
    assert data["id"] == "again"
    assert data["result"] == item["result"]["result"]
    assert data["result"]["parts"][0]["text"] == "echo: pay once"
    assert len(agent.received) == 1
    assert await a2ad.daemon.store.counts() == {"w": {"delivered": 1}}


async def test_a_delivered_message_id_sent_again_with_a_free_slot_gets_the_stored_result(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock)
    item = await deliver_through_the_queue(a2ad, "pay once", "m-pay")
    # The slot is free now, as it is after most deliveries.
    status, _, data = await post_send(a2ad, "pay once", message_id="m-pay", rpc_id="again")
    assert status == 200, data
    assert data["id"] == "again"
    assert data["result"] == item["result"]["result"]
    assert len(agent.received) == 1, "the agent saw the message twice"


async def test_a_message_id_is_replayed_only_within_the_replay_window(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(
        agent_factory, a2ad_factory, clock, replay_window_seconds=60, retention_seconds=3600
    )
    first = await deliver_through_the_queue(a2ad, "hello", "m-1")
    await heartbeat(a2ad, 1)
    await advance(clock, 61.0, step=10.0)
    await heartbeat(a2ad, 1)  # still someone else's work
    status, _, data = await post_send(a2ad, "hello", message_id="m-1")
    assert status == 202, data
    second = jsonrpc_task(data)["id"]
    assert second != first["id"]
    await heartbeat(a2ad, 0)
    assert (await final(a2ad, second))["state"] == "delivered"
    assert len(agent.received) == 2


async def test_after_a_failed_item_the_same_message_id_makes_a_new_item(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock, max_attempts=1)
    failed = await fail_one(a2ad, agent, "again", message_id="m-again")
    status, _, data = await post_send(a2ad, "again", message_id="m-again", rpc_id=2)
    assert status == 202, data
    fresh = jsonrpc_task(data)["id"]
    assert fresh != failed
    assert jsonrpc_task(data)["status"]["state"] == "submitted"
    await heartbeat(a2ad, 0)
    assert (await final(a2ad, fresh))["state"] == "delivered"
    assert (await a2ad.item(failed))["state"] == "failed"
    assert texts(agent) == ["again", "again"]
    # Now delivered: the messageId replays the new item's result.
    await heartbeat(a2ad, 1)
    status, _, data = await post_send(a2ad, "again", message_id="m-again", rpc_id=3)
    assert status == 200 and data["id"] == 3
    assert len(agent.received) == 2


async def test_a_failed_item_cannot_be_retried_while_a_newer_one_has_its_message_id(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent, a2ad = await busy_a2ad(agent_factory, a2ad_factory, clock, max_attempts=1)
    failed = await fail_one(a2ad, agent, "x", message_id="m-x")
    await enqueue(a2ad, "x", message_id="m-x")
    resp = await a2ad.client.post(f"/queue/{failed}/retry")
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "conflict"
    assert (await a2ad.item(failed))["state"] == "failed"


# -- retention ---------------------------------------------------------------------

RETENTION = 120.0
PERIOD = 60.0  # the retention loop runs once a minute of clock time
ROUNDS_PER_PERIOD = 3
PER_ROUND = 10
PAD = "x" * 4000  # each message, and the agent's echo of it, carry ~4 kB
# SQLite checkpoints the WAL once it holds wal_autocheckpoint (1000) pages, and then
# writes it again from the start: the -wal file stays under this, commits in flight
# included, however long the traffic runs.
WAL_FRAMES_BOUND = 1200


def file_stats(path: Path) -> dict[str, int]:
    """Rows and pages of the store read through a connection of our own, and the
    sizes of its two files on disk."""
    conn = sqlite3.connect(path, timeout=5)
    try:
        rows = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    wal = Path(f"{path}-wal")
    return {
        "rows": rows,
        "pages": pages,
        "page_size": page_size,
        "db_file": path.stat().st_size,
        "wal_file": wal.stat().st_size if wal.exists() else 0,
    }


@pytest.mark.sqlite_only  # measures the SQLite file itself
async def test_retention_deletes_old_final_items_and_the_file_stays_bounded(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory, tmp_path: Path
) -> None:
    """Steady traffic through the queue for eight retention-loop periods."""
    clock = ManualClock()
    t0 = clock.now()
    agent, a2ad = await busy_a2ad(
        agent_factory,
        a2ad_factory,
        clock,
        retention_seconds=RETENTION,
        replay_window_seconds=RETENTION,
    )
    db = tmp_path / "a2ad.db"
    store = a2ad.daemon.store

    async def oldest_finished() -> float:
        items = await store.list_items(state="delivered", limit=1)
        return (items[0].finished_at or 0.0) if items else clock.now()

    written = 0
    stats: list[dict[str, int]] = []
    for period in range(8):
        for round_ in range(ROUNDS_PER_PERIOD):
            qids = [
                await enqueue(a2ad, f"{PAD} {period}-{round_}-{i}", message_id=f"m-{written + i}")
                for i in range(PER_ROUND)
            ]
            await heartbeat(a2ad, 0)
            for qid in qids:
                assert (await final(a2ad, qid))["state"] == "delivered"
            await heartbeat(a2ad, 1)
            written += PER_ROUND
            step = PERIOD / ROUNDS_PER_PERIOD
            await advance(clock, step, step=step)
        # The retention loop ran as the clock reached this minute; once its delete has
        # landed nothing is final for longer than retention_seconds.
        cutoff = clock.now() - RETENTION
        if cutoff > t0:
            await poll(oldest_finished, lambda finished, c=cutoff: finished >= c)
        stats.append(file_stats(db))

    rows = [s["rows"] for s in stats]
    # At most what finished within the retention period plus one loop interval.
    kept_at_most = PER_ROUND * ROUNDS_PER_PERIOD * (RETENTION + PERIOD) / PERIOD
    assert max(rows) <= kept_at_most, rows
    assert rows[-1] <= written / 4, (rows, written)
    assert len(agent.received) == written

    # The file: pages that retention frees are reused, so it stops growing once
    # retention runs, at the size of the rows it may keep, not of all that was written.
    pages = [s["pages"] for s in stats]
    pages_per_row = stats[1]["pages"] / stats[1]["rows"]
    assert pages[-1] <= pages[2] * 1.1, pages
    assert pages[-1] <= pages_per_row * kept_at_most * 1.1, pages
    assert pages[-1] < pages_per_row * written / 2, pages
    for s in stats:
        assert s["db_file"] <= s["pages"] * s["page_size"], s
        assert s["wal_file"] <= WAL_FRAMES_BOUND * (s["page_size"] + 24) + 32, s


async def test_retention_keeps_what_is_younger_and_everything_live(
    agent_factory: AgentFactory, a2ad_factory: A2adFactory
) -> None:
    clock = ManualClock()
    agent = await agent_factory()
    a2ad = await a2ad_factory(
        [hb_ws(agent, "w"), hb_ws(agent, "v")],
        clock=clock,
        queue={"retention_seconds": 100, "replay_window_seconds": 100, "max_attempts": 1},
    )
    for workspace in ("w", "v"):
        await heartbeat(a2ad, 1, workspace)
    old = await deliver_through_the_queue(a2ad, "old", "m-old")
    await heartbeat(a2ad, 1)
    # A live item of another workspace whose slot stays taken.
    waiting = await enqueue(a2ad, "waiting", workspace="v")
    await advance(clock, 50.0, step=10.0)
    failed = await fail_one(a2ad, agent, "young failure")
    # Retention runs at 60 s and 120 s of clock time: the first deletes nothing; at
    # the second the delivered item is 120 s final, the failed one 70 s.
    for workspace in ("w", "v"):
        await heartbeat(a2ad, 1, workspace)
    await advance(clock, 70.0, step=10.0)

    async def status_of(qid: str) -> int:
        async with a2ad.client.get(f"/queue/{qid}") as resp:
            await resp.read()
            return resp.status

    await poll(lambda: status_of(old["id"]), lambda status: status == 404)
    assert (await a2ad.item(failed))["state"] == "failed"
    assert (await a2ad.item(waiting))["state"] == "queued"
    assert await a2ad.daemon.store.counts() == {"w": {"failed": 1}, "v": {"queued": 1}}
