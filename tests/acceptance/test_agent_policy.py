"""The agent-address policy across a restart of the real process: a run-time
workspace registered while link-local agents were allowed is not served once
they are refused, and the operator can point it elsewhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

from a2ad_http import http_json, send_body

if TYPE_CHECKING:
    from conftest import Launcher, Process


def test_a_stored_workspace_the_policy_now_refuses_is_not_served(
    launcher: Launcher, demo_agent: Process
) -> None:
    allowed = launcher.config(auth={"allow_link_local_agents": True})
    a2ad = launcher.a2ad(allowed)
    registration = {"url": "http://169.254.10.10:9/", "heartbeat": False}
    status, data = http_json("PUT", f"{allowed.url}/workspaces/rt", registration)
    assert status == 201, data
    assert a2ad.stop() == 0

    refused = launcher.config(port=allowed.port, store=allowed.store)
    a2ad = launcher.a2ad(refused)
    status, data = http_json("GET", f"{refused.url}/workspaces/rt")
    assert status == 404, data
    assert data["error"]["code"] == "unknown_workspace"
    logged = [line for line in a2ad.stderr().splitlines() if "stored workspace rt" in line]
    assert len(logged) == 1, a2ad.stderr()
    assert "169.254.10.10" in logged[0] and "allow_link_local_agents" in logged[0]

    # The operator points it at an agent a2ad may reach: served again.
    registration["url"] = demo_agent.url + "/"
    status, data = http_json("PUT", f"{refused.url}/workspaces/rt", registration)
    assert status == 201, data
    status, data = http_json("POST", f"{refused.url}/workspaces/rt/a2a", send_body("hello"))
    assert status == 200, data
    assert a2ad.stop() == 0
