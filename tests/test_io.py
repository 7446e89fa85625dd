"""Atomic writes: the destination appears whole or not at all, with ordinary permissions."""
import os
import stat

import pytest

from fcdm_common.io import atomic_path, atomic_write_text, sha256_file


def test_atomic_write_permissions_and_content(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "hello")
    assert path.read_text() == "hello"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]  # no temporary left behind


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_sha256_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "b.bin"
    path.write_bytes(os.urandom(3 << 20))
    assert sha256_file(path, chunk_bytes=1 << 16) == hashlib.sha256(path.read_bytes()).hexdigest()
