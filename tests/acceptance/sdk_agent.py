"""A real a2a-sdk (1.3.0) agent for the interop tests, run as a subprocess.

It answers every message with a Task: the Task (SUBMITTED), a WORKING status,
an artifact "echo: <text>", then COMPLETED, with a pause between events so a
streaming caller sees the first event well before the last. With `--gate FILE`
it waits, before its final event, until FILE exists: a test creates FILE once
it has seen the first event, which proves the stream reached it unbuffered.
With `--linger SECONDS` it keeps its stream open that long after the final event
(the SDK ends a stream only when `execute` returns), as an agent that cleans up
after completing does. With `--push` its card says it sends push notifications
and it does (the SDK's own config store and sender). Every message text it
receives is appended to `--log`, one JSON line each.

    python tests/acceptance/sdk_agent.py --port 9001 --protocol 1.0 --log agent.log
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from a2a.helpers import get_message_text
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import (
    BasePushNotificationSender,
    InMemoryPushNotificationConfigStore,
    InMemoryTaskStore,
    TaskUpdater,
)
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Part,
    Task,
    TaskState,
    TaskStatus,
)
from starlette.applications import Starlette

GATE_TIMEOUT = 30.0  # a gate never opened fails the task rather than hang the agent
GATE_POLL = 0.02


class EchoExecutor(AgentExecutor):
    """Task, WORKING, artifact "echo: <text>", COMPLETED; or a Message in `message` mode."""

    def __init__(
        self, *, mode: str, pause: float, log: Path, gate: Path | None, linger: float
    ) -> None:
        self.mode = mode
        self.pause = pause
        self.log = log
        self.gate = gate
        self.linger = linger

    def _record(self, text: str, context: RequestContext) -> None:
        line = json.dumps({"text": text, "task_id": context.task_id, "at": time.time()})
        with self.log.open("a") as f:
            f.write(line + "\n")

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        text = get_message_text(message) if message is not None else ""
        self._record(text, context)
        task_id = context.task_id or ""
        context_id = context.context_id or ""
        updater = TaskUpdater(event_queue, task_id, context_id)
        if self.mode == "message":
            await asyncio.sleep(self.pause)
            reply = updater.new_agent_message([Part(text=f"echo: {text}")])
            await event_queue.enqueue_event(reply)
            return
        task = Task(
            id=task_id,
            context_id=context_id,
            status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
        )
        if message is not None:
            task.history.append(message)
        await event_queue.enqueue_event(task)
        await asyncio.sleep(self.pause)
        await updater.start_work()
        await asyncio.sleep(self.pause)
        await updater.add_artifact([Part(text=f"echo: {text}")], name="echo")
        await asyncio.sleep(self.pause)
        if self.gate is not None and not await self._gate_opened():
            await updater.failed(updater.new_agent_message([Part(text="gate never opened")]))
            return
        await updater.complete()
        await asyncio.sleep(self.linger)

    async def _gate_opened(self) -> bool:
        assert self.gate is not None
        end = time.monotonic() + GATE_TIMEOUT
        while time.monotonic() < end:
            if self.gate.exists():
                return True
            await asyncio.sleep(GATE_POLL)
        return False

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, context.task_id or "", context.context_id or "")
        await updater.cancel()


def build_card(port: int, protocol: str, *, push: bool = False) -> AgentCard:
    return AgentCard(
        name="sdk-echo",
        description="Echoes text back as a Task artifact (a2ad interop tests).",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(
                url=f"http://127.0.0.1:{port}/",
                protocol_binding="JSONRPC",
                protocol_version=protocol,
            )
        ],
        capabilities=AgentCapabilities(streaming=True, push_notifications=push),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            AgentSkill(
                id="echo",
                name="echo",
                description="Echoes the text it is sent.",
                tags=["echo"],
            )
        ],
    )


def build_app(args: argparse.Namespace) -> Starlette:
    card = build_card(args.port, args.protocol, push=args.push)
    executor = EchoExecutor(
        mode=args.mode,
        pause=args.pause,
        log=Path(args.log),
        gate=Path(args.gate) if args.gate else None,
        linger=args.linger,
    )
    pushing: dict[str, Any] = {}
    if args.push:
        configs = InMemoryPushNotificationConfigStore()
        sender = BasePushNotificationSender(httpx.AsyncClient(timeout=10), configs)
        pushing = {"push_config_store": configs, "push_sender": sender}
    handler = DefaultRequestHandler(
        agent_executor=executor, task_store=InMemoryTaskStore(), agent_card=card, **pushing
    )
    routes = create_agent_card_routes(card) + create_jsonrpc_routes(
        handler, rpc_url="/", enable_v0_3_compat=args.protocol == "0.3"
    )
    return Starlette(routes=routes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", choices=["1.0", "0.3"], default="1.0")
    parser.add_argument("--mode", choices=["task", "message"], default="task")
    parser.add_argument("--pause", type=float, default=0.3)
    parser.add_argument("--log", required=True, help="file to append received texts to")
    parser.add_argument("--gate", default="", help="wait for this file before the final event")
    parser.add_argument("--linger", type=float, default=0.0, help="seconds to stay after it")
    parser.add_argument("--push", action="store_true", help="send push notifications")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(build_app(args), host="127.0.0.1", port=args.port, log_level="info")


if __name__ == "__main__":
    main()
