"""Acceptance helpers: free ports, a2ad.toml files, and the real `a2ad serve` and demo
agent started as subprocesses, each waited for with a deadline and killed at teardown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

START_TIMEOUT = 15.0  # an a2ad or a demo agent answers within a second or two
STOP_TIMEOUT = 10.0
RUN_TIMEOUT = 20.0  # one CLI command, start to exit
POLL_INTERVAL = 0.05


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the operator's A2AD_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("A2AD_")}
    env.update(extra)
    return env


def a2ad_command(*args: str) -> list[str]:
    """`a2ad ARGS`, run with this interpreter so it works from any venv."""
    return [sys.executable, "-m", "a2ad", *args]


def _toml_value(value: Any) -> str:
    # JSON strings, numbers, booleans and lists of them are valid TOML too.
    return json.dumps(value)


def _toml_table(header: str, values: Mapping[str, Any]) -> list[str]:
    return [header, *(f"{key} = {_toml_value(v)}" for key, v in values.items()), ""]


def toml_text(
    sections: Mapping[str, Mapping[str, Any]], workspaces: Sequence[Mapping[str, Any]] = ()
) -> str:
    """a2ad.toml text from {section: {key: value}} and a list of workspaces."""
    lines: list[str] = []
    for name, values in sections.items():
        lines += _toml_table(f"[{name}]", values)
    for ws in workspaces:
        lines += _toml_table("[[workspaces]]", ws)
    return "\n".join(lines)


@dataclass
class A2adConfig:
    """An a2ad.toml written into tmp_path, with the store inside tmp_path."""

    path: Path
    port: int
    store: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def write_config(
    directory: Path,
    *,
    name: str = "a2ad.toml",
    port: int | None = None,
    host: str = "127.0.0.1",
    store: Path | Mapping[str, Any] | None = None,
    workspaces: Sequence[Mapping[str, Any]] = (),
    **sections: Mapping[str, Any],
) -> A2adConfig:
    """Write an a2ad.toml; `sections` add or override keys per section (server=..., queue=...).
    `store` is the SQLite file, or the whole [store] section (a PostgreSQL url)."""
    port = free_port() if port is None else port
    store_section: dict[str, Any] = {}
    if isinstance(store, Mapping):
        store_section, store = dict(store), None
    store = directory / "var" / "a2ad.db" if store is None else store
    merged: dict[str, dict[str, Any]] = {
        "server": {"host": host, "port": port, "shutdown_grace_seconds": 2.0},
        "store": {"path": str(store), **store_section},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    path = directory / name
    path.write_text(toml_text(merged, workspaces))
    return A2adConfig(path=path, port=port, store=store, host=host)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET `url`; the status and body, also for HTTP errors."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@dataclass
class Process:
    """A subprocess whose stdout and stderr go to files in tmp_path."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    url: str = ""
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait_until(self, path: str, deadline: float = START_TIMEOUT) -> None:
        """Poll GET url+path until it answers 200; fail early if the process exits."""
        end = time.monotonic() + deadline
        last = "no answer"
        while time.monotonic() < end:
            if not self.running():
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode} before answering "
                    f"{path}:\n{self.stderr()}"
                )
            try:
                status, body = http_get(self.url + path, timeout=1.0)
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            time.sleep(POLL_INTERVAL)
        raise AssertionError(f"{self.name} did not answer {path} in {deadline} s ({last})")

    def send_signal(self, sig: int) -> None:
        if self.running():
            self.popen.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit code, once the process has exited (TimeoutExpired after `timeout`)."""
        code = self.popen.wait(timeout=timeout)
        self._close_files()
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` and wait for the exit; SIGKILL if it does not come in time."""
        self.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.wait(timeout)
            raise

    def kill(self) -> int:
        """SIGKILL and reap."""
        if self.running():
            self.popen.kill()
        return self.wait()

    def _close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()


class Launcher:
    """Starts subprocesses for one test and kills every one of them at teardown.

    Test modules reach every helper through it (the `launcher` fixture), since a
    conftest is not a module to import from."""

    free_port = staticmethod(free_port)
    http_get = staticmethod(http_get)

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._processes: list[Process] = []

    def config(self, **kwargs: Any) -> A2adConfig:
        """write_config() into this test's tmp_path."""
        return write_config(self.directory, **kwargs)

    def run(self, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run one `a2ad ARGS` command to its end in tmp_path (killed after `timeout`)."""
        return subprocess.run(
            a2ad_command(*args),
            cwd=self.directory,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def spawn(
        self, name: str, argv: Sequence[str], *, url: str = "", env: Mapping[str, str] = {}
    ) -> Process:
        """Start `argv` in tmp_path, output to <name>-<n>.out / .err."""
        n = sum(1 for p in self._processes if p.name == name)
        stdout_path = self.directory / f"{name}-{n}.out"
        stderr_path = self.directory / f"{name}-{n}.err"
        out = stdout_path.open("wb")
        err = stderr_path.open("wb")
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.directory,
                env=clean_env(**env),
            )
        except BaseException:
            out.close()
            err.close()
            raise
        process = Process(name, popen, stdout_path, stderr_path, url, [out, err])
        self._processes.append(process)
        return process

    def a2ad(
        self, config: A2adConfig, *, ready: bool = True, env: Mapping[str, str] = {}
    ) -> Process:
        """`a2ad serve --config ...`; with `ready`, returns once GET /healthz answers."""
        process = self.spawn(
            "a2ad", a2ad_command("serve", "--config", str(config.path)), url=config.url, env=env
        )
        if ready:
            process.wait_until("/healthz")
        return process

    def demo_agent(self, *, delay: float, slots: int = 1, port: int | None = None) -> Process:
        """`python -m a2ad.demo_agent`; returns once GET /stats answers."""
        port = free_port() if port is None else port
        argv = [sys.executable, "-m", "a2ad.demo_agent", "--port", str(port)]
        argv += ["--delay", str(delay), "--slots", str(slots)]
        process = self.spawn("demo-agent", argv, url=f"http://127.0.0.1:{port}")
        process.wait_until("/stats")
        return process

    def close(self) -> None:
        for process in self._processes:
            # A process that ignores SIGKILL is beyond help; the others still go.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.kill()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Start subprocesses with it; all are killed when the test ends."""
    launch = Launcher(tmp_path)
    try:
        yield launch
    finally:
        launch.close()


@pytest.fixture
def demo_agent(launcher: Launcher) -> Process:
    """A demo agent with one slot that answers at once."""
    return launcher.demo_agent(delay=0.0)


@pytest.fixture(scope="module")
def module_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """A launcher shared by one test module: what it starts lives until the module ends."""
    launch = Launcher(tmp_path_factory.mktemp("module"))
    try:
        yield launch
    finally:
        launch.close()
