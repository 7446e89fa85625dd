"""Preemption: a checkpoint on a cluster's warning signal, then a status a requeue script can test.

SLURM warns a job before killing it (at the time limit, or on preemption with a grace time):
`--signal=USR1@300` sends SIGUSR1 300 s ahead, and SIGTERM arrives KillWait seconds before SIGKILL.
While training, `PreemptionWatch` turns SIGTERM and SIGUSR1 into a request that the loop honours at
the next step boundary: every process finishes the current optimizer step, they agree on the step,
write one checkpoint (the usual collective one, so the resume is bitwise exact), the main process
writes `<run>/preempted.json` ({"step", "signal", "time"}), and every process exits with
`PREEMPTED_STATUS` (75, EX_TEMPFAIL: "try again"). Rerunning the same command resumes; the marker is
removed when it does. docs/training.md shows the SLURM lines.

Agreement: a signal may reach the processes at slightly different times, so with several processes
they compare flags (one all-reduce of one number) every `POLL_EVERY` steps, always at the same steps;
with one process the flag is read after every step (no collective).

Sampling (train_gen/sample_ddp.py) needs no checkpoint: every PNG is written atomically and a rerun keeps
the finished ones. `SignalStop` turns the same signals into a `Preempted` exception raised at once (only
the batch being computed is lost; the writes of a finished batch complete first), and the program exits
with the same `PREEMPTED_STATUS` after one line.
"""
from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from fcdm_common.io import atomic_write_text

PREEMPTED_STATUS = 75  # exit status after a preemption checkpoint (EX_TEMPFAIL of sysexits.h)
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")  # the warnings of SLURM (and of most schedulers)
POLL_EVERY = 10  # steps between the flag comparisons of a multi-process run
MARKER = "preempted.json"  # in the run folder: the step of the preemption checkpoint


class SignalHandlers:
    """A context manager that routes PREEMPT_SIGNALS to `self._handle` inside its block; the previous handlers
    come back on exit. Outside the main thread (e.g. a test harness) no handler can be set, and none is."""
    _previous: dict

    def __enter__(self):
        self._previous = {}
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: no handler
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError


class PreemptionWatch(SignalHandlers):
    """Catch PREEMPT_SIGNALS while training (a context manager: the previous handlers come back on exit).

    `due(step)` is True once every process agrees that a signal arrived; all processes call it after
    every step, in step order."""

    def __init__(self, world_size: int, device: torch.device, poll_every: int = POLL_EVERY):
        self.world_size = world_size  # processes of the run
        self.device = device  # where the flag lives for the all-reduce (NCCL needs a CUDA tensor)
        self.poll_every = poll_every  # steps between comparisons when world_size > 1
        self.received: Optional[str] = None  # name of the first signal caught, or None

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def due(self, step: int) -> bool:
        """After `step`: should the run checkpoint and stop now? Identical on every process."""
        if self.world_size == 1:
            return self.received is not None
        if step % self.poll_every:
            return False
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


class Preempted(BaseException):
    """Raised by `SignalStop` when a preemption signal arrives. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way (a library's fallback, a retry) swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name  # e.g. "SIGTERM"


class SignalStop(SignalHandlers):
    """PREEMPT_SIGNALS stop a program whose saved state is consistent at every moment (each file written
    atomically, a rerun keeps what is finished) where it is: the handler raises `Preempted` at once, so the
    process is gone long before the cluster's SIGKILL, losing only the work in progress. Inside `hold()`
    (writing a finished batch's files) the stop waits for the end of the block instead. Only the first signal
    raises: a second one (SLURM and torchrun both signal a worker) cannot interrupt the exit it started.
    A context manager: the previous handlers come back on exit."""

    def __init__(self):
        self.received: Optional[str] = None  # name of the first signal caught, or None
        self._raised = False
        self._holding = 0

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
        if not self._holding:
            self.check()

    def check(self) -> None:
        """Raise `Preempted` if a signal arrived and nothing raised it yet (it came inside `hold()`, or the
        handler ran where Python drops exceptions, e.g. a finalizer): call it at the safe points."""
        if self.received is not None and not self._raised:
            self._raised = True
            raise Preempted(self.received)

    @contextlib.contextmanager
    def hold(self):
        """A block a signal does not interrupt (writing files that belong together); the stop follows it."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if not self._holding:
            self.check()


def write_marker(run_dir: Path, step: int, received: Optional[str]) -> Path:
    """Main process: `<run>/preempted.json`, for requeue scripts and for the log of the resumed run."""
    path = Path(run_dir) / MARKER
    atomic_write_text(path, json.dumps({"step": int(step), "signal": received or "another process's",
                                        "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    return path


def take_marker(run_dir: Path) -> Optional[dict]:
    """Main process, when a run starts: remove `<run>/preempted.json` and return what it held (None when
    there is none; {} when it was unreadable)."""
    path = Path(run_dir) / MARKER
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        info = info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        info = {}
    path.unlink(missing_ok=True)
    return info
