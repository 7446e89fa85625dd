"""Checkpoint bit rot (issue: 16 flipped bytes in a weight tensor went unnoticed): every training checkpoint, EMA
export and post-hoc EMA snapshot carries a content digest (fcdm_common/digests.py) that loading checks.

Bytes are flipped inside one tensor's data in the file (found by its raw bytes: .pt and safetensors store tensor
data uncompressed), as bit rot on a disk does, and each reader must stop with one line naming the file and the
tensor; a resume falls back to the previous checkpoint and continues bitwise like an uninterrupted run; files
written before digests load with a note. Tiny runs of test_faults.py / test_train.py (4 steps, in-process).
"""
from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fcdm_common.digests import DamagedCheckpoint, NoDigestWarning, content_digest
from helpers import one_thread  # noqa: F401  (fixture)
from models.checkpoints import load_checkpoint, load_ema_export, save_checkpoint
from test_faults import assert_equals_reference, train_args
from test_train import ENV, TINY, make_store, run_train

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "tiny.zarr")


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """test_faults.py's uninterrupted run: checkpoints, exports and grids at steps 2 and 4."""
    results = tmp_path_factory.mktemp("reference")
    run_train(train_args(store, results))
    return results / "run"


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def unique_tensor(path: Path, state: dict, prefix: str = "") -> str:
    """The name of the largest tensor of `state` whose bytes occur exactly once in the file `path`."""
    data = path.read_bytes()
    for name, t in sorted(state.items(), key=lambda kv: -kv[1].numel()):
        raw = raw_bytes(t)
        at = data.find(raw)
        if len(raw) >= 16 and at >= 0 and data.find(raw, at + 1) < 0:
            return prefix + name
    raise AssertionError(f"no tensor of {path} has bytes that occur once in it")


def flip_bytes(path: Path, t: torch.Tensor, n: int = 16) -> None:
    """Invert `n` bytes in the middle of tensor `t`'s data in the file `path` (bit rot: the file stays loadable)."""
    data, raw = bytearray(path.read_bytes()), raw_bytes(t)
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes must occur once in the file"
    start = at + (len(raw) - n) // 2
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def one_line(message: str, *parts) -> None:
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, f"{part!r} not in {message!r}"


def no_digest_warnings(record) -> list:
    return [str(w.message) for w in record if issubclass(w.category, NoDigestWarning)]


# ---------------------------------------------------------------------------------- the digest
def test_digest_ignores_insertion_order_and_sees_a_byte_of_any_dtype():
    g = torch.Generator().manual_seed(0)
    state = {"model": {"w": torch.randn(4, 3, generator=g).bfloat16(), "h": torch.randn(5, generator=g).half(),
                       "b": torch.tensor([True, False]), "i": torch.arange(6), "s": torch.tensor(2.5)},
             "step": 7, "config": {"lr": 1e-3, "betas": (0.9, 0.99), "name": "run", "none": None, "flag": True},
             "opt": {"state": {0: {"step": torch.tensor(3.0)}, 1: {"step": torch.tensor(4.0)}}},
             "numpy": np.arange(5, dtype=np.uint32)}
    d = content_digest(state)
    assert [p for p, _ in d["tensors"]] == ["model.b", "model.h", "model.i", "model.s", "model.w", "numpy",
                                            "opt.state.0.step", "opt.state.1.step"]
    reordered = collections.OrderedDict((k, dict(reversed(list(v.items()))) if isinstance(v, dict) else v)
                                        for k, v in reversed(list(state.items())))
    assert content_digest(reordered) == d
    listed = {**state, "config": {**state["config"], "betas": [0.9, 0.99]}}  # a serialiser's list for a tuple
    assert content_digest(listed) == d

    def changed(mutate) -> list:
        other = {k: ({kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                     if isinstance(v, dict) else v) for k, v in state.items()}
        mutate(other)
        new = content_digest(other)
        return [p for (p, a), (_, b) in zip(d["tensors"] + d["values"], new["tensors"] + new["values"]) if a != b]

    def flip_bf16(s):  # one byte of one bf16 element
        s["model"]["w"].view(torch.uint8).view(-1)[5] ^= 1

    assert changed(flip_bf16) == ["model.w"]
    assert changed(lambda s: s["model"]["b"].view(torch.uint8).view(-1).__setitem__(1, 2)) == ["model.b"]
    assert changed(lambda s: s.__setitem__("step", 8)) == ["step"]
    assert changed(lambda s: s["config"].__setitem__("lr", 2e-3)) == ["config"]
    assert changed(lambda s: s["model"].__setitem__("h", s["model"]["h"].float())) == ["model.h", "model"]  # dtype


def test_damaged_bf16_checkpoint_names_the_tensor_and_an_old_one_loads_with_one_note(tmp_path):
    g = torch.Generator().manual_seed(1)
    weights = {f"blocks.{i}.pwconv1.weight": torch.randn(32, 16, generator=g).bfloat16() for i in range(4)}
    ckpt = {"model": weights, "ema": {k: v.float() for k, v in weights.items()}, "step": 3,
            "config": {"model": "FCDM-digits", "model_kwargs": {}, "objective": "diffusion"}}
    path = tmp_path / "0000003.pt"
    save_checkpoint(ckpt, path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = load_checkpoint(path)
    assert "digest" not in loaded and not no_digest_warnings(record)
    assert all(torch.equal(loaded["model"][k], v) for k, v in weights.items())
    # the same checkpoint built in another order has the same digest
    save_checkpoint(dict(reversed(list(ckpt.items()))), tmp_path / "reversed.pt")
    assert torch.load(tmp_path / "reversed.pt")["digest"] == torch.load(path)["digest"]

    flip_bytes(path, weights["blocks.2.pwconv1.weight"])
    with pytest.raises(DamagedCheckpoint) as e:
        load_checkpoint(path)
    one_line(str(e.value), path, "tensor 'model.blocks.2.pwconv1.weight' does not match its crc32c digest",
             "use an earlier checkpoint")
    from train_gen import export_pipeline, sample

    for main, out in ((sample.main, "--out"), (export_pipeline.main, "--out")):  # sample_ddp.py: below
        with pytest.raises(DamagedCheckpoint, match=re.escape(str(path))):
            main(["--ckpt", str(path), out, str(tmp_path / "out")])

    old = tmp_path / "old.pt"
    torch.save(ckpt, old)  # as written before digests
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            assert load_checkpoint(old)["step"] == 3
    notes = no_digest_warnings(record)
    assert len(notes) == 1, notes  # once per file
    one_line(notes[0], f"checkpoint {old} was loaded without a check for damage: it has no content digest")


# ---------------------------------------------------------------------------------- training checkpoints
def test_damaged_newest_checkpoint_is_refused_and_the_resume_falls_back_bitwise(store, reference, tmp_path):
    from train_gen import sample_ddp

    rd = tmp_path / "run"
    shutil.copytree(reference, rd)
    newest = rd / "checkpoints" / "0000004.pt"
    model = torch.load(newest, weights_only=True)["model"]
    name = unique_tensor(newest, model)
    flip_bytes(newest, model[name])
    with pytest.raises(DamagedCheckpoint) as e:
        sample_ddp.main(["--ckpt", str(newest), "--sample-dir", str(tmp_path / "s"), "--num-fid-samples", "2"])
    one_line(str(e.value), f"checkpoint {newest} is damaged: tensor 'model.{name}'")
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.png"))

    run_train(train_args(store, tmp_path))
    log = (rd / "log.txt").read_text()
    assert (f"WARNING: skipping damaged checkpoint {newest} (tensor 'model.{name}' does not match its crc32c "
            "digest); falling back to the previous one") in log
    assert f"resumed from {rd / 'checkpoints' / '0000002.pt'} at step 2" in log
    assert_equals_reference(rd, reference)  # the damaged file was kept until the resumed run replaced it
    assert load_checkpoint(newest)["step"] == 4
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == \
        ["0000002-ema.safetensors", "0000002.pt", "0000004-ema.safetensors", "0000004.pt"]
    run_train(train_args(store, tmp_path))  # a later rerun: nothing damaged, nothing to do
    later = (rd / "log.txt").read_text()[len(log):]
    assert "WARNING" not in later and "nothing to do: the run is already at step 4" in later


# ---------------------------------------------------------------------------------- EMA exports
def test_damaged_ema_export_stops_sampling_and_is_rewritten_on_resume(store, reference, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(reference, rd)
    export = rd / "checkpoints" / "0000004-ema.safetensors"
    with safe_open(str(export), "pt") as f:
        ema = {k: f.get_tensor(k) for k in f.keys()}
    name = unique_tensor(export, ema)
    flip_bytes(export, ema[name])
    with pytest.raises(DamagedCheckpoint) as e:
        load_checkpoint(export)
    one_line(str(e.value), f"EMA export {export} is damaged: tensor '{name}'", "pass its <step>.pt checkpoint")
    # the script: exit 2 and one line, no traceback
    proc = subprocess.run([sys.executable, str(REPO / "train_gen" / "sample_ddp.py"), "--ckpt", str(export),
                           "--sample-dir", str(tmp_path / "s"), "--num-fid-samples", "2"], env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: EMA export {export} is damaged"), proc.stderr[-2000:]
    # resuming from the checkpoint of its step (the run is complete: no step to train) rewrites it
    run_train(train_args(store, tmp_path))
    assert f"WARNING: the EMA export {export} was damaged (tensor '{name}'" in (rd / "log.txt").read_text()
    assert_equals_reference(rd, reference)
    assert load_ema_export(export)["step"] == 4


def test_export_without_digest_loads_with_one_note(tmp_path):
    path = tmp_path / "0000002-ema.safetensors"
    save_file({"w": torch.ones(3)}, str(path), metadata={"config": '{"model": "m"}', "step": "2"})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert load_ema_export(path)["step"] == 2 and load_ema_export(path)["step"] == 2
    notes = no_digest_warnings(record)
    assert len(notes) == 1, notes
    one_line(notes[0], f"EMA export {path} was loaded without a check for damage: it has no content digest")


# ---------------------------------------------------------------------------------- post-hoc EMA snapshots
def vector_snapshots(folder: Path) -> Path:
    """A run folder (config.json + posthoc_ema/) of a 64-weight vector 'model', snapshots every 8 of 32 steps."""
    from train_gen.ema import PowerEMA, save_posthoc_snapshots

    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    model = torch.nn.Linear(1, 64, bias=False)
    power = PowerEMA(model, (0.05, 0.10))
    theta = np.random.default_rng(0).normal(size=(33, 64)).cumsum(0)
    for t in range(1, 33):
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(theta[t]).float()[:, None])
        power.update(model, t)
        if t % 8 == 0:
            save_posthoc_snapshots(power, model, folder, t, "fp32")
    return folder


def test_damaged_snapshot_stops_the_reconstruction_and_damaged_metadata_is_skipped(tmp_path, capsys):
    from train_gen.reconstruct_ema import main as reconstruct

    run = vector_snapshots(tmp_path / "run")
    snap = run / "posthoc_ema" / "0000024-sigma0.1000.safetensors"
    with safe_open(str(snap), "pt") as f:
        weight = f.get_tensor("weight")
    flip_bytes(snap, weight)
    with pytest.raises(DamagedCheckpoint) as e:
        reconstruct(["--run", str(run), "--sigma-rel", "0.07", "--out", str(tmp_path / "a.pt")])
    one_line(str(e.value), f"post-hoc EMA snapshot {snap} is damaged: tensor 'weight'",
             f"rename it to {snap.name}.damaged and rerun")
    assert not (tmp_path / "a.pt").exists()
    snap.rename(snap.with_name(snap.name + ".damaged"))  # what the message says to do
    reconstruct(["--run", str(run), "--sigma-rel", "0.07", "--out", str(tmp_path / "a.pt")])
    assert torch.load(tmp_path / "a.pt")["posthoc_ema"]["snapshots"][-1] == "0000032-sigma0.1000.safetensors"

    # a flipped bit in the header metadata: step "32" -> "33" (still valid JSON), found from the header alone
    newest = run / "posthoc_ema" / "0000032-sigma0.0500.safetensors"
    data = newest.read_bytes()
    assert data.count(b'"step":"32"') == 1
    newest.write_bytes(data.replace(b'"step":"32"', b'"step":"33"'))
    capsys.readouterr()
    reconstruct(["--run", str(run), "--sigma-rel", "0.07", "--out", str(tmp_path / "b.pt")])
    out = capsys.readouterr().out
    assert (f"WARNING: skipping 1 damaged snapshot(s), reconstructing from the others: {newest.name} (metadata "
            "entry 'step' does not match its crc32c digest)") in out


def snapshot_tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}  # copies: not views of a file flipped later


def test_snapshots_after_a_fallback_are_redone_and_a_damaged_one_of_the_resume_step_is_rewritten(store, tmp_path,
                                                                                                 capsys):
    def args(results):
        return TINY + ["--zarr-path", store, "--results-dir", results, "--exp-name", "run", "--max-train-steps", 4,
                       "--log-every", 2, "--ckpt-every", 2, "--sample-every", 0, "--posthoc-ema-snapshot-every", 2]

    run_train(args(tmp_path / "a"))
    ref = tmp_path / "a" / "run"
    snaps = sorted(p.name for p in (ref / "posthoc_ema").iterdir())
    assert snaps == [f"{s:07d}-sigma{r:.4f}.safetensors" for s in (2, 4) for r in (0.05, 0.1)]
    # the newest checkpoint damaged: the resume falls back to step 2, drops the snapshots of step 4 and redoes them
    rd = tmp_path / "b" / "run"
    shutil.copytree(ref, rd)
    newest = rd / "checkpoints" / "0000004.pt"
    model = torch.load(newest, weights_only=True)["model"]
    flip_bytes(newest, model[unique_tensor(newest, model)])
    run_train(args(tmp_path / "b"))
    assert f"resumed from {rd / 'checkpoints' / '0000002.pt'} at step 2" in (rd / "log.txt").read_text()
    assert sorted(p.name for p in (rd / "posthoc_ema").iterdir()) == snaps
    for name in snaps:
        ours, theirs = snapshot_tensors(rd / "posthoc_ema" / name), snapshot_tensors(ref / "posthoc_ema" / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert load_checkpoint(newest)["posthoc_ema"]["t"] == 4

    # a damaged snapshot of the resume step (the run is complete): set aside and rewritten from the checkpoint
    snap = ref / "posthoc_ema" / "0000004-sigma0.0500.safetensors"
    before = snapshot_tensors(snap)
    name = unique_tensor(snap, before)
    flip_bytes(snap, before[name])
    capsys.readouterr()
    run_train(args(tmp_path / "a"))  # resumes at step 4, the snapshot's step: nothing to train
    out = capsys.readouterr().out
    assert re.search(rf"WARNING: post-hoc EMA snapshot {re.escape(str(snap))} is damaged \(tensor '{re.escape(name)}' "
                     r"does not match its crc32c digest\); set aside as", out), out
    assert f"rewrote the missing post-hoc EMA snapshot {snap}" in (ref / "log.txt").read_text()
    assert (ref / "posthoc_ema" / (snap.name + ".damaged")).exists()
    assert all(torch.equal(v, before[k]) for k, v in snapshot_tensors(snap).items())
