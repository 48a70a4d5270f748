"""The real `a2ad` process on a real PostgreSQL server: migrate, check, serve, queue
and deliver, one replica per name, the queue CLI against the server."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from a2ad_http import http_json, item, send_body
from pgserver import PgServer

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher


def pg_config(launcher: Launcher, pg: PgServer, agent_url: str, schema: str) -> A2adConfig:
    workspace = {"id": "w", "url": agent_url + "/", "max_concurrent": 1, "heartbeat": False}
    store = {"url": pg.url, "schema": schema, "replica_id": "first"}
    return launcher.config(store=store, workspaces=[workspace])


def test_serve_on_postgres_after_migrate_queues_and_delivers_in_order(
    launcher: Launcher, pg_server: PgServer
) -> None:
    agent = launcher.demo_agent(delay=0.2, slots=1)
    schema = f"a_{uuid.uuid4().hex[:10]}"
    config = pg_config(launcher, pg_server, agent.url, schema)

    # A schema that is not there yet: serve refuses in one line; migrate makes it.
    refused = launcher.run("serve", "--config", str(config.path), timeout=30)
    assert refused.returncode == 1, refused.stderr
    assert "run a2ad migrate" in refused.stderr.strip().splitlines()[-1], refused.stderr
    migrated = launcher.run("migrate", "--config", str(config.path))
    assert migrated.returncode == 0, migrated.stderr
    assert "applied 0001 schema" in migrated.stdout
    assert "applied 0002 replicas" in migrated.stdout
    assert "applied 0003 push" in migrated.stdout
    checked = launcher.run("check", "--config", str(config.path))
    store_line = next(line for line in checked.stdout.splitlines() if line.startswith("store"))
    assert "PostgreSQL" in store_line and "schema 3 of 3, writable" in store_line, checked.stdout
    assert "a2ad@" not in checked.stdout  # no credentials printed

    a2ad = launcher.a2ad(config)
    base = a2ad.url
    texts = [f"pg-{i}" for i in range(6)]

    def send(text: str) -> tuple[int, dict[str, object]]:
        return http_json("POST", f"{base}/workspaces/w/a2a", send_body(text))

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, texts))
    statuses = sorted(status for status, _ in answers)
    assert statuses.count(202) >= 4 and set(statuses) <= {200, 202}, answers
    queued = [data["result"]["id"] for status, data in answers if status == 202]  # type: ignore[index]
    for qid in queued:
        view = item(base, qid, wait=20)
        assert view["state"] == "delivered", view

    # Replicas share a schema, each under its own name: a second serve that takes
    # the name of a running one exits 2 with one line.
    second = launcher.config(
        name="second.toml",
        store={"url": pg_server.url, "schema": schema, "replica_id": "first"},
    )
    refused = launcher.run("serve", "--config", str(second.path), timeout=30)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert "served by a running replica named 'first'" in lines[-1], refused.stderr
    # And migrate refuses while serve runs, as on SQLite.
    refused = launcher.run("migrate", "--config", str(config.path), timeout=30)
    assert refused.returncode == 2, refused.stderr
    assert "is a2ad serve running" in refused.stderr.strip().splitlines()[-1], refused.stderr

    # The queue CLI reads the server while the daemon runs.
    listed = launcher.run("queue", "ls", "--config", str(config.path), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {r["id"] for r in rows} >= set(queued)
    assert all(r["state"] == "delivered" for r in rows if r["id"] in queued)

    # The one-slot agent served all six and never had to refuse one as busy.
    status, stats = http_json("GET", agent.url + "/stats")
    assert status == 200 and stats["served"] == 6 and stats["busy"] == 0, stats
