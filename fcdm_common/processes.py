"""Finding and stopping the processes of one command by an environment tag (Linux /proc).

torch's elastic agent (torchrun, accelerate launch) starts its workers in their own sessions, so killing
the launcher's process group leaves them running. Every process inherits its parent's environment, so a
command started with a unique `KEY=VALUE` in its environment can be stopped with everything it started."""
from __future__ import annotations

import os
import signal


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs of this user's live processes (not this one) whose environment holds key=value."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone, or another user's
            continue
        if needle in env and state != b"Z":  # zombies are dead already (waiting for their parent)
            found.append(int(entry))
    return found


def kill_processes_with_env(key: str, value: str) -> list[int]:
    """SIGKILL every process tagged with key=value; returns their PIDs."""
    pids = processes_with_env(key, value)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
