"""train.py with representation alignment (--repa-*), end to end on CPU, nothing downloaded.

The data: scikit-learn's digits (8x8, pixel space) extracted with their clean images (--repa-image-size 8); the
encoder: a tiny timm ViT (patch 2, so a 4x4 grid at 8 pixels) saved as a Hub snapshot folder by the test. The
network: FCDM-digits with hidden 16 and one block per stage, whose enc1 site is 4x4.

Checked: the checkpoint holds the projector and the EMA/export do not; the alignment metrics are logged; exact
resume with the projector (bitwise); --repa-weight 0 trains the same network as no alignment (bitwise); one
process, gradient accumulation and two processes give the same weights; both objectives; the resize path; errors.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_torchrun
from train_gen.run_folder import ema_export_path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train_gen" / "train.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ENCODER_ARGS = dict(patch_size=2, img_size=8, embed_dim=32, depth=1, num_heads=2)


def python(script, *args, check=True):
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import timm
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("repa")
    python(REPO / "preparation" / "make_demo_dataset.py", "--out", root / "digits", "--upscale", 1)
    common = ["--data-path", root / "digits", "--vae", "none", "--image-size", 8, "--num-workers", 0, "--device", "cpu",
              "--per-proc-batch-size", 512]
    python(REPO / "preparation" / "extract_features.py", *common, "--zarr-path", root / "digits.zarr",
           "--repa-image-size", 8)
    python(REPO / "preparation" / "extract_features.py", *common, "--zarr-path", root / "plain.zarr")
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ENCODER_ARGS)
    save_for_hf(encoder, root / "encoder", model_args=ENCODER_ARGS)
    return root


def args_for(data, results, *extra, steps=4, repa=True):
    base = ["--model", "FCDM-digits", "--hidden-size", "16", "--depths", "1,1,1,1,1", "--zarr-path",
            data / "digits.zarr", "--global-batch-size", 16, "--lr", "1e-3", "--num-workers", 0, "--vae", "none",
            "--sample-every", 0, "--log-every", 2, "--ckpt-every", 2, "--max-train-steps", steps,
            "--results-dir", results, "--exp-name", "run", "--mixed-precision", "no"]
    if repa:
        base += ["--repa-encoder-path", data / "encoder", "--repa-projector-width", 64]
    return base + list(extra)


def train(data, results, *extra, steps=4, repa=True, check=True):
    return python(TRAIN, *args_for(data, results, *extra, steps=steps, repa=repa), check=check)


def last_checkpoint(results) -> dict:
    ckpts = sorted((Path(results) / "run" / "checkpoints").glob("*.pt"))
    return torch.load(ckpts[-1], map_location="cpu", weights_only=True)


def assert_equal_tensors(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_checkpoint_metrics_and_exports(data, tmp_path):
    proc = train(data, tmp_path)
    assert "representation alignment: site enc1 (32 channels, 4x4) -> projector (width 64)" in proc.stdout
    ckpt = last_checkpoint(tmp_path)
    proj = ckpt["projector"]
    assert proj["net.0.weight"].shape == (64, 32) and proj["net.4.weight"].shape == (32, 64)  # 32 -> 64 -> 64 -> 32
    assert ckpt["ema"].keys() == ckpt["model"].keys()  # the EMA is the denoiser's alone
    assert not any(k.startswith(("net.", "projector")) for k in ckpt["model"])
    repa = ckpt["config"]["repa"]
    assert (repa["site"], repa["site_shape"], repa["encoder_grid"], repa["encoder_dim"], repa["weight"]) == \
        ("enc1", [32, 4, 4], [4, 4], 32, 0.5)
    exported = load_file(ema_export_path(sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1]))
    assert set(exported) == set(ckpt["model"])  # the generator, no projector
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "repa_cos" in r]
    assert [r["step"] for r in train_records] == [2, 4]
    for r in train_records:  # repa_loss = lambda * align = -0.5 * mean cosine
        assert -1 <= r["repa_cos"] <= 1
        assert r["repa_loss"] == pytest.approx(-0.5 * r["repa_cos"], rel=1e-5, abs=1e-7)
    assert "repa_cos" in proc.stdout


def test_exact_resume_with_the_projector(data, tmp_path):
    train(data, tmp_path / "straight", steps=4)
    train(data, tmp_path / "halves", steps=2)
    proc = train(data, tmp_path / "halves", steps=4)
    assert "resumed from" in proc.stdout
    a, b = last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "halves")
    for key in ("model", "ema", "projector"):
        assert_equal_tensors(a[key], b[key])
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert_equal_tensors(sa, sb)
    assert len(a["opt"]["state"]) == len(ckpt_params(a))


def ckpt_params(ckpt) -> list:
    return list(ckpt["model"]) + list(ckpt["projector"])


def test_weight_zero_trains_the_same_network_as_no_alignment(data, tmp_path):
    train(data, tmp_path / "off", steps=3, repa=False)
    train(data, tmp_path / "zero", "--repa-weight", 0, steps=3)
    off, zero = last_checkpoint(tmp_path / "off"), last_checkpoint(tmp_path / "zero")
    assert "repa" not in off["config"] and "projector" not in off
    for key in ("model", "ema"):
        assert_equal_tensors(off[key], zero[key])
    # and a positive weight does change the network
    train(data, tmp_path / "on", steps=3)
    on = last_checkpoint(tmp_path / "on")
    assert not torch.equal(on["model"]["stem.weight"], off["model"]["stem.weight"])


def test_accumulation_and_two_processes_give_the_same_weights(data, tmp_path):
    train(data, tmp_path / "one", steps=3)
    train(data, tmp_path / "accum", "--per-proc-batch-size", 8, steps=3)
    run_torchrun(TRAIN, [str(a) for a in args_for(data, tmp_path / "two", steps=3)], timeout=240)
    ref = last_checkpoint(tmp_path / "one")
    for other in ("accum", "two"):
        ckpt = last_checkpoint(tmp_path / other)
        for key in ("model", "ema", "projector"):
            assert_equal_tensors(ref[key], ckpt[key], atol=3e-5)  # float summation order only


def test_flow_objective_and_a_resized_site(data, tmp_path):
    proc = train(data, tmp_path / "flow", "--objective", "flow", "--repa-site", "enc0", steps=2)
    # by default the encoder's input side makes its grid the site's: 8x8 tokens at 16 pixels (patch 2)
    assert "site enc0 (16 channels, 8x8) -> projector (width 64) -> " in proc.stdout
    assert "at 16px (8x8 tokens of 32" in proc.stdout
    proc = train(data, tmp_path / "resized", "--repa-site", "enc0", "--repa-encoder-resolution", 8, steps=2)
    assert "site enc0 (16 channels, 8x8, resized 8x8 -> 4x4)" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "flow" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["repa_cos"]])).all() for r in records if "repa_cos" in r)


@pytest.mark.parametrize("extra,store,message", [
    (["--repa-weight", "1"], None, "without --repa-encoder"),
    (["--repa-encoder-path", "ENC"], "plain.zarr", "--repa-image-size"),
    (["--repa-encoder-path", "ENC", "--repa-site", "enc5"], None, "sites: enc0, enc0.0"),
    (["--repa-encoder-path", "ENC", "--repa-weight", "-1"], None, "--repa-weight"),
    (["--repa-encoder-path", "ENC", "--repa-encoder-resolution", "9"], None, "multiple of its patch size 2"),
    (["--repa-encoder-path", "missing-folder"], None, "missing-folder"),
    (["--repa-encoder"], None, "expected one argument"),
])
def test_bad_alignment_flags_stop_with_one_message(data, tmp_path, extra, store, message):
    args = [str(a) for a in args_for(data, tmp_path, repa=False)]
    extra = [str(data / "encoder") if a == "ENC" else a for a in extra]
    if store:
        args[args.index("--zarr-path") + 1] = str(data / store)
    proc = subprocess.run([sys.executable, str(TRAIN), *args, *extra], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_resuming_with_other_alignment_settings_is_another_run(data, tmp_path):
    train(data, tmp_path, steps=2)
    proc = train(data, tmp_path, "--repa-weight", "0.25", steps=4, check=False)
    assert proc.returncode == 2 and "repa=" in proc.stderr and "another --exp-name" in proc.stderr
