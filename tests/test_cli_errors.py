"""A user error under a 2-process torchrun: printed once (by rank 0), and torchrun's closing failure
summary - the last lines of the output - names it, with the workers' exit code 2. Warnings print as
one line without the echoed source line.

Reference: a real torchrun run of preparation/extract_features.py with a missing --data-path.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import torchrun_result

REPO = Path(__file__).resolve().parents[1]


def test_user_error_under_torchrun_is_printed_once_and_closes_the_output(tmp_path):
    missing = tmp_path / "no-such-folder"
    rc, out, err = torchrun_result(REPO / "preparation" / "extract_features.py",
                                   ["--data-path", missing, "--features-path", tmp_path / "o.zarr", "--vae", "none",
                                    "--device", "cpu"], timeout=120)
    assert rc != 0
    text = out + err
    expected = f"error: --data-path {missing} does not exist"
    assert [line for line in text.splitlines() if line.startswith("error:")] == \
        [line for line in text.splitlines() if line.startswith(expected)]
    assert sum(line.startswith(expected) for line in text.splitlines()) == 1  # rank 0 only
    tail = [line.strip() for line in err.strip().splitlines()[-8:]]
    assert any(line.startswith("traceback : " + expected) for line in tail), tail
    assert "exitcode  : 2" in err  # rank 0's status in the summary (the others may show torchrun's SIGTERM)
    assert "To enable traceback" not in err, err
    assert not (tmp_path / "o.zarr").exists()


def test_warnings_are_one_line(tmp_path):
    code = ("from fcdm_common.cli import run_main\n"
            "import warnings\n"
            "def main(argv):\n"
            "    warnings.warn('something to know')\n"
            "run_main(main)\n")
    plain = "import warnings\nwarnings.warn('something to know')\n"
    outputs = []
    for name, text in (("w.py", code), ("plain.py", plain)):
        (tmp_path / name).write_text(text)
        proc = subprocess.run([sys.executable, str(tmp_path / name)], capture_output=True, text=True, timeout=60,
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0
        outputs.append(proc.stderr)
    assert outputs[0] == "UserWarning: something to know\n"
    assert outputs[1].count("\n") == 2 and "warnings.warn(" in outputs[1]  # Python's default echoes the source
