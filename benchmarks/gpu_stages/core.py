"""The GPU suite's runner, the helpers its steps share, and the registry of steps and workers.

`Suite` owns one run: the budget (a step starts only with its minimum left, a command is stopped at the budget),
the records (one JSON line per step in OUT/gpu_results.jsonl, flushed as each step ends so that a timeout of the
whole call keeps what was measured), the log, and every command, each in its own process group with an environment
tag so that what it leaves running is found and killed. The stage modules next to this one register their steps
with `@stage` and the code they run in a process of their own with `@worker`; the package's __init__ orders them."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

from benchmarks.gpu_stages.sizes import Sizes
from fcdm_common.processes import kill_processes_with_env

REPO = Path(__file__).resolve().parents[2]
# the entry point, which workers run as (`--worker NAME`): not resolved, so that commands name it as the shell
# script does (the package is imported from the same root as the script)
SUITE_PY = Path(__file__).parents[1] / "gpu_suite.py"
BENCH_MODEL = REPO / "benchmarks" / "bench_model.py"
NOMINAL_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the vendor's figure
MEASURED_PEAK_TFLOPS = 790.0  # what an 8192^3 bf16 matmul reached on this project's H200 (used if env fails)
RUN_TAG = "FCDM_GPU_SUITE_RUN"  # environment tag of every command the suite runs (to find what it left behind)


# ---------------------------------------------------------------------------------------------- the registry
@dataclasses.dataclass(frozen=True)
class Stage:
    """One step as its module registers it: what main dispatches to, and the budget it needs to start."""
    name: str
    fn: Callable[..., dict]  # fn(suite) -> the step's record; fn(suite, *options(args)) when `options` is set
    min_s: float  # a step starts only with this much budget left (the dry run starts every step)
    options: Optional[Callable[[argparse.Namespace], tuple]] = None  # the suite's own flags the step takes

    def bind(self, args: argparse.Namespace) -> Callable[["Suite"], dict]:
        """The step as Suite.step calls it; its options are read from `args` when it runs (a bad one fails the
        step, not the suite)."""
        if self.options is None:
            return self.fn
        return lambda suite: self.fn(suite, *self.options(args))


STAGES: Dict[str, Stage] = {}  # step name -> Stage, in the order the modules were imported (STEP_ORDER orders them)
WORKERS: Dict[str, Callable[[argparse.Namespace], dict]] = {}  # --worker NAME -> the function run in its process


def stage(name: str, min_s: float, options: Optional[Callable[[argparse.Namespace], tuple]] = None):
    """Register the decorated function as the step `name` (its record is the dict it returns)."""
    def add(fn):
        if name in STAGES:
            raise ValueError(f"step {name!r} registered twice: {STAGES[name].fn.__module__} and {fn.__module__}")
        STAGES[name] = Stage(name, fn, min_s, options)
        return fn
    return add


def worker(name: str):
    """Register the decorated function as `gpu_suite.py --worker NAME`: code that needs torch or a CUDA context
    of its own runs in a subprocess of the suite (stopped at the budget like any command); its answer is the
    JSON written to --json."""
    def add(fn):
        if name in WORKERS:
            raise ValueError(f"worker {name!r} registered twice: {WORKERS[name].__module__} and {fn.__module__}")
        WORKERS[name] = fn
        return fn
    return add


# ---------------------------------------------------------------------------------------------- the runner
class Skip(Exception):
    """A step that cannot run here (recorded as skipped with this reason)."""


class Suite:
    """One run of the suite: its budget, its records and log in `out`, and the commands its steps run."""

    def __init__(self, out: Path, budget_s: float, sizes: Sizes, dry_run: bool):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = out / "gpu_results.jsonl"
        self.log_path = out / "gpu_log.txt"
        self.budget_s = budget_s
        self.sizes = sizes
        self.dry_run = dry_run
        self.t0 = time.perf_counter()
        self.work = Path(tempfile.mkdtemp(prefix="fcdm_gpu_suite_"))  # JSON reports of the sub-runs
        self.peak_tflops = MEASURED_PEAK_TFLOPS
        self._lock = threading.Lock()
        self.active: Optional[subprocess.Popen] = None  # the command running now
        self.statuses: dict = {}  # step -> ok / failed / timeout / skipped

    def _terminate(self, signum, frame):
        """Stopped from outside: stop the running command too, then exit (the results so far are on disk)."""
        if self.active is not None and self.active.poll() is None:
            os.killpg(self.active.pid, signal.SIGKILL)
        self.log("suite stopped by SIGTERM")
        raise SystemExit(128 + signum)

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def log(self, msg: str) -> None:
        with self._lock:
            print(msg, flush=True)
            with open(self.log_path, "a") as fh:
                fh.write(msg + "\n")

    def record(self, rec: dict) -> None:
        """Append one line and flush it to disk: the file is complete up to the last finished step."""
        line = json.dumps(rec, default=str) + "\n"
        with open(self.results, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def run(self, cmd: List[str], timeout_s: Optional[float] = None, env: Optional[dict] = None) -> dict:
        """Run a command (own process group), its output streamed into the log; stopped at `timeout_s`
        or at the budget, whichever comes first. Returns rc, timed_out, seconds and the output's tail."""
        limit = max(1.0, self.remaining() - 2.0)
        if timeout_s is not None:
            limit = min(limit, timeout_s)
        self.log("$ " + " ".join(shlex.quote(str(c)) for c in cmd) + f"   [limit {limit:.0f}s]")
        t = time.perf_counter()
        cpu0 = _children_cpu_s()
        tag = uuid.uuid4().hex
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, env={**os.environ, **(env or {}), RUN_TAG: tag}, process_group=0, bufsize=1)
        # its own process group (not a new session: a machine that ends the suite's session ends it too),
        # so a time limit stops the command with everything it started; torchrun's workers live in sessions
        # of their own and are found by the environment tag instead
        self.active = proc
        tail: List[str] = []

        def pump():
            for line in proc.stdout:
                line = line.rstrip("\n")
                if "\r" in line:  # progress bars: keep their last state only
                    line = line.split("\r")[-1]
                self.log("  " + line)
                tail.append(line)
                del tail[:-60]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
        self.active = None
        orphans = kill_processes_with_env(RUN_TAG, tag)  # e.g. a torchrun worker of a launcher that was stopped
        if orphans:
            self.log(f"  killed {len(orphans)} process(es) the command left running: {orphans}")
        sec, cpu = time.perf_counter() - t, _children_cpu_s() - cpu0
        self.log(f"  -> rc {proc.returncode}{' (stopped: time limit)' if timed_out else ''} after {sec:.1f}s "
                 f"({cpu:.1f} CPU-s)")
        return {"rc": proc.returncode, "timed_out": timed_out, "seconds": round(sec, 2), "cpu_s": round(cpu, 2),
                "tail": "\n".join(tail[-25:]), "orphans_killed": len(orphans)}

    def step(self, name: str, fn: Callable[["Suite"], dict], min_s: float) -> None:
        rem = self.remaining()
        if rem < min_s:
            self.log(f"== {name}: skipped ({rem:.0f}s of the budget left, the step needs about {min_s:.0f}s)")
            self.record({"step": name, "status": "skipped", "reason": f"budget: {rem:.0f}s left < {min_s:.0f}s",
                         "elapsed_s": 0.0})
            self.statuses[name] = "skipped"
            return
        self.log(f"== {name} (budget left {rem:.0f}s)")
        t = time.perf_counter()
        try:
            data = fn(self)
            status = data.pop("status", "ok")
            if status == "ok" and _has_failed_part(data):  # e.g. one dtype of the forward step
                status = "failed"
        except Skip as e:
            data, status = {"reason": str(e)}, "skipped"
        except Exception as e:  # a broken step must not stop the others
            data, status = {"error": f"{type(e).__name__}: {e}"}, "failed"
        elapsed = time.perf_counter() - t
        self.statuses[name] = status
        self.record({"step": name, "status": status, "elapsed_s": round(elapsed, 2), **data})
        self.log(f"== {name}: {status} in {elapsed:.1f}s (total {time.perf_counter() - self.t0:.1f}s)")

    def summary(self) -> str:
        """One line: how many steps were ok, failed (timeouts included) and skipped, naming the bad ones."""
        bad = [n for n, st in self.statuses.items() if st not in ("ok", "skipped")]
        skipped = [n for n, st in self.statuses.items() if st == "skipped"]
        ok = len(self.statuses) - len(bad) - len(skipped)
        return (f"{ok} ok, {len(bad)} failed{' (' + ', '.join(bad) + ')' if bad else ''}, {len(skipped)} skipped"
                f"{' (' + ', '.join(skipped) + ')' if skipped else ''}")

    def failed(self) -> bool:
        return any(st not in ("ok", "skipped") for st in self.statuses.values())

    # -- helpers shared by the steps
    def model_args(self) -> List[str]:
        s = self.sizes
        return ["--model", s.model] + (["--model-kwargs", s.model_kwargs] if s.model_kwargs else [])

    def bench(self, tag: str, args: List[str], timeout_s: Optional[float] = None, warmup: Optional[int] = None,
              repeats: Optional[int] = None, env: Optional[dict] = None) -> dict:
        """benchmarks/bench_model.py with `args`; returns its JSON report (plus the run's rc/tail).
        `warmup`/`repeats` override the sizes' counts (long measurements: one timed loop)."""
        path = self.work / f"{tag}.json"
        warmup = self.sizes.warmup if warmup is None else warmup
        repeats = self.sizes.repeats if repeats is None else repeats
        cmd = [sys.executable, BENCH_MODEL, *args, "--device", self.sizes.device, "--warmup", warmup,
               "--repeats", repeats, "--json", path]
        res = self.run(cmd, timeout_s, env=env)
        report = json.loads(path.read_text()) if res["rc"] == 0 and path.is_file() else None
        return {"run": res, "report": report, "command": " ".join(shlex.quote(str(c)) for c in cmd)}


def _has_failed_part(obj) -> bool:
    """Whether a step's nested result holds a part that failed or timed out (skipped parts are fine)."""
    if isinstance(obj, dict):
        return obj.get("status") in ("failed", "timeout") or any(_has_failed_part(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_failed_part(v) for v in obj)
    return False


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def out_of_memory(run: dict) -> bool:
    """Whether a command's output tail (Suite.run's answer) says it ran out of memory: the one failure that a
    smaller batch can cure."""
    return bool(re.search(r"OutOfMemoryError|out of memory", run["tail"]))


def bench_summary(report: dict, suite: Suite) -> dict:
    """The rows of a bench_model report that matter here, with MFU against both peaks."""
    rows = {}
    for label, r in report["results"].items():
        row = {k: r[k] for k in ("train_steps_per_s", "train_img_per_s", "train_tflops", "train_peak_mem_gib",
                                 "forward_img_per_s", "forward_tflops", "forward_peak_mem_gib", "checkpointing",
                                 "compile", "kernels", "bf16") if k in r}
        for mode in ("train", "forward"):
            if f"{mode}_tflops" in r:
                row[f"{mode}_mfu_nominal_{NOMINAL_PEAK_TFLOPS:.0f}"] = r[f"{mode}_tflops"] / NOMINAL_PEAK_TFLOPS
                row[f"{mode}_mfu_measured_{suite.peak_tflops:.0f}"] = r[f"{mode}_tflops"] / suite.peak_tflops
        rows[label] = row
    return {"rows": rows, "ratios": report["ratios"], "environment": report["environment"]}


def batch_attempts(tag: str, first: int, smallest: int, args: Callable[[int], list]) -> List[tuple]:
    """(tag_b<batch>, args(batch)) for batch = first, first/2, ... down to `smallest`: bench_step's attempts when an
    out-of-memory halves the batch."""
    attempts, batch = [], first
    while batch >= max(1, smallest):
        attempts.append((f"{tag}_b{batch}", args(batch)))
        batch //= 2
    return attempts


def fits_batch(result: dict) -> Optional[int]:
    """The batch of the attempt that succeeded (None when none did) in a bench_step over batch_attempts."""
    return None if result.get("status") else int(re.search(r"_b(\d+)$", result["attempts"][-1]["tag"]).group(1))


def bench_step(suite: Suite, attempts: List[tuple], timeout_s: Optional[float] = None,
               env: Optional[dict] = None) -> dict:
    """Try each (tag, args) in turn until one succeeds; the next is tried only after an out-of-memory."""
    tried = []
    for tag, args in attempts:
        b = suite.bench(tag, args, timeout_s, env=env)
        tried.append({"tag": tag, "command": b["command"], "rc": b["run"]["rc"], "timed_out": b["run"]["timed_out"],
                      "oom": out_of_memory(b["run"])})
        if b["report"] is not None:
            return {"attempts": tried, "command": b["command"], **bench_summary(b["report"], suite)}
        if not tried[-1]["oom"] or suite.remaining() < 30:
            break
        suite.log("  out of memory: trying the next, smaller setting")
    status = "timeout" if tried[-1]["timed_out"] else "failed"
    return {"status": status, "attempts": tried, "tail": b["run"]["tail"]}



def halving_batches(suite: Suite, tag: str, first: int, command: Callable[[int, Path], list],
                    summary: Callable[[dict], dict]) -> dict:
    """Run the benchmark `command(batch, json_path)` at batch `first`, halved after each out-of-memory down to a
    quarter of it (while 40 s of the budget are left): {batch, command, attempts} and `summary(report)` of the run
    that wrote its JSON report, else {status: failed/timeout, attempts, tail}."""
    tried: List[dict] = []
    batch = first
    while True:
        path = suite.work / f"{tag}_b{batch}.json"
        cmd = command(batch, path)
        res = suite.run(cmd, timeout_s=150)
        line = " ".join(shlex.quote(str(c)) for c in cmd)
        tried.append({"batch": batch, "command": line, "rc": res["rc"], "timed_out": res["timed_out"],
                      "oom": out_of_memory(res)})
        if res["rc"] == 0 and path.is_file():
            return {"batch": batch, "command": line, "attempts": tried, **summary(json.loads(path.read_text()))}
        if not tried[-1]["oom"] or batch // 2 < max(1, first // 4) or suite.remaining() < 40:
            break
        batch //= 2
        suite.log(f"  out of memory: trying batch {batch}")
    return {"status": "timeout" if tried[-1]["timed_out"] else "failed", "attempts": tried, "tail": res["tail"]}
