"""Sampling and evaluation programs under faults: object arrays in npz files, temp files of killed runs,
two sample_ddp.py runs on one folder, a full disk and a read-only output folder.

- object arrays (np.load never unpickles: allow_pickle=False raises ValueError) are one `error:` line;
- each program deletes its own leftovers when it runs again, and only its own;
- sample_ddp.py's rank 0 holds an flock on the PNG folder: a second run of the same command stops with one
  line instead of deleting the first one's temp files (which crashed the first), and kill -9 frees it;
- FCDM_FAULT_NOSPACE_AT (fcdm_common/io.py) raises the full-disk OSError at an atomic write: exit 2, one
  line, finished files kept; a read-only folder (chmod 0o555) likewise. Root ignores the mode, so as root
  the programs run under `setpriv` without the capabilities that bypass file permissions (skipped where
  setpriv cannot drop them).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluations import digits
from evaluations.in_training import (
    EvalPlan,
    InTrainingEvaluator,
    add_eval_args,
    load_or_build_reference,
    plan_from_args,
)
from fcdm_common.cli import UserError
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)
from test_sample_ddp import make_checkpoint
from train_gen import evaluate, export_pipeline, sample_ddp

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    x_tr, _, x_te, y_te = digits.digits_split()
    np.savez(root / "ref.npz", arr_0=digits.digits_to_images(x_tr[:200], 2))
    np.savez(root / "samples.npz", arr_0=digits.digits_to_images(x_te[:60], 2), arr_1=y_te[:60])
    return {"root": root, "ckpt": make_checkpoint(root / "diff.pt", "diffusion"), "ref": root / "ref.npz",
            "samples": root / "samples.npz", "images": digits.digits_to_images(x_te[:60], 2)}


def run(script, *argv, env_extra=None, timeout=180, prefix=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([*prefix, sys.executable, str(script), *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, errors


def temps(folder: Path) -> list:
    return sorted(p.name for p in Path(folder).rglob("*.tmp"))


# ------------------------------------------------------------------------------------------- object arrays
def object_array(n):
    return np.array([1, "two"] * (n // 2) + [3] * (n % 2), dtype=object)


def test_object_labels_in_a_sample_batch_are_one_message(data, tmp_path):
    bad = tmp_path / "objlabels.npz"
    np.savez(bad, arr_0=data["images"], arr_1=object_array(len(data["images"])))
    with pytest.raises(UserError, match=r"objlabels\.npz: 'arr_1' is an array of Python objects"):
        evaluate.main(["--sample-batch", str(bad), "--ref-batch", str(data["ref"]), "--backend", "digits"])
    rc, errors = run(REPO / "train_gen" / "evaluate.py", "--sample-batch", bad, "--ref-batch", data["ref"],
                     "--backend", "digits")
    assert rc == 2 and len(errors) == 1 and "'arr_1' is an array of Python objects" in errors[0], errors


@pytest.mark.parametrize("key", ["mu", "sigma_s"])
def test_object_reference_statistics_are_one_message(data, tmp_path, key):
    stats = {"mu": np.zeros(64), "sigma": np.eye(64), "mu_s": np.zeros(64), "sigma_s": np.eye(64)}
    stats[key] = np.array([None] * len(stats[key]), dtype=object)
    ref = tmp_path / "objref.npz"
    np.savez(ref, arr_0=digits.digits_to_images(np.zeros((8, 64)), 2), **stats)
    with pytest.raises(UserError, match=rf"objref\.npz: '{key}' is an array of Python objects"):
        evaluate.main(["--sample-batch", str(data["samples"]), "--ref-batch", str(ref), "--backend", "digits"])
    # the evaluation during training: refused before training starts, and when the reference is read
    p = argparse.ArgumentParser()
    add_eval_args(p)
    args = p.parse_args(["--eval-every", "5", "--eval-backend", "digits", "--ref-batch", str(ref)])
    with pytest.raises(UserError, match=rf"'{key}' is an array of Python objects"):
        plan_from_args(args, {"image_size": 16}, "diffusion")
    with pytest.raises(UserError, match=rf"'{key}' is an array of Python objects"):
        load_or_build_reference(digits_plan(ref), tmp_path / "eval", print)


# ------------------------------------------------------------------------------------------- stale temps
def digits_plan(ref) -> EvalPlan:
    return EvalPlan(every=5, num_samples=8, sampler="ddim", num_steps=2, cfg_scale=1.0, seed=0, batch_size=8,
                    precision="fp32", ref_batch=str(ref), backend="digits", inception_pb=None, inception_weights=None,
                    tf_python=None, keep_samples=False)


def test_evaluate_removes_the_temps_of_its_outputs_only(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in (".fid.txt.abcd1234.tmp", ".fid.json.abcd1234.tmp", ".other.txt.abcd1234.tmp"):
        (out / name).write_text("half")
    evaluate.main(["--sample-batch", str(data["samples"]), "--ref-batch", str(data["ref"]), "--backend", "digits",
                   "--output-fid", str(out / "fid.txt")])
    assert (out / "fid.txt").read_text().startswith("Inception Score: ") and (out / "fid.json").is_file()
    assert temps(out) == [".other.txt.abcd1234.tmp"]  # another program's file is left alone


def test_make_reference_removes_its_work_folders_and_temps(tmp_path):
    from evaluations import make_reference  # deferred: PIL-heavy ImageFolder code only this test runs

    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for k in range(3):
            image = Image.fromarray(np.full((16, 16, 3), 40 * (k + 3 * c), np.uint8))
            image.save(tmp_path / "data" / f"c{c}" / f"{k}.png")
    out = tmp_path / "out"
    leftovers = [".make_reference_ref.npz.abcd1234", ".make_reference_x1y2z3w4"]  # ours, and an older unnamed one
    kept = ".make_reference_other.npz.abcd1234"  # another output's run may still be using it
    for name in leftovers + [kept]:
        (out / name).mkdir(parents=True)
        (out / name / "images.npz").write_bytes(b"half")
    (out / ".ref.npz.abcd1234.tmp").write_bytes(b"half")
    make_reference.main(["--data-path", str(tmp_path / "data"), "--out", str(out / "ref.npz"), "--image-size", "16",
                         "--backend", "digits"])
    assert sorted(p.name for p in out.iterdir()) == [kept, "ref.npz"]
    with np.load(out / "ref.npz") as z:
        assert z["arr_0"].shape == (6, 16, 16, 3) and z["mu"].shape == (64,)


def test_evaluation_during_training_removes_stale_parts_and_cache_temps(data, tmp_path):
    eval_dir = tmp_path / "run" / "eval"
    (eval_dir / ".parts-0000050").mkdir(parents=True)
    (eval_dir / ".parts-0000050" / "rank00000.npy").write_bytes(b"x")
    (eval_dir / ".0000050-samples.npz.abcd1234.tmp").write_bytes(b"x")
    (eval_dir / "0000040-samples.npz").write_bytes(b"kept samples")  # --eval-keep-samples output: not a leftover
    logged = []
    fake = types.SimpleNamespace(run_dir=tmp_path / "run", logger=types.SimpleNamespace(log=logged.append))
    InTrainingEvaluator._remove_stale_parts(fake)
    assert sorted(p.name for p in eval_dir.iterdir()) == ["0000040-samples.npz"]
    assert "removed 2 leftover(s)" in logged[0]
    # the reference feature cache beside the reference batch: a killed write's temp goes, the cache is written
    ref = tmp_path / "ref.npz"
    ref.write_bytes(data["ref"].read_bytes())
    (tmp_path / ".ref.digits-features.npz.abcd1234.tmp").write_bytes(b"half")
    out = load_or_build_reference(digits_plan(ref), eval_dir, logged.append)
    assert out["pool"].shape == (200, 64) and (tmp_path / "ref.digits-features.npz").is_file()
    assert temps(tmp_path) == []


def test_export_removes_its_half_written_folders_only(data, tmp_path):
    for name in (".pipe.abcd1234", ".other.abcd1234"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{")
    export_pipeline.main(["--ckpt", str(data["ckpt"]), "--out", str(tmp_path / "pipe")])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.abcd1234", "pipe"]
    assert (tmp_path / "pipe" / "model_index.json").is_file()


# ------------------------------------------------------------------------------------ two runs, one folder
def sample_args(data, sample_dir, *extra):
    return ["--ckpt", data["ckpt"], "--sample-dir", sample_dir, "--num-fid-samples", 6, "--num-sampling-steps", 2,
            "--forward-batch", 4, "--per-proc-batch-size", 4, "--device", "cpu", *extra]


def the_archive(sample_dir):
    (npz,) = Path(sample_dir).glob("*.npz")
    return npz


def test_a_second_run_on_a_locked_folder_stops_and_leaves_its_files(data, tmp_path):
    out = tmp_path / "s"
    argv = [str(a) for a in sample_args(data, out)]
    sample_ddp.main(argv)
    npz = the_archive(out)
    first = npz.read_bytes()
    folder = out / npz.name[: -len("-6.npz")]
    npz.unlink()
    npz.with_suffix(".json").unlink()
    (folder / "000001.png").unlink()
    in_flight = folder / ".000001.png.abcd1234.tmp"  # the other run is writing this one right now
    in_flight.write_bytes(b"half")
    lock = sample_ddp.lock_sample_folder(folder)  # "the other run"
    try:
        with pytest.raises(UserError, match=rf"is in use by another sample_ddp\.py run \(pid {os.getpid()} "):
            sample_ddp.main(argv)
        assert in_flight.exists() and not npz.exists()
    finally:
        lock.release()
    sample_ddp.main(argv)  # the lock is free: the leftover is stale now and goes, the archive is the same
    assert npz.read_bytes() == first and temps(out) == []


def test_two_concurrent_runs_with_keep_pngs_false(data, tmp_path):
    """Before: the second run removed the first one's temp files as stale, and the first crashed on them."""
    argv = [sys.executable, str(REPO / "train_gen" / "sample_ddp.py"),
            *map(str, sample_args(data, tmp_path, "--keep-pngs", "false"))]
    argv[argv.index("--num-fid-samples") + 1] = "40"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert "Traceback" not in err, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert (rc, errors) == (0, []) or (rc == 2 and len(errors) == 1 and "another sample_ddp.py run" in errors[0])
    assert 0 in [rc for rc, _ in results]
    npz = the_archive(tmp_path)
    with np.load(npz) as z:
        assert z["arr_0"].shape == (40, 16, 16, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([npz.name, npz.with_suffix(".json").name])


def test_kill_9_leaves_no_stuck_lock(data, tmp_path):
    rc = subprocess.run([sys.executable, str(REPO / "train_gen" / "sample_ddp.py"),
                         *map(str, sample_args(data, tmp_path))], capture_output=True, timeout=180,
                        env={**os.environ, "OMP_NUM_THREADS": "1", "FCDM_FAULT_KILL_AT": "000002.png:1"}).returncode
    assert rc == -9
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (folder / sample_ddp.LOCK_FILE).is_file() and temps(tmp_path)
    sample_ddp.main([str(a) for a in sample_args(data, tmp_path)])
    assert the_archive(tmp_path).is_file() and temps(tmp_path) == []


# ------------------------------------------------------------------------------------ full disk, read-only
def test_full_disk_at_the_archive_write(data, tmp_path):
    rc, errors = run(REPO / "train_gen" / "sample_ddp.py", *sample_args(data, tmp_path),
                     env_extra={"FCDM_FAULT_NOSPACE_AT": "*.npz:1"})
    assert rc == 2 and len(errors) == 1 and "no space left on device" in errors[0] and ".npz" in errors[0], errors
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(list(folder.glob("*.png"))) == 6 and not list(tmp_path.glob("*.npz")) and temps(tmp_path) == []
    sample_ddp.main([str(a) for a in sample_args(data, tmp_path)])  # space again: the PNGs are packed
    assert the_archive(tmp_path).is_file()


FULL_DISK = {  # program: (arguments, the write that finds the disk full)
    "sample": (["train_gen/sample.py", "--ckpt", "{ckpt}", "--num-sampling-steps", "2", "--class-labels", "1", "2",
                "--out", "{out}/grid.png"], "grid.png:1"),
    "evaluate": (["train_gen/evaluate.py", "--sample-batch", "{samples}", "--ref-batch", "{ref}", "--backend", "digits",
                  "--output-fid", "{out}/fid.txt"], "fid.txt:1"),
    "export_pipeline": (["train_gen/export_pipeline.py", "--ckpt", "{ckpt}", "--out", "{out}/pipe"], "README.md:1"),
}


@pytest.mark.parametrize("program", sorted(FULL_DISK))
def test_full_disk_is_one_message(data, tmp_path, program):
    argv, spec = FULL_DISK[program]
    out = tmp_path / "out"
    fill = dict(ckpt=data["ckpt"], samples=data["samples"], ref=data["ref"], out=out)
    rc, errors = run(REPO / argv[0], *[a.format(**fill) for a in argv[1:]],
                     env_extra={"FCDM_FAULT_NOSPACE_AT": spec})
    assert rc == 2 and len(errors) == 1 and "no space left on device" in errors[0], errors
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []  # nothing half-written


READ_ONLY = {
    "sample_ddp": ["train_gen/sample_ddp.py", "--ckpt", "{ckpt}", "--sample-dir", "{ro}/s", "--num-fid-samples", "2",
                   "--num-sampling-steps", "2"],
    "sample": ["train_gen/sample.py", "--ckpt", "{ckpt}", "--num-sampling-steps", "2", "--out", "{ro}/grid.png"],
    "evaluate": ["train_gen/evaluate.py", "--sample-batch", "{samples}", "--ref-batch", "{ref}", "--backend", "digits",
                 "--output-fid", "{ro}/fid.txt"],
    "export_pipeline": ["train_gen/export_pipeline.py", "--ckpt", "{ckpt}", "--out", "{ro}/pipe"],
    "pipeline_sample": ["train_gen/pipeline_sample.py", "--pipeline", "{root}/no-pipeline", "--class-labels", "1",
                        "--out", "{ro}/grid.png"],
    "make_reference": ["evaluations/make_reference.py", "--data-path", "{root}", "--out", "{ro}/ref.npz",
                       "--image-size", "16", "--backend", "digits"],
}


def unprivileged(ro: Path) -> list:
    """Command prefix under which writing into the chmod 0o555 folder `ro` is refused: none for a normal user;
    for root, setpriv without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (checked on `ro`), else the test is skipped."""
    if not IS_ROOT:
        return []
    prefix = [shutil.which("setpriv") or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    try:
        probe = subprocess.run([*prefix, "sh", "-c", f"touch '{ro}/probe'"], capture_output=True, timeout=30)
    except OSError:
        pytest.skip("root ignores chmod 0o555, and setpriv is not installed")
    if probe.returncode == 0 or (ro / "probe").exists():
        pytest.skip("root ignores chmod 0o555, and setpriv cannot drop the capabilities that allow it")
    return prefix


@pytest.mark.parametrize("program", sorted(READ_ONLY))
def test_read_only_output_folder_is_one_message(data, tmp_path, program):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        prefix = unprivileged(ro)
        fill = dict(ckpt=data["ckpt"], samples=data["samples"], ref=data["ref"], ro=ro, root=data["root"])
        argv = READ_ONLY[program]
        rc, errors = run(REPO / argv[0], *[a.format(**fill) for a in argv[1:]], prefix=prefix)
        assert rc == 2 and len(errors) == 1 and "permission denied" in errors[0] and str(ro) in errors[0], errors
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
