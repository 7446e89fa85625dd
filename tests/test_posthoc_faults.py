"""Post-hoc EMA under faults and off the grid (issue 23): damaged snapshots, kills during snapshot, export
and reconstruction writes, a kill before pruning, broken config.json, bad flags, a full or read-only
disk, and reconstruction coefficients that must sum to one for any target.

References: an uninterrupted training run (snapshots and checkpoints compared bitwise), the reconstruction
from the same folder without the damaged file, closed-form EMAs of a linear weight trajectory, and an
independent least-squares solve of the constrained fit on a fine time grid (variable elimination).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fcdm_common.cli import UserError
from helpers import one_thread  # noqa: F401  (fixture)
from test_train import ENV, TINY, assert_same_state, make_store, run_train
from train_gen.ema import (
    EMATarget,
    PowerEMA,
    classic_ema_initial_weight,
    list_posthoc_snapshots,
    posthoc_coefficients,
    power_weights,
    reconstruct_from_snapshots,
    save_posthoc_snapshots,
    sigma_rel_to_gamma,
    target_coefficients,
)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train_gen" / "train.py"
RECONSTRUCT = REPO / "train_gen" / "reconstruct_ema.py"
TEMP = re.compile(r"^\.(.+\.tmp|tmp\w{6})$")  # ours (.<name>.XXXXXXXX.tmp) and safetensors' (.tmpXXXXXX)
STEPS = 8


def train_args(store, results, *extra):
    """8 steps, checkpoints at 4 and 8, post-hoc EMA snapshots (sigma_rel 0.05, 0.10) every 2 steps."""
    return TINY + ["--zarr-path", store, "--results-dir", results, "--exp-name", "run", "--max-train-steps", STEPS,
                   "--log-every", 2, "--ckpt-every", 4, "--sample-every", 0, "--posthoc-ema-snapshot-every", 2,
                   *extra]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "tiny.zarr")


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """An uninterrupted run: snapshots at 2, 4, 6, 8, checkpoints and exports at 4 and 8."""
    results = tmp_path_factory.mktemp("reference")
    run_train(train_args(store, results))
    return results / "run"


def temps(folder: Path) -> list:
    return sorted(str(p) for p in Path(folder).rglob("*") if TEMP.match(p.name))


def killed(script, args, spec: str, timeout=240) -> subprocess.CompletedProcess:
    """Run `script` until the fault hook SIGKILLs it at the write `spec` ("<glob>:<n>")."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=dict(ENV, FCDM_FAULT_KILL_AT=spec),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {spec} (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def assert_snapshots_equal(rd: Path, reference: Path):
    """The same snapshot files (names) holding the same tensors bitwise, and the same final checkpoint."""
    ours, theirs = list_posthoc_snapshots(rd), list_posthoc_snapshots(reference)
    assert [s["path"].name for s in ours] == [s["path"].name for s in theirs]
    assert [s["step"] for s in ours] == [2, 2, 4, 4, 6, 6, 8, 8]
    for a, b in zip(ours, theirs):
        ta, tb = load_file(str(a["path"])), load_file(str(b["path"]))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), a["path"].name
    ca, cb = (torch.load(d / "checkpoints" / f"{STEPS:07d}.pt", weights_only=True) for d in (rd, reference))
    assert_same_state(ca, cb)
    for avg_a, avg_b in zip(ca["posthoc_ema"]["averages"], cb["posthoc_ema"]["averages"]):
        assert all(torch.equal(avg_a[k], avg_b[k]) for k in avg_a)


# ---------------------------------------------------------------------------------- damaged snapshots
def test_truncated_newest_snapshot_is_set_aside_and_redone(store, reference, tmp_path, capsys):
    # killed while writing snapshot 8: checkpoint 4, snapshots 2, 4, 6 and the temp file of snapshot 8 are left
    args = train_args(store, tmp_path)
    killed(TRAIN, args, "0000008-sigma0.0500.safetensors:1")
    rd = tmp_path / "run"
    assert [p for p in temps(rd) if "/posthoc_ema/.0000008-sigma0.0500.safetensors." in p]
    newest = rd / "posthoc_ema" / "0000006-sigma0.1000.safetensors"
    os.truncate(newest, 1000)  # `truncate -s 1000` of the newest snapshot
    run_train(args)  # raised SafetensorError
    out = capsys.readouterr().out
    assert f"WARNING: post-hoc EMA snapshot {newest} is damaged" in out and "set aside as" in out
    assert (rd / "posthoc_ema" / (newest.name + ".damaged")).stat().st_size == 1000  # kept, not deleted
    assert_snapshots_equal(rd, reference)  # step 6 redone from the checkpoint of step 4
    assert temps(rd) == []


def test_truncated_snapshot_of_the_resume_step_is_rewritten_from_its_checkpoint(store, reference, tmp_path, capsys):
    # a run that ended at step 4 (the newest snapshot is the checkpoint's step), then continued to 8
    run_train(train_args(store, tmp_path, "--max-train-steps", 4))
    rd = tmp_path / "run"
    damaged = rd / "posthoc_ema" / "0000004-sigma0.0500.safetensors"
    os.truncate(damaged, 1000)
    run_train(train_args(store, tmp_path))
    out = capsys.readouterr().out
    assert f"WARNING: post-hoc EMA snapshot {damaged} is damaged" in out
    assert f"rewrote the missing post-hoc EMA snapshot {damaged}" in (rd / "log.txt").read_text()
    assert_snapshots_equal(rd, reference)


def vector_run(folder: Path, theta: np.ndarray, every: int, sigmas=(0.05, 0.10)) -> Path:
    """A run folder (config.json + posthoc_ema/) of a vector 'model' whose weights after step t are theta[t]
    (theta[0]: the initial weights), snapshots in float32 every `every` steps."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    model = torch.nn.Linear(1, theta.shape[1], bias=False)
    power = PowerEMA(model, sigmas)
    for t in range(1, len(theta)):
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(theta[t]).float()[:, None])
        power.update(model, t)
        if t % every == 0:
            save_posthoc_snapshots(power, model, folder, t, "fp32")
    return folder


def reconstruct(argv) -> dict:
    from train_gen.reconstruct_ema import main

    main([str(a) for a in argv])
    out = Path(argv[argv.index("--out") + 1])
    return torch.load(out, weights_only=True) if out.is_file() else {}


def test_reconstruct_skips_a_damaged_snapshot_and_says_so(tmp_path, capsys):
    theta = np.random.default_rng(0).normal(size=(257, 5)).cumsum(0)
    run = vector_run(tmp_path / "run", theta, 32)
    damaged = run / "posthoc_ema" / "0000256-sigma0.1000.safetensors"  # the newest
    os.truncate(damaged, 1000)
    before = damaged.read_bytes()
    got = reconstruct(["--run", run, "--sigma-rel", "0.07", "--out", tmp_path / "a.pt"])
    out = capsys.readouterr().out
    assert "WARNING: skipping 1 damaged snapshot(s), reconstructing from the others: " \
           "0000256-sigma0.1000.safetensors" in out
    assert got["posthoc_ema"]["skipped_damaged"] == [damaged.name] and got["step"] == 256
    assert damaged.read_bytes() == before  # reconstruction never changes the run folder
    # the reference: the same folder without the damaged file
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    (clean / "posthoc_ema" / damaged.name).unlink()
    ref = reconstruct(["--run", clean, "--sigma-rel", "0.07", "--out", tmp_path / "b.pt"])
    assert torch.equal(got["ema"]["weight"], ref["ema"]["weight"])
    assert got["posthoc_ema"]["coefficients"] == ref["posthoc_ema"]["coefficients"]
    assert sum(got["posthoc_ema"]["coefficients"]) == pytest.approx(1.0, abs=1e-9)
    # every snapshot damaged: one message naming the folder
    for p in (run / "posthoc_ema").glob("*.safetensors"):
        p.write_bytes(b"")
    with pytest.raises(UserError, match="has no readable post-hoc EMA snapshots"):
        reconstruct(["--run", run, "--sigma-rel", "0.07", "--out", tmp_path / "c.pt"])


# ---------------------------------------------------------------------------------- coefficients
GRID = [s for s in range(1024, 16385, 1024) for _ in (0, 1)]  # the run: every 1024 steps up to 16384
GRID_GAMMAS = [sigma_rel_to_gamma(s) for s in (0.05, 0.10)] * 16
OFF_GRID = [EMATarget(9728, gamma=sigma_rel_to_gamma(0.05)),  # the example: the sum was 0.378
            EMATarget(9728, gamma=sigma_rel_to_gamma(0.10)),
            EMATarget(16000, gamma=sigma_rel_to_gamma(0.03)),
            EMATarget(12345, gamma=sigma_rel_to_gamma(0.07)),
            EMATarget(16384, gamma=sigma_rel_to_gamma(0.07)),  # on the grid, an untracked width
            EMATarget(5000, gamma=sigma_rel_to_gamma(0.25)),
            EMATarget(1500, gamma=sigma_rel_to_gamma(0.15)),
            EMATarget(9728, decay=0.999), EMATarget(16384, decay=0.9995), EMATarget(3000, decay=0.99),
            EMATarget(12345, decay=0.9999)]


@pytest.mark.parametrize("target", OFF_GRID, ids=str)
def test_coefficients_sum_to_one_off_the_grid(target):
    use = [i for i, s in enumerate(GRID) if s <= target.step]
    x = target_coefficients([GRID[i] for i in use], [GRID_GAMMAS[i] for i in use], target)
    assert abs(x.sum() - 1.0) < 1e-6, x.sum()
    assert np.all(np.isfinite(x))


def test_a_tracked_target_gets_one_hot_coefficients():
    for k in range(len(GRID)):
        use = [i for i, s in enumerate(GRID) if s <= GRID[k]]
        x = posthoc_coefficients([GRID[i] for i in use], [GRID_GAMMAS[i] for i in use], GRID[k], GRID_GAMMAS[k])
        np.testing.assert_allclose(x, np.eye(len(use))[use.index(k)], rtol=0, atol=1e-9)
    # a target between snapshots: weights after the newest usable snapshot are in none, so it is that
    # snapshot's average (the power profile cut at T' and normalised is the profile at T' of the same width)
    x = posthoc_coefficients(GRID[:18], GRID_GAMMAS[:18], 9728, GRID_GAMMAS[16])
    np.testing.assert_allclose(x, np.eye(18)[16], rtol=0, atol=1e-9)


def test_constrained_fit_equals_an_independent_grid_solve():
    """min ||P x - p|| with sum(x) = 1 on a fine grid, solved by eliminating the last coefficient."""
    steps = [128, 128, 256, 256, 384, 384, 512, 512]
    gammas = [sigma_rel_to_gamma(s) for s in (0.05, 0.10)] * 4
    n = 400_000
    s = (np.arange(n) + 0.5) * (512 / n)
    prof = lambda t, g: np.where(s <= t, (g + 1) * s ** g / t ** (g + 1), 0.0)  # noqa: E731
    P = np.stack([prof(t, g) for t, g in zip(steps, gammas)], axis=1)
    for target in (EMATarget(512, gamma=sigma_rel_to_gamma(0.07)), EMATarget(512, gamma=sigma_rel_to_gamma(0.2)),
                   EMATarget(512, decay=0.98)):
        if target.decay is None:
            p = prof(512, target.gamma)
        else:  # the classic profile normalised over [0, T]
            lam = -np.log(target.decay)
            p = lam * target.decay ** (512 - s) / (1 - target.decay ** 512)
        B = P[:, :-1] - P[:, -1:]
        y = np.linalg.lstsq(B, p - P[:, -1], rcond=None)[0]
        ref = np.append(y, 1 - y.sum())
        x = target_coefficients(steps, gammas, target)
        assert x.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(P @ x, P @ ref, rtol=0, atol=2e-4 * p.max())
        np.testing.assert_allclose(x, ref, rtol=0, atol=2e-3)


def linear_trajectory(T, d=4, seed=1):
    """theta_t = a + b t / T for t = 0..T, with a large constant a (a scale error shows as an error ~ a)."""
    rng = np.random.default_rng(seed)
    a, b = 3.0 + rng.uniform(size=d), rng.normal(size=d)
    return a, b, a + b * (np.arange(T + 1)[:, None] / T)


@pytest.mark.parametrize("target", [EMATarget(500, gamma=sigma_rel_to_gamma(0.07)),  # between 496 and 512
                                    EMATarget(512, gamma=sigma_rel_to_gamma(0.07)),
                                    EMATarget(437, gamma=sigma_rel_to_gamma(0.15)),
                                    EMATarget(500, decay=0.97),
                                    EMATarget(512, decay=0.98)], ids=str)
def test_linear_trajectory_reconstruction_is_close_to_its_true_ema(tmp_path, target):
    T = 512
    a, b, theta = linear_trajectory(T)
    run = vector_run(tmp_path / "run", theta, 16)
    snaps = list_posthoc_snapshots(run)
    (state, coefs), = reconstruct_from_snapshots(snaps, [target])
    got = state["weight"][:, 0].double().numpy()
    t = target.step
    if target.decay is None:
        exact = power_weights(t, target.gamma) @ theta[1:t + 1]
    else:  # (1 - beta) beta^(T - tau) on theta_tau, beta^T on theta_0
        beta = target.decay
        exact = ((1 - beta) * beta ** (t - np.arange(1, t + 1))) @ theta[1:t + 1] + beta ** t * theta[0]
        assert classic_ema_initial_weight(t, beta) < 1e-4
    assert coefs.sum() == pytest.approx(1.0, abs=1e-9)
    # the weights after the newest snapshot at or before t (t - t_used steps) are in none: at most that lag
    t_used = max(s["step"] for s in snaps if s["step"] <= t)
    lag = (t - t_used) / T * np.abs(b)
    assert np.all(np.abs(got - exact) <= lag + 2e-4 * np.abs(b) + 1e-5 * np.abs(a)), (got - exact, lag)
    # a constant trajectory comes back exactly whatever the target (the sum was 0.6-0.99 here)
    const = vector_run(tmp_path / "const", np.full_like(theta, 1.5), 16)
    (state, _), = reconstruct_from_snapshots(list_posthoc_snapshots(const), [target])
    np.testing.assert_allclose(state["weight"].numpy(), 1.5, rtol=2e-6)


# ---------------------------------------------------------------------------------- kills and temps
@pytest.mark.parametrize("spec,folder", [("0000006-sigma0.1000.safetensors:1", "posthoc_ema"),  # a snapshot
                                         ("0000004-ema.safetensors:1", "checkpoints")])  # an EMA export
def test_temps_of_killed_snapshot_and_export_writes_are_removed_on_rerun(store, reference, tmp_path, spec, folder):
    args = train_args(store, tmp_path)
    killed(TRAIN, args, spec)
    rd = tmp_path / "run"
    left = temps(rd)
    assert left and all(Path(p).parent.name == folder for p in left), left
    run_train(args)
    assert temps(rd) == []
    assert_snapshots_equal(rd, reference)


def test_kill_between_export_and_pruning_is_pruned_on_rerun(store, reference, tmp_path, monkeypatch):
    import train_gen.training_loop as loop

    class Killed(BaseException):
        pass

    def prune_or_die(ckpt_dir, *args, **kwargs):
        if (Path(ckpt_dir) / "0000008.pt").exists():
            raise Killed  # the files of a kill after the export of step 8, before its pruning
        return []  # step 4: nothing to prune

    args = train_args(store, tmp_path, "--keep-last", 1)
    with monkeypatch.context() as m:
        m.setattr(loop, "prune_checkpoints", prune_or_die)
        with pytest.raises(Killed):
            run_train(args)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["0000004-ema.safetensors", "0000004.pt",
                                                       "0000008-ema.safetensors", "0000008.pt"]
    run_train(args)  # no step left: the start prunes what the killed save did not
    assert sorted(p.name for p in ckpts.iterdir()) == ["0000008-ema.safetensors", "0000008.pt"]
    assert "removed 2 old checkpoint files an interrupted save had left" in (tmp_path / "run" / "log.txt").read_text()
    assert_snapshots_equal(tmp_path / "run", reference)


def test_killed_reconstruction_leaves_a_temp_that_the_rerun_removes(tmp_path):
    theta = np.random.default_rng(2).normal(size=(129, 3)).cumsum(0)
    run = vector_run(tmp_path / "run", theta, 16)
    argv = ["--run", run, "--sweep", "0.05,0.07", "--out", tmp_path / "out"]
    killed(RECONSTRUCT, argv, "ema-*.pt:2")  # the second output
    out = tmp_path / "out"
    assert (out / "ema-sigma0.0500-0000128.pt").is_file() and not (out / "ema-sigma0.0700-0000128.pt").exists()
    (stale,) = temps(out)
    assert Path(stale).name.startswith(".ema-sigma0.0700-0000128.pt.")
    (out / ".someone-elses.pt.abcdefgh.tmp").write_bytes(b"x")  # not ours: kept
    reconstruct(argv)
    assert temps(out) == [str(out / ".someone-elses.pt.abcdefgh.tmp")]
    ref = reconstruct(["--run", run, "--sigma-rel", "0.07", "--out", tmp_path / "ref.pt"])
    assert torch.equal(torch.load(out / "ema-sigma0.0700-0000128.pt", weights_only=True)["ema"]["weight"],
                       ref["ema"]["weight"])


# ---------------------------------------------------------------------------------- bad input
def script(argv, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECONSTRUCT), *map(str, argv)], env=dict(ENV, **env),
                          capture_output=True, text=True, timeout=120)


CONFIGS = {"empty": b"", "truncated": b'{"model": "FCDM-digits", "train": {"lr"', "text": b"not json at all\n",
           "binary": bytes(range(256)), "list": b"[1, 2]", "number": b"3", "null": b"null", "string": b'"run"'}


@pytest.mark.parametrize("kind", CONFIGS)
def test_broken_config_json_is_one_message(tmp_path, kind):
    run = vector_run(tmp_path / "run", np.zeros((33, 2)), 16)
    (run / "config.json").write_bytes(CONFIGS[kind])
    with pytest.raises(UserError, match=re.escape(str(run / "config.json"))):
        reconstruct(["--run", run, "--sigma-rel", "0.1", "--out", tmp_path / "x.pt"])
    if kind == "truncated":  # the script: one line, exit 2
        proc = script(["--run", run, "--sigma-rel", "0.1", "--out", tmp_path / "x.pt"])
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "config.json is damaged" in proc.stderr
    assert not (tmp_path / "x.pt").exists()


BAD_FLAGS = [("--sigma-rel", v) for v in ("0", "-0.1", "0.29", "nan", "inf", "abc")] + \
            [("--sweep", v) for v in ("0.05,0.5", ",", "0.05,nan", "0.05;0.1")] + \
            [("--ema-decay", v) for v in ("0", "1", "1.5", "nan", "-inf", "0.99,1")] + \
            [("--at-step", v) for v in ("0", "-4", "1.5", "x")]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_bad_flags_exit_2(tmp_path, capsys, flag, value):
    argv = ["--run", tmp_path, "--out", tmp_path / "x.pt", flag, value]
    if flag == "--at-step":
        argv += ["--sigma-rel", "0.1"]
    with pytest.raises(SystemExit) as e:
        reconstruct(argv)
    assert e.value.code == 2
    assert f"argument {flag}: expected" in capsys.readouterr().err


def test_full_disk_and_unwritable_output_are_one_message(tmp_path):
    theta = np.random.default_rng(3).normal(size=(65, 3)).cumsum(0)
    run = vector_run(tmp_path / "run", theta, 16)
    out = tmp_path / "out"
    proc = script(["--run", run, "--sweep", "0.05,0.07", "--out", out], FCDM_FAULT_NOSPACE_AT="ema-*.pt:2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no space left on device" in proc.stderr and "ema-sigma0.0700-0000064.pt" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ema-sigma0.0500-0000064.pt"]  # finished, complete
    torch.load(out / "ema-sigma0.0500-0000064.pt", weights_only=True)
    # a read-only folder (simulated: the tests may run as root, who writes anywhere)
    code = ("import errno, tempfile, sys\n"
            "def refuse(*a, **k):\n"
            "    raise OSError(errno.EROFS, 'Read-only file system', k.get('dir'))\n"
            "tempfile.mkstemp = refuse\n"
            "from fcdm_common.cli import run_main\n"
            "from train_gen.reconstruct_ema import main\n"
            "run_main(main, sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", code, "--run", str(run), "--sigma-rel", "0.1", "--out",
                           str(tmp_path / "ro" / "x.pt")], env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "read-only" in proc.stderr, proc.stderr
    assert list((tmp_path / "ro").iterdir()) == []
    # --out below a file, or a folder where one file is wanted: one message
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        reconstruct(["--run", run, "--sigma-rel", "0.1", "--out", tmp_path / "file" / "x.pt"])
    with pytest.raises(UserError, match="is a folder"):
        reconstruct(["--run", run, "--sigma-rel", "0.1", "--out", out])
