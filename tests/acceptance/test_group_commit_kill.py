"""Group commit under SIGKILL: every enqueue a process acknowledged is in the file afterwards."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest

from a2ad.store import Store

# The writer: 50 enqueues always in flight, each id printed only once its enqueue
# returned, i.e. once the commit that holds it returned.
WRITER = textwrap.dedent(
    """
    import asyncio
    import sys
    import time

    from a2ad.store import NewItem, Store


    async def main(path: str) -> None:
        store = Store(path)
        await store.open()
        await store.migrate()
        print("ready", flush=True)
        counter = iter(range(10**9))

        async def worker() -> None:
            while True:
                n = next(counter)
                new = NewItem(
                    workspace="ws", method="message/send", body=b'{"n": %d}' % n,
                    caller="kill-test", message_id=f"m-{n}",
                )
                done = await store.enqueue(new, now=time.time(), replay_window=60.0)
                sys.stdout.write(done.item.id + "\\n")
                sys.stdout.flush()

        await asyncio.gather(*(worker() for _ in range(50)))


    asyncio.run(main(sys.argv[1]))
    """
)

ID = re.compile(r"^q-[0-9a-f]{32}$")
TIMEOUT = 15.0  # per read; the whole test normally takes well under a second


def _ids(lines: list[str]) -> set[str]:
    return {line for line in lines if ID.match(line)}


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [200, 350, 500])
async def test_every_acknowledged_enqueue_survives_sigkill(tmp_path: Path, kill_after: int) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    db = tmp_path / "a2ad.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(db),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while len(_ids(lines)) < kill_after:
            raw = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
            if not raw:
                break  # the writer died on its own; communicate() below shows why
            lines.append(raw.decode().rstrip("\n"))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        # Ids printed before the kill but not read yet were acknowledged too.
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)

    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert lines[0] == "ready"
    # A line cut by the kill has no newline and is not counted: it was never whole.
    complete, _, _partial = out.decode().rpartition("\n")
    acknowledged = _ids(lines) | _ids(complete.splitlines())
    assert len(acknowledged) >= kill_after

    async with Store(str(db)) as store:
        stored = {item.id for item in await store.list_items(limit=1_000_000)}
    missing = acknowledged - stored
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged ids lost"

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
