"""Push notifications for queued tasks: configs on queue ids in both protocol
versions, the durable outbox and its sender (retries, order, dead letters), the
webhook policy, and tasks a2ad follows at the agent after their delivery."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from a2a.types import a2a_pb2
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import A2ad, FakeAgent, jsonrpc_task
from google.protobuf import json_format
from test_queue_id_methods import heartbeat, queue
from test_status_page import csrf_of

from a2ad import push

BOTH_STORES = True

AgentFactory = Callable[..., Awaitable[FakeAgent]]
A2adFactory = Callable[..., Awaitable[A2ad]]
V1 = {"A2A-Version": "1.0"}
ALLOWED = {"allowed_hosts": ["127.0.0.1"]}


@dataclass
class Receiver:
    """A caller's webhook: records each push; answers from `script` first (a status,
    or a delay in seconds as a float), then 200."""

    got: list[tuple[dict[str, Any], dict[str, str]]] = field(default_factory=list)
    script: list[int | float] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.Response:
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, float):
                await asyncio.sleep(step)
            else:
                return web.Response(status=step)
        self.got.append((await request.json(), dict(request.headers)))
        async with self.arrived:
            self.arrived.notify_all()
        return web.Response(status=200)

    async def wait(self, n: int, within: float = 10.0) -> None:
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(lambda: len(self.got) >= n)

    def states(self, task_id: str | None = None) -> list[str]:
        tasks = [body.get("task", body) for body, _ in self.got]
        return [t["status"]["state"] for t in tasks if task_id is None or t["id"] == task_id]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(push, "BACKOFF_FIRST", 0.05)
    monkeypatch.setattr(push, "BACKOFF_MAX", 0.2)
    monkeypatch.setattr(push, "POLL_SECONDS", 0.1)
    monkeypatch.setattr(push, "FOLLOW_FIRST_SECONDS", 0.05)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    found.url = str(server.make_url("/hook"))
    yield found
    await server.close()


async def busy(a2ad: A2ad) -> None:
    """Someone else's work fills the workspace's only slot: sends queue."""
    await heartbeat(a2ad, "w", 1)


async def free(a2ad: A2ad) -> None:
    await heartbeat(a2ad, "w", 0)


async def setup(a2ad_factory: A2adFactory, agent: FakeAgent, **push_settings: Any) -> A2ad:
    return await a2ad_factory(
        [{"id": "w", "url": agent.url, "token": "hb-w"}],
        push={**ALLOWED, **push_settings},
    )


async def send_with_push(
    a2ad: A2ad, config: dict[str, Any], *, v1: bool = True, key: str = "taskPushNotificationConfig"
) -> tuple[int, dict[str, Any]]:
    if v1:
        message: dict[str, Any] = {
            "role": "ROLE_USER",
            "parts": [{"text": "hi"}],
            "messageId": "m1",
        }
        configuration: dict[str, Any] = {"returnImmediately": True, key: config}
        method = "SendMessage"
    else:
        message = {"role": "user", "parts": [{"kind": "text", "text": "hi"}], "messageId": "m1"}
        configuration = {"blocking": False, "pushNotificationConfig": config}
        method = "message/send"
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": method,
        "params": {"message": message, "configuration": configuration},
    }
    resp = await a2ad.client.post("/workspaces/w/a2a", json=body, headers=V1 if v1 else {})
    return resp.status, await resp.json()


async def test_a_queued_send_with_a_push_config_is_pushed_submitted_then_its_answer(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent)
    await busy(a2ad)
    status, data = await send_with_push(a2ad, {"url": receiver.url, "token": "secret-1"})
    assert status == 202, data
    qid = jsonrpc_task(data)["id"]
    await receiver.wait(1)
    assert receiver.states() == ["TASK_STATE_SUBMITTED"]
    await free(a2ad)
    await receiver.wait(2)
    assert receiver.states(qid) == ["TASK_STATE_SUBMITTED", "TASK_STATE_COMPLETED"]
    body, headers = receiver.got[1]
    assert headers["X-A2A-Notification-Token"] == "secret-1"
    # The a2a-sdk's own types read it: a StreamResponse holding the Task.
    parsed = json_format.ParseDict(body, a2a_pb2.StreamResponse(), ignore_unknown_fields=True)
    assert parsed.task.id == qid
    assert parsed.task.status.state == a2a_pb2.TASK_STATE_COMPLETED
    assert parsed.task.status.message.parts[0].text == "echo: hi"
    # The agent got the message without the caller's config: a2ad pushes for it.
    assert "taskPushNotificationConfig" not in agent.served[0].body["params"]["configuration"]
    # The item view never shows the token.
    view = await a2ad.client.get(f"/queue/{qid}")
    assert "secret-1" not in await view.text()


async def test_the_push_config_methods_on_a_queue_id_in_1_0(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent)
    qid = await queue(a2ad, "w", "hi", V1)
    auth = {"scheme": "Bearer", "credentials": "cred-9"}
    created = await a2ad.rpc(
        "w",
        "CreateTaskPushNotificationConfig",
        {"taskId": qid, "id": "c1", "url": receiver.url, "token": "t1", "authentication": auth},
        V1,
    )
    assert created["result"] == {
        "taskId": qid,
        "id": "c1",
        "url": receiver.url,
        "token": "t1",
        "authentication": auth,
    }
    got = await a2ad.rpc("w", "GetTaskPushNotificationConfig", {"taskId": qid, "id": "c1"}, V1)
    assert got["result"] == created["result"]
    listed = await a2ad.rpc("w", "ListTaskPushNotificationConfigs", {"taskId": qid}, V1)
    assert listed["result"] == {"configs": [created["result"]]}
    missing = await a2ad.rpc("w", "GetTaskPushNotificationConfig", {"taskId": qid, "id": "x"}, V1)
    assert missing["error"]["code"] == -32001
    await free(a2ad)
    await receiver.wait(1)
    body, headers = receiver.got[0]
    assert body["task"]["id"] == qid and body["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    assert headers["Authorization"] == "Bearer cred-9"
    assert headers["X-A2A-Notification-Token"] == "t1"
    deleted = await a2ad.rpc(
        "w", "DeleteTaskPushNotificationConfig", {"taskId": qid, "id": "c1"}, V1
    )
    assert deleted["result"] is None
    listed = await a2ad.rpc("w", "ListTaskPushNotificationConfigs", {"taskId": qid}, V1)
    assert listed["result"] == {"configs": []}


async def test_the_push_config_methods_in_v0_3_push_the_v0_3_task(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent)
    qid = await queue(a2ad, "w", "hi")
    config = {
        "url": receiver.url,
        "token": "t3",
        "authentication": {"schemes": ["Basic"], "credentials": "dTpw"},
    }
    created = await a2ad.rpc(
        "w", "tasks/pushNotificationConfig/set", {"taskId": qid, "pushNotificationConfig": config}
    )
    assert created["result"] == {"taskId": qid, "pushNotificationConfig": {"id": qid, **config}}
    got = await a2ad.rpc("w", "tasks/pushNotificationConfig/get", {"id": qid})
    assert got["result"] == created["result"]
    listed = await a2ad.rpc("w", "tasks/pushNotificationConfig/list", {"id": qid})
    assert listed["result"] == [created["result"]]
    await free(a2ad)
    await receiver.wait(1)
    body, headers = receiver.got[0]
    assert body["kind"] == "task" and body["id"] == qid and body["status"]["state"] == "completed"
    assert headers["Authorization"] == "Basic dTpw"
    deleted = await a2ad.rpc(
        "w", "tasks/pushNotificationConfig/delete", {"id": qid, "pushNotificationConfigId": qid}
    )
    assert deleted["result"] is None


async def test_webhooks_at_loopback_private_or_metadata_addresses_are_refused(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory
) -> None:
    agent = await agent_factory()
    a2ad = await a2ad_factory([{"id": "w", "url": agent.url, "token": "hb-w"}])
    qid = await queue(a2ad, "w", "hi", V1)
    for url in (
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest",
        "http://metadata.google.internal/x",
        "ftp://example.com/x",
        "http://user:pw@example.com/x",
    ):
        answer = await a2ad.rpc(
            "w", "CreateTaskPushNotificationConfig", {"taskId": qid, "url": url}, V1
        )
        assert answer["error"]["code"] == -32602, (url, answer)
    status, data = await send_with_push(a2ad, {"url": "http://192.168.1.1/hook"})
    assert status == 200 and data["error"]["code"] == -32602
    assert a2ad.daemon.registry.get("w").queued_total == 1  # the refused send queued nothing


async def test_bad_configs_get_invalid_params_and_a_task_holds_at_most_its_limit(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent, max_configs_per_task=2)
    qid = await queue(a2ad, "w", "hi", V1)
    for params in (
        {"taskId": qid},
        {"taskId": qid, "url": 5},
        {"taskId": qid, "url": receiver.url, "token": ["x"]},
        {"taskId": qid, "url": receiver.url, "authentication": "Bearer x"},
    ):
        answer = await a2ad.rpc("w", "CreateTaskPushNotificationConfig", params, V1)
        assert answer["error"]["code"] == -32602, (params, answer)
    for n in range(2):
        answer = await a2ad.rpc(
            "w",
            "CreateTaskPushNotificationConfig",
            {"taskId": qid, "id": f"c{n}", "url": receiver.url},
            V1,
        )
        assert "result" in answer
    answer = await a2ad.rpc(
        "w",
        "CreateTaskPushNotificationConfig",
        {"taskId": qid, "id": "c9", "url": receiver.url},
        V1,
    )
    assert answer["error"]["code"] == -32602 and "at most 2" in answer["error"]["message"]
    other = await a2ad.rpc(
        "w",
        "CreateTaskPushNotificationConfig",
        {"taskId": "q-" + "0" * 32, "url": receiver.url},
        V1,
    )
    assert other["error"]["code"] == -32001


async def test_a_receiver_that_is_down_gets_every_update_in_order_once_it_is_back(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent)
    receiver.script = [503, 503, 0.3, 503]  # 503s, then a slow answer, then one more 503
    await busy(a2ad)
    qids = []
    for n in range(3):
        _, data = await a2ad.send("w", f"m{n}", headers=V1)
        qid = jsonrpc_task(data)["id"]
        await a2ad.rpc(
            "w", "CreateTaskPushNotificationConfig", {"taskId": qid, "url": receiver.url}, V1
        )
        qids.append(qid)
    await free(a2ad)
    await receiver.wait(3)
    for qid in qids:
        assert receiver.states(qid) == ["TASK_STATE_COMPLETED"]


async def test_an_update_past_its_attempts_is_a_dead_letter_that_a_retry_delivers(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent, max_attempts=2)
    receiver.script = [500, 500]
    await busy(a2ad)
    _, data = await send_with_push(a2ad, {"url": receiver.url})
    qid = jsonrpc_task(data)["id"]
    store = a2ad.daemon.store
    async with asyncio.timeout(5):
        while not await store.dead_pushes():  # noqa: ASYNC110 - the store tells no one
            await asyncio.sleep(0.02)
    # The dead SUBMITTED does not hold back the task's later update.
    await free(a2ad)
    await receiver.wait(1)
    assert receiver.states(qid) == ["TASK_STATE_COMPLETED"]
    resp = await a2ad.client.get("/queue/pushes")
    listing = await resp.json()
    assert [p["item_id"] for p in listing["pushes"]] == [qid]
    assert listing["pushes"][0]["last_error"] == "the receiver answered HTTP 500"
    for seq in ("999999", "x"):
        unknown = await a2ad.client.post(f"/queue/pushes/{seq}/retry")
        assert unknown.status == 404 and (await unknown.json())["error"]["code"] == "not_found"
    page = await (await a2ad.client.get("/ui")).text()
    assert "Dead push updates <span class=muted>(1)</span>" in page
    assert receiver.url in page and "the receiver answered HTTP 500" in page
    refused = await a2ad.client.post("/ui/pushes/retry", data={}, allow_redirects=False)
    assert refused.status == 403  # the status page's form needs its CSRF token
    resp = await a2ad.client.post(
        "/ui/pushes/retry", data={"csrf": csrf_of(page)}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/ui?retried=1"
    await receiver.wait(2)
    assert receiver.states(qid) == ["TASK_STATE_COMPLETED", "TASK_STATE_SUBMITTED"]
    assert await store.dead_pushes() == []


async def test_a_config_registered_after_the_task_ended_gets_its_final_update(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent)
    qid = await queue(a2ad, "w", "hi", V1)
    await free(a2ad)
    await a2ad.final(qid)
    await a2ad.rpc(
        "w", "CreateTaskPushNotificationConfig", {"taskId": qid, "url": receiver.url}, V1
    )
    await receiver.wait(1)
    assert receiver.states(qid) == ["TASK_STATE_COMPLETED"]


WORKING_1 = {"id": "t-1", "contextId": "c-1", "status": {"state": "TASK_STATE_WORKING"}}
HELLO = {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}


async def test_a_task_the_agent_goes_on_with_is_followed_to_its_end(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    agent.script = [
        (200, {"jsonrpc": "2.0", "id": 1, "result": {"task": WORKING_1}}, {}),
        # Only history added (a GetTask's answer often has it): no news, no push.
        (200, {"jsonrpc": "2.0", "id": 2, "result": {**WORKING_1, "history": [HELLO]}}, {}),
        (
            200,
            {
                "jsonrpc": "2.0",
                "id": 3,
                "result": {
                    **WORKING_1,
                    "artifacts": [{"artifactId": "a", "parts": [{"text": "half"}]}],
                },
            },
            {},
        ),
        (
            200,
            {
                "jsonrpc": "2.0",
                "id": 4,
                "result": {**WORKING_1, "status": {"state": "TASK_STATE_COMPLETED"}},
            },
            {},
        ),
    ]
    a2ad = await setup(a2ad_factory, agent)
    await busy(a2ad)
    _, data = await send_with_push(a2ad, {"url": receiver.url})
    qid = jsonrpc_task(data)["id"]
    await free(a2ad)
    await receiver.wait(4)
    assert receiver.states(qid) == [
        "TASK_STATE_SUBMITTED",
        "TASK_STATE_WORKING",
        "TASK_STATE_WORKING",
        "TASK_STATE_COMPLETED",
    ]
    last = receiver.got[-1][0]["task"]
    assert last["id"] == qid and last["metadata"]["a2ad"]["agent_task_id"] == "t-1"
    asked = [r.body for r in agent.received[1:]]
    assert {r["method"] for r in asked} == {"GetTask"} and asked[0]["params"] == {"id": "t-1"}
    await asyncio.sleep(0.3)
    assert len(agent.received) == 4  # no more looks once it is final


async def test_a_send_with_a_push_config_is_queued_unless_the_agent_pushes_itself(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent)
    # This agent has no card: a2ad cannot know it pushes, so it pushes itself.
    status, _ = await send_with_push(a2ad, {"url": receiver.url})
    assert status == 202
    await receiver.wait(2)
    assert receiver.states() == ["TASK_STATE_SUBMITTED", "TASK_STATE_COMPLETED"]


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_receiver() -> str:
    """The receiver example of README's Push notifications section, as it stands."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Push notifications") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


@pytest.mark.sqlite_only
async def test_the_readme_receiver_gets_a_queued_tasks_updates(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    script = tmp_path / "receiver.py"
    script.write_text(readme_receiver())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(port), stdout=asyncio.subprocess.PIPE
    )
    try:
        agent = await agent_factory()
        a2ad = await setup(a2ad_factory, agent)
        await busy(a2ad)
        url = f"http://127.0.0.1:{port}/a2a-updates"
        async with asyncio.timeout(10):  # the receiver is listening once this answers
            while True:
                try:
                    _, reader = await asyncio.open_connection("127.0.0.1", port)
                    reader.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        _, data = await send_with_push(a2ad, {"url": url, "token": "s3cret"})
        qid = jsonrpc_task(data)["id"]
        await free(a2ad)
        assert process.stdout is not None
        lines: list[list[str]] = []
        async with asyncio.timeout(10):
            while len(lines) < 2:  # aiohttp's own lines ("Running on …") are not updates
                line = (await process.stdout.readline()).decode().split()
                if line and line[0].startswith("q-"):
                    lines.append(line)
        assert lines == [[qid, "TASK_STATE_SUBMITTED"], [qid, "TASK_STATE_COMPLETED"]]
    finally:
        process.kill()
        await process.wait()


async def pushing_agent(agent: FakeAgent) -> TestServer:
    """`agent` with a card that says it sends push notifications itself."""
    card = {"name": "pusher", "capabilities": {"pushNotifications": True}, "url": "x"}

    async def serve_card(request: web.Request) -> web.Response:
        return web.json_response(card)

    app = web.Application()
    app.router.add_post("/", agent.handle)
    app.router.add_get("/.well-known/agent-card.json", serve_card)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    agent.url = str(server.make_url("/"))
    return server


async def test_an_agent_that_pushes_is_given_a2ads_receiver_and_its_pushes_are_relayed(
    a2ad_factory: A2adFactory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(push, "FOLLOW_FIRST_SECONDS", 60.0)  # no polling: only its pushes
    agent = FakeAgent()
    agent.script = [
        (200, {"jsonrpc": "2.0", "id": 1, "result": {"task": WORKING_1}}, {}),
        (200, {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "t-1", "id": "a2ad"}}, {}),
    ]
    server = await pushing_agent(agent)
    try:
        a2ad = await setup(a2ad_factory, agent)
        await busy(a2ad)
        _, data = await send_with_push(a2ad, {"url": receiver.url, "token": "mine"})
        qid = jsonrpc_task(data)["id"]
        await free(a2ad)
        await agent.wait_received(2)
        registered = agent.received[1].body
        assert registered["method"] == "CreateTaskPushNotificationConfig"
        params = registered["params"]
        assert params["taskId"] == "t-1" and params["url"].endswith(f"/workspaces/w/pushes/{qid}")
        path = params["url"][params["url"].index("/workspaces/") :]
        update = {
            "statusUpdate": {
                "taskId": "t-1",
                "contextId": "c-1",
                "status": {"state": "TASK_STATE_COMPLETED"},
            }
        }
        wrong = await a2ad.client.post(
            path, json=update, headers={"X-A2A-Notification-Token": "guess"}
        )
        assert wrong.status == 401
        pushed = await a2ad.client.post(
            path, json=update, headers={"X-A2A-Notification-Token": params["token"]}
        )
        assert pushed.status == 200, await pushed.text()
        await receiver.wait(3)
        assert receiver.states(qid) == [
            "TASK_STATE_SUBMITTED",
            "TASK_STATE_WORKING",
            "TASK_STATE_COMPLETED",
        ]
        assert receiver.got[-1][1]["X-A2A-Notification-Token"] == "mine"
        # The task is final: the agent's token opens nothing any more.
        again = await a2ad.client.post(
            path, json=update, headers={"X-A2A-Notification-Token": params["token"]}
        )
        assert again.status == 401
    finally:
        await server.close()


async def test_a_send_with_a_push_config_to_an_agent_that_pushes_goes_to_it_unchanged(
    a2ad_factory: A2adFactory, receiver: Receiver
) -> None:
    agent = FakeAgent()
    server = await pushing_agent(agent)
    try:
        a2ad = await setup(a2ad_factory, agent)
        config = {"url": receiver.url, "token": "mine"}
        status, _ = await send_with_push(a2ad, config)
        assert status == 200  # forwarded: the agent's own answer
        assert agent.served[0].body["params"]["configuration"]["taskPushNotificationConfig"] == (
            config
        )
        assert a2ad.daemon.registry.get("w").queued_total == 0
    finally:
        await server.close()


# -- what an attack on the invariants found ------------------------------------------


async def test_tokens_and_credentials_with_control_characters_are_refused(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    """A NUL cannot go into PostgreSQL's jsonb (it stopped every expiry there) and a
    CR/LF cannot go into a header (the push was never sent nor dead-lettered)."""
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent)
    await busy(a2ad)
    for config in (
        {"url": receiver.url, "token": "x\u0000"},
        {"url": receiver.url, "token": "a\r\nX-Injected: 1"},
        {"url": receiver.url, "authentication": {"scheme": "Bearer\n", "credentials": "c"}},
        {"url": "http://[::1/hook"},
        {"url": "http://100.64.0.1/hook"},
        {"url": "http://[2002:7f00:1::]/hook"},
    ):
        status, data = await send_with_push(a2ad, config)
        assert status == 200 and data["error"]["code"] == -32602, (config, data)
    assert a2ad.daemon.registry.get("w").queued_total == 0


async def test_a_deleted_configs_token_is_shown_nowhere_nor_sent_to_the_agent(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent)
    await busy(a2ad)
    auth = {"scheme": "Bearer", "credentials": "cred-secret"}
    _, data = await send_with_push(
        a2ad, {"url": receiver.url, "token": "tok-secret", "authentication": auth}
    )
    qid = jsonrpc_task(data)["id"]
    deleted = await a2ad.rpc(
        "w", "DeleteTaskPushNotificationConfig", {"taskId": qid, "id": qid}, V1
    )
    assert deleted["result"] is None
    await free(a2ad)
    await a2ad.final(qid)
    for path in (f"/queue/{qid}", "/workspaces/w/queue?bodies=1", "/queue/pushes"):
        text = await (await a2ad.client.get(path)).text()
        assert "secret" not in text, path
    assert "taskPushNotificationConfig" not in agent.served[0].body["params"]["configuration"]


async def test_a_config_registered_after_a_followed_task_ended_gets_its_final_state(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    done = {**WORKING_1, "status": {"state": "TASK_STATE_COMPLETED"}}
    agent.script = [
        (200, {"jsonrpc": "2.0", "id": 1, "result": {"task": WORKING_1}}, {}),
        (200, {"jsonrpc": "2.0", "id": 2, "result": done}, {}),
    ]
    a2ad = await setup(a2ad_factory, agent)
    await busy(a2ad)
    _, data = await send_with_push(a2ad, {"url": receiver.url, "id": "A"})
    qid = jsonrpc_task(data)["id"]
    await free(a2ad)
    await receiver.wait(3)
    create = "CreateTaskPushNotificationConfig"
    params = {"taskId": qid, "id": "B", "url": receiver.url, "token": "b"}
    assert "result" in await a2ad.rpc("w", create, params, V1)
    await receiver.wait(4)
    body, headers = receiver.got[3]
    assert headers["X-A2A-Notification-Token"] == "b"
    assert body["task"]["status"]["state"] == "TASK_STATE_COMPLETED"


async def test_a_send_answered_by_its_live_item_attaches_its_push_config(
    a2ad_factory: A2adFactory, agent_factory: AgentFactory, receiver: Receiver
) -> None:
    agent = await agent_factory()
    a2ad = await setup(a2ad_factory, agent)
    await busy(a2ad)
    _, first = await send_with_push(a2ad, {"url": receiver.url, "token": "first"})
    _, again = await send_with_push(a2ad, {"url": receiver.url, "token": "second", "id": "2"})
    qid = jsonrpc_task(first)["id"]
    assert jsonrpc_task(again)["id"] == qid  # the same messageId: the same item
    await free(a2ad)
    await a2ad.final(qid)
    await receiver.wait(3)  # SUBMITTED to the first; the final state to both
    finals = {h["X-A2A-Notification-Token"] for _, h in receiver.got[1:]}
    assert receiver.states(qid)[1:] == ["TASK_STATE_COMPLETED"] * 2
    assert finals == {"first", "second"}
