"""Push notifications with the real a2a-sdk on both sides: an SDK client registers
a push config for a task a2ad queued, and a webhook gets the task's updates under
the queue id, in bodies the SDK's own types read, without polling. The SDK agent
answers a `returnImmediately` delivery with a Task it goes on with: a2ad follows
it to its end, by the agent's own pushes to a2ad when its card says it pushes,
and by GetTask when it does not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from a2a.compat.v0_3 import types as v03
from a2a.types.a2a_pb2 import StreamResponse, Task, TaskPushNotificationConfig
from aiohttp import web
from google.protobuf.json_format import ParseDict
from local_server import served
from test_interop import (
    COMPLETED,
    PROTOCOLS,
    SUBMITTED,
    TEST_DEADLINE,
    only_one,
    sdk_client,
    stack_for,
    task_texts,
    unique,
    user_message,
)

if TYPE_CHECKING:
    from conftest import Launcher


@dataclass
class Webhook:
    """A caller's receiver on 127.0.0.1: each push as the SDK's Task, and its token."""

    protocol: str
    url: str = ""
    got: list[tuple[Task, str | None]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        if self.protocol == "1.0":
            task = ParseDict(body, StreamResponse(), ignore_unknown_fields=True).task
        else:  # a config registered in v0.3 gets the v0.3 Task itself
            old = v03.Task.model_validate(body)
            task = Task(id=old.id, context_id=old.context_id)
            task.status.state = COMPLETED if old.status.state == "completed" else 0
            if old.status.state == "submitted":
                task.status.state = SUBMITTED
            for artifact in old.artifacts or []:
                added = task.artifacts.add(artifact_id=artifact.artifact_id)
                for part in artifact.parts:
                    added.parts.add(text=getattr(part.root, "text", ""))
        self.got.append((task, request.headers.get("X-A2A-Notification-Token")))
        self.changed.set()
        return web.Response(status=200)

    async def final(self, qid: str) -> Task:
        while True:
            for task, _ in self.got:
                if task.id == qid and task.status.state == COMPLETED:
                    return task
            self.changed.clear()
            await self.changed.wait()


@contextlib.asynccontextmanager
async def webhook(protocol: str) -> AsyncIterator[Webhook]:
    hook = Webhook(protocol)
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    async with served(app) as port:
        hook.url = f"http://127.0.0.1:{port}/hook"
        yield hook


@pytest.mark.parametrize("agent_pushes", [False, True], ids=["agent-polled", "agent-pushes"])
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=[f"v{p}" for p in PROTOCOLS])
async def test_an_sdk_client_gets_a_queued_tasks_updates_at_its_webhook(
    launcher: Launcher, tmp_path: Path, protocol: str, agent_pushes: bool
) -> None:
    async with (
        asyncio.timeout(TEST_DEADLINE),
        stack_for(launcher, tmp_path, protocol, push=agent_pushes) as stack,
        webhook(protocol) as hook,
        sdk_client(stack, streaming=False) as (client, card),
    ):
        assert card.capabilities.push_notifications  # a2ad pushes for every agent
        await stack.busy()
        text = unique("pushed")
        response = await only_one(client, user_message(text, return_immediately=True))
        qid = response.task.id
        config = TaskPushNotificationConfig(task_id=qid, id="hook", url=hook.url, token="t-42")
        created = await client.create_task_push_notification_config(config)
        assert (created.task_id, created.id, created.url) == (qid, "hook", hook.url)
        await stack.free()  # delivered now; its answer is a Task the agent goes on with
        final = await hook.final(qid)
    assert final.id == qid and task_texts(final) == [f"echo: {text}"], final
    assert {token for _, token in hook.got} == {"t-42"}
    states = [task.status.state for task, _ in hook.got]
    assert states[0] == SUBMITTED and states[-1] == COMPLETED, states
    if agent_pushes:  # the agent pushed to a2ad's own webhook for the task
        assert f"POST {stack.config.url}/workspaces/sdk/pushes/{qid}" in stack.agent.stderr()
