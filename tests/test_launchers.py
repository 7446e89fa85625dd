"""`accelerate launch --num_processes N` on CPU starts one process: detected from the launcher's
command line and warned about with the fix; `--multi_gpu` really gives N processes (no warning).

Reference: real `accelerate launch` runs of a probe script on this CPU machine.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from fcdm_common.launchers import process_count_warning, requested_processes

ACC = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False"}


def test_requested_processes_from_the_launcher_command_line():
    argv = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "4", "train.py", "--x", "1"]
    assert requested_processes(ACC, argv) == 4
    assert requested_processes(ACC, ["accelerate", "launch", "--num-processes=3", "t.py"]) == 3
    assert requested_processes({}, argv) is None  # not launched by accelerate
    assert requested_processes(ACC, ["accelerate", "launch", "t.py", "--num_processes", "4"]) is None  # script's flag
    assert requested_processes(ACC, ["bash"]) is None
    msg = process_count_warning(1, ACC, argv)
    assert "asked for 4 processes but this run has 1" in msg and "--multi_gpu --num_processes 4" in msg
    assert process_count_warning(4, ACC, argv) is None


PROBE = """
import os
from fcdm_common.launchers import process_count_warning
world = int(os.environ.get("WORLD_SIZE", "1"))
line = f"rank {os.environ.get('RANK', '0')} of {world}: {process_count_warning(world)}\\n"
os.write(1, line.encode())  # one write below PIPE_BUF: the two ranks' lines cannot interleave (print's pieces can)
"""


def _launch(tmp_path, *flags):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with socket.socket() as sock:  # a free rendezvous port: other tests may run launchers at the same time
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([accelerate, "launch", *flags, "--main_process_port", str(port), "--num_machines", "1",
                           "--mixed_precision", "no",
                           "--dynamo_backend", "no", str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("rank ")]


def test_real_accelerate_launch_on_cpu(tmp_path):
    lines = _launch(tmp_path, "--num_processes", "2")
    assert len(lines) == 1 and lines[0].startswith("rank 0 of 1: WARNING: accelerate launch asked for 2"), lines
    lines = sorted(_launch(tmp_path, "--multi_gpu", "--num_processes", "2"))
    assert lines == ["rank 0 of 2: None", "rank 1 of 2: None"]
