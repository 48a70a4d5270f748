"""Processes a run starts: the servers, a2ad itself (optionally under a profiler),
and the one-shot tools; ports, readiness, memory, and stopping what we started."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_json(url: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """GET (or POST `body` to) a URL; the status and the decoded JSON body (or None)."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User plus system CPU time so far of a process (all its threads), or of one thread."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class MachineTimes:
    """CPU seconds of the whole machine (/proc/stat) and of this run's processes,
    to tell our load from everyone else's."""

    busy: float
    iowait: float
    steal: float  # taken by the hypervisor for other guests
    ours: float
    wall: float

    @classmethod
    def now(cls, running: list[Proc] | None = None) -> MachineTimes:
        """`running`: processes started and not yet waited for (their CPU is in
        /proc until then, in our children's times after)."""
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
        user, nice, system, _, iowait, irq, softirq, steal = fields
        tick = os.sysconf("SC_CLK_TCK")
        mine = os.times()
        ours = mine.user + mine.system + mine.children_user + mine.children_system
        for proc in running or []:
            if proc.popen is not None and proc.popen.returncode is None:
                with contextlib.suppress(OSError):
                    ours += cpu_seconds(proc.pid)
        return cls(
            busy=(user + nice + system + irq + softirq) / tick,
            iowait=iowait / tick,
            steal=steal / tick,
            ours=ours,
            wall=time.monotonic(),
        )

    def since(self, start: MachineTimes) -> dict[str, float]:
        """Shares of the machine's CPU capacity over the interval."""
        capacity = max(1e-9, (self.wall - start.wall) * (os.cpu_count() or 1))
        foreign = (self.busy - start.busy) - (self.ours - start.ours)
        return {
            "seconds": round(self.wall - start.wall, 1),
            "steal_share": round((self.steal - start.steal) / capacity, 3),
            "iowait_share": round((self.iowait - start.iowait) / capacity, 3),
            "foreign_share": round(max(0.0, foreign) / capacity, 3),
        }


@dataclass
class Proc:
    """One process we started; stopped by its own pid, never by name."""

    name: str
    cmd: list[str]
    log: Path
    url: str
    popen: subprocess.Popen[bytes] | None = None
    profiler: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self, env: dict[str, str] | None = None) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.cmd,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, path: str = "", timeout: float = 60.0, want: int | None = None) -> None:
        """Until `url + path` answers (with `want`, that status); a TCP connect when no path."""
        deadline = time.monotonic() + timeout
        port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            try:
                if not path:
                    with socket.create_connection((HOST, port), timeout=1):
                        return
                else:
                    status, _ = http_json(self.url + path, timeout=2)
                    if want is None or status == want:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:g} s:\n{self.log_tail()}")

    def memory(self) -> dict[str, int]:
        return memory(self.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.profiler is not None:
            # py-spy writes its samples once the process it watches has exited.
            try:
                self.profiler.wait(60)
            except subprocess.TimeoutExpired:
                self.profiler.send_signal(signal.SIGINT)
                self.profiler.wait(30)
            self.profiler = None
        return self.popen.returncode


class Procs:
    """Every process of one run, so that all are stopped whatever happens."""

    def __init__(
        self, workdir: Path, profile: str | None = None, a2ad_env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.profile = profile
        self.a2ad_env = a2ad_env or {}
        self.started: list[Proc] = []
        self.profiles: list[Path] = []

    def server(self, kind: str, *args: str, port: int | None = None) -> Proc:
        """One of bench/servers.py's servers, ready to take requests (on `port`: one
        picked before, e.g. a webhook a2ad was told of before it listens)."""
        port = port or free_port()
        name = f"{kind}-{port}"
        proc = Proc(
            name,
            [PYTHON, "-m", "bench.servers", kind, "--port", str(port), *args],
            self.workdir / "logs" / f"{name}.log",
            f"http://{HOST}:{port}/",
        )
        self.started.append(proc.start())
        proc.wait_ready()
        if kind == "proxy" and self.profile in ("py-spy", "py-spy-gil"):
            # The bare proxy's profile beside a2ad's shows what a2ad adds.
            self._py_spy(proc, self.workdir / f"bare-proxy-{port}")
        return proc

    def a2ad(
        self,
        name: str,
        workspaces: list[dict[str, Any]],
        *,
        synchronous: str = "full",
        store: Path | dict[str, str] | None = None,
        push: dict[str, Any] | None = None,
        ready_timeout: float = 120.0,
    ) -> Proc:
        """`a2ad serve` on a generated config, with its store in the run's work folder
        (or `store` = {"url": …, "schema": …}: on PostgreSQL); `push`: its [push] table."""
        port = free_port()
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        config = write_config(
            folder / "a2ad.toml",
            port=port,
            store=store or folder / "a2ad.db",
            synchronous=synchronous,
            workspaces=workspaces,
            push=push,
        )
        proc = Proc(
            name,
            self._serve_cmd(config, folder),
            self.workdir / "logs" / f"a2ad-{name}.log",
            f"http://{HOST}:{port}",
        )
        proc.extra["config"] = config
        proc.extra["folder"] = folder
        return self._start_a2ad(proc, folder, ready_timeout)

    def restart(self, proc: Proc, label: str = "again", ready_timeout: float = 120.0) -> Proc:
        """Stop an a2ad of `a2ad()` and start it again on the same config (its port and
        store too), as an operator's restart; its profile, if any, in a folder of its own."""
        proc.stop()
        folder = proc.extra["folder"] / label
        folder.mkdir(parents=True, exist_ok=True)
        config = proc.extra["config"]
        again = Proc(
            f"{proc.name}-{label}",
            self._serve_cmd(config, folder),
            self.workdir / "logs" / f"a2ad-{proc.name}-{label}.log",
            proc.url,
        )
        again.extra["config"] = config
        again.extra["folder"] = folder
        return self._start_a2ad(again, folder, ready_timeout)

    def _serve_cmd(self, config: Path, folder: Path) -> list[str]:
        serve = ["-m", "a2ad", "serve", "--config", str(config)]
        if self.profile == "cprofile":
            out = folder / "a2ad.prof"
            self.profiles.append(out)
            return [PYTHON, "-m", "cProfile", "-o", str(out), *serve]
        return [PYTHON, *serve]

    def _start_a2ad(self, proc: Proc, folder: Path, ready_timeout: float) -> Proc:
        """Start it and wait until /readyz answers 200; `ready_at`: time.monotonic() then."""
        started = time.perf_counter()
        self.started.append(proc.start(self.a2ad_env))
        proc.wait_ready("/readyz", timeout=ready_timeout, want=200)
        proc.extra["ready_at"] = time.monotonic()
        proc.extra["startup_s"] = round(time.perf_counter() - started, 3)
        if self.profile in ("py-spy", "py-spy-gil"):
            self._py_spy(proc, folder)
        return proc

    def _py_spy(self, proc: Proc, folder: Path) -> None:
        """Sample `proc` until it exits; raw collapsed stacks in folder/py-spy.txt."""
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "py-spy.txt"
        self.profiles.append(out)
        spy = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
        with open(self.workdir / "logs" / f"py-spy-{proc.name}.log", "ab") as log:
            record = ["record", "--pid", str(proc.pid), "--format", "raw", "-o", str(out)]
            if self.profile == "py-spy-gil":
                # Only the thread holding the GIL: where a2ad's serial Python time goes.
                record.append("--gil")
            proc.profiler = subprocess.Popen(
                [spy, *record, "--rate", "200", "--nonblocking", "--threads"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()


def workspace(
    ws_id: str, url: str, *, max_concurrent: int = 1, timeout: float = 30.0
) -> dict[str, Any]:
    """A workspace without heartbeats: never offline, capacity as configured."""
    return {
        "id": ws_id,
        "url": url,
        "max_concurrent": max_concurrent,
        "heartbeat": False,
        "request_timeout_seconds": timeout,
    }


def write_config(
    path: Path,
    *,
    port: int,
    store: Path | dict[str, str],
    synchronous: str,
    workspaces: list[dict[str, Any]],
    push: dict[str, Any] | None = None,
) -> Path:
    """An a2ad.toml for one benchmark a2ad: queue caps raised so nothing is refused;
    `push`: a [push] table (e.g. allowed_hosts, so a webhook on 127.0.0.1 is taken)."""
    if isinstance(store, dict):
        where = [f"{key} = {json.dumps(value)}" for key, value in store.items()]
    else:
        where = [f'path = "{store}"']
    lines = [
        "[server]",
        f'host = "{HOST}"',
        f"port = {port}",
        "shutdown_grace_seconds = 2",
        "",
        "[store]",
        *where,
        f'synchronous = "{synchronous}"',
        "",
        "[queue]",
        "max_depth_per_workspace = 100000000",
        "max_depth = 100000000",
        "",
    ]
    if push:
        # JSON's lists, strings and numbers are TOML's too.
        lines += ["[push]", *(f"{key} = {json.dumps(value)}" for key, value in push.items()), ""]
    for ws in workspaces:
        lines.append("[[workspaces]]")
        for key, value in ws.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path
