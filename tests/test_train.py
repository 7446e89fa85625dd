"""train_gen/train.py on CPU: loss goes down (1 and 2 processes), bitwise resume, SIGKILL + rerun,
corrupt-checkpoint fallback, non-finite step skipping, checkpoint/log/grid outputs and bad inputs.

Tiny FCDM (hidden 16, depths 1,1,1,1,1) on a 64-item, 4-class 3x8x8 store built here with the
store writer of preparation/. Subprocesses run single-threaded (2 shared cores).
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fcdm_common.cli import UserError
from models.checkpoints import load_checkpoint, model_from_checkpoint
from preparation.store import create_store, make_settings, mark_complete, write_shard

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train_gen" / "train.py")
TINY = ["--model", "FCDM-digits", "--hidden-size", "16", "--depths", "1,1,1,1,1", "--global-batch-size", "16",
        "--lr", "1e-3", "--num-workers", "0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def make_store(path, n=64, C=3, H=8, classes=4, seed=0, nan=False, nan_items=()):
    """n items of class prototypes + small noise (a learnable fixed data set), both orientations; `nan`: every
    value NaN, `nan_items`: one NaN in each of those items."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(-1, 1, size=(classes, C, H, H)).astype(np.float32)
    labels = np.arange(n) % classes
    x = protos[labels] + 0.05 * rng.standard_normal((n, C, H, H)).astype(np.float32)
    if nan:
        x[:] = np.nan
    for i in nan_items:
        x[i, 0, 0, 0] = np.nan
    settings = make_settings(image_size=H, vae="none", scaling_factor=1.0, store="sample", count=n,
                             latent_shape=(C, H, H), orientations=2, class_names=[str(i) for i in range(classes)],
                             shard_size=n, chunk_size=n, seed=None)
    group = create_store(path, settings)
    write_shard(group, 0, np.stack([x, x[..., ::-1]], axis=1), labels)
    mark_complete(group)
    return Path(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "tiny.zarr")


def run(args, check=True, launcher=None, timeout=240):
    cmd = (launcher or [sys.executable]) + [TRAIN] + [str(a) for a in args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_dir(results: Path) -> Path:
    dirs = [p for p in Path(results).iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def metrics(rd: Path) -> list:
    return [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: dict, b: dict):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"opt state {i}.{k} differs"
    assert a["step"] == b["step"]


def test_single_process_trains_and_writes_outputs(store, tmp_path):
    res = tmp_path / "res"
    run(TINY + ["--zarr-path", store, "--results-dir", res, "--max-train-steps", 40, "--log-every", 5,
                "--ckpt-every", 20, "--sample-every", 20, "--grid-steps", 4, "--grid-cols", 3])
    rd = run_dir(res)
    assert rd.name.startswith("FCDM-digits-diffusion-tiny-bs16-lr1e-3-seed0")
    recs = metrics(rd)
    assert [r["step"] for r in recs] == list(range(5, 45, 5))
    for key in ("loss", "mse", "vb", "grad_norm", "lr", "steps_per_sec", "images_per_sec", "peak_mem_gb"):
        assert key in recs[0]
    assert recs[-1]["loss"] < 0.8 * recs[0]["loss"], [r["loss"] for r in recs]
    assert (rd / "log.txt").is_file() and "done: 40 steps" in (rd / "log.txt").read_text()
    config = json.loads((rd / "config.json").read_text())
    # checkpoints: weights_only loadable, contain the resolved config and rebuild the model
    for step in (20, 40):
        path = rd / "checkpoints" / f"{step:07d}.pt"
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["step"] == step and ckpt["config"] == config
        assert {"model", "ema", "opt", "step", "config", "rng", "rng_per_rank", "data"} <= set(ckpt)
    ckpt = load_checkpoint(rd / "checkpoints" / "0000040.pt")
    assert config["model_kwargs"]["in_channels"] == 3 and config["model_kwargs"]["num_classes"] == 4
    assert config["model_kwargs"]["learn_sigma"] is True and config["data"]["latent_shape"] == [3, 8, 8]
    assert config["vae"]["vae"] == "none"
    model = model_from_checkpoint(ckpt)
    assert model.hidden_size == 16
    from safetensors.torch import load_file

    exported = load_file(str(rd / "checkpoints" / "0000040-ema.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in ckpt["ema"].items())
    # the EMA really averages: differs from the raw weights, and from the start
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    # grids: one row per class (4), 3 columns, 8x8 images with 2px padding
    from PIL import Image

    for step in (20, 40):
        img = Image.open(rd / "samples" / f"{step:07d}.png")
        assert img.size == (3 * 10 + 2, 4 * 10 + 2)


def test_flow_objective(store, tmp_path):
    res = tmp_path / "res"
    run(TINY + ["--zarr-path", store, "--results-dir", res, "--objective", "flow", "--max-train-steps", 30,
                "--log-every", 10, "--ckpt-every", 30, "--sample-every", 30, "--grid-steps", 3, "--grid-cols", 2])
    rd = run_dir(res)
    recs = metrics(rd)
    assert recs[-1]["loss"] < recs[0]["loss"] and recs[0]["vb"] is None
    ckpt = load_checkpoint(rd / "checkpoints" / "0000030.pt")
    assert ckpt["config"]["model_kwargs"]["learn_sigma"] is False
    assert (rd / "samples" / "0000030.png").is_file()


def test_bitwise_resume_and_corrupt_fallback(store, tmp_path):
    common = TINY + ["--zarr-path", store, "--log-every", 4, "--ckpt-every", 4, "--sample-every", 0,
                     "--keep-last", 3]
    run(common + ["--results-dir", tmp_path / "a", "--max-train-steps", 16])
    straight = torch.load(run_dir(tmp_path / "a") / "checkpoints" / "0000016.pt", weights_only=True)
    run(common + ["--results-dir", tmp_path / "b", "--max-train-steps", 8])
    proc = run(common + ["--results-dir", tmp_path / "b", "--max-train-steps", 16])
    rd = run_dir(tmp_path / "b")
    assert "resumed from" in proc.stdout + proc.stderr
    assert_same_state(straight, torch.load(rd / "checkpoints" / "0000016.pt", weights_only=True))
    assert [r["step"] for r in metrics(rd)] == [4, 8, 12, 16]
    # keep-last 3: checkpoint 4 was pruned with its safetensors
    assert sorted(p.name for p in (rd / "checkpoints").glob("*.pt")) == ["0000008.pt", "0000012.pt", "0000016.pt"]
    assert not (rd / "checkpoints" / "0000004-ema.safetensors").exists()
    # a corrupt newest checkpoint: warning, fall back to 12, redo to 16, same weights
    path = rd / "checkpoints" / "0000016.pt"
    path.write_bytes(path.read_bytes()[:1000])
    proc = run(common + ["--results-dir", tmp_path / "b", "--max-train-steps", 16])
    out = proc.stdout + proc.stderr
    assert "skipping unreadable checkpoint" in out and "0000012.pt at step 12" in out
    assert_same_state(straight, torch.load(path, weights_only=True))
    # --resume PATH into a new run folder continues from that file
    proc = run(common + ["--results-dir", tmp_path / "c", "--max-train-steps", 16,
                         "--resume", rd / "checkpoints" / "0000008.pt"])
    assert "at step 8" in proc.stdout + proc.stderr
    assert_same_state(straight, torch.load(run_dir(tmp_path / "c") / "checkpoints" / "0000016.pt", weights_only=True))


def test_sigkill_then_rerun_resumes(store, tmp_path):
    args = TINY + ["--zarr-path", store, "--results-dir", tmp_path, "--max-train-steps", 80, "--log-every", 10,
                   "--ckpt-every", 10, "--sample-every", 0]
    cmd = [sys.executable, TRAIN] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if glob.glob(str(tmp_path / "*" / "checkpoints" / "0000020.pt")):
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        else:
            raise AssertionError("no checkpoint appeared")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rd = run_dir(tmp_path)
    done = [int(p.stem) for p in (rd / "checkpoints").glob("*.pt")]
    assert max(done) < 80
    out = run(args)
    text = out.stdout + out.stderr
    assert f"at step {max(done)}" in text and "done: 80 steps" in text
    steps = [r["step"] for r in metrics(rd)]
    assert steps == list(range(10, 90, 10))  # no duplicated or missing records after the kill
    assert load_checkpoint(rd / "checkpoints" / "0000080.pt")["step"] == 80


def test_two_processes_torchrun(store, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    run(TINY + ["--zarr-path", store, "--results-dir", tmp_path, "--max-train-steps", 40, "--log-every", 10,
                "--ckpt-every", 40, "--sample-every", 40, "--grid-steps", 2, "--grid-cols", 2], launcher=torchrun)
    rd = run_dir(tmp_path)
    recs = metrics(rd)  # written once (main process), averaged over both ranks
    assert [r["step"] for r in recs] == [10, 20, 30, 40]
    assert recs[-1]["loss"] < 0.8 * recs[0]["loss"]
    ckpt = load_checkpoint(rd / "checkpoints" / "0000040.pt")
    assert ckpt["config"]["run"]["world_size"] == 2 and ckpt["config"]["train"]["batch_per_process"] == 8
    ranks = ckpt["rng_per_rank"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert ckpt["rng_scheme"] == "step-v1"  # training draws: functions of (seed, step, sample index)
    # global batch not divisible by the processes: one clear message before training
    proc = run(TINY[:-6] + ["--global-batch-size", "15", "--lr", "1e-3", "--num-workers", "0", "--zarr-path", store,
                            "--results-dir", tmp_path / "x", "--max-train-steps", 2], check=False,
               launcher=torchrun[:-1] + ["29518"])
    assert proc.returncode != 0 and "not divisible by the 2 processes" in proc.stderr


# ---------------------------------------------------------------------------------- in-process
def run_train(argv):
    from train_gen.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def test_nonfinite_steps_are_skipped_then_training_stops(store, tmp_path):
    bad_store = make_store(tmp_path / "nan.zarr", nan=True)
    common = TINY + ["--log-every", 10, "--sample-every", 0, "--max-train-steps", 30]
    run_train(common + ["--zarr-path", store, "--results-dir", tmp_path, "--exp-name", "good", "--ckpt-every", 4,
                    "--max-train-steps", 4])
    good = torch.load(tmp_path / "good" / "checkpoints" / "0000004.pt", weights_only=True)
    with pytest.raises(UserError, match="consecutive steps had non-finite loss or gradients"):
        run_train(common + ["--zarr-path", bad_store, "--results-dir", tmp_path, "--exp-name", "bad", "--ckpt-every", 2,
                        "--max-bad-steps", 3, "--resume", tmp_path / "good" / "checkpoints" / "0000004.pt"])
    saved = sorted(p.name for p in (tmp_path / "bad" / "checkpoints").glob("*.pt"))
    assert saved == ["0000006.pt"]  # step 8 found the streak before saving
    after = torch.load(tmp_path / "bad" / "checkpoints" / "0000006.pt", weights_only=True)
    after["step"] = good["step"]
    assert_same_state(good, after)  # skipped steps changed no weight, EMA or optimizer moment/step
    assert after["counters"]["skipped_steps"] == 2  # steps 5 and 6


@pytest.mark.parametrize("extra,message", [
    (["--model", "FCDM-nope"], "unknown --model"),
    (["--model-kwargs", '{"num_classes": 2}'], "num_classes=2"),
    (["--model-kwargs", '{"in_channels": 4}'], "in_channels=4"),
    (["--global-batch-size", "128"], "fewer than one global batch"),
    (["--objective", "flow", "--grid-sampler", "ddpm"], "does not fit --objective flow"),
    (["--batch-per-gpu", "32"], "larger than the per-process share"),
    (["--batch-per-gpu", "5"], r"not divisible by 1 process\(es\) x --per-proc-batch-size 5"),
])
def test_bad_inputs(store, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        run_train(TINY + ["--zarr-path", store, "--results-dir", tmp_path, "--max-train-steps", 2] + extra)
    assert not any(tmp_path.iterdir())  # nothing written before the check


def test_bad_data(tmp_path):
    odd = make_store(tmp_path / "odd.zarr", H=6)  # 3-level FCDM needs sizes divisible by 4
    with pytest.raises(UserError, match="does not fit the data"):
        run_train(TINY + ["--zarr-path", odd, "--results-dir", tmp_path / "r", "--max-train-steps", 2])
    (tmp_path / "f").mkdir()
    (tmp_path / "l").mkdir()
    with pytest.raises(UserError, match="holds no .npy files"):
        run_train(TINY + ["--feature-path", tmp_path / "f", "--label-path", tmp_path / "l",
                      "--results-dir", tmp_path / "r"])
    # labels outside the class list (4 class names, label 7)
    bad = make_store(tmp_path / "labels.zarr")
    import zarr

    g = zarr.open_group(str(bad), mode="r+")
    labels = g["labels"][:]
    labels[3] = 7
    g["labels"][:] = labels
    with pytest.raises(UserError, match="labels must lie in"):
        run_train(TINY + ["--zarr-path", bad, "--results-dir", tmp_path / "r"])
    assert not (tmp_path / "r").exists()


def test_cli_exit_status_and_help():
    proc = subprocess.run([sys.executable, TRAIN, "--help"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--global-batch-size", "--max-train-steps", "--ema-decay", "--mixed-precision", "--grad-checkpointing",
                 "--compile", "--grad-clip", "--keep-last", "--sample-every", "--cfg-scale", "--report-to",
                 "--hf-model-dir", "--vae", "--resume", "--epochs", "--max-bad-steps"):
        assert flag in proc.stdout
    proc = subprocess.run([sys.executable, TRAIN, "--model", "FCDM-nope", "--zarr-path", "/nonexistent"], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown --model" in proc.stderr


def test_checkpoint_from_before_per_step_draws_is_refused(store, tmp_path):
    common = TINY + ["--zarr-path", store, "--results-dir", tmp_path, "--exp-name", "old", "--log-every", 2,
                     "--ckpt-every", 2, "--sample-every", 0]
    run_train(common + ["--max-train-steps", 2])
    path = tmp_path / "old" / "checkpoints" / "0000002.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["rng_scheme"], ckpt["digest"]  # what a checkpoint of the per-process scheme looks like (neither)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="cannot continue the same trajectory; start a new run"):
        run_train(common + ["--max-train-steps", 4])
    run_train(common + ["--max-train-steps", 4, "--allow-rng-scheme-change", "true"])
    log = (tmp_path / "old" / "log.txt").read_text()
    assert "continuing with new random streams" in log and "done: 4 steps" in log
