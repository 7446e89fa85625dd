"""How runs stop when something outside them stops them: one line each, no traceback, and a rerun resumes.

- A process of a 2-process torchrun training killed with SIGKILL: the survivor's collective fails (gloo:
  "Connection closed by peer"); it prints one line naming the dead rank and exits non-zero.
- sample_ddp.py given SIGTERM (a cluster's warning): one line with the images kept, exit status 75 (training's
  PREEMPTED_STATUS), and the rerun gives the archive of an uninterrupted run byte for byte; under torchrun every
  rank stops and rank 0 alone prints the line.

References: the collective errors torch raises (messages of gloo's tcp transport, NCCL and the c10d store), the
tiny training run of test_train.py, the tiny sampling checkpoint of test_sample_ddp.py.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fcdm_common.cli import PEER_LOST_STATUS, peer_lost_message, run_main
from helpers import kill_processes_with_env, one_thread, torchrun_workers  # noqa: F401  (one_thread: fixture)
from test_sample_ddp import make_checkpoint, run_inprocess, the_archive
from test_train import ENV, TRAIN, make_store
from test_train_faults import long_run_args, wait_for
from train_gen.preemption import PREEMPTED_STATUS, Preempted, SignalStop

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
SAMPLE_DDP = REPO / "train_gen" / "sample_ddp.py"
GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
               "[127.0.0.1]:31953. This is typically caused by a remote worker crashing. Check the logs of the remote "
               "worker before reporting an error. GLHF!")


def torchrun(script, args, tag: str, log_dir: Path) -> subprocess.Popen:
    """Start `script` under a 2-process torchrun whose workers' stderr goes to files under `log_dir`
    (`worker_stderr`), so each process's own output can be told from the launcher's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(log_dir), "--redirects", "2", str(script), *map(str, args)]
    return subprocess.Popen(cmd, env=dict(ENV, FCDM_TEST_TORCHRUN=tag), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, tag: str, timeout: float = 120) -> str:
    """Wait for a torchrun started by `torchrun`; its stderr. Every process of the run is gone afterwards."""
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_processes_with_env("FCDM_TEST_TORCHRUN", tag)
        proc.wait()
    return err


def worker_stderr(log_dir: Path, rank: int) -> str:
    (path,) = Path(log_dir).glob(f"*/attempt_0/{rank}/stderr.log")
    return path.read_text(errors="replace")


# ---------------------------------------------------------------------------------- a dead peer
@pytest.mark.parametrize("exc,world,rank,expected", [
    (RuntimeError(GLOO_CLOSED), "2", "0", "the process of rank 1 died (connection closed by peer)"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [10.0.0.2]:7001: "
                  "Connection reset by peer"), "2", "1", "the process of rank 0 died (connection reset by peer)"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:589] Write error [10.0.0.2]:7001: Broken pipe"),
     "4", "2", "another process of this run died (broken pipe)"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for "
                  "recv operation to complete"), "4", "0", "another process of this run stopped answering"),
    (dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1333, remote process exited or there was a network "
                           "error, NCCL version 2.18.6\nncclRemoteError: A call failed possibly due to a network "
                           "error or a remote process exiting prematurely."), "8", "3",
     "another process of this run died (remote process exited)"),
    (dist.DistBackendError("NCCL communicator was aborted on rank 3."), "8", "3",
     "another process of this run died (communicator was aborted)"),
    (dist.DistBackendError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, "
                           "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600046 milliseconds "
                           "before timing out."), "2", "0", "the process of rank 1 stopped answering"),
    (dist.DistNetworkError("Connection reset by peer"), "2", "1", "the process of rank 0 died"),
])
def test_collective_failures_of_a_dead_peer_are_recognised(monkeypatch, exc, world, rank, expected):
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", rank)
    message = peer_lost_message(exc)
    assert message is not None and message.startswith(expected), message
    assert message.endswith("rerun the same command to resume from the last checkpoint") and "\n" not in message
    assert peer_lost_message(exc, resume_from="the images already written").endswith(
        "resume from the images already written")


@pytest.mark.parametrize("exc", [
    RuntimeError("Connection reset by peer"),  # not from torch.distributed: an ordinary error, shown as it is
    RuntimeError("CUDA error: the launch timed out and was terminated"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x4)"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    BrokenPipeError(errno.EPIPE, "Broken pipe"),
    dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1333, invalid usage"),
    dist.DistNetworkError("The client socket has timed out after 600s while trying to connect to (node7, 29500)."),
    dist.DistStoreError("Timed out after 901 seconds waiting for clients. 1/2 clients joined."),
    ValueError("gloo: connection closed by peer"),
])
def test_ordinary_errors_are_not_taken_for_a_dead_peer(monkeypatch, exc):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert peer_lost_message(exc) is None


def test_run_main_prints_one_line_for_a_dead_peer(monkeypatch, capsys):
    def main(argv):
        raise RuntimeError(GLOO_CLOSED)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            run_main(main, [])
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # torchrun's SIGTERM cannot cut the exit short
    finally:
        signal.signal(signal.SIGTERM, handler)
    err = capsys.readouterr().err
    assert e.value.code == PEER_LOST_STATUS != 0
    assert err.splitlines() == ["error: the process of rank 1 died (connection closed by peer), so rank 0 stops too; "
                                "rerun the same command to resume from the last checkpoint"], err
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RuntimeError):  # one process: no peer, the error is shown as it is
        run_main(main, [])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "tiny.zarr")


def test_sigkill_of_one_training_process_leaves_one_line_on_the_other(store, tmp_path):
    tag, logs = uuid.uuid4().hex, tmp_path / "logs"
    proc = torchrun(TRAIN, long_run_args(store, tmp_path, "k"), tag, logs)
    try:
        wait_for(lambda: (tmp_path / "k" / "metrics.jsonl").is_file(), proc, timeout=120)
        os.kill(torchrun_workers(tag, "train.py")[1], signal.SIGKILL)
    finally:
        err = finish(proc, tag)
    assert proc.returncode != 0 and "exitcode  : -9" in err, err[-3000:]
    survivor = worker_stderr(logs, 0)
    assert "Traceback" not in survivor and "GLHF" not in survivor, survivor[-3000:]
    errors = [line for line in survivor.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(  # gloo says either, depending on where the kill caught the transfer
        r"error: the process of rank 1 died \(connection (closed by|reset by) peer\), so rank 0 stops too; "
        r"rerun the same command to resume from the last checkpoint", errors[0]), survivor[-3000:]


# ---------------------------------------------------------------------------------- sample_ddp.py on SIGTERM
SAMPLE_ARGS = ["--num-fid-samples", 24, "--per-proc-batch-size", 2, "--num-sampling-steps", 10, "--forward-batch", 2,
               "--global-seed", 5]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "flow.pt", "flow", seed=1)


@pytest.fixture(scope="module")
def straight(ckpt, tmp_path_factory):
    """The archive of an uninterrupted run (one thread: module fixtures start before `one_thread`)."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_inprocess(["--ckpt", ckpt, "--sample-dir", out, *SAMPLE_ARGS])
    finally:
        torch.set_num_threads(threads)
    return the_archive(out)


def test_signal_stop_raises_at_once_but_not_inside_hold_and_only_once():
    previous = signal.getsignal(signal.SIGTERM)
    with SignalStop() as stop:
        with pytest.raises(Preempted) as e:
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs (and raises) before the next line
            pytest.fail("not stopped")
        assert e.value.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal (SLURM's and torchrun's): the exit goes on
        stop.check()
    assert signal.getsignal(signal.SIGTERM) == previous
    with SignalStop() as stop:
        written = []
        with pytest.raises(Preempted):
            with stop.hold():
                os.kill(os.getpid(), signal.SIGTERM)
                written.append("the rest of the batch")
            pytest.fail("not stopped after the block")
        assert written == ["the rest of the batch"] and stop.received == "SIGTERM"


def pngs(sample_dir: Path) -> list:
    return sorted(Path(sample_dir).glob("*/[0-9]*.png"))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_sigterm_stops_sampling_with_one_line_and_status_75_and_the_rerun_completes(ckpt, straight, tmp_path, sig):
    args = ["--ckpt", ckpt, "--sample-dir", tmp_path, *SAMPLE_ARGS]
    proc = subprocess.Popen([sys.executable, SAMPLE_DDP, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(pngs(tmp_path)) >= 3, proc, timeout=120)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = len(pngs(tmp_path))
    assert proc.returncode == PREEMPTED_STATUS, err[-3000:]
    assert "Traceback" not in err and 3 <= kept < 24, err[-3000:]
    assert not list(tmp_path.rglob("*.tmp"))  # stopped between two writes, not inside one
    folder = pngs(tmp_path)[0].parent
    lines = [line for line in err.splitlines() if line.startswith("preempted")]
    assert lines == [f"preempted ({sig}): {kept} of 24 images kept in {folder}; exiting with status 75; "
                     "rerun the same command to resume"], err[-3000:]
    run_inprocess(args)  # the same command: samples the rest
    assert the_archive(tmp_path).read_bytes() == straight.read_bytes()


def test_sigterm_to_every_torchrun_worker_stops_each_and_rank_0_says_it(ckpt, straight, tmp_path):
    tag, logs = uuid.uuid4().hex, tmp_path / "logs"
    args = ["--ckpt", ckpt, "--sample-dir", tmp_path / "s", *SAMPLE_ARGS]
    proc = torchrun(SAMPLE_DDP, args, tag, logs)
    try:
        wait_for(lambda: len(pngs(tmp_path / "s")) >= 4, proc, timeout=120)
        for pid in torchrun_workers(tag, "sample_ddp.py").values():  # as a cluster does: every process is signalled
            os.kill(pid, signal.SIGTERM)
    finally:
        err = finish(proc, tag)
    assert f"exitcode  : {PREEMPTED_STATUS}" in err, err[-3000:]
    said = [[line for line in worker_stderr(logs, r).splitlines() if line.startswith("preempted")] for r in (0, 1)]
    assert len(said[0]) == 1 and said[1] == [], said
    assert " images kept in " in said[0][0] and said[0][0].endswith("rerun the same command to resume"), said
    for r in (0, 1):
        assert "Traceback" not in worker_stderr(logs, r), worker_stderr(logs, r)[-3000:]
    assert len(pngs(tmp_path / "s")) < 24
    run_inprocess(args)
    assert the_archive(tmp_path / "s").read_bytes() == straight.read_bytes()
