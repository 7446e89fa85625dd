"""Fault injection: a kill -9 during every write the programs make, damaged files of every kind, a run
folder whose checkpoints are all unreadable, two trainers on one folder.

Each scenario must end either in a rerun whose outputs equal an uninterrupted run's (weights, optimizer,
exports, grids and metrics bitwise; archives and stores byte for byte) or in one message and exit 2,
with nothing lost and no temp file left. Kills are deterministic: `FCDM_FAULT_KILL_AT="<name glob>:<n>"`
(the test hook of fcdm_common/io.py) SIGKILLs the process at the n-th matching write, after the data is
in the temp file and before the rename (for metrics.jsonl: half-way through the line).

Tiny models and data (the 3x8x8 pixel store of test_train.py, 4 steps, 2-step grids); killed runs are
subprocesses, references and reruns run in-process (one thread, bitwise comparable).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fcdm_common.cli import UserError
from helpers import one_thread, processes_with_env, run_torchrun  # noqa: F401  (one_thread: fixture)
from test_train import ENV, TINY, TRAIN, assert_same_state, make_store, metrics, run_train

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
SAMPLE_DDP = REPO / "train_gen" / "sample_ddp.py"
EXTRACT = REPO / "preparation" / "extract_features.py"
TEMP = re.compile(r"^\.(.+\.tmp|tmp\w{6})$")  # ours (.<name>.XXXXXXXX.tmp) and safetensors' (.tmpXXXXXX)
KINDS = ("empty", "truncated", "random", "text", "zip")


def damaged(kind: str, original: bytes) -> bytes:
    """`original` damaged in one of the ways files get damaged (KINDS)."""
    if kind == "empty":
        return b""
    if kind == "truncated":
        return original[:len(original) // 2]
    if kind == "random":
        return np.random.default_rng(0).integers(0, 256, max(len(original), 64), dtype=np.uint8).tobytes()
    if kind == "text":
        return b"this is not the file you are looking for\nsecond line\n"
    if kind == "zip":  # a valid zip archive holding something else
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("notes.txt", "hello")
        return buf.getvalue()
    raise ValueError(kind)


def temps(folder: Path) -> list:
    return sorted(str(p) for p in Path(folder).rglob("*") if TEMP.match(p.name))


def killed(script, args, spec: str, timeout=240) -> subprocess.CompletedProcess:
    """Run `script` until the fault hook kills it at `spec`; asserts it died of SIGKILL."""
    env = dict(ENV, FCDM_FAULT_KILL_AT=spec)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {spec} (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def test_error_summary_never_fails_on_empty_or_multiline_messages():
    from fcdm_common.cli import error_summary

    assert error_summary(EOFError()) == "EOFError"  # str(e).splitlines()[0] raised IndexError here
    assert error_summary(KeyError("101")) == "KeyError: '101'"
    assert error_summary(RuntimeError("\n  first\nsecond")) == "RuntimeError: first"
    assert error_summary(ValueError("x" * 500), limit=10) == "ValueError: " + "x" * 10


# ---------------------------------------------------------------------------------- training
STEPS = 4


def train_args(store, results, *extra):
    return TINY + ["--zarr-path", store, "--results-dir", results, "--exp-name", "run", "--max-train-steps", STEPS,
                   "--log-every", 1, "--ckpt-every", 2, "--sample-every", 2, "--grid-steps", 2, "--grid-cols", 2,
                   "--keep-last", 3, *extra]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "tiny.zarr")


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """An uninterrupted run: checkpoints, exports and grids at steps 2 and 4."""
    results = tmp_path_factory.mktemp("reference")
    run_train(train_args(store, results))
    return results / "run"


def load(path):
    return torch.load(path, weights_only=True)


def assert_equals_reference(rd: Path, reference: Path):
    """Every output of `rd` equals the uninterrupted run's and no temp file is left."""
    for step in (2, STEPS):
        name = f"{step:07d}"
        assert_same_state(load(reference / "checkpoints" / f"{name}.pt"), load(rd / "checkpoints" / f"{name}.pt"))
        ours, theirs = (safe_open(str(d / "checkpoints" / f"{name}-ema.safetensors"), "pt")
                        for d in (rd, reference))
        assert ours.keys() == theirs.keys() and ours.metadata()["step"] == str(step)
        assert all(torch.equal(ours.get_tensor(k), theirs.get_tensor(k)) for k in ours.keys())
        assert (rd / "samples" / f"{name}.png").read_bytes() == (reference / "samples" / f"{name}.png").read_bytes()
    key = lambda recs: [(r["step"], r["loss"], r["grad_norm"]) for r in recs]  # noqa: E731
    assert key(metrics(rd)) == key(metrics(reference))  # no record lost, duplicated or cut
    assert temps(rd) == []


@pytest.mark.parametrize("spec", [
    "0000002.pt:1",  # the first checkpoint: the rerun starts from step 0
    "0000004-ema.safetensors:1",  # after the final .pt: the rerun has no step left, completes export and grid
    "metrics.jsonl:3",  # half a line in metrics.jsonl
    "0000002.png:1",  # a grid (after its checkpoint): the resumed run draws it
])
def test_kill_during_a_training_write_then_rerun_equals_uninterrupted(store, reference, tmp_path, spec):
    args = train_args(store, tmp_path)
    killed(TRAIN, args, spec)
    rd = tmp_path / "run"
    if spec.startswith("metrics"):
        assert not (rd / "metrics.jsonl").read_text().endswith("\n")  # killed inside the line
    else:
        assert temps(rd), "the kill should have left the temp file of the write"
    run_train(args)
    assert_equals_reference(rd, reference)


@pytest.mark.parametrize("kind", KINDS + ("foreign",))
def test_unreadable_newest_checkpoint_is_skipped_in_training_and_refused_in_sampling(store, reference, tmp_path,
                                                                                     kind):
    from train_gen import sample_ddp

    rd = tmp_path / "run"
    shutil.copytree(reference, rd)
    newest = rd / "checkpoints" / f"{STEPS:07d}.pt"
    if kind == "foreign":  # a loadable torch file that is no training checkpoint
        torch.save({"weights": torch.zeros(2)}, newest)
    else:
        newest.write_bytes(damaged(kind, newest.read_bytes()))
    with pytest.raises(UserError, match=re.escape(str(newest))):
        sample_ddp.main(["--ckpt", str(newest), "--sample-dir", str(tmp_path / "s"), "--num-fid-samples", "2"])
    run_train(train_args(store, tmp_path))
    log = (rd / "log.txt").read_text()
    assert f"skipping unreadable checkpoint {newest}" in log
    assert f"resumed from {rd / 'checkpoints' / '0000002.pt'} at step 2" in log
    assert_equals_reference(rd, reference)


def test_all_checkpoints_unreadable_stop_then_start_over(store, reference, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(reference, rd)
    ckpts = rd / "checkpoints"
    for step, kind in ((2, "text"), (4, "empty"), (6, "truncated"), (8, "random")):  # 6, 8: beyond this run
        (ckpts / f"{step:07d}.pt").write_bytes(damaged(kind, (reference / "checkpoints" / "0000004.pt").read_bytes()))
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    with pytest.raises(UserError) as e:
        run_train(train_args(store, tmp_path))
    msg = str(e.value)
    assert "no checkpoint" in msg and "--start-over" in msg
    assert all(f"{s:07d}.pt" in msg for s in (2, 4, 6, 8))
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before  # nothing deleted or rewritten
    # deliberately from step 0, keeping only the newest checkpoint: the unreadable 6 and 8 must not count
    # as the newest (they did, and each new checkpoint was deleted as soon as it was written)
    run_train(train_args(store, tmp_path, "--start-over", "true", "--keep-last", "1"))
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["0000004.pt", "0000006.pt", "0000008.pt"]
    assert_same_state(load(reference / "checkpoints" / "0000004.pt"), load(ckpts / "0000004.pt"))
    assert temps(rd) == []


def test_prune_never_deletes_the_only_readable_checkpoint(tmp_path):
    from train_gen.run_folder import prune_checkpoints

    for s in (10, 20, 30, 40):
        (tmp_path / f"{s:07d}.pt").write_bytes(b"x")
        (tmp_path / f"{s:07d}-ema.safetensors").write_bytes(b"x")
    bad = [tmp_path / "0000030.pt", tmp_path / "0000040.pt", tmp_path / "0000010.pt"]
    removed = prune_checkpoints(tmp_path, keep_last=1, keep_every=0, unreadable=bad)
    # 20: the newest readable; 30, 40: unreadable but newer (overwritten when the run gets there); 10: old junk
    assert sorted(p.name for p in removed) == ["0000010-ema.safetensors", "0000010.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["0000020.pt", "0000030.pt", "0000040.pt"]


def test_two_trainers_on_one_folder(store, reference, tmp_path):
    long = train_args(store, tmp_path, "--max-train-steps", 100_000, "--ckpt-every", 100_000, "--sample-every", 0)
    first = subprocess.Popen([sys.executable, TRAIN, *map(str, long)], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(19))  # cores for the rest
    rd = tmp_path / "run"
    try:
        deadline = time.time() + 120
        while not (rd / "metrics.jsonl").is_file():  # the first trainer holds the lock and is training
            assert first.poll() is None and time.time() < deadline, "the first trainer did not start"
            time.sleep(0.1)
        with pytest.raises(UserError, match=f"in use by another trainer \\(pid {first.pid} on "):  # run_main: exit 2
            run_train(train_args(store, tmp_path))
        assert first.poll() is None  # the first one was not disturbed
    finally:
        first.kill()
        first.wait()
    # the kernel freed the lock of the killed trainer: the rerun takes over and its records are its own
    run_train(train_args(store, tmp_path))
    assert_equals_reference(rd, reference)


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_store_is_one_message(store, tmp_path, kind):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    chunk = next(p for p in (bad / "latents").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(damaged(kind, chunk.read_bytes()))
    with pytest.raises(UserError, match=f"zarr store {re.escape(str(bad))} is damaged"):
        run_train(train_args(bad, tmp_path / "res"))


# ---------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def archive(reference, tmp_path_factory):
    """An uninterrupted sample_ddp run from the reference's final checkpoint."""
    folder = tmp_path_factory.mktemp("samples")
    sample(reference, folder)
    (npz,) = folder.glob("*.npz")
    return npz


def sample_args(reference, sample_dir):
    return ["--ckpt", reference / "checkpoints" / f"{STEPS:07d}.pt", "--sample-dir", sample_dir,
            "--num-fid-samples", 5, "--per-proc-batch-size", 2, "--num-sampling-steps", 2, "--global-seed", 1]


def sample(reference, sample_dir):
    from train_gen import sample_ddp

    sample_ddp.main([str(a) for a in sample_args(reference, sample_dir)])


@pytest.mark.parametrize("spec", ["000003.png:1", "*.npz:1"])
def test_kill_during_a_sampling_write_then_rerun_equals_uninterrupted(reference, archive, tmp_path, spec):
    killed(SAMPLE_DDP, sample_args(reference, tmp_path), spec)
    assert temps(tmp_path), "the kill should have left the temp file of the write"
    sample(reference, tmp_path)
    assert (tmp_path / archive.name).read_bytes() == archive.read_bytes()
    assert temps(tmp_path) == []


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_archive_is_rewritten_by_sampling_and_refused_by_evaluation(reference, archive, tmp_path, kind):
    from train_gen import evaluate

    shutil.copytree(archive.parent, tmp_path, dirs_exist_ok=True)
    npz = tmp_path / archive.name
    npz.write_bytes(damaged(kind, archive.read_bytes()))
    with pytest.raises(UserError, match=re.escape(str(npz))):
        evaluate.main(["--sample-batch", str(npz), "--ref-batch", str(archive), "--backend", "digits",
                       "--output_fid", str(tmp_path / "fid.txt")])
    assert not (tmp_path / "fid.txt").exists()
    sample(reference, tmp_path)  # the rerun sees the damage and writes the archive again from the PNGs
    assert npz.read_bytes() == archive.read_bytes()


# ---------------------------------------------------------------------------------- extraction
def test_kill_during_a_store_write_then_rerun_equals_uninterrupted(tmp_path):
    from PIL import Image

    from test_preparation import build_tiny_vae, common_args, read_store, run_inprocess

    vae = build_tiny_vae(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    run_inprocess(common_args(tmp_path / "imgs", vae, tmp_path / "ref.zarr"))
    args = common_args(tmp_path / "imgs", vae, tmp_path / "out.zarr")
    killed(EXTRACT, args, "store-shard:2")  # shard 1's latents written, its labels and done marker not
    run_inprocess(args)
    (ref_x, ref_y, ref_attrs), (x, y, attrs) = read_store(tmp_path / "ref.zarr"), read_store(tmp_path / "out.zarr")
    assert np.array_equal(ref_x, x) and np.array_equal(ref_y, y) and attrs == ref_attrs
    assert temps(tmp_path) == []


# ---------------------------------------------------------------------------------- test helpers
def test_run_torchrun_kills_every_worker_on_timeout(tmp_path):
    """torchrun starts its workers in their own sessions: killing torchrun's process group missed them."""
    script = tmp_path / "sleeper.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        open(os.path.join(sys.argv[1], f"{os.getpid()}.pid"), "w").close()
        time.sleep(600)
    """))
    with pytest.raises(subprocess.TimeoutExpired):
        run_torchrun(script, [tmp_path], timeout=20)
    pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2, "the workers did not start within 20 s; cannot check them"
    time.sleep(0.2)
    alive = [pid for pid in pids if pid in processes_with_env("FCDM_TEST_SESSION", os.environ["FCDM_TEST_SESSION"])]
    assert alive == [], f"torchrun workers survived: {alive}"
