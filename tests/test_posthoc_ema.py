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

from train_gen.ema import (
    PowerEMA,
    gamma_to_sigma_rel,
    list_posthoc_snapshots,
    posthoc_coefficients,
    power_weights,
    profile_dot,
    reconstruct_from_snapshots,
    save_posthoc_snapshots,
    sigma_rel_to_gamma,
)

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
    from fcdm_common.cli import UserError
    from models.checkpoints import load_checkpoint, model_from_checkpoint

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
                           tmp_path / "x.pt", "--sigma-rel", "0.1", "--at-step", "9"],
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "after the newest snapshot" in proc.stderr and proc.stderr.strip().count("\n") == 0
    # a sigma_rel out of EDM2's range is refused by the flag's type (argparse: usage, then the error line)
    proc = subprocess.run([sys.executable, str(REPO / "train_gen" / "reconstruct_ema.py"), "--run", ra, "--out",
                           tmp_path / "x.pt", "--sigma-rel", "0.5"],
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--sigma-rel: expected a finite number in (0, 0.288675]" in proc.stderr
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------------------- classic EMA targets
def test_exp_profile_dot_matches_brute_force_sums():
    from scipy.special import hyp1f1

    from train_gen.ema import decay_power_integral, exp_profile_dot

    # midpoint sums of p_a(s) q_b(s), q_b(s) = lam beta^(t_b - s), on a fine grid
    for ta, ga, tb, beta in ((700, 6.94, 1000, 0.99), (1000, 16.97, 1000, 0.995), (1500, 0.5, 1000, 0.98),
                             (300, 0.0, 1000, 0.999)):
        m, n = min(ta, tb), 2_000_000
        s = (np.arange(n) + 0.5) * (m / n)
        lam = -np.log(beta)
        pa = (ga + 1) * s ** ga / ta ** (ga + 1)
        assert exp_profile_dot(ta, ga, tb, beta) == pytest.approx(np.sum(pa * lam * beta ** (tb - s)) * m / n,
                                                                  rel=1e-6)
    # a run of 1e6 steps: the sum over steps of the two discrete weight vectors (each the cell integral of
    # its profile, varying slowly per step) equals the integral to ~1e-8
    T, beta = 1_000_000, 0.9999
    q = (1 - beta) * beta ** (T - np.arange(1, T + 1, dtype=np.float64))
    for ta, ga in ((T, 16.97), (600_000, 6.94), (999_000, 0.3)):
        brute = float(power_weights(ta, ga) @ q[:ta])
        assert exp_profile_dot(ta, ga, T, beta) == pytest.approx(brute, rel=1e-6)
    # the 1-D integral against the confluent hypergeometric closed form 1F1(1; g+2; -a) / (g+1)
    for g in (0.0, 0.3, 6.94, 16.97, 80.0):
        for a in (0.0, 1.0, 59.0, 61.0, 1e4, 1e6):
            assert decay_power_integral(g, a) == pytest.approx(hyp1f1(1.0, g + 2.0, -a) / (g + 1.0), rel=1e-12)


def classic_ema(theta, theta0, beta):
    """update_ema's recursion from a copy of theta_0, on a float64 vector model."""
    from train_gen.ema import create_ema, update_ema

    model = Vec(theta.shape[1])
    with torch.no_grad():
        model.w.copy_(torch.from_numpy(theta0))
    ema = create_ema(model)
    for th in theta:
        with torch.no_grad():
            model.w.copy_(torch.from_numpy(th))
        update_ema(ema, model, beta)
    return ema.w.detach().numpy().copy()


def classic_reconstruction(run_dir, theta, snap_every, beta):
    from train_gen.ema import EMATarget

    T = len(theta)
    track(theta, [0.05, 0.10], snap_every, run_dir, param_dtype=torch.float32)
    snaps = list_posthoc_snapshots(run_dir)
    (state, coefs), = reconstruct_from_snapshots(snaps, [EMATarget(T, decay=beta)])
    # the weights the combination gives each theta_tau, next to the classic EMA's (1 - beta) beta^(T - tau)
    w = np.zeros(T)
    for c, s in zip(coefs, snaps):
        w[:s["step"]] += c * power_weights(s["step"], s["gamma"])
    q = (1 - beta) * beta ** (T - np.arange(1, T + 1, dtype=np.float64))
    return state["w"].double().numpy(), float(np.abs(w - q).sum())


def test_classic_ema_reconstruction_is_close_and_improves_with_more_snapshots(tmp_path):
    T, beta = 512, 0.97  # relative width ~1 / (T (1 - beta)) = 0.064, between the tracked 0.05 and 0.10
    theta = trajectory(T, seed=3)
    theta0 = np.full(theta.shape[1], 5.0)  # its weight beta^T = 1.7e-7 is the part no snapshot holds
    exact = classic_ema(theta, theta0, beta)
    # the recursion is the closed form (1 - beta) beta^(T - tau) on theta_tau plus beta^T on theta_0
    q = (1 - beta) * beta ** (T - np.arange(1, T + 1, dtype=np.float64))
    np.testing.assert_allclose(exact, q @ theta + beta ** T * theta0, rtol=0, atol=1e-12)
    errors, weight_errors = [], []
    for n in (128, 32, 8):
        got, werr = classic_reconstruction(tmp_path / str(n), theta, n, beta)
        errors.append(float(np.abs(got - exact).max()))
        weight_errors.append(werr)
    scale = float(np.abs(exact).max())
    assert errors[0] > errors[1] > errors[2] and errors[-1] < 1e-3 * scale, errors
    # the L1 distance of the per-step weights: measured 9.7e-3, 5.6e-4, 4.1e-5
    assert weight_errors[0] > 4 * weight_errors[1] > 16 * weight_errors[2] and weight_errors[-1] < 1e-4, weight_errors


def test_reconstruct_cli_classic_ema(tmp_path):
    from fcdm_common.cli import UserError

    load_checkpoint = lambda p: torch.load(p, weights_only=True)  # noqa: E731 - the run config is a stub

    T, beta = 512, 0.97
    theta = trajectory(T, seed=3)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    track(theta, [0.05, 0.10], 16, run, param_dtype=torch.float32)
    exact = classic_ema(theta, np.zeros(theta.shape[1]), beta)
    reconstruct(["--run", run, "--ema-decay", beta, "--out", tmp_path / "e.pt"])
    ckpt = load_checkpoint(tmp_path / "e.pt")
    np.testing.assert_allclose(ckpt["ema"]["w"].double().numpy(), exact, rtol=0, atol=1e-3 * np.abs(exact).max())
    assert ckpt["posthoc_ema"]["ema_decay"] == beta and ckpt["step"] == T
    assert ckpt["posthoc_ema"]["initial_weight_left_out"] == pytest.approx(beta ** T)
    # with a width and a second decay: a folder, one checkpoint per target
    reconstruct(["--run", run, "--sigma-rel", "0.07", "--ema-decay", "0.97,0.98", "--out", tmp_path / "all"])
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [
        "ema-decay0.97-0000512.pt", "ema-decay0.98-0000512.pt", "ema-sigma0.0700-0000512.pt"]
    torch.testing.assert_close(load_checkpoint(tmp_path / "all" / "ema-decay0.97-0000512.pt")["ema"]["w"],
                               ckpt["ema"]["w"], rtol=0, atol=0)
    # beta^T = 0.999^256 = 0.77 of the initial weights: refused
    with pytest.raises(UserError, match="beta\\^T = 0.774"):
        reconstruct(["--run", run, "--ema-decay", "0.999", "--at-step", "256", "--out", tmp_path / "x.pt"])
    with pytest.raises(SystemExit):
        reconstruct(["--run", run, "--ema-decay", "1.0", "--out", tmp_path / "x.pt"])
    with pytest.raises(UserError, match="give --sigma-rel"):
        reconstruct(["--run", run, "--out", tmp_path / "x.pt"])
    assert not (tmp_path / "x.pt").exists()
