"""A restart_command for the liveness tests: count the restart, start the demo agent
again in the background, exit at once.

    python restart_agent.py STATE_DIR DEMO_AGENT_ARGS...

Appends $A2AD_WORKSPACE to STATE_DIR/restarts (one line per run) and the new
agent's pid to STATE_DIR/pids, so the test counts restarts and kills every
agent it did not start itself. The agent gets its own session and files for
its output: nothing keeps a2ad's pipe to this script open once it exits.

More demo agent arguments may wait in STATE_DIR/more-args, one a line: what the
test learns only after a2ad (and so this command line) exists, such as a2ad's URL.

While STATE_DIR/hold exists it starts nothing (an agent that fails to come up);
once STATE_DIR/closed exists (the test is over) it starts nothing at all. The
check, the start and the pid record happen under STATE_DIR/lock, which the test
takes before it closes and kills: no agent escapes it.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    state = Path(sys.argv[1])
    more = state / "more-args"
    demo_args = sys.argv[2:] + (more.read_text().splitlines() if more.exists() else [])
    workspace = os.environ.get("A2AD_WORKSPACE", "<unset>")
    with (state / "restarts").open("a") as f:
        f.write(workspace + "\n")
    n = len((state / "restarts").read_text().splitlines())
    with (state / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (state / "closed").exists() or (state / "hold").exists():
            print(f"restart {n} of {workspace}: held, no agent started")
            return
        pid = start_agent(state, n, demo_args)
    # What a2ad writes to its log: the restart command's output.
    print(f"restart {n} of {workspace}: demo agent started as pid {pid}")


def start_agent(state: Path, n: int, demo_args: list[str]) -> int:
    with (state / f"restarted-agent-{n}.log").open("wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "a2ad.demo_agent", *demo_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    with (state / "pids").open("a") as f:
        f.write(f"{child.pid}\n")
    return child.pid


if __name__ == "__main__":
    main()
