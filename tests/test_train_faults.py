"""Training under faults, round three: flag values that used to train garbage, a NaN item named in the log,
a full disk / read-only folder / Ctrl-C as one message, and preemption (SIGTERM or SIGUSR1: checkpoint,
marker, exit status 75, bitwise resume) with one and two processes.

Tiny runs on the 3x8x8 pixel store of test_train.py; signalled runs are subprocesses.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from fcdm_common.cli import run_main
from helpers import kill_processes_with_env, one_thread, torchrun_workers  # noqa: F401  (one_thread: fixture)
from test_train import ENV, TINY, TRAIN, assert_same_state, make_store, metrics, run_train
from train_gen.preemption import MARKER, PREEMPTED_STATUS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "tiny.zarr")


def exit_of(argv, capsys) -> tuple[int, str]:
    """Run train.py's main in-process through run_main: (exit status, stderr)."""
    from train_gen.train import main

    with pytest.raises(SystemExit) as e:
        run_main(main, [str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------------------- flag ranges
@pytest.mark.parametrize("flag,value", [
    ("--ema-decay", "nan"), ("--ema-decay", "2"), ("--ema-decay", "-1"),
    ("--cfg-scale", "nan"), ("--cfg-scale", "inf"), ("--cfg-scale", "-1"),
    ("--grad-clip", "-1"), ("--grad-clip", "nan"), ("--weight-decay", "nan"), ("--lr", "inf"),
    ("--seed", "-1"), ("--seed", str(2**64)), ("--grid-seed", "-5"),
    ("--exp-name", ".."), ("--exp-name", "../x"), ("--exp-name", "/tmp/abs"), ("--exp-name", "x" * 300),
])
def test_bad_flag_values_exit_2_before_anything_is_written(store, tmp_path, capsys, flag, value):
    code, err = exit_of(TINY + ["--zarr-path", store, "--results-dir", tmp_path / "r", "--max-train-steps", 2,
                                flag, value], capsys)
    assert code == 2 and flag in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra,message", [
    (["--cfg-channels", "99"], "--cfg-channels 99 is out of range"),
    (["--cfg-channels", "two"], "--cfg-channels must be 'all' or a channel count"),
    (["--grid-steps", "5000"], "--grid-steps 5000 exceeds the run's 1000 diffusion steps"),
])
def test_grid_flags_checked_against_model_and_data(store, tmp_path, capsys, extra, message):
    code, err = exit_of(TINY + ["--zarr-path", store, "--results-dir", tmp_path / "r", "--max-train-steps", 2]
                        + extra, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_grid_steps_of_flow_models_are_not_bounded(store, tmp_path):
    run_train(TINY + ["--zarr-path", store, "--results-dir", tmp_path, "--exp-name", "f", "--objective", "flow",
                      "--max-train-steps", 1, "--sample-every", 1, "--grid-steps", 1001, "--grid-cols", 1,
                      "--grid-sampler", "euler", "--cfg-channels", "3"])
    assert (tmp_path / "f" / "samples" / "0000001.png").is_file()


# ---------------------------------------------------------------------------------- a NaN item is named
def test_nan_item_is_named_once_in_the_log(tmp_path):
    bad = make_store(tmp_path / "nan.zarr", nan_items=(5,))
    run_train(TINY + ["--zarr-path", bad, "--results-dir", tmp_path, "--exp-name", "n", "--max-train-steps", 12,
                      "--log-every", 2, "--ckpt-every", 12, "--sample-every", 0, "--hflip", "false"])
    log = (tmp_path / "n" / "log.txt").read_text()
    named = [line for line in log.splitlines() if "hold NaN or inf" in line]
    assert len(named) == 1 and "dataset item(s) 5 of" in named[0], log
    skipped = sum(r["skipped_steps"] for r in metrics(tmp_path / "n"))
    assert skipped == 3  # 12 steps of 16 out of 64 items: item 5 is in one batch per epoch (3 epochs)


# ---------------------------------------------------------------------------------- storage errors, Ctrl-C
def test_full_disk_at_the_checkpoint_is_one_message_and_keeps_the_rest(store, tmp_path):
    args = TINY + ["--zarr-path", store, "--results-dir", tmp_path, "--exp-name", "d", "--max-train-steps", 4,
                   "--ckpt-every", 2, "--sample-every", 0, "--log-every", 2]
    env = dict(ENV, FCDM_FAULT_NOSPACE_AT="0000004.pt:1")  # the disk fills up at the second checkpoint
    proc = subprocess.run([sys.executable, TRAIN, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and proc.stderr.rstrip().endswith(err[0]) and "Traceback" not in proc.stderr
    assert "no space left on device" in err[0] and "0000004.pt" in err[0], proc.stderr
    ckpts = sorted(p.name for p in (tmp_path / "d" / "checkpoints").iterdir())
    assert ckpts == ["0000002-ema.safetensors", "0000002.pt"]  # the earlier checkpoint is kept; no temp file left
    run_train(args)  # space again: the same command finishes
    assert (tmp_path / "d" / "checkpoints" / "0000004.pt").is_file()


def test_torch_save_on_a_full_disk_says_so(tmp_path, monkeypatch):
    from fcdm_common import io

    def failing_save(obj, f):
        Path(f).write_bytes(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1152 vs 1048")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(io, "LOW_SPACE_BYTES", 1 << 62)  # every disk is "nearly full"
    with pytest.raises(OSError) as e:
        io.atomic_torch_save({"a": 1}, tmp_path / "c.pt")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(io, "LOW_SPACE_BYTES", 0)  # plenty of space: torch's own error stays
    with pytest.raises(RuntimeError, match="unexpected pos"):
        io.atomic_torch_save({"a": 1}, tmp_path / "c.pt")


def test_read_only_results_folder_is_one_message(store, tmp_path, capsys, monkeypatch):
    results = tmp_path / "ro"
    results.mkdir()
    if os.geteuid() != 0:  # a real read-only folder (root writes anyway)
        results.chmod(0o555)
    else:  # as root: the file system refuses every write below `results`, as a read-only mount would
        real_mkdir = Path.mkdir

        def mkdir(self, *a, **k):
            if str(self).startswith(str(results)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        code, err = exit_of(TINY + ["--zarr-path", store, "--results-dir", results, "--max-train-steps", 2,
                                    "--sample-every", 0], capsys)
    finally:
        results.chmod(0o755)
    assert code == 2 and err.count("\n") == 1 and "permission denied" in err and str(results) in err, err


def test_storage_errors_and_ctrl_c_in_run_main(capsys):
    def raises(exc):
        def main(argv):
            raise exc
        return main

    for exc, status, text in [
        (OSError(errno.ENOSPC, "No space left on device", "/x/ckpt.pt"), 2, "cannot write /x/ckpt.pt: no space left"),
        (OSError(errno.EROFS, "Read-only file system", "/x"), 2, "read-only"),
        (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
    ]:
        with pytest.raises(SystemExit) as e:
            run_main(raises(exc), [])
        err = capsys.readouterr().err
        assert e.value.code == status and text in err and "Traceback" not in err, err
    with pytest.raises(FileNotFoundError):  # other OS errors are bugs or missing inputs: not swallowed
        run_main(raises(FileNotFoundError(errno.ENOENT, "No such file", "/y")), [])


def long_run_args(store, results, name) -> list:
    """A run far longer than any test waits, logging every 5 steps, no checkpoint before the end."""
    return TINY + ["--zarr-path", store, "--results-dir", results, "--exp-name", name, "--max-train-steps", 100000,
                   "--log-every", 5, "--ckpt-every", 100000, "--sample-every", 0]


def signal_after_first_log(args, run_folder: Path, sig) -> subprocess.Popen:
    """Start train.py with `args`, send `sig` once its first metrics are logged, and wait for it to exit;
    the finished process (returncode, and stderr in `.err`)."""
    proc = subprocess.Popen([sys.executable, TRAIN, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_folder / "metrics.jsonl").is_file(), proc)
        proc.send_signal(sig)
        _, proc.err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc


def test_ctrl_c_during_training_prints_one_line(store, tmp_path):
    proc = signal_after_first_log(long_run_args(store, tmp_path, "c"), tmp_path / "c", signal.SIGINT)
    err = proc.err
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted (Ctrl-C)" in err, err[-2000:]


# ---------------------------------------------------------------------------------- preemption
def wait_for(condition, proc, timeout=120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before it was signalled: " + str(proc.communicate()[1])[-2000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_checkpoints_exits_75_and_the_rerun_resumes_bitwise(store, tmp_path):
    args = long_run_args(store, tmp_path, "p")
    proc = signal_after_first_log(args, tmp_path / "p", signal.SIGTERM)
    assert proc.returncode == PREEMPTED_STATUS, proc.err[-2000:]
    rd = tmp_path / "p"
    marker = json.loads((rd / MARKER).read_text())
    step = marker["step"]
    assert marker["signal"] == "SIGTERM" and 5 <= step < 100000
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == [f"{step:07d}-ema.safetensors", f"{step:07d}.pt"]
    assert f"checkpoint of step {step} saved; exiting with status 75" in (rd / "log.txt").read_text()
    # the same command (here up to step + 3) resumes: equal to a run that was never interrupted
    resume_args = [str(a) for a in args]
    resume_args[resume_args.index("--max-train-steps") + 1] = str(step + 3)
    run_train(resume_args)
    assert not (rd / MARKER).exists()
    assert f"resuming after a preemption (checkpoint of step {step}, signal SIGTERM)" in (rd / "log.txt").read_text()
    straight = args[:]
    straight[straight.index("--exp-name") + 1] = "s"
    straight[straight.index("--max-train-steps") + 1] = step + 3
    run_train(straight)
    final = f"{step + 3:07d}.pt"
    assert_same_state(torch.load(tmp_path / "s" / "checkpoints" / final, weights_only=True),
                      torch.load(rd / "checkpoints" / final, weights_only=True))


def test_sigusr1_to_one_of_two_processes_stops_both_at_one_step(store, tmp_path):
    """SLURM may signal the processes at slightly different times: they agree on the step. Only rank 1 is
    signalled here; both write the one checkpoint of that step and exit 75 (torchrun then reports them)."""
    tag = uuid.uuid4().hex
    env = dict(ENV, FCDM_TEST_TORCHRUN=tag)
    args = long_run_args(store, tmp_path, "p2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
           *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "p2" / "metrics.jsonl").is_file(), proc, timeout=180)
        os.kill(torchrun_workers(tag, "train.py")[1], signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_processes_with_env("FCDM_TEST_TORCHRUN", tag)
        proc.wait()
    rd = tmp_path / "p2"
    assert proc.returncode != 0 and f"exitcode  : {PREEMPTED_STATUS}" in err, err[-3000:]
    step = json.loads((rd / MARKER).read_text())["step"]
    assert step % 10 == 0  # multi-process runs compare their flags every 10 steps
    ckpt = torch.load(rd / "checkpoints" / f"{step:07d}.pt", weights_only=True)
    assert ckpt["step"] == step and len(ckpt["rng_per_rank"]) == 2
    assert not [p for p in rd.rglob("*.tmp")]
    log = (rd / "log.txt").read_text()
    assert f"preempted (signal on another process): checkpoint of step {step} saved" in log, log[-2000:]
