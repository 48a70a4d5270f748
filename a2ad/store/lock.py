"""The exclusive lock on `<store.path>.lock` that makes one process the SQLite store's owner."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StoreLocked(Exception):
    """Another process owns this store."""


class StoreLock:
    """The exclusive lock on `<store.path>.lock` that makes one process the owner."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.path = Path(f"{os.fspath(db_path)}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(
                f"{self.path} is held by another a2ad (pid {holder}); "
                "stop it first, or give this one another store.path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
