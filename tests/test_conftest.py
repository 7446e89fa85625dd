"""The suite's own end-of-session check (conftest.py): a process left behind fails the session, but
torch.compile's worker pool, which belongs to the test process itself, does not. Each case runs a nested
pytest session over a probe file in a temporary folder with this folder's conftest."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

POOL_PROBE = """
def test_starts_the_compile_pool():
    from torch._inductor.async_compile import AsyncCompile

    AsyncCompile.process_pool()  # what the first inductor compilation on a GPU does
"""

ORPHAN_PROBE = """
import os
import subprocess
import sys


def test_leaves_an_orphan():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
"""


def nested_session(tmp_path, probe: str) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(probe))
    env = {"TORCHINDUCTOR_COMPILE_THREADS": "4", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_probe.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_the_compile_worker_pool_is_not_a_leftover(tmp_path):
    proc = nested_session(tmp_path, POOL_PROBE)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_a_real_leftover_fails_the_session(tmp_path):
    proc = nested_session(tmp_path, ORPHAN_PROBE)
    assert proc.returncode != 0 and "still running at the end" in proc.stdout, proc.stdout[-3000:]
