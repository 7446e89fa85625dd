"""One writer per folder: an exclusive `flock` on a lock file inside it, held for the writer's life.

The kernel frees an flock when its process ends in any way (kill -9 too), so a lock is never left
stuck; the lock file records the holder's pid, host and start time for the message a second writer
gets. Used by training (`<run>/run.lock`, train_gen/run_folder.py) and sampling
(`<sample folder>/sample.lock`, train_gen/sample_ddp.py).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from fcdm_common.cli import UserError

NO_LOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock
_held: dict = {}  # resolved lock path -> FolderLock held by this process


class FolderLock:
    """A held lock; `release()` (or the process ending) frees it."""

    def __init__(self, path: Path, fd: Optional[int]):
        self.path = path  # the lock file
        self.fd = fd  # open descriptor carrying the flock (None: the file system has no locks)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
        _held.pop(str(self.path.resolve()), None)


def lock_folder(folder: str | os.PathLike, lock_name: str, *, label: str, what: str, fix: str,
                log=print, reentrant: bool = False) -> FolderLock:
    """Lock `folder` (creating it) through `folder/lock_name`, or raise UserError: "<label> is in use by
    another <what> (pid, host, start); <fix> (...)". With `reentrant`, a lock this same process still
    holds (a previous in-process call that raised) is released and taken again; without, it refuses
    like any other holder. On a file system without locks: a warning through `log` and an empty lock."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_name
    previous = _held.get(str(path.resolve())) if reentrant else None
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
        raise UserError(f"{label} is in use by another {what} ({who}); {fix} (the lock {path} is freed when its "
                        "holder exits, also on kill -9)") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in NO_LOCK_ERRNOS:
            raise
        log(f"WARNING: cannot lock {path} ({e}); make sure no other {what} uses {folder}")
        return FolderLock(path, None)
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    lock = FolderLock(path, fd)
    _held[str(path.resolve())] = lock
    return lock
