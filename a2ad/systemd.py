"""systemd's notify protocol: READY=1 once serving, WATCHDOG=1 while alive."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("a2ad.systemd")


def notify(message: str) -> bool:
    """Send one datagram to $NOTIFY_SOCKET; False when there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC in seconds, when systemd asks for a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def watchdog(interval: float) -> None:
    """Ping the watchdog; the event loop being alive is what it proves."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
