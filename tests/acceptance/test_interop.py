"""The real a2a-sdk (1.3.0) on both sides of a2ad, in both protocol versions: an SDK
agent (sdk_agent.py, uvicorn, in a subprocess) behind the real `a2ad serve`, and the
SDK client resolving its card through a2ad. A heartbeat claiming the agent's only
slot makes a2ad queue; a heartbeat freeing it makes a2ad deliver at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from a2a.client import A2ACardResolver, Client, ClientConfig, ClientFactory
from a2a.helpers import get_artifact_text, get_message_text
from a2a.types.a2a_pb2 import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    Task,
    TaskState,
)
from google.protobuf.json_format import MessageToDict

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher, Process

WORKSPACE = "sdk"
HEARTBEAT_TOKEN = "interop-heartbeat-token"
AGENT_SCRIPT = Path(__file__).with_name("sdk_agent.py")
AGENT_PAUSE = 0.3  # seconds between the SDK agent's events
TEST_DEADLINE = 30.0  # every test ends well within this, or fails
CLIENT_TIMEOUT = httpx.Timeout(30.0)  # the SDK factory's default of 5 s is too short
POLL_INTERVAL = 0.05

PROTOCOLS = ["1.0", "0.3"]

SUBMITTED = TaskState.TASK_STATE_SUBMITTED
WORKING = TaskState.TASK_STATE_WORKING
COMPLETED = TaskState.TASK_STATE_COMPLETED
CANCELED = TaskState.TASK_STATE_CANCELED


# -- the stack: SDK agent + a2ad ------------------------------------------------


@dataclass
class Stack:
    """One SDK agent behind one a2ad, and an HTTP client for a2ad's own endpoints."""

    protocol: str
    agent: Process
    a2ad: Process
    config: A2adConfig
    agent_log: Path
    http: httpx.AsyncClient

    @property
    def ws_url(self) -> str:
        """a2ad's public URL for the workspace: what the card must point at."""
        return f"{self.config.url}/workspaces/{WORKSPACE}/a2a"

    async def heartbeat(self, active: int) -> None:
        resp = await self.http.post(
            f"{self.config.url}/workspaces/{WORKSPACE}/heartbeat",
            headers={"Authorization": f"Bearer {HEARTBEAT_TOKEN}"},
            json={"active_tasks": active, "max_concurrent_tasks": 1},
        )
        assert resp.status_code == 200, resp.text

    async def busy(self) -> None:
        """External load takes the only slot: a2ad queues every send."""
        await self.heartbeat(1)

    async def free(self) -> None:
        """The slot is free again: a2ad delivers at once."""
        await self.heartbeat(0)

    async def queue_item(self, qid: str, wait: float = 0.0) -> dict[str, Any]:
        url = f"{self.config.url}/queue/{qid}"
        resp = await self.http.get(url, params={"wait": wait} if wait else None)
        assert resp.status_code == 200, resp.text
        item: dict[str, Any] = resp.json()
        return item

    async def wait_delivered(self, qid: str) -> dict[str, Any]:
        item = await self.queue_item(qid, wait=10.0)
        assert item["state"] == "delivered", item
        return item

    def agent_texts(self) -> list[str]:
        """Every message text the agent has received, in order."""
        if not self.agent_log.exists():
            return []
        content = self.agent_log.read_text()
        # Only whole lines: the agent may be writing one right now.
        lines = content[: content.rfind("\n") + 1].splitlines()
        return [json.loads(line)["text"] for line in lines if line.strip()]


def start_stack(
    launcher: Launcher,
    directory: Path,
    protocol: str,
    *,
    gate: Path | None = None,
    linger: float = 0.0,
    push: bool = False,
) -> tuple[Process, Process, A2adConfig, Path]:
    """Start the SDK agent and a2ad in front of it; both answer when this returns."""
    port = launcher.free_port()
    log = directory / "agent-received.jsonl"
    argv = [sys.executable, str(AGENT_SCRIPT), "--port", str(port), "--protocol", protocol]
    argv += ["--pause", str(AGENT_PAUSE), "--log", str(log)]
    if gate is not None:
        argv += ["--gate", str(gate)]
    if linger:
        argv += ["--linger", str(linger)]
    if push:
        argv.append("--push")
    agent = launcher.spawn("sdk-agent", argv, url=f"http://127.0.0.1:{port}")
    agent.wait_until("/.well-known/agent-card.json")
    config = launcher.config(
        workspaces=[
            {
                "id": WORKSPACE,
                "url": agent.url + "/",
                "max_concurrent": 1,
                "heartbeat": True,
                "token": HEARTBEAT_TOKEN,
                "request_timeout_seconds": 30.0,
            }
        ],
        push={"allowed_hosts": ["127.0.0.1"]},  # the tests' webhooks
    )
    a2ad = launcher.a2ad(config)
    return agent, a2ad, config, log


@contextlib.asynccontextmanager
async def stack_for(
    launcher: Launcher,
    directory: Path,
    protocol: str,
    *,
    gate: Path | None = None,
    linger: float = 0.0,
    push: bool = False,
) -> AsyncIterator[Stack]:
    agent, a2ad, config, log = await asyncio.to_thread(
        start_stack, launcher, directory, protocol, gate=gate, linger=linger, push=push
    )
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as http:
        yield Stack(protocol, agent, a2ad, config, log, http)


@pytest.fixture(params=PROTOCOLS, ids=[f"v{p}" for p in PROTOCOLS])
async def stack(
    request: pytest.FixtureRequest, launcher: Launcher, tmp_path: Path
) -> AsyncIterator[Stack]:
    async with stack_for(launcher, tmp_path, request.param) as s:
        yield s


# -- the SDK client, resolved through a2ad ---------------------------------------


@contextlib.asynccontextmanager
async def sdk_client(stack: Stack, *, streaming: bool) -> AsyncIterator[tuple[Client, AgentCard]]:
    """The SDK client for the card a2ad serves, with its own (closed) httpx client."""
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as http:
        factory = ClientFactory(ClientConfig(streaming=streaming, httpx_client=http))
        card = await A2ACardResolver(http, stack.ws_url).get_agent_card()
        client = factory.create(card)
        try:
            yield client, card
        finally:
            await client.close()


def user_message(text: str, *, return_immediately: bool = False) -> SendMessageRequest:
    """A send that waits for the task to end (the SDK's default; held through the
    queue when it is queued), or with `return_immediately` one that does not (a
    queued one gets its SUBMITTED Task at once)."""
    return SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=text)]),
        configuration=SendMessageConfiguration(return_immediately=return_immediately),
    )


def unique(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


def kind(event: StreamResponse) -> str:
    which = event.WhichOneof("payload")
    assert which is not None, event
    return which


def state_name(state: int) -> str:
    return TaskState.Name(state)


def task_texts(task: Task) -> list[str]:
    """The artifact texts of a Task, and its status message's text if any."""
    texts = [get_artifact_text(a) for a in task.artifacts]
    if task.status.HasField("message"):
        texts.append(get_message_text(task.status.message))
    return texts


def event_summary(events: list[StreamResponse]) -> list[str]:
    out = []
    for e in events:
        k = kind(e)
        if k == "task":
            out.append(f"task {e.task.id} {state_name(e.task.status.state)}")
        elif k == "status_update":
            u = e.status_update
            out.append(f"status {u.task_id} {state_name(u.status.state)}")
        elif k == "artifact_update":
            u2 = e.artifact_update
            out.append(f"artifact {u2.task_id} {get_artifact_text(u2.artifact)!r}")
        else:
            out.append(f"message {get_message_text(e.message)!r}")
    return out


async def until_final(client: Client, task_id: str) -> Task:
    """GetTask until the task is final (a caller's poll; the test's deadline bounds it)."""
    while True:
        task = await client.get_task(GetTaskRequest(id=task_id))
        if task.status.state in (COMPLETED, CANCELED, TaskState.TASK_STATE_FAILED):
            return task
        await asyncio.sleep(0.05)


async def only_one(client: Client, request: SendMessageRequest) -> StreamResponse:
    """A non-streaming send: the client yields exactly one response."""
    responses = [r async for r in client.send_message(request)]
    assert len(responses) == 1, event_summary(responses)
    return responses[0]


async def wait_texts(stack: Stack, text: str) -> list[str]:
    """The agent's received texts once `text` is among them (polled, bounded)."""
    end = time.monotonic() + 10.0
    while time.monotonic() < end:
        texts = stack.agent_texts()
        if text in texts:
            return texts
        await asyncio.sleep(POLL_INTERVAL)
    raise AssertionError(f"the agent never received {text!r}: {stack.agent_texts()}")


# -- 1. the card and a direct send ------------------------------------------------


async def test_card_points_at_a2ad_and_send_returns_agent_reply(stack: Stack) -> None:
    async with asyncio.timeout(TEST_DEADLINE):
        # The card as served: every interface (and v0.3's top-level url) is a2ad's.
        resp = await stack.http.get(stack.ws_url + "/.well-known/agent-card.json")
        assert resp.status_code == 200, resp.text
        raw = resp.json()
        assert [i["url"] for i in raw["supportedInterfaces"]] == [stack.ws_url], raw
        assert [i["protocolVersion"] for i in raw["supportedInterfaces"]] == [stack.protocol]
        if stack.protocol == "0.3":
            assert raw["url"] == stack.ws_url, raw

        async with sdk_client(stack, streaming=False) as (client, card):
            assert [i.url for i in card.supported_interfaces] == [stack.ws_url]
            assert card.capabilities.streaming
            text = unique("hello")
            response = await only_one(client, user_message(text))

        assert kind(response) == "task", response
        task = response.task
        assert not task.id.startswith("q-"), task
        assert task.status.state == COMPLETED, task
        assert task_texts(task) == [f"echo: {text}"], task
        assert stack.agent_texts() == [text]


# -- 2. busy agent, non-streaming client ----------------------------------------------


async def test_a_blocking_send_to_a_busy_agent_gets_the_agents_answer(stack: Stack) -> None:
    """The SDK's default send waits for the task to end: through a2ad it is held
    while queued and answered with the agent's own reply once a slot frees."""
    async with asyncio.timeout(TEST_DEADLINE), sdk_client(stack, streaming=False) as (client, _):
        await stack.busy()
        text = unique("held")
        send = asyncio.create_task(only_one(client, user_message(text)))
        await asyncio.sleep(0.5)
        assert not send.done() and stack.agent_texts() == []  # queued, the caller held
        await stack.free()
        response = await send
        if kind(response) == "task":  # the agent's Task, under the queue id
            assert response.task.id.startswith("q-"), response
            assert state_name(response.task.status.state) == "TASK_STATE_COMPLETED", response
            assert task_texts(response.task) == [f"echo: {text}"], response
        else:
            assert get_message_text(response.message) == f"echo: {text}", response
        assert stack.agent_texts() == [text]


async def test_queued_send_then_get_task_returns_agent_reply(stack: Stack) -> None:
    async with asyncio.timeout(TEST_DEADLINE), sdk_client(stack, streaming=False) as (client, _):
        await stack.busy()
        text = unique("queued")
        response = await only_one(client, user_message(text, return_immediately=True))
        assert kind(response) == "task", response
        queued = response.task
        qid = queued.id
        assert qid.startswith("q-") and len(qid) == 34, queued
        assert queued.status.state == SUBMITTED, queued
        assert queued.context_id, queued  # one a2ad made: the message had none
        meta = MessageToDict(queued.metadata)["a2ad"]
        assert meta["queued"] is True and meta["queue_id"] == qid, meta
        assert (meta["position"], meta["queue_depth"]) == (1, 1), meta
        assert stack.agent_texts() == []

        # While queued, GetTask through the same client says SUBMITTED under the queue id.
        waiting = await client.get_task(GetTaskRequest(id=qid))
        assert (waiting.id, waiting.status.state) == (qid, SUBMITTED), waiting
        assert waiting.context_id == queued.context_id, waiting

        await stack.free()
        await stack.wait_delivered(qid)
        # Delivered with returnImmediately, as sent: the agent may still be working.
        task = await until_final(client, qid)

    assert (task.id, task.context_id) == (qid, queued.context_id), task
    assert task.status.state == COMPLETED, task
    assert task_texts(task) == [f"echo: {text}"], task
    meta = MessageToDict(task.metadata)["a2ad"]
    assert meta["queue_id"] == qid and not meta["agent_task_id"].startswith("q-"), meta
    assert stack.agent_texts() == [text]


# -- 3. streaming, slot free -------------------------------------------------------------


async def test_direct_stream_relays_agent_events_in_order(stack: Stack) -> None:
    async with asyncio.timeout(TEST_DEADLINE), sdk_client(stack, streaming=True) as (client, _):
        text = unique("stream")
        events = [e async for e in client.send_message(user_message(text))]
        # Not a queue id: a2ad forwards GetTask to the agent unchanged.
        fetched = await client.get_task(GetTaskRequest(id=events[0].task.id))

    summary = event_summary(events)
    assert [kind(e) for e in events] == [
        "task",
        "status_update",
        "artifact_update",
        "status_update",
    ], summary
    task_id = events[0].task.id
    assert not task_id.startswith("q-"), summary
    assert events[0].task.status.state == SUBMITTED, summary
    assert events[1].status_update.status.state == WORKING, summary
    assert get_artifact_text(events[2].artifact_update.artifact) == f"echo: {text}", summary
    assert events[3].status_update.status.state == COMPLETED, summary
    assert {events[1].status_update.task_id, events[2].artifact_update.task_id} == {task_id}
    assert events[3].status_update.task_id == task_id
    assert (fetched.id, fetched.status.state) == (task_id, COMPLETED), fetched
    assert task_texts(fetched) == [f"echo: {text}"], fetched
    assert stack.agent_texts() == [text]


# -- 4. streaming, queued --------------------------------------------------------------


async def test_queued_stream_is_one_task_under_the_queue_id(stack: Stack) -> None:
    async with asyncio.timeout(TEST_DEADLINE), sdk_client(stack, streaming=True) as (client, _):
        await stack.busy()
        text = unique("queued stream")
        events: list[StreamResponse] = []
        async for event in client.send_message(user_message(text)):
            events.append(event)
            if len(events) == 1:
                # Seen the queued Task: only now does the slot free.
                assert kind(event) == "task", event
                assert stack.agent_texts() == []
                await stack.free()
        # The stored result: the Task the stream added up to, under the queue id.
        qid = events[0].task.id
        await stack.wait_delivered(qid)
        fetched = await client.get_task(GetTaskRequest(id=qid))

    summary = event_summary(events)
    first = events[0].task
    assert qid.startswith("q-"), summary
    assert first.status.state == SUBMITTED, summary
    assert MessageToDict(first.metadata)["a2ad"]["queued"] is True, summary

    rest = events[1:]
    assert [kind(e) for e in rest if kind(e) == "task"] == [], summary  # one Task only
    assert all(kind(e) in ("status_update", "artifact_update") for e in rest), summary
    ids = {
        (e.status_update.task_id, e.status_update.context_id)
        if kind(e) == "status_update"
        else (e.artifact_update.task_id, e.artifact_update.context_id)
        for e in rest
    }
    assert ids == {(qid, first.context_id)}, summary
    states = [e.status_update.status.state for e in rest if kind(e) == "status_update"]
    assert states[0] == WORKING, summary  # delivery started
    assert states[-1] == COMPLETED and kind(rest[-1]) == "status_update", summary
    artifacts = [
        get_artifact_text(e.artifact_update.artifact) for e in rest if kind(e) == "artifact_update"
    ]
    assert artifacts == [f"echo: {text}"], summary
    assert (fetched.id, fetched.context_id) == (qid, first.context_id), fetched
    assert fetched.status.state == COMPLETED, fetched
    assert task_texts(fetched) == [f"echo: {text}"], fetched
    assert stack.agent_texts() == [text]


# -- 5. cancel of a queued task -----------------------------------------------------------


async def test_cancel_queued_task_is_never_delivered(stack: Stack) -> None:
    async with asyncio.timeout(TEST_DEADLINE), sdk_client(stack, streaming=False) as (client, _):
        await stack.busy()
        cancelled_text = unique("never deliver")
        response = await only_one(client, user_message(cancelled_text, return_immediately=True))
        qid = response.task.id
        assert qid.startswith("q-"), response

        task = await client.cancel_task(CancelTaskRequest(id=qid))
        assert (task.id, task.status.state) == (qid, CANCELED), task

        await stack.free()
        # a2ad keeps order: had it kept the cancelled item, this send would queue
        # behind it. Going direct and completing proves the queue is empty.
        sentinel = unique("sentinel")
        after = await only_one(client, user_message(sentinel))
        assert kind(after) == "task" and not after.task.id.startswith("q-"), after
        assert after.task.status.state == COMPLETED, after

        again = await client.get_task(GetTaskRequest(id=qid))
        assert (again.id, again.status.state) == (qid, CANCELED), again
        item = await stack.queue_item(qid)

    assert item["state"] == "cancelled", item
    texts = await wait_texts(stack, sentinel)
    assert cancelled_text not in texts, texts
    assert texts == [sentinel]


# -- 6. a stream is relayed as it is produced ---------------------------------------------


@pytest.mark.parametrize("path", ["direct", "queued"])
async def test_first_event_arrives_before_agent_emits_last(
    launcher: Launcher, tmp_path: Path, path: str
) -> None:
    """The agent holds its final event until a file exists that the test creates only
    after it has seen the agent's first event. A buffering a2ad deadlocks this: the
    deadline fails the test (and the agent, at its own timeout, fails the task)."""
    gate = tmp_path / "gate"
    async with (
        stack_for(launcher, tmp_path, "1.0", gate=gate) as stack,
        sdk_client(stack, streaming=True) as (client, _),
    ):
        if path == "queued":
            await stack.busy()
        text = unique("gated")
        # Direct: the agent's Task comes first. Queued: a2ad's SUBMITTED Task, then its
        # WORKING status when delivery starts, then the agent's events.
        first_agent = 0 if path == "direct" else 2
        events: list[StreamResponse] = []
        arrivals: list[float] = []
        opened_at: float | None = None
        async with asyncio.timeout(15.0):
            async for event in client.send_message(user_message(text)):
                events.append(event)
                arrivals.append(time.monotonic())
                if path == "queued" and len(events) == 1:
                    await stack.free()  # the agent has not been contacted yet
                if len(events) == first_agent + 1:
                    # The agent's first event: it now waits for the gate before its last.
                    assert stack.agent_texts() == [text]
                    gate.touch()
                    opened_at = time.monotonic()

    summary = event_summary(events)
    assert opened_at is not None, summary
    last = events[-1]
    assert kind(last) == "status_update", summary
    assert last.status_update.status.state == COMPLETED, summary
    # The final event cannot exist before the gate opened; the first agent event did.
    assert arrivals[-1] >= opened_at, summary
    assert arrivals[-1] - arrivals[first_agent] >= AGENT_PAUSE, summary


# -- a queued stream ends with the agent's; the history names the queue id -------------

LINGER = 1.5  # seconds the agent keeps its stream open after its final event


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=[f"v{p}" for p in PROTOCOLS])
async def test_queued_stream_ends_with_the_agents_stream(
    launcher: Launcher, tmp_path: Path, protocol: str
) -> None:
    async with (
        asyncio.timeout(TEST_DEADLINE),
        stack_for(launcher, tmp_path, protocol, linger=LINGER) as stack,
        sdk_client(stack, streaming=True) as (client, _),
    ):
        await stack.busy()
        events: list[StreamResponse] = []
        async for event in client.send_message(user_message(unique("linger"))):
            events.append(event)
            if len(events) == 1:
                await stack.free()
        qid = events[0].task.id
        last = events[-1]
        assert last.status_update.status.state == COMPLETED, event_summary(events)
        # The stream is over, so the item is final: GetTask agrees with the stream.
        task = await client.get_task(GetTaskRequest(id=qid))
        item = await stack.queue_item(qid)
        assert (task.status.state, item["state"]) == (COMPLETED, "delivered"), (
            state_name(task.status.state),
            item["state"],
        )


async def test_delivered_task_history_names_the_queue_id(stack: Stack) -> None:
    async with asyncio.timeout(TEST_DEADLINE), sdk_client(stack, streaming=False) as (client, _):
        await stack.busy()
        response = await only_one(client, user_message(unique("history"), return_immediately=True))
        queued = response.task
        await stack.free()
        await stack.wait_delivered(queued.id)
        task = await until_final(client, queued.id)
    assert task.status.state == COMPLETED, task
    assert len(task.history) >= 1, task
    ids = {(m.task_id, m.context_id) for m in task.history}
    assert ids == {(queued.id, queued.context_id)}, task.history
