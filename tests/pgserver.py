"""A throwaway PostgreSQL server for the tests, from Debian's packages.

`initdb` into a temporary folder and `postgres` on its own port and socket
folder, run as an unprivileged user when the tests run as root (PostgreSQL
refuses to run as root), stopped and deleted at the end. `make test` installs
Debian's `postgresql` when it is missing; without it these tests fail with a
line saying so, they do not skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DATABASE = "a2ad"
ROLE = "a2ad"


def bin_dir() -> Path:
    """The newest installed PostgreSQL's programs."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres); "
            "make test installs Debian's postgresql, or: apt-get install postgresql"
        )
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unprivileged() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as when the tests run as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


class PgServer:
    """One PostgreSQL server in a temporary folder; `start()`, `url`, `stop()`."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.bin = bin_dir()
        self.port = _free_port()
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="a2ad-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "postgres.log"
        self._user = _unprivileged()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *argv: str | os.PathLike[str]) -> None:
        subprocess.run(
            [str(a) for a in argv],
            check=True,
            capture_output=True,
            user=self._user.pw_uid if self._user else None,
            group=self._user.pw_gid if self._user else None,
            cwd=self.root,
        )

    def start(self) -> PgServer:
        self.sockets.mkdir()
        if self._user is not None:
            for path in (self.root, self.sockets):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        if not self.data.exists():
            self._run(
                self.bin / "initdb",
                "-D",
                self.data,
                "-U",
                ROLE,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
        self.launch()
        self._run(
            self.bin / "createdb", "-h", self.sockets, "-p", str(self.port), "-U", ROLE, DATABASE
        )
        return self

    def launch(self) -> None:
        """Start (or start again) the server on the same folder and port."""
        argv = [
            str(self.bin / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.sockets),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"fsync={'on' if self.fsync else 'off'}",
            "-c",
            "max_connections=200",
        ]
        log = self.log.open("ab")
        self._proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self._user.pw_uid if self._user else None,
            group=self._user.pw_gid if self._user else None,
            cwd=self.root,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """Stop the server at once, as a crash would (immediate shutdown)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(3)  # SIGQUIT: immediate shutdown, recovery at next start
            self._proc.wait(30)
        self._proc = None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # SIGTERM: smart shutdown... then fast
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
