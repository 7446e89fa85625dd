"""Latent stores under kills and damage: a kill at any write of extraction or conversion leaves something
the same command finishes, missing shard files are refused by readers and re-encoded by a rerun, and the
temp files of killed writers (zarr's `.partial`, creation folders, mmap caches) are removed by a rerun.

Reference: an uninterrupted run of the same command into another path, compared array by array (every
array of the store) and attribute by attribute. Kills are deterministic: `FCDM_FAULT_KILL_AT` (the hook of
fcdm_common/io.py) at the n-th write of the store's metadata (`store-meta/*`: every zarr.json write and the
steps of creation, see preparation/store.py), for every n; a kill at a zarr write leaves the half-written
`.partial` file zarr itself would leave. Tiny ImageFolder (8x8 images, `--vae none`) and .npy folders.
"""
from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from fcdm_common.cli import UserError, run_main
from helpers import run_torchrun
from preparation import extract_features, save_zarr
from preparation import store as zstore
from preparation.readers import open_dataset

REPO = Path(__file__).resolve().parents[1]
EXTRACT = REPO / "preparation" / "extract_features.py"
SAVE_ZARR = REPO / "preparation" / "save_zarr.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# what killed writers may leave: zarr's temp files, our creation/removal folders, atomic writes, mmap caches
LEFTOVER = re.compile(r"(\.[0-9a-f]{32}\.partial|\.(creating|removing)-\d+|\.tmp)$")


def make_images(root: Path, per_class=3) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def extract_args(images, out, *extra):
    return ["--data-path", str(images), "--zarr-path", str(out), "--vae", "none", "--image-size", "8",
            "--batch-size", "2", "--shard-size", "2", "--chunk-size", "2", "--num-workers", "0", "--device", "cpu",
            *map(str, extra)]


def write_npy(root: Path, count=6, shape=(2, 3, 2, 2)):
    feats, labels = root / "features", root / "labels"
    feats.mkdir(parents=True)
    labels.mkdir(parents=True)
    values = np.random.default_rng(1).standard_normal((count, *shape)).astype(np.float32)
    for i in range(count):
        np.save(feats / f"{i:03d}.npy", values[i])
        np.save(labels / f"{i:03d}.npy", np.array([i % 2]))
    return feats, labels


def convert_args(feats, labels, out, *extra):
    return ["--feature-path", str(feats), "--label-path", str(labels), "--zarr-path", str(out), "--shard-size", "2",
            "--chunk-size", "2", *map(str, extra)]


def contents(path) -> dict:
    """Every array of the store and its attributes."""
    g = zarr.open_group(str(path), mode="r")
    return {"attrs": dict(g.attrs), **{name: g[name][:] for name in sorted(g.array_keys())}}


def assert_same_store(path, reference):
    got, want = contents(path), contents(reference)
    assert got.keys() == want.keys()
    assert got["attrs"] == want["attrs"]
    for name in want:
        if name != "attrs":
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{path}: array {name}")


def leftovers(folder) -> list:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if LEFTOVER.search(p.name))


def count_hook(monkeypatch, glob="store-meta/*") -> list:
    """Record the names of the fault-hook calls of preparation/store.py that `glob` selects (no kill)."""
    import fnmatch

    names = []
    original = zstore.fault_point

    def counting(name, before_kill=None):
        if fnmatch.fnmatchcase(name, glob):
            names.append(name)
        original(name, before_kill)

    monkeypatch.setattr(zstore, "fault_point", counting)
    return names


# Imports the programs once, then runs each killed run in a forked child (before any zarr or torch work, so no
# thread is forked) whose fault hook is re-read from its environment: a real process killed by SIGKILL after
# real writes, at a fraction of a fresh interpreter's start-up time.
KILL_DRIVER = """
import importlib, json, os, sys, traceback
import fcdm_common.io
from preparation import add_checksums, extract_features, save_zarr
mains = {"extract_features.py": extract_features.main, "save_zarr.py": save_zarr.main,
         "add_checksums.py": add_checksums.main}
results = []
for spec, program, argv in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os.environ["FCDM_FAULT_KILL_AT"] = spec
        importlib.reload(fcdm_common.io)  # the hook reads its variable when the module is executed
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            mains[program](argv)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    results.append([spec, os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)])
print(json.dumps(results))
"""


def kill_each(script, argv_of, specs):
    """Run program `script` once per spec (FCDM_FAULT_KILL_AT); every run must die of SIGKILL."""
    import json

    jobs = [[spec, Path(script).name, argv_of(spec)] for spec in specs]
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, json.dumps(jobs)], env=ENV, capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for spec, sig in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert sig == signal.SIGKILL, f"not killed at {spec} (status {sig}):\n{proc.stderr[-3000:]}"


def exit_2_line(main, argv, capsys) -> str:
    """main under run_main exits 2 with one `error: ...` line (after any progress output) and no traceback."""
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert not any("Traceback" in ln for ln in lines)
    return lines[-1]


# ------------------------------------------------------------------------------- (a) extraction
def test_kill_at_every_store_metadata_write_of_extraction_then_rerun_equals_uninterrupted(tmp_path, monkeypatch,
                                                                                          capsys):
    images = make_images(tmp_path / "imgs")
    names = count_hook(monkeypatch)
    run_main(extract_features.main, extract_args(images, tmp_path / "ref.zarr"))
    monkeypatch.undo()
    # every zarr.json of the creation folder, the finished creation, the rename, the completion
    assert names[0] == "store-meta/zarr.json" and "store-meta/created" in names and "store-meta/renamed" in names
    assert len(names) >= 12, names
    n = len(names)
    kill_each(EXTRACT, lambda spec: extract_args(images, tmp_path / f"k{spec.rsplit(':', 1)[1]}.zarr"),
              [f"store-meta/*:{i}" for i in range(1, n + 1)])
    after_kill = {}
    for i in range(1, n + 1):
        out = tmp_path / f"k{i}.zarr"
        after_kill[i] = [t for t in leftovers(tmp_path) if t.startswith((f"k{i}.zarr", f".k{i}.zarr"))]
        run_main(extract_features.main, extract_args(images, out))
        assert_same_store(out, tmp_path / "ref.zarr")
    assert "Traceback" not in capsys.readouterr().err
    with capsys.disabled():  # shown with -s
        print("".join(f"\nkilled at store write {i} ({names[i - 1]}): left {after_kill[i]}" for i in after_kill))
    assert leftovers(tmp_path) == [], "the reruns left temp files"
    left = [t for ts in after_kill.values() for t in ts]
    assert any(".creating-" in t for t in left) and any(t.endswith(".partial") for t in left), left


def test_kill_while_overwrite_replaces_a_store_then_rerun_finishes(tmp_path):
    images = make_images(tmp_path / "imgs")
    run_main(extract_features.main, extract_args(images, tmp_path / "ref.zarr"))
    steps = {"created": tmp_path / "o1.zarr", "removing": tmp_path / "o2.zarr", "renamed": tmp_path / "o3.zarr"}
    for out in steps.values():
        run_main(extract_features.main, extract_args(images, out, "--seed", 3, "--image-size", 4))  # other settings
    kill_each(EXTRACT, lambda spec: extract_args(images, steps[spec.split("/")[1].split(":")[0]], "--overwrite"),
              [f"store-meta/{step}:1" for step in steps])
    print(f"killed while replacing: left {leftovers(tmp_path)}")
    assert any(".removing-" in t for t in leftovers(tmp_path))
    for out in steps.values():
        run_main(extract_features.main, extract_args(images, out, "--overwrite"))
        assert_same_store(out, tmp_path / "ref.zarr")
    assert leftovers(tmp_path) == []


def test_stores_of_the_old_writer_killed_during_creation_are_redone(tmp_path, capsys):
    """Before creation became one rename, attributes were set one by one, then the arrays created: a kill
    left a folder of `.partial` files, a group with some attributes, or a store without `stat_done`."""
    images = make_images(tmp_path / "imgs")
    ref = tmp_path / "ref.zarr"
    run_main(extract_features.main, extract_args(images, ref))
    attrs = contents(ref)["attrs"]
    partial = tmp_path / "p.zarr"
    partial.mkdir()
    (partial / f"zarr.{'0' * 32}.partial").write_text('{"zarr_format": 3, "node_')
    some = tmp_path / "s.zarr"
    zarr.open_group(str(some), mode="w", zarr_format=3).attrs.update(dict(list(attrs.items())[:9]))
    no_stat_done = tmp_path / "n.zarr"
    settings = {k: attrs[k] for k in zstore.SETTING_KEYS}
    zstore.create_store(no_stat_done, settings)
    del zarr.open_group(str(no_stat_done), mode="r+")["stat_done"]
    for out in (partial, some, no_stat_done):
        run_main(extract_features.main, extract_args(images, out))
        assert_same_store(out, ref)
    assert leftovers(tmp_path) == []
    # never deleted: a folder that is not a store, or a zarr group of someone else
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert "not a zarr store" in exit_2_line(extract_features.main, extract_args(images, tmp_path / "other"), capsys)
    with pytest.raises(UserError, match="not an FCDM latent store"):
        zstore.create_store(tmp_path / "other", settings)
    assert (tmp_path / "other" / "keep.txt").exists()


def test_two_process_extraction_finishes_a_killed_creation(tmp_path):
    images = make_images(tmp_path / "imgs", per_class=4)
    run_main(extract_features.main, extract_args(images, tmp_path / "ref.zarr"))
    out = tmp_path / "o.zarr"
    kill_each(EXTRACT, lambda spec: extract_args(images, out), ["store-meta/*:4"])
    assert not out.exists() and leftovers(tmp_path)
    run_torchrun(EXTRACT, extract_args(images, out), timeout=120)
    assert_same_store(out, tmp_path / "ref.zarr")
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- (b) save_zarr
def test_kill_at_every_store_metadata_write_of_save_zarr_then_rerun_equals_uninterrupted(tmp_path, monkeypatch):
    feats, labels = write_npy(tmp_path)
    names = count_hook(monkeypatch)
    run_main(save_zarr.main, convert_args(feats, labels, tmp_path / "ref.zarr"))
    monkeypatch.undo()
    n = len(names)
    assert n >= 12 and "store-meta/renamed" in names, names
    kill_each(SAVE_ZARR, lambda spec: convert_args(feats, labels, tmp_path / f"k{spec.rsplit(':', 1)[1]}.zarr"),
              [f"store-meta/*:{i}" for i in range(1, n + 1)])
    for i in range(1, n + 1):
        print(f"killed at store write {i} ({names[i - 1]}): left "
              f"{[t for t in leftovers(tmp_path) if t.startswith((f'k{i}.zarr', f'.k{i}.zarr'))]}")
        run_main(save_zarr.main, convert_args(feats, labels, tmp_path / f"k{i}.zarr"))
        assert_same_store(tmp_path / f"k{i}.zarr", tmp_path / "ref.zarr")
    assert leftovers(tmp_path) == []


def test_save_zarr_overwrite_replaces_other_settings_and_resumes_same(tmp_path, capsys):
    feats, labels = write_npy(tmp_path)
    ref, out = tmp_path / "ref.zarr", tmp_path / "o.zarr"
    run_main(save_zarr.main, convert_args(feats, labels, ref))
    run_main(save_zarr.main, convert_args(feats, labels, out, "--vae-scaling-factor", 1.0))
    err = exit_2_line(save_zarr.main, convert_args(feats, labels, out), capsys)
    assert "other settings: scaling_factor" in err and "--overwrite" in err
    run_main(save_zarr.main, convert_args(feats, labels, out, "--overwrite"))
    assert "--overwrite: deleted" in capsys.readouterr().out
    assert_same_store(out, ref)
    run_main(save_zarr.main, convert_args(feats, labels, out, "--overwrite"))  # same settings: kept
    assert "nothing to do" in capsys.readouterr().out
    assert_same_store(out, ref)


# ------------------------------------------------------------------------------- (c) missing shard files
def shard_file(store: Path, array: str, k: int) -> Path:
    files = [p for p in (store / array / "c" / str(k)).rglob("*") if p.is_file()] if array == "latents" \
        else [store / array / "c" / str(k)]
    assert len(files) == 1 and files[0].is_file(), files
    return files[0]


@pytest.mark.parametrize("damage", ["latents", "labels", "empty latents"])
def test_missing_shard_file_is_one_message_and_a_rerun_restores_the_store(tmp_path, capsys, damage):
    from test_train import TINY
    from train_gen import train

    images = make_images(tmp_path / "imgs")
    ref, out = tmp_path / "ref.zarr", tmp_path / "o.zarr"
    run_main(extract_features.main, extract_args(images, ref))
    run_main(extract_features.main, extract_args(images, out))
    f = shard_file(out, damage.split()[-1], 1)
    if damage.startswith("empty"):
        f.write_bytes(b"")
    else:
        f.unlink()
    with pytest.raises(UserError) as e:
        open_dataset(zarr_path=out)
    msg = str(e.value)
    assert str(out) in msg and "shard 1 (images 2..3)" in msg and "rerun the command that made it" in msg
    err = exit_2_line(train.main, TINY + ["--zarr-path", str(out), "--results-dir", str(tmp_path / "res"),
                                          "--max-train-steps", "1"], capsys)
    assert err == f"error: {msg}"
    run_main(extract_features.main, extract_args(images, out))  # the documented fix
    assert "shard 1 (images 2..3) are missing; encoding them again" in capsys.readouterr().out
    assert_same_store(out, ref)
    assert len(open_dataset(zarr_path=out)) == 6


def test_save_zarr_rerun_restores_a_missing_shard_and_latent_stats_refuses_it(tmp_path, capsys):
    from preparation import latent_stats

    feats, labels = write_npy(tmp_path)
    ref, out = tmp_path / "ref.zarr", tmp_path / "o.zarr"
    run_main(save_zarr.main, convert_args(feats, labels, ref))
    run_main(save_zarr.main, convert_args(feats, labels, out))
    shard_file(out, "latents", 2).unlink()
    assert "shard 2 (images 4..5)" in exit_2_line(latent_stats.main, [str(out), "--recompute"], capsys)
    run_main(save_zarr.main, convert_args(feats, labels, out))
    assert_same_store(out, ref)


def test_every_shard_file_is_written_even_when_it_holds_only_the_fill_value(tmp_path):
    feats, labels = write_npy(tmp_path)
    for f in sorted(feats.iterdir())[:2]:
        np.save(f, np.zeros((2, 3, 2, 2), np.float32))  # shard 0: zeros = the latents' fill value
    out = save_zarr.convert(feats, labels, tmp_path / "o.zarr", shard_size=2, chunk_size=2, progress=False)
    assert shard_file(out, "latents", 0).stat().st_size > 0
    assert len(open_dataset(zarr_path=out)) == 6


# ------------------------------------------------------------------------------- (d) stale temp files
def test_partial_files_of_a_killed_write_are_removed_by_the_rerun(tmp_path):
    images = make_images(tmp_path / "imgs")
    run_main(extract_features.main, extract_args(images, tmp_path / "ref.zarr"))
    out = tmp_path / "o.zarr"
    kill_each(EXTRACT, lambda spec: extract_args(images, out), ["store-data/latents/*:2"])
    partials = [t for t in leftovers(tmp_path) if t.endswith(".partial")]
    assert partials and all(t.startswith("o.zarr/latents/c/1/") for t in partials), leftovers(tmp_path)
    (out / "labels" / "c" / f"0.{'a' * 32}.partial").write_bytes(b"xx")  # another killed write
    run_main(extract_features.main, extract_args(images, out))
    assert_same_store(out, tmp_path / "ref.zarr")
    assert leftovers(tmp_path) == []
    (out / f"zarr.{'b' * 32}.partial").write_bytes(b"{")  # a complete store: the rerun has nothing else to do
    run_main(extract_features.main, extract_args(images, out))
    assert leftovers(tmp_path) == []


def test_stale_mmap_cache_temps_are_removed_and_a_live_writers_is_kept(tmp_path):
    feats, labels = write_npy(tmp_path)
    store = save_zarr.convert(feats, labels, tmp_path / "s.zarr", shard_size=2, chunk_size=2, progress=False)
    expected = open_dataset(zarr_path=store, cache="memory")
    expected.prepare()
    code = (f"from preparation.readers import open_dataset; "
            f"open_dataset(zarr_path={str(store)!r}, cache='mmap').prepare()")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(ENV, FCDM_FAULT_KILL_AT="s.zarr.cache-*.npy:1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (killed,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert killed.name.startswith(".s.zarr.cache-") and killed.stat().st_size > 0
    # a temp of an older cache of the store (other id) whose writer died, and one whose writer is alive
    dead = tmp_path / ".s.zarr.cache-0123456789ab.npy.4242.tmp"
    alive = tmp_path / ".s.zarr.cache-ba9876543210.npy.4343.tmp"
    dead.write_bytes(b"x" * 100)
    alive.write_bytes(b"x" * 100)
    with open(tmp_path / "s.zarr.cache-ba9876543210.npy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held through another open file: a writer in another process
        ds = open_dataset(zarr_path=store, cache="mmap")
        ds.prepare()
        assert not killed.exists() and not dead.exists() and alive.exists()
    assert ds.cache_file().is_file()
    idx, orient = np.arange(6), np.zeros(6, np.int64)
    np.testing.assert_array_equal(ds.read(idx, orient), expected.read(idx, orient))


# ------------------------------------------------------------------------------- (e) flag ranges
@pytest.mark.parametrize("flag,value", [("--vae-scaling-factor", "0"), ("--vae-scaling-factor", "nan"),
                                        ("--vae-scaling-factor", "-1"), ("--vae-scaling-factor", "inf"),
                                        ("--vae-shift-factor", "nan"), ("--vae-shift-factor", "-inf"),
                                        ("--seed", "-1"), ("--seed", str(2 ** 32)), ("--shard-size", "0"),
                                        ("--num-workers", "-1")])
def test_bad_extraction_flag_values_exit_2(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        extract_features.main(extract_args(tmp_path, tmp_path / "o.zarr", f"{flag}={value}"))
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: expected" in last and repr(value) in last and not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("argv", [["--vae-scaling-factor", "0"], ["--vae-scaling-factor", "nan"],
                                  ["--image-size", "0"], ["--chunk-size", "-2"], ["--overwrite", "maybe"]])
def test_bad_save_zarr_flag_values_exit_2(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        save_zarr.main(convert_args(tmp_path, tmp_path, tmp_path / "o.zarr", *argv))
    assert e.value.code == 2
    assert f"argument {argv[0]}: expected" in capsys.readouterr().err.strip().splitlines()[-1]


def test_full_disk_during_a_store_write_is_one_message(tmp_path, capsys):
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "o.zarr"
    proc = subprocess.run([sys.executable, str(EXTRACT), *extract_args(images, out)], capture_output=True, text=True,
                          env=dict(ENV, FCDM_FAULT_NOSPACE_AT="store-data/latents/*:1"), timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "encoding" not in ln]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith(f"error: cannot write {out}/latents/c/0/") and "no space left" in lines[-1]
    run_main(extract_features.main, extract_args(images, out))  # space freed: the rerun finishes
    run_main(extract_features.main, extract_args(images, tmp_path / "ref.zarr"))
    assert_same_store(out, tmp_path / "ref.zarr")
    assert leftovers(tmp_path) == []
