"""train_gen/plot.py: curves of several run folders in one PNG, each series really drawn."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcdm_common.cli import UserError
from train_gen.plot import load_run, make_figure, plot_runs, smooth

REPO = Path(__file__).resolve().parents[1]


def fake_run(path: Path, batch: int, seed: int, steps=(10, 20, 30, 40), eval_steps=(20, 40), flow=False) -> Path:
    """A run folder as train.py writes it: config.json and metrics.jsonl with training and eval records."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"train": {"global_batch_size": batch}}))
    lines = []
    for s in steps:
        lines.append({"step": s, "loss": float(rng.uniform(0.1, 1.0)), "mse": float(rng.uniform(0.1, 1.0)),
                      "vb": None if flow else float(rng.uniform(0.01, 0.1)), "grad_norm": float(rng.uniform(1, 2)),
                      "steps_per_sec": float(rng.uniform(3, 4)), "lr": 1e-4})
        if s in eval_steps:
            lines.append({"step": s, "kind": "eval", "nimg": s * batch, "fid": float(rng.uniform(5, 50)),
                          "sfid": 3.0, "inception_score": 9.0, "precision": 0.5, "recall": 0.4,
                          "eval_samples": 100, "eval_seconds": 1.0, "eval_sampler": "ddim"})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 50, "loss"'  # a line cut by a kill
    (path / "metrics.jsonl").write_text(text)
    return path


def _panels(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_smooth_is_the_debiased_ema():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    # s1 = 0.5*0 + 0.5*1 -> /0.5 = 1; s2 = 0.5*0.5 + 0.5*3 = 1.75 -> /0.75 = 7/3
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, 7.0 / 3.0])
    out = smooth([float("nan"), 4.0, float("nan")], 0.5)
    assert math.isnan(out[0]) and out[1:] == pytest.approx([4.0, 4.0])


def test_two_runs_every_series_drawn(tmp_path):
    a = fake_run(tmp_path / "run_a", batch=16, seed=0)
    b = fake_run(tmp_path / "run_b", batch=16, seed=1, flow=True)
    out = tmp_path / "curves.png"
    fig = plot_runs([a, b], out, names=["A", "B"])
    panels = _panels(fig)
    assert list(panels) == ["loss", "mse", "vb", "grad norm", "steps/s", "eval: fid", "eval: sfid",
                            "eval: inception_score", "eval: precision", "eval: recall"]
    runs = {"A": load_run(a), "B": load_run(b)}
    assert len(runs["A"].train) == 4 and len(runs["A"].evals) == 2  # the cut line is skipped
    for title, ax in panels.items():
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        want = {"A", "B"} if title != "vb" else {"A"}  # the flow run has no vb
        if title == "loss":
            want |= {f"{n} (raw)" for n in want}
        assert set(lines) == want, title
    # raw loss faint, smoothed opaque; values are the records'
    loss = {ln.get_label(): ln for ln in panels["loss"].get_lines()}
    raw_a = [r["loss"] for r in runs["A"].train]
    assert list(loss["A (raw)"].get_ydata()) == raw_a and loss["A (raw)"].get_alpha() < 0.5
    assert list(loss["A"].get_ydata()) == pytest.approx(smooth(raw_a, 0.6))
    assert list(loss["A"].get_xdata()) == [10, 20, 30, 40]
    fid_b = {ln.get_label(): ln for ln in panels["eval: fid"].get_lines()}["B"]
    assert list(fid_b.get_xdata()) == [20, 40]
    assert list(fid_b.get_ydata()) == [r["fid"] for r in runs["B"].evals]
    assert [t.get_text() for t in panels["loss"].get_legend().get_texts()] == ["A", "B"]
    # the PNG: 3 columns x 4 rows of 5 x 3.4 inch panels at 100 dpi
    assert Image.open(out).size == (1500, 1360)


def test_images_axis_and_cli(tmp_path):
    a = fake_run(tmp_path / "a", batch=16, seed=0)
    b = fake_run(tmp_path / "b", batch=32, seed=1)
    fig = make_figure([load_run(a), load_run(b)], x="images")
    fid = {ln.get_label(): ln for ln in _panels(fig)["eval: fid"].get_lines()}
    assert list(fid["a"].get_xdata()) == [320, 640] and list(fid["b"].get_xdata()) == [640, 1280]
    loss = {ln.get_label(): ln for ln in _panels(fig)["loss"].get_lines()}
    assert list(loss["b"].get_xdata()) == [320, 640, 960, 1280]
    out = tmp_path / "c.png"
    proc = subprocess.run([sys.executable, str(REPO / "train_gen" / "plot.py"), str(a), str(b), "--out", str(out),
                           "--x", "images"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "10 panels" in proc.stdout and Image.open(out).size == (1500, 1360)
    proc = subprocess.run([sys.executable, str(REPO / "train_gen" / "plot.py"), str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr
    with pytest.raises(UserError, match="2 run folders"):
        plot_runs([a, b], out, names=["x"])
