"""The a2ad command line as an operator meets it: versions, config errors, the store lock,
open endpoints, `check`, and SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from a2ad import __version__

if TYPE_CHECKING:
    from conftest import A2adConfig, Launcher, Process


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    return lines[0]


def test_version(launcher: Launcher) -> None:
    done = launcher.run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"a2ad {__version__}"


# -- bad configs -------------------------------------------------------------

# kind → (file contents or None for a missing file, what the line must name)
BAD_CONFIGS = {
    "missing file": (None, ["no such file"]),
    "bad TOML": ('[server]\nport = 8470\nhost = "127.0.0.1\n', ["TOML", "line 3"]),
    "unknown top-level key": ("colour = 1\n", ["colour", "unknown key"]),
    "unknown nested key": ("[server]\ncolour = 1\n", ["server.colour", "unknown key"]),
    "invalid value": ('[server]\nport = "x"\n', ["server.port"]),
}


@pytest.mark.parametrize("command", ["serve", "check"])
@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, launcher: Launcher, command: str, kind: str
) -> None:
    contents, names = BAD_CONFIGS[kind]
    path = tmp_path / "a2ad.toml"
    if contents is not None:
        path.write_text(contents)

    done = launcher.run(command, "--config", str(path))

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    line = one_line(done.stderr)
    assert line.startswith("a2ad: config error:"), line
    assert str(path) in line
    for name in names:
        assert name in line
    # Nothing was started or created on the way to the error.
    assert not (tmp_path / "var").exists()


# -- one owner per store -----------------------------------------------------


def test_second_serve_and_migrate_refused_while_one_serves(launcher: Launcher) -> None:
    first_config = launcher.config()
    first = launcher.a2ad(first_config)
    # Another port, the same store: only the lock can stop the second one.
    second_config = launcher.config(name="second.toml", store=first_config.store)

    second = launcher.run("serve", "--config", str(second_config.path))

    assert second.returncode == 2, second.stderr
    line = one_line(second.stderr)
    assert line.startswith("a2ad: ")
    assert "lock" in line
    assert "another a2ad" in line
    assert str(first.pid) in line
    assert launcher.http_get(first_config.url + "/healthz")[0] == 200

    migrate = launcher.run("migrate", "--config", str(first_config.path))
    assert migrate.returncode == 2, migrate.stderr
    line = one_line(migrate.stderr)
    assert "another a2ad" in line
    assert launcher.http_get(first_config.url + "/healthz")[0] == 200

    assert first.stop(signal.SIGTERM) == 0

    migrate = launcher.run("migrate", "--config", str(first_config.path))
    assert migrate.returncode == 0, migrate.stderr
    assert one_line(migrate.stdout) == f"{first_config.store}: up to date"


def test_serve_takes_the_store_after_the_owner_stops(launcher: Launcher) -> None:
    config = launcher.config()
    assert launcher.a2ad(config).stop(signal.SIGTERM) == 0
    again = launcher.a2ad(config)
    assert launcher.http_get(config.url + "/readyz")[0] == 200
    assert again.running()


# -- open endpoints off loopback ---------------------------------------------


def test_serve_refuses_open_endpoints_on_a_public_address(launcher: Launcher) -> None:
    config = launcher.config(host="0.0.0.0")

    done = launcher.run("serve", "--config", str(config.path))

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    line = one_line(done.stderr)
    assert "0.0.0.0" in line
    assert "loopback" in line
    assert "allow_open" in line


def test_check_refuses_open_endpoints_on_a_public_address(launcher: Launcher) -> None:
    config = launcher.config(host="0.0.0.0")
    done = launcher.run("check", "--config", str(config.path))
    assert done.returncode == 2, done.stderr
    assert "allow_open" in one_line(done.stderr)


def test_serve_with_allow_open_listens_on_a_public_address(launcher: Launcher) -> None:
    config = launcher.config(host="0.0.0.0", auth={"allow_open": True})
    process = launcher.a2ad(config)  # reached through 127.0.0.1
    assert process.running()
    process.kill()


# -- check ---------------------------------------------------------------------


def check_config(launcher: Launcher, url: str) -> A2adConfig:
    return launcher.config(workspaces=[{"id": "demo", "url": url, "heartbeat": False}])


def workspace_line(stdout: str, workspace: str) -> str:
    lines = [line for line in stdout.splitlines() if line.split()[:2] == ["workspace", workspace]]
    assert len(lines) == 1, stdout
    return lines[0]


def test_check_reaches_a_running_agent(launcher: Launcher, demo_agent: Process) -> None:
    config = check_config(launcher, demo_agent.url + "/")

    done = launcher.run("check", "--config", str(config.path))

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].split() == ["CHECK", "RESULT", "DETAIL"]
    line = workspace_line(done.stdout, "demo")
    assert demo_agent.url in line
    assert line.split()[2] == "ok"
    assert "does not exist yet" in done.stdout
    # check only looks: it creates no store.
    assert not config.store.exists()


def test_check_reports_an_unreachable_agent(launcher: Launcher) -> None:
    config = check_config(launcher, f"http://127.0.0.1:{launcher.free_port()}/")

    done = launcher.run("check", "--config", str(config.path))

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    line = workspace_line(done.stdout, "demo")
    assert line.split()[2] == "FAIL"
    assert "Connection refused" in line


def test_check_runs_the_status_command(launcher: Launcher) -> None:
    url = "http://127.0.0.1:9/"
    running = {"id": "up", "url": url, "heartbeat": False, "status_command": ["true"]}
    stopped = {"id": "down", "url": url, "heartbeat": False, "status_command": ["false"]}
    config = launcher.config(workspaces=[running, stopped])

    done = launcher.run("check", "--config", str(config.path))

    assert done.returncode == 1, done.stdout + done.stderr
    assert workspace_line(done.stdout, "up").split()[2] == "ok"
    assert "status_command exited 1" in workspace_line(done.stdout, "down")


def test_check_reports_a_store_it_cannot_write(launcher: Launcher, demo_agent: Process) -> None:
    config = check_config(launcher, demo_agent.url + "/")
    assert launcher.run("migrate", "--config", str(config.path)).returncode == 0
    config.store.write_bytes(b"this is not a database" * 100)

    done = launcher.run("check", "--config", str(config.path))

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    store_line = next(line for line in done.stdout.splitlines() if line.startswith("store"))
    assert store_line.split()[1] == "FAIL" and "not a database" in store_line, store_line


# -- signals -------------------------------------------------------------------


def test_sigterm_stops_serve_promptly_with_exit_0(launcher: Launcher) -> None:
    config = launcher.config()
    process = launcher.a2ad(config)

    started = time.monotonic()
    code = process.stop(signal.SIGTERM, timeout=10)
    elapsed = time.monotonic() - started

    assert code == 0, process.stderr()
    assert elapsed < 5.0
    assert "Traceback" not in process.stderr()
    # The lock went with it: the store is free for the next owner.
    migrate = launcher.run("migrate", "--config", str(config.path))
    assert migrate.returncode == 0, migrate.stderr
