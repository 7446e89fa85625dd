"""An exclusive lock on a run folder, so two trainers (a requeued job, orphaned workers) never share one.

The main process takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `<run>/run.lock` and holds it for the run's
life; the kernel releases it when the process ends in any way (also kill -9), so a stale lock never
needs deleting by hand. The file also records who holds it (pid, host, start time) for the message a
second trainer prints. flock works on local file systems and on NFSv4 / Lustre mounted with flock
support; where the file system refuses locks the run continues with a warning.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .cli import UserError

LOCK_NAME = "run.lock"
_held: dict = {}  # resolved lock path -> RunLock held by this process


class RunLock:
    """A held lock; `release()` (or the process ending) frees it."""

    def __init__(self, path: Path, fd: Optional[int]):
        self.path = path  # the lock file
        self.fd = fd  # open descriptor carrying the flock (None: the file system has no locks)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
        _held.pop(str(self.path.resolve()), None)


def acquire_run_lock(run_dir: str | os.PathLike, what: str = "trainer", log=print) -> RunLock:
    """Lock `run_dir` for this process or raise UserError naming the process that holds it. A lock this
    same process still holds (a previous in-process call that raised) is released and taken again."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    previous = _held.get(str(path.resolve()))
    if previous is not None:
        previous.release()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            holder = {}
        os.close(fd)
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
               if holder else "another process")
        raise UserError(f"run folder {run_dir} is in use by another {what} ({who}); wait for it to finish or stop "
                        f"it, or pass another --exp-name / --results-dir (the lock {path} is freed when its "
                        "holder exits, also on kill -9)") from None
    except OSError as e:  # e.g. ENOLCK: a file system without lock support
        log(f"WARNING: cannot lock {path} ({e}); make sure no other {what} uses this run folder")
        os.close(fd)
        lock = RunLock(path, None)
        return lock
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    lock = RunLock(path, fd)
    _held[str(path.resolve())] = lock
    return lock
