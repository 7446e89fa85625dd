"""Atomic file writing: a crash (even kill -9) never leaves a half-written file under the final name.

Everything is written to a temporary file in the same directory, flushed to disk, then renamed over the
destination with `os.replace`, which is atomic on POSIX file systems. A kill leaves at most a temp
file (`.<name>.<8 chars>.tmp`) that `remove_stale_temps` deletes when the program reruns.

Test hook (fault injection, tests/test_faults.py): with `FCDM_FAULT_KILL_AT="<glob>:<n>"` in the
environment, the n-th write (1-based, counted per process) whose file name matches the glob SIGKILLs
the process after the data is in the temp file and before the rename: a deterministic "kill -9 during
the write". Unset (always, outside the tests) it costs one `is None` test per write.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

_FAULT_SPEC = os.environ.get("FCDM_FAULT_KILL_AT")  # test hook, read once: "<basename glob>:<n>"
_fault_hits = 0
# temp files we can leave behind: ours (mkstemp below) and safetensors' own (`.tmp` + 6 characters,
# left by `safetensors.torch.save_file` when killed)
_OUR_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_SAFETENSORS_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def fault_point(name: str, before_kill: Optional[Callable[[], object]] = None) -> None:
    """Test hook: SIGKILL this process here if `FCDM_FAULT_KILL_AT` selects this write of `name`
    (`before_kill` runs first, e.g. to leave half a line in a log). A no-op when the variable is unset."""
    if _FAULT_SPEC is None:
        return
    global _fault_hits
    pattern, _, count = _FAULT_SPEC.rpartition(":")
    if not pattern or not count.isdigit():
        raise ValueError(f"FCDM_FAULT_KILL_AT must look like '<glob>:<n>', got {_FAULT_SPEC!r}")
    if fnmatch.fnmatchcase(name, pattern):
        _fault_hits += 1
        if _fault_hits == int(count):
            if before_kill is not None:
                before_kill()
            os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temps(folder: str | os.PathLike, names: Optional[list] = None) -> list[Path]:
    """Delete the temp files a killed write left in `folder` (not recursive): those of `atomic_path`
    and safetensors' own; with `names`, only the temps of those destination file names. Call it only
    when no other process is writing there (the run lock, rank 0 before the others start)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _OUR_TEMP.match(p.name)
        ours = bool(m) and (names is None or m.group("name") in names)
        if (ours or (names is None and _SAFETENSORS_TEMP.match(p.name))) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        fault_point(path.name)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` through a temporary file and an atomic rename."""
    import torch  # deferred: this module is also imported by the TensorFlow feature process, which has no torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def save_safetensors(state_dict: dict, path: str | os.PathLike, metadata: Optional[dict] = None) -> None:
    """Write a state_dict as safetensors atomically (contiguous copies; metadata values as strings).
    Serialised in memory and written by our atomic writer: `save_file` would leave its own temp file
    (`.tmpXXXXXX`) behind when killed."""
    from safetensors.torch import save  # deferred: as torch above (the TensorFlow feature process has neither)

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))
