"""Stored times are on the store's clock: PostgreSQL's server clock, so that every
host writing to one database agrees on them; SQLite's is the host's own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import pytest
from fakes import A2ad, FakeAgent, jsonrpc_task

from a2ad.clock import Clock

BOTH_STORES = True

SKEW = -300.0  # this host's clock five minutes behind


class SkewedHostClock(Clock):
    """Real time, read from a host whose wall clock is off by `SKEW`."""

    def host_now(self) -> float:
        return time.time() + SKEW


async def test_stored_times_follow_the_database_clock_not_a_skewed_hosts(
    agent_factory: Callable[..., Awaitable[FakeAgent]],
    a2ad_factory: Callable[..., Awaitable[A2ad]],
    store_kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = await agent_factory(slots=1, gate=asyncio.Event())
    caplog.set_level(logging.WARNING, logger="a2ad")
    a2ad = await a2ad_factory(
        [{"id": "w", "url": agent.url, "heartbeat": False}],
        clock=SkewedHostClock(),
        queue={"max_age_seconds": 600},
    )
    first = asyncio.create_task(a2ad.send("w", "holds the slot"))
    await agent.wait_received(1)
    status, data = await a2ad.send("w", "queued")
    assert status == 202
    item = await a2ad.item(jsonrpc_task(data)["id"])
    enqueued = datetime.fromisoformat(item["enqueued_at"].replace("Z", "+00:00")).timestamp()
    expected_skew = 0.0 if store_kind == "postgres" else SKEW
    assert abs(enqueued - (time.time() + expected_skew)) < 5
    expires = datetime.fromisoformat(item["expires_at"].replace("Z", "+00:00")).timestamp()
    assert abs(expires - enqueued - 600) < 1
    warned = any("clock is 300.0 s behind the store's" in r.message for r in caplog.records)
    assert warned == (store_kind == "postgres")
    assert agent.gate is not None
    agent.gate.set()
    await first
