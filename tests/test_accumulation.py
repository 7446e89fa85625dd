"""One run at any process count and accumulation: train.py with --batch-per-gpu under torchrun (gloo, CPU).

The same 8-step run (global batch 16, a store of posterior moments so every step also draws eps,
per-level label dropout so the 2-D dropout mask is sliced too) is trained as
  1 process x 4 micro-batches of 4, 2 x 2 of 4, 4 x 1 of 4, 2 x 1 of 8,
and a 1 process x 2 micro-batches of 8 continuation of the 2-process checkpoint at step 4. Every
random draw is a function of (seed, step, sample index), so these runs differ only in float
summation order: the per-process batch mean, DDP's gradient all-reduce, and matmul blocking at
another batch size. Measured (2026-12-01, this CPU): losses agree to 7e-8 relative and weights
(lr 1e-3, 8 AdamW steps) to 1e-6 absolute; Adam divides by sqrt(v), so a rounding difference in
a near-zero gradient can move a weight by up to ~lr, which is why the bound is not float eps.
Tolerances: losses rtol 1e-5, weights atol 3e-5 (30x the measured gap, 1/30 of one step's size
lr), and the weights must move by more than 50x that between steps 4 and 8.
Multi-node: two `torchrun --nnodes=2 --node_rank=0/1` launches on one machine (rendezvous c10d on
127.0.0.1) give bitwise the 2-process one-node run (same world size, same reduction order).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from preparation.store import create_store, make_settings, mark_complete, write_shard

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train_gen" / "train.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
STEPS = 8


def make_moments_store(path, n=48, C=3, H=8, classes=4, seed=0):
    """Posterior moments (mean, std) of n items from 4 class prototypes, both orientations."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(-1, 1, size=(classes, C, H, H)).astype(np.float32)
    labels = np.arange(n) % classes
    mean = protos[labels] + 0.05 * rng.standard_normal((n, C, H, H)).astype(np.float32)
    std = np.full_like(mean, 0.1)
    oriented = np.stack([mean, mean[..., ::-1]], axis=1)  # (n, 2, C, H, W)
    moments = np.stack([oriented, np.stack([std, std], axis=1)], axis=2)  # (n, 2, 2, C, H, W)
    settings = make_settings(image_size=H, vae="none", scaling_factor=1.0, store="moments", count=n,
                             latent_shape=(C, H, H), orientations=2, class_names=[str(i) for i in range(classes)],
                             shard_size=n, chunk_size=n, seed=None)
    group = create_store(path, settings)
    write_shard(group, 0, moments, labels)
    mark_complete(group)
    return Path(path)


def common_args(store, results):
    return ["--model", "FCDM-digits", "--hidden-size", "16", "--depths", "1,1,1,1,1",
            "--model-kwargs", '{"label_dropout": "per-level", "class_dropout_prob": 0.25}',
            "--global-batch-size", "16", "--lr", "1e-3", "--num-workers", "1", "--zarr-path", str(store),
            "--results-dir", str(results), "--log-every", "1", "--ckpt-every", "4",
            "--sample-every", "0", "--max-train-steps", str(STEPS)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, nproc=1, extra_launcher=(), timeout=300):
    """Start train.py (plain python for one process, else torchrun standalone); returns the Popen."""
    if nproc == 1 and not extra_launcher:
        cmd = [sys.executable, TRAIN, *args]
    else:
        launcher = list(extra_launcher) or ["--standalone"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}", TRAIN, *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_all(procs, timeout=300):
    """Wait for every process; on failure or timeout kill all their process groups, then raise."""
    deadline = time.time() + timeout
    outputs = [None] * len(procs)
    try:
        for i, p in enumerate(procs):
            outputs[i], _ = p.communicate(timeout=max(1, deadline - time.time()))
            if p.returncode != 0:
                raise AssertionError(f"process {i} failed ({p.returncode}):\n{outputs[i][-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    return outputs


def final(results) -> dict:
    (rd,) = [p for p in Path(results).iterdir() if p.is_dir()]
    return torch.load(rd / "checkpoints" / f"{STEPS:07d}.pt", weights_only=True)


def losses(results) -> list:
    import json

    (rd,) = [p for p in Path(results).iterdir() if p.is_dir()]
    return [json.loads(line)["loss"] for line in (rd / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every layout of the same run, launched two at a time (2 shared cores, one thread each)."""
    root = tmp_path_factory.mktemp("accum")
    store = make_moments_store(root / "m.zarr")
    layouts = {"1x4": (1, ["--batch-per-gpu", "4"]), "2x2": (2, ["--batch-per-gpu", "4"]),
               "4x1": (4, []), "2x1": (2, [])}
    out = {}
    names = list(layouts)
    for i in range(0, len(names), 2):
        batch = names[i:i + 2]
        procs = []
        for name in batch:
            nproc, extra = layouts[name]
            procs.append(launch(common_args(store, root / name) + extra, nproc=nproc))
        logs = wait_all(procs)
        for name, log in zip(batch, logs):
            out[name] = {"results": root / name, "log": log}
    out["store"], out["root"] = store, root
    return out


def assert_close_runs(a: dict, b: dict, atol=3e-5):
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=atol,
                                       msg=lambda m: f"{key}.{name}: {m}")


def max_diff(a: dict, b: dict) -> float:
    return max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"])


def test_process_count_and_accumulation_give_the_same_run(runs):
    ref = final(runs["2x1"]["results"])
    ref_losses = losses(runs["2x1"]["results"])
    assert len(ref_losses) == STEPS
    assert "4 micro-batches of 4" in runs["1x4"]["log"] and "2 micro-batches of 4" in runs["2x2"]["log"]
    for name in ("1x4", "2x2", "4x1"):
        got = final(runs[name]["results"])
        assert got["config"]["train"]["grad_accum_steps"] == {"1x4": 4, "2x2": 2, "4x1": 1}[name]
        np.testing.assert_allclose(losses(runs[name]["results"]), ref_losses, rtol=1e-5, err_msg=name)
        assert_close_runs(got, ref)
    # the tolerance is meaningful: the weights moved far more than it over the last 4 steps
    (rd,) = [p for p in Path(runs["2x1"]["results"]).iterdir() if p.is_dir()]
    assert max_diff(torch.load(rd / "checkpoints" / "0000004.pt", weights_only=True), ref) > 50 * 3e-5


def test_two_process_checkpoint_continues_on_one_process_with_accumulation(runs, tmp_path):
    (rd,) = [p for p in Path(runs["2x1"]["results"]).iterdir() if p.is_dir()]
    ckpt4 = rd / "checkpoints" / "0000004.pt"
    (log,) = wait_all([launch(common_args(runs["store"], tmp_path) + ["--batch-per-gpu", "8", "--resume", ckpt4])])
    assert "at step 4" in log and "2 micro-batches of 8" in log
    assert "WARNING" not in log and "random streams" not in log
    np.testing.assert_allclose(losses(tmp_path), losses(runs["2x1"]["results"])[4:], rtol=1e-5)
    assert_close_runs(final(tmp_path), final(runs["2x1"]["results"]))


def test_two_nodes_on_one_machine_equal_one_node_with_two_processes(runs, tmp_path):
    port = free_port()
    args = common_args(runs["store"], tmp_path)
    procs = [launch(args, nproc=1, extra_launcher=["--nnodes=2", f"--node_rank={r}", "--rdzv_backend=c10d",
                                                   f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=fcdm-test"])
             for r in (0, 1)]
    wait_all(procs)
    a, b = final(tmp_path), final(runs["2x1"]["results"])
    assert a["config"]["run"]["world_size"] == 2
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert losses(tmp_path) == losses(runs["2x1"]["results"])


class _Accel:
    """The two Accelerator methods accumulate_gradients uses; fp16-style loss scaling when given a scaler."""

    def __init__(self, scaler=None):
        self.scaler = scaler

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


@pytest.mark.parametrize("use_scaler", [False, True])
def test_accumulated_gradient_is_the_full_batch_mean(use_scaler):
    """In process: 4 micro-batches (optionally through a GradScaler, unscaled once) give the gradient of
    the plain full-batch mean loss with the same draws, to float rounding."""
    from diffusion import create_diffusion
    from models import create_model
    from train_gen.step_draws import BatchPlan, StepDraws
    from train_gen.training_loop import accumulate_gradients

    torch.manual_seed(0)
    model = create_model("FCDM-digits", hidden_size=16, depths=(1, 1, 1, 1, 1), num_classes=4).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # open the zero-initialised gates
    objective = create_diffusion()
    draws = StepDraws(0, BatchPlan(16), (3, 8, 8), "cpu", objective.sample_timesteps, model.label_drop_shape,
                      model.class_dropout_prob).draw(0)
    x = torch.randn(16, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.arange(16) % 4
    full = objective.training_losses(model, x, draws["t"], model_kwargs={"y": y, "drop_mask": draws["drop_mask"]},
                                     noise=draws["noise"])
    full["loss"].mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if use_scaler else None
    out = accumulate_gradients(model, objective, _Accel(scaler), x, y, draws,
                               BatchPlan(16, micro_batch=4).micro_slices())
    if scaler is not None:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler.unscale_(opt)
    torch.testing.assert_close(out["loss"], full["loss"].mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["mse"], full["mse"].mean(), rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
    assert max(float(ref[n].abs().max()) for n in ref) > 1e-3  # the gradients are not trivially zero
