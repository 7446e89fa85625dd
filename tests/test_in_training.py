"""Evaluation during training (evaluations/in_training.py, train.py --eval-*), with the digits backend.

Tiny FCDM on the 64-item 3x8x8 store of test_train.py; the reference batch is that store's images.
- evaluations at two steps: records at the right steps, the samples equal sample_ddp.py's for the saved
  checkpoint and the metrics equal evaluate.py's on them;
- training with evaluation is bitwise the training without;
- resume across an evaluation: a kill between a checkpoint and its evaluation's record re-runs it, a
  logged evaluation is never repeated;
- bad evaluation settings fail before anything is written.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcdm_common.cli import UserError
from test_train import TINY, assert_same_state, make_store, run_train

REPO = Path(__file__).resolve().parents[1]
STEPS_KEYS = ("steps_per_sec", "images_per_sec", "peak_mem_gb")  # timings: differ between runs
METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "class_accuracy")




@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "tiny.zarr")


@pytest.fixture(scope="module")
def ref(tmp_path_factory, store):
    """The store's latents (pixel space, vae none) as uint8 images: an ADM reference batch."""
    import zarr

    from fcdm_common.images import to_uint8

    g = zarr.open_group(str(store), mode="r")
    x = torch.from_numpy(np.asarray(g["latents"][:, 0], dtype=np.float32))  # (64, 3, 8, 8), first orientation
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(path, arr_0=to_uint8(x))
    return path


def records(rd, kind=None):
    recs = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("kind") == kind]


def _eval_flags(ref, every, samples, steps=3, batch=16):
    return ["--eval-every", every, "--eval-samples", samples, "--eval-steps", steps, "--eval-backend", "digits",
            "--ref-batch", ref, "--eval-batch-size", batch]


def test_two_evaluations_match_sample_ddp_and_evaluate_and_training_is_unchanged(store, ref, tmp_path):
    common = TINY + ["--zarr-path", store, "--exp-name", "run", "--max-train-steps", 6, "--log-every", 3,
                     "--ckpt-every", 100, "--keep-last", 5, "--sample-every", 6, "--grid-steps", 2, "--grid-cols", 2]
    run_train(common + ["--results-dir", tmp_path / "with"] + _eval_flags(ref, 3, 40) + ["--eval-keep-samples", "true"])
    run_train(common + ["--results-dir", tmp_path / "without"])
    rd, plain = tmp_path / "with" / "run", tmp_path / "without" / "run"

    evals = records(rd, "eval")
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert all(math.isfinite(r[k]) for k in METRICS), r
        assert r["eval_samples"] == 40 and r["eval_sampler"] == "ddim" and r["eval_steps"] == 3
        assert r["nimg"] == 16 * r["step"] and r["eval_seconds"] > 0
    assert evals[0]["fid"] != evals[1]["fid"]  # two different EMA models were scored
    log = (rd / "log.txt").read_text()
    assert "eval step 0000003 fid" in log and "eval step 0000006 fid" in log
    # step 3 is no checkpoint step (--ckpt-every 100): the evaluation wrote its checkpoint first
    assert (rd / "checkpoints" / "0000003.pt").is_file() and not (plain / "checkpoints" / "0000003.pt").exists()
    # the reference features were computed once and cached beside the reference batch
    from evaluations.digits import digits_features

    with np.load(ref.with_name("ref.digits-features.npz")) as cache, np.load(ref) as r:
        assert np.array_equal(cache["pool"], digits_features(r["arr_0"])["pool"])

    # training with evaluation == training without: weights, EMA, optimizer and every logged loss
    assert_same_state(torch.load(rd / "checkpoints" / "0000006.pt", weights_only=True),
                      torch.load(plain / "checkpoints" / "0000006.pt", weights_only=True))
    strip = lambda recs: [{k: v for k, v in r.items() if k not in STEPS_KEYS} for r in recs]  # noqa: E731
    assert strip(records(rd)) == strip(records(plain)) and len(records(plain)) == 2
    assert not records(plain, "eval")

    # the same samples as sample_ddp.py on the saved checkpoint, and the same numbers as evaluate.py
    from train_gen import evaluate, sample_ddp

    for r in evals:
        step = r["step"]
        out = tmp_path / f"ddp{step}"
        sample_ddp.main(["--ckpt", str(rd / "checkpoints" / f"{step:07d}.pt"), "--sample-dir", str(out),
                         "--num-fid-samples", "40", "--sampler", "ddim", "--num-sampling-steps", "3",
                         "--cfg-scale", "1", "--per-proc-batch-size", "16", "--forward-batch", "16",
                         "--global-seed", "0", "--device", "cpu"])
        (archive,) = out.glob("*-40.npz")
        with np.load(archive) as a, np.load(rd / "eval" / f"{step:07d}-samples.npz") as b:
            assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
        result = evaluate.main(["--sample-batch", str(archive), "--ref-batch", str(ref), "--backend", "digits",
                                "--output-json", str(out / "eval.json")])
        for k in METRICS:
            assert result["metrics"][k] == r[k], (step, k)

    # curves.png drawn (at the evaluations and at the end, with and without evaluation)
    assert Image.open(rd / "curves.png").size[0] > 500 and (plain / "curves.png").is_file()
    # the grid carries its step and sampler in the PNG text chunks
    meta = Image.open(rd / "samples" / "0000006.png").text
    assert meta["step"] == "6" and meta["sampler"] == "ddim" and meta["sampling_steps"] == "2"


def test_resume_across_an_evaluation(store, ref, tmp_path):
    common = TINY + ["--zarr-path", store, "--exp-name", "run", "--log-every", 4, "--ckpt-every", 4,
                     "--keep-last", 5, "--sample-every", 0] + _eval_flags(ref, 4, 20, steps=2, batch=10)
    run_train(common + ["--results-dir", tmp_path / "a", "--max-train-steps", 12])
    straight = records(tmp_path / "a" / "run", "eval")
    assert [r["step"] for r in straight] == [4, 8, 12]

    b = tmp_path / "b"
    run_train(common + ["--results-dir", b, "--max-train-steps", 8])
    rd = b / "run"
    # a kill after checkpoint 8 was written but before its evaluation was logged: drop that record
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if not (json.loads(line).get("kind") == "eval" and json.loads(line)["step"] == 8)]
    assert len(kept) == len(lines) - 1
    (rd / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    run_train(common + ["--results-dir", b, "--max-train-steps", 12])
    log = (rd / "log.txt").read_text()
    assert "evaluation of step 8 is pending" in log
    resumed = records(rd, "eval")
    assert [r["step"] for r in resumed] == [4, 8, 12]  # none skipped, none repeated
    for r, s in zip(resumed, straight):
        assert all(r[k] == s[k] for k in METRICS), (r, s)  # the same EMA weights were scored
    assert_same_state(torch.load(tmp_path / "a" / "run" / "checkpoints" / "0000012.pt", weights_only=True),
                      torch.load(rd / "checkpoints" / "0000012.pt", weights_only=True))
    assert "from the cache" in log  # the reference features were not recomputed
    # rerunning a finished run repeats no logged evaluation
    run_train(common + ["--results-dir", b, "--max-train-steps", 12])
    assert [r["step"] for r in records(rd, "eval")] == [4, 8, 12]


@pytest.mark.parametrize("extra,message", [
    (["--eval-every", "2"], "needs --ref-batch"),
    (["--eval-every", "2", "--ref-batch", "MISSING"], "file not found"),
    (["--eval-every", "2", "--ref-batch", "REF", "--eval-backend", "tf"], "Inception graph"),
    (["--eval-every", "2", "--ref-batch", "REF", "--eval-backend", "torch"], "--inception-weights"),
    (["--eval-every", "2", "--ref-batch", "REF16", "--eval-backend", "digits"],
     "16x16 images but the model samples 8x8"),
    (["--eval-every", "2", "--ref-batch", "REF", "--eval-backend", "digits", "--eval-sampler", "sde"],
     "--eval-sampler sde"),
])
def test_bad_evaluation_settings_fail_before_anything_is_written(store, ref, tmp_path, monkeypatch, extra, message):
    monkeypatch.delenv("FCDM_INCEPTION_PB", raising=False)
    ref16 = tmp_path / "ref16.npz"
    np.savez(ref16, arr_0=np.zeros((8, 16, 16, 3), np.uint8))
    extra = [{"REF": str(ref), "REF16": str(ref16), "MISSING": str(tmp_path / "missing.npz")}.get(a, a) for a in extra]
    results = tmp_path / "res"
    with pytest.raises(UserError, match=message):
        run_train(TINY + ["--zarr-path", store, "--results-dir", results, "--max-train-steps", 2] + extra)
    assert not results.exists()


def test_two_processes_sample_their_shares_like_sample_ddp(store, ref, tmp_path):
    from helpers import run_torchrun
    from train_gen import sample_ddp

    run_torchrun(REPO / "train_gen" / "train.py", TINY + [
        "--zarr-path", store, "--results-dir", tmp_path, "--exp-name", "run", "--max-train-steps", 2,
        "--log-every", 2, "--ckpt-every", 2, "--sample-every", 0, "--eval-keep-samples", "true"]
        + _eval_flags(ref, 2, 21, steps=2, batch=8), timeout=300)
    rd = tmp_path / "run"
    (rec,) = records(rd, "eval")
    assert rec["step"] == 2 and math.isfinite(rec["fid"])
    sample_ddp.main(["--ckpt", str(rd / "checkpoints" / "0000002.pt"), "--sample-dir", str(tmp_path / "ddp"),
                     "--num-fid-samples", "21", "--sampler", "ddim", "--num-sampling-steps", "2",
                     "--per-proc-batch-size", "8", "--forward-batch", "8", "--device", "cpu"])
    (archive,) = (tmp_path / "ddp").glob("*-21.npz")
    with np.load(archive) as a, np.load(rd / "eval" / "0000002-samples.npz") as b:  # ranks interleaved back
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not list((rd / "eval").glob(".parts-*"))
