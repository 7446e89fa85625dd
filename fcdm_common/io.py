"""Atomic file writing: a crash (even kill -9) never leaves a half-written file under the final name.

Everything is written to a temporary file in the same directory, flushed to disk, then renamed over the
destination with `os.replace`, which is atomic on POSIX file systems. A kill leaves at most a temp
file (`.<name>.<8 chars>.tmp`) that `remove_stale_temps` deletes when the program reruns.

Test hook (fault injection, tests/test_faults.py): with `FCDM_FAULT_KILL_AT="<glob>:<n>"` in the
environment, the n-th write (1-based, counted per process) whose file name matches the glob SIGKILLs
the process after the data is in the temp file and before the rename: a deterministic "kill -9 during
the write". `FCDM_FAULT_NOSPACE_AT` (same form) instead raises the OSError of a full disk (ENOSPC) at that
point, for the programs' "disk full" message. Unset (always, outside the tests) they cost one `is None`
test per write.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

_FAULT_SPEC = os.environ.get("FCDM_FAULT_KILL_AT")  # test hook, read once: "<basename glob>:<n>"
_NOSPACE_SPEC = os.environ.get("FCDM_FAULT_NOSPACE_AT")  # test hook, read once: "<basename glob>:<n>"
_fault_hits = 0
_nospace_hits = 0
# temp files we can leave behind: ours (mkstemp below) and safetensors' own (`.tmp` + 6 characters,
# left by `safetensors.torch.save_file` when killed)
_OUR_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_SAFETENSORS_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def _selects(spec: str, variable: str, name: str) -> tuple[bool, int]:
    """(does `name` match the glob of `spec`, the n of `spec`)."""
    pattern, _, count = spec.rpartition(":")
    if not pattern or not count.isdigit():
        raise ValueError(f"{variable} must look like '<glob>:<n>', got {spec!r}")
    return fnmatch.fnmatchcase(name, pattern), int(count)


def fault_point(name: str, before_kill: Optional[Callable[[], object]] = None) -> None:
    """Test hook: SIGKILL this process here if `FCDM_FAULT_KILL_AT` selects this write of `name`
    (`before_kill` runs first, e.g. to leave half a line in a log), or raise ENOSPC if
    `FCDM_FAULT_NOSPACE_AT` selects it. A no-op when the variables are unset."""
    global _fault_hits, _nospace_hits
    if _NOSPACE_SPEC is not None:
        match, n = _selects(_NOSPACE_SPEC, "FCDM_FAULT_NOSPACE_AT", name)
        if match:
            _nospace_hits += 1
            if _nospace_hits >= n:  # the disk stays full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    if _FAULT_SPEC is None:
        return
    match, n = _selects(_FAULT_SPEC, "FCDM_FAULT_KILL_AT", name)
    if match:
        _fault_hits += 1
        if _fault_hits == n:
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


def remove_stale_dirs(folder: str | os.PathLike, pattern: "re.Pattern[str]") -> list[Path]:
    """Delete the folders in `folder` whose whole names match `pattern`: work folders (mkdtemp's) that a
    killed program left. Symlinks are never followed or deleted. Call it only when no other process
    writes there (as `remove_stale_temps`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


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
        try:
            fault_point(path.name)
        except OSError as e:  # the test hook's full disk: named after the destination, as a real one is
            raise OSError(e.errno, e.strerror, str(path)) from None
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def check_writable(path) -> None:
    """Raise now the OSError (EROFS or EACCES, which run_main prints as one line) that writing `path` would
    raise at the end of a long computation: the nearest existing folder of `path` must be writable."""
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        code = errno.EROFS if read_only else errno.EACCES
        raise OSError(code, os.strerror(code), str(folder))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` through a temporary file and an atomic rename."""
    import torch  # deferred: this module is also imported by the TensorFlow feature process, which has no torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's writer hides a full disk behind "enforce fail ... unexpected pos"
            raise disk_full_error(tmp, path) or e


LOW_SPACE_BYTES = 16 << 20  # a failed write with less free space than this is taken for a full disk


def disk_full_error(tmp: Path, path: str | os.PathLike) -> Optional[OSError]:
    """The ENOSPC error for a write of `path` that failed with a library's own message (torch's
    "unexpected pos"), when the disk of `tmp` is (nearly) full; None when it is not. Checked while the
    half-written temp file still takes its space."""
    try:
        free = os.statvfs(tmp.parent).f_bavail * os.statvfs(tmp.parent).f_frsize
    except OSError:
        return None
    if free >= LOW_SPACE_BYTES:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


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
