"""The embedded demo in its reduced form: every stage runs through the real programs and writes its artifacts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_writes_every_artifact(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "train_gen/demo.py", "--quick", "--out", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert f"=== {stage}" in result.stdout
    assert (out / "digits" / "7").is_dir() and len(list((out / "digits").iterdir())) >= 10
    assert (out / "digits.zarr").is_dir()
    assert list((out / "runs" / "fcdm-digits" / "checkpoints").glob("*.pt"))
    assert list((out / "runs" / "fcdm-digits" / "samples").glob("*.png"))  # the training grid
    archive = next((out / "samples").glob("*-20.npz"))
    with np.load(archive) as data:
        assert data["arr_0"].shape == (20, 8, 8, 3) and data["arr_0"].dtype == np.uint8
        assert np.bincount(data["arr_1"], minlength=10).tolist() == [2] * 10  # class-balanced
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 10 * 64 and grid.size[1] > 10 * 64  # 10 x 10 digits zoomed to 64x64
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "inception_score", "precision", "recall", "class_accuracy"):
        assert key in metrics["metrics"]
    assert 0.0 <= metrics["metrics"]["class_accuracy"] <= 1.0
    assert "step" in (out / "train_log.txt").read_text()
    # evaluation during training (digits backend, every 3 steps) and its curves
    assert [e["step"] for e in metrics["evaluations_during_training"]] == [3, 6]
    assert "eval step 0000003 fid" in (out / "train_log.txt").read_text()
    assert Image.open(out / "curves.png").size[0] > 500
