"""Post-hoc EMA (EDM2 power-function EMA): the closed forms, the tracked averages, the reconstruction,
and train.py's snapshots, resume and reconstruct_ema.py.

References: numerical quadrature of the profiles, the explicitly weighted sum of a synthetic weight
trajectory (weights (tau^(g+1) - (tau-1)^(g+1)) / T^(g+1)), and bitwise equality for resume.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fcdm_common.ema import (PowerEMA, gamma_to_sigma_rel, list_posthoc_snapshots, posthoc_coefficients,
                             power_weights, profile_dot, reconstruct_from_snapshots, save_posthoc_snapshots,
                             sigma_rel_to_gamma)

REPO = Path(__file__).resolve().parents[1]


def test_sigma_rel_and_gamma_closed_forms():
    # EDM2's two tracked averages
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma in (0.02, 0.05, 0.07, 0.1, 0.2, 0.28):
        gamma = sigma_rel_to_gamma(sigma)
        # the relative std of p(s) = (g+1) s^g on [0, 1], by quadrature
        s = np.linspace(0, 1, 400_001)
        p = (gamma + 1) * s ** gamma
        mean = np.trapezoid(s * p, s)
        std = np.sqrt(np.trapezoid((s - mean) ** 2 * p, s))
        assert std == pytest.approx(sigma, rel=1e-4)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma, rel=1e-12)
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.3)


def test_profile_dot_matches_quadrature():
    for ta, ga, tb, gb in ((1.0, 6.9, 0.7, 17.0), (0.3, 2.0, 0.9, 2.0), (2.0, 0.5, 2.0, 10.0)):
        s = np.linspace(0, max(ta, tb), 2_000_001)
        pa = np.where(s <= ta, (ga + 1) * s ** ga / ta ** (ga + 1), 0)
        pb = np.where(s <= tb, (gb + 1) * s ** gb / tb ** (gb + 1), 0)
        assert profile_dot(ta, ga, tb, gb) == pytest.approx(np.trapezoid(pa * pb, s), rel=1e-5)
    # huge steps and exponents stay finite (log space) and scale as 1 / t
    assert profile_dot(4e5, 70, 3e5, 70) == pytest.approx(profile_dot(4, 70, 3, 70) / 1e5, rel=1e-9)


def trajectory(T, d=6, seed=0):
    """A smooth synthetic weight trajectory theta_1..theta_T (T, d) in float64."""
    rng = np.random.default_rng(seed)
    tau = np.arange(1, T + 1)[:, None] / T
    freq, phase, slope = rng.uniform(1, 6, d), rng.uniform(0, 6, d), rng.normal(size=d)
    return np.sin(freq * np.pi * tau + phase) + slope * tau


class Vec(torch.nn.Module):
    def __init__(self, d, dtype=torch.float64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d, dtype=dtype))


def track(theta, sigmas, snap_every, run_dir, dtype="fp32", param_dtype=torch.float64):
    """Run PowerEMA over the trajectory, saving snapshots every `snap_every` steps; returns the PowerEMA."""
    model = Vec(theta.shape[1], param_dtype)
    power = PowerEMA(model, sigmas)
    for t in range(1, len(theta) + 1):
        with torch.no_grad():
            model.w.copy_(torch.from_numpy(theta[t - 1]))
        power.update(model, t)
        if t % snap_every == 0:
            save_posthoc_snapshots(power, model, run_dir, t, dtype)
    return power


def test_power_ema_equals_its_closed_form_weights():
    theta = trajectory(300)
    power = track(theta, [0.05, 0.1, 0.2], 10 ** 9, None)
    for gamma, avg in zip(power.gammas, power.averages):
        w = power_weights(300, gamma)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(avg["w"].numpy(), w @ theta, rtol=0, atol=1e-12)


def test_reconstructing_a_tracked_profile_returns_it(tmp_path):
    theta = trajectory(256)
    sigmas = [0.05, 0.10]
    track(theta, sigmas, 32, tmp_path, param_dtype=torch.float32)
    snaps = list_posthoc_snapshots(tmp_path)
    assert len(snaps) == 2 * 8 and {s["step"] for s in snaps} == set(range(32, 257, 32))
    for target in (snaps[-1], snaps[-2], snaps[7]):
        coefs = posthoc_coefficients([s["step"] for s in snaps if s["step"] <= target["step"]],
                                     [s["gamma"] for s in snaps if s["step"] <= target["step"]],
                                     target["step"], target["gamma"])
        # the combined profile is the target's profile (checked on a grid)
        grid = np.linspace(1e-3, 1, 1000) * target["step"]
        prof = lambda t, g: np.where(grid <= t, (g + 1) * grid ** g / t ** (g + 1), 0)  # noqa: E731
        used = [s for s in snaps if s["step"] <= target["step"]]
        combined = sum(c * prof(s["step"], s["gamma"]) for c, s in zip(coefs, used))
        np.testing.assert_allclose(combined, prof(target["step"], target["gamma"]), rtol=0,
                                   atol=1e-6 * prof(target["step"], target["gamma"]).max())
        (state, _), = reconstruct_from_snapshots(snaps, [(target["step"], target["gamma"])])
        from safetensors.torch import load_file

        torch.testing.assert_close(state["w"], load_file(str(target["path"]))["w"], rtol=0, atol=1e-5)


def reconstruction_error(tmp_path, snap_every, sigma=0.07, dtype="fp32"):
    T = 512
    theta = trajectory(T, seed=3)
    track(theta, [0.05, 0.10], snap_every, tmp_path, dtype=dtype, param_dtype=torch.float32)
    gamma = sigma_rel_to_gamma(sigma)
    (state, _), = reconstruct_from_snapshots(list_posthoc_snapshots(tmp_path), [(T, gamma)])
    exact = power_weights(T, gamma) @ theta  # the closed-form average of the target
    return float(np.abs(state["w"].double().numpy() - exact).max()), float(np.abs(exact).max())


def test_reconstruction_of_an_untracked_width_is_close_and_improves_with_more_snapshots(tmp_path):
    errors = [reconstruction_error(tmp_path / str(n), n)[0] for n in (128, 32, 8)]
    scale = reconstruction_error(tmp_path / "x", 8)[1]
    assert errors[-1] < 2e-3 * scale, errors
    assert errors[0] > errors[1] > errors[2], errors
    # fp16 snapshots (the default): the storage rounding stays small next to the weights
    err16, _ = reconstruction_error(tmp_path / "fp16", 8, dtype="fp16")
    assert err16 < 1e-2 * scale


# ---------------------------------------------------------------------------------- train.py
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train(store, results, steps, extra=()):
    """train.py in this process (one thread), as tests/test_train.py's in-process tests do."""
    from train_gen.train import main

    args = ["--model", "FCDM-digits", "--hidden-size", "16", "--depths", "1,1,1,1,1", "--global-batch-size", "16",
            "--lr", "1e-3", "--num-workers", "0", "--zarr-path", store, "--results-dir", results, "--log-every", "2",
            "--ckpt-every", "4", "--sample-every", "0", "--max-train-steps", steps,
            "--posthoc-ema-snapshot-every", "2", *extra]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def reconstruct(args):
    from train_gen.reconstruct_ema import main

    main([str(a) for a in args])


def test_train_snapshots_resume_bitwise_and_reconstruct_cli(tmp_path):
    from test_train import make_store

    store = make_store(tmp_path / "s.zarr")
    train(store, tmp_path / "a", 8)
    train(store, tmp_path / "b", 4)
    train(store, tmp_path / "b", 8)
    (ra,), (rb,) = [list((tmp_path / x).iterdir()) for x in ("a", "b")]
    a = torch.load(ra / "checkpoints" / "0000008.pt", weights_only=True)
    b = torch.load(rb / "checkpoints" / "0000008.pt", weights_only=True)
    assert a["posthoc_ema"]["t"] == 8 and a["posthoc_ema"]["sigma_rels"] == [0.05, 0.10]
    for avg_a, avg_b in zip(a["posthoc_ema"]["averages"], b["posthoc_ema"]["averages"]):
        for k in avg_a:
            assert torch.equal(avg_a[k], avg_b[k]), k
    snaps_a, snaps_b = list_posthoc_snapshots(ra), list_posthoc_snapshots(rb)
    assert [s["step"] for s in snaps_a] == [2, 2, 4, 4, 6, 6, 8, 8]
    from safetensors.torch import load_file

    for sa, sb in zip(snaps_a, snaps_b):  # same tensors (the metadata's config names another run folder)
        ta, tb = load_file(str(sa["path"])), load_file(str(sb["path"]))
        assert sa["path"].name == sb["path"].name and all(torch.equal(ta[k], tb[k]) for k in ta)

    assert load_file(str(snaps_a[-1]["path"]))["stem.weight"].dtype == torch.float16
    # turning tracking on in the middle of a run is refused
    from fcdm_common.checkpoint import load_checkpoint, model_from_checkpoint
    from fcdm_common.cli import UserError

    train(store, tmp_path / "c", 4, extra=["--posthoc-ema-snapshot-every", "0"])
    with pytest.raises(UserError, match="cannot be turned on mid-run"):
        train(store, tmp_path / "c", 8)
    # reconstruct_ema.py: one width, then a sweep; the outputs load as sampling checkpoints
    out = tmp_path / "ema.pt"
    reconstruct(["--run", ra, "--sigma-rel", "0.10", "--out", out])

    ckpt = load_checkpoint(out)
    model = model_from_checkpoint(ckpt)
    tracked = a["posthoc_ema"]["averages"][1]  # sigma_rel 0.10 at step 8, float32
    for k, v in model.state_dict().items():
        if k in tracked:
            torch.testing.assert_close(v, tracked[k], rtol=0, atol=2e-3 * max(1.0, float(tracked[k].abs().max())))
    assert ckpt["config"] == json.loads((ra / "config.json").read_text()) and ckpt["step"] == 8
    reconstruct(["--run", ra, "--sweep", "0.05,0.07", "--at-step", "6", "--out", tmp_path / "sweep"])
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["ema-sigma0.0500-0000006.pt",
                                                                      "ema-sigma0.0700-0000006.pt"]
    with pytest.raises(UserError, match="after the newest snapshot"):
        reconstruct(["--run", ra, "--out", tmp_path / "x.pt", "--at-step", "9", "--sigma-rel", "0.1"])
    with pytest.raises(UserError, match="no post-hoc EMA snapshots"):
        reconstruct(["--run", next((tmp_path / "c").iterdir()), "--out", tmp_path / "x.pt", "--sigma-rel", "0.1"])
    # the script: one line on stderr, exit 2
    proc = subprocess.run([sys.executable, str(REPO / "train_gen" / "reconstruct_ema.py"), "--run", ra, "--out",
                           tmp_path / "x.pt", "--sigma-rel", "0.5"], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "sigma_rel must lie in" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "x.pt").exists()
