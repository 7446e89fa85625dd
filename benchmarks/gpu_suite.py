"""The one-call GPU suite: correctness and speed on one CUDA device in a few minutes.

Run it through `bash benchmarks/gpu_suite.sh` (which first installs missing wheels from .whl/). Steps,
in order, each appending one JSON record to OUT/gpu_results.jsonl as soon as it ends (so a timeout of
the whole call still returns what was measured) and everything it prints to OUT/gpu_log.txt:

  1 env          GPU name, memory, driver, torch/CUDA/cuDNN versions, bf16 and TF32 settings, and a
                 bf16 matmul rate (8192^3) as this machine's practical peak
  2 cuda_tests   pytest -m cuda tests/test_cuda.py tests/test_kernels.py (fast paths vs
                 models/fcdm_reference.py in fp32, TF32 and bf16, every checkpointing mode, compiled blocks,
                 fused AdamW's skip of a non-finite step, the device-side label check, train.py bf16 kill +
                 resume, sample_ddp.py batch 16 vs 32; the fused Triton kernels against the torch path)
     fused       the fused block (--kernels triton): bench_fused.py (numerics against float64 first, block
                 times, per-kernel times against their byte and FLOP floors: OUT/gpu_fused_kernels.txt), the
                 forward at batch 64 against DiT-XL/2 (bf16, TF32), the training step at batch 256 against the
                 torch path, a profile of one fused step (OUT/gpu_profile_fused.txt), then compiled variants
  3 train256     FCDM-XL training step at 32x32x4, batch 256, bf16: baseline (paper mode, bf16 autocast as the
                 release trains) vs optimized with checkpointing none/selective/full in one process
                 (bench_model.py --compare-baseline --extra-variants); MFU against 989 TFLOP/s (nominal dense
                 bf16) and against the measured matmul rate
     profile256  torch.profiler of one optimized training step: top kernels and ops (OUT/gpu_profile.txt)
     train512    FCDM-XL at 64x64x4, batch 256 (halved until it fits), selective and full checkpointing
  4 forward      forward throughput at batch 64, FCDM-XL vs DiT-XL/2 in one process, bf16 and TF32
  3 repa         the cost of representation alignment: FCDM-XL training step at 32x32x4, batch 32 (halved
                 after an out-of-memory), bf16, with alignment (site enc1, projector width 2048, a frozen
                 encoder of DINOv2-B/14's architecture with random weights at 224) against without,
                 interleaved in one process (bench_repa.py): median step times, the ratio with/without and
                 the encoder forward pass's share
     flow_times  the cost of the flow time schedules: a training iteration (its draws included) with uniform,
                 logit-normal and shifted logit-normal times, FCDM-XL at 32x32x4, batch 32, bf16, interleaved in
                 one process (bench_flow_times.py): ratios to the uniform iteration, the draw alone in microseconds
     e2e         the real programs as a user runs them, each with its wall time: extract_features.py with a
                 random SD-VAE-shaped AutoencoderKL on 256x256 digits, make_reference.py, `accelerate
                 launch train.py` in bf16 (FCDM-S, 300 steps, a grid), `torchrun sample_ddp.py`, evaluate.py
                 (torch backend, a random Inception)
  3 compile256   eager vs compiled blocks, every checkpointing mode, in one process (after the cheap
                 steps: compilation time is the least predictable part)
  5 sampling     bench_model.py --mode sample: guided DPM++ 20 eager (batch 64, 256), DDPM-250 eager (64), then
                 --compile at 256 alone (autotuning: the longest cap)
  6 latents      SD-VAE-sized random AutoencoderKL encoding 256x256 images at batch 64 (fp32, bf16);
                 the training loader copying batches to the GPU (bench_data.py --device cuda)

Every measurement is warm-up + a few timed repeats. `--budget-s` bounds the whole run: a step is
skipped (recorded as "skipped") when too little time is left for it, and a running step is stopped at
the budget. `--dry-run` runs every step on the CPU with tiny sizes (the same scripts and code paths,
compiled variants left out), which is what CI checks. The suite ends with one line counting the steps
that were ok, failed and skipped, and exits 1 when any step failed or timed out (a step skipped for the
budget, or one that cannot run here, is not a failure).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
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
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Callable, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run by path from the shell script: the repo root is on PYTHONPATH already
    sys.path.insert(0, str(REPO))

from fcdm_common.cli import UserError, float_in, positive_int, run_main  # noqa: E402
from fcdm_common.io import atomic_write_text  # noqa: E402
from fcdm_common.processes import kill_processes_with_env  # noqa: E402

BENCH_MODEL = REPO / "benchmarks" / "bench_model.py"
BENCH_DATA = REPO / "benchmarks" / "bench_data.py"
BENCH_REPA = REPO / "benchmarks" / "bench_repa.py"
BENCH_FLOW_TIMES = REPO / "benchmarks" / "bench_flow_times.py"
BENCH_FUSED = REPO / "benchmarks" / "bench_fused.py"
VECTOR_TFLOPS = 67.0  # H100/H200 SXM float32 without tensor cores, the vendor's figure (the fused kernels' FLOP floor)
NOMINAL_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the vendor's figure
MEASURED_PEAK_TFLOPS = 790.0  # what an 8192^3 bf16 matmul reached on this project's H200 (used if env fails)
RUN_TAG = "FCDM_GPU_SUITE_RUN"  # environment tag of every command the suite runs (to find what it left behind)
TINY_FCDM = '{"hidden_size": 16, "depths": [1, 1, 1], "num_classes": 10}'


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run: the real suite (GPU) or the dry run (CPU, tiny)."""
    device: str  # "cuda" or "cpu"
    model: str  # the FCDM preset
    model_kwargs: Optional[str]  # JSON overrides of the preset (dry run: a tiny network)
    dit: str  # the DiT compared in the forward step
    latent256: int  # latent side of ImageNet 256 (SD-VAE /8)
    latent512: int  # latent side of ImageNet 512
    train_batch: int  # global batch of the training steps (paper: 256)
    forward_batch: int  # batch of the forward-throughput protocol (paper: 64)
    sample_batch: int  # batch of the sampling loop
    warmup: int  # untimed iterations per variant
    repeats: int  # timed iterations per variant (median reported)
    compile: bool  # include torch.compile'd variants
    vae_widths: tuple  # AutoencoderKL block_out_channels
    vae_layers: int  # layers_per_block
    vae_image: int  # image side encoded
    vae_batch: int  # images per encode call
    loader_count: int  # items in the random latent store of the loader benchmark
    loader_batch: int
    loader_steps: int
    matmul_n: int  # side of the square bf16 matmul of the env step
    forward_dtypes: tuple  # bench_model --dtype of the forward step (fp32 = TF32 on CUDA)
    ckpt512: tuple  # checkpointing modes of the 512 step
    test_timeout_s: int  # the pytest step's own cap
    e2e_upscale: int  # the end-to-end pass: digits upscaled to this factor (8x8 -> 8K x 8K images)
    e2e_model: str  # its FCDM preset
    e2e_model_kwargs: Optional[str]
    e2e_steps: int  # training steps (bf16, under accelerate launch)
    e2e_batch: int  # global batch
    e2e_samples: int  # samples drawn by sample_ddp.py under torchrun
    e2e_sampling_steps: int  # DDIM steps
    e2e_ref_images: int  # images of the reference batch
    repa_batch: int  # batch of the alignment-cost step (halved after an out-of-memory, down to a quarter)
    repa_encoder: str  # bench_repa.py --encoder: dinov2-b (DINOv2-B/14's architecture) or tiny
    repa_site: str  # the aligned site (enc1: 16x16 at 32x32 latents, DINOv2-B/14's grid at 224)
    repa_projector_width: int  # hidden width of the projector (REPA: 2048)
    repa_repeats: int  # timed steps per variant (interleaved; median)
    flow_batch: int  # batch of the flow-schedule step (three networks with AdamW and EMA in one process)
    flow_repeats: int  # timed iterations per schedule (interleaved; median)


GPU = Sizes(device="cuda", model="FCDM-XL", model_kwargs=None, dit="DiT-XL/2", latent256=32, latent512=64,
            train_batch=256, forward_batch=64, sample_batch=256, warmup=2, repeats=3, compile=True,
            vae_widths=(128, 256, 512, 512), vae_layers=2, vae_image=256, vae_batch=64, loader_count=4096,
            loader_batch=256, loader_steps=40, matmul_n=8192, forward_dtypes=("bf16", "fp32"),
            ckpt512=("selective", "full"), test_timeout_s=150, e2e_upscale=32, e2e_model="FCDM-S",
            e2e_model_kwargs=None, e2e_steps=300, e2e_batch=64, e2e_samples=256, e2e_sampling_steps=50,
            e2e_ref_images=1797, repa_batch=32, repa_encoder="dinov2-b", repa_site="enc1", repa_projector_width=2048,
            repa_repeats=10, flow_batch=32, flow_repeats=7)
# one dtype / mode where the GPU run loops over two: the same code, fewer processes
DRY = Sizes(device="cpu", model="FCDM-S", model_kwargs=TINY_FCDM, dit="DiT-S/2", latent256=8, latent512=16,
            train_batch=2, forward_batch=2, sample_batch=2, warmup=0, repeats=1, compile=False,
            vae_widths=(32, 32, 32, 32), vae_layers=1, vae_image=32, vae_batch=2, loader_count=64,
            loader_batch=8, loader_steps=2, matmul_n=64, forward_dtypes=("bf16",), ckpt512=("selective",),
            test_timeout_s=60, e2e_upscale=4, e2e_model="FCDM-S", e2e_model_kwargs=TINY_FCDM, e2e_steps=4,
            e2e_batch=8, e2e_samples=16, e2e_sampling_steps=3, e2e_ref_images=16, repa_batch=2, repa_encoder="tiny",
            repa_site="enc0", repa_projector_width=64, repa_repeats=1, flow_batch=2,
            flow_repeats=1)  # TINY_FCDM has 2 levels: no enc1


class Skip(Exception):
    """A step that cannot run here (recorded as skipped with this reason)."""


# ---------------------------------------------------------------------------------------------- the runner
class Suite:
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


def _oom(run: dict) -> bool:
    return bool(re.search(r"OutOfMemoryError|out of memory", run["tail"]))


def _summary(report: dict, suite: Suite) -> dict:
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


def _batch_attempts(tag: str, first: int, smallest: int, args: Callable[[int], list]) -> List[tuple]:
    """(tag_b<batch>, args(batch)) for batch = first, first/2, ... down to `smallest`: _bench_step's attempts when an
    out-of-memory halves the batch."""
    attempts, batch = [], first
    while batch >= max(1, smallest):
        attempts.append((f"{tag}_b{batch}", args(batch)))
        batch //= 2
    return attempts


def _fits_batch(result: dict) -> Optional[int]:
    """The batch of the attempt that succeeded (None when none did) in a _bench_step over _batch_attempts."""
    return None if result.get("status") else int(re.search(r"_b(\d+)$", result["attempts"][-1]["tag"]).group(1))


def _bench_step(suite: Suite, attempts: List[tuple], timeout_s: Optional[float] = None,
                env: Optional[dict] = None) -> dict:
    """Try each (tag, args) in turn until one succeeds; the next is tried only after an out-of-memory."""
    tried = []
    for tag, args in attempts:
        b = suite.bench(tag, args, timeout_s, env=env)
        tried.append({"tag": tag, "command": b["command"], "rc": b["run"]["rc"], "timed_out": b["run"]["timed_out"],
                      "oom": _oom(b["run"])})
        if b["report"] is not None:
            return {"attempts": tried, "command": b["command"], **_summary(b["report"], suite)}
        if not tried[-1]["oom"] or suite.remaining() < 30:
            break
        suite.log("  out of memory: trying the next, smaller setting")
    status = "timeout" if tried[-1]["timed_out"] else "failed"
    return {"status": status, "attempts": tried, "tail": b["run"]["tail"]}


# ---------------------------------------------------------------------------------------------- steps
def step_env(suite: Suite) -> dict:
    s = suite.sizes
    res = suite.run([sys.executable, __file__, "--worker", "env", "--device", s.device, "--matmul-n", s.matmul_n,
                     "--json", suite.work / "env.json"], timeout_s=120)
    if res["rc"] != 0:
        return {"status": "failed", "tail": res["tail"]}
    env = json.loads((suite.work / "env.json").read_text())
    env["wheels"] = os.environ.get("FCDM_GPU_WHEELS", "(suite not started through gpu_suite.sh)")
    if env.get("bf16_matmul_tflops") and s.device == "cuda":
        suite.peak_tflops = float(env["bf16_matmul_tflops"])
    return env


def step_cuda_tests(suite: Suite) -> dict:
    junit = suite.work / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
           str(REPO / "tests" / "test_cuda.py"), str(REPO / "tests" / "test_kernels.py"), f"--junitxml={junit}"]
    if suite.dry_run:  # collection only: the CPU cases run in the ordinary test suite
        cmd.insert(4, "--collect-only")
    res = suite.run(cmd, timeout_s=suite.sizes.test_timeout_s)
    out = {"command": " ".join(cmd), "rc": res["rc"], "summary": res["tail"].splitlines()[-1:] or [""]}
    if junit.is_file():
        out["tests"] = _junit_cases(junit)
    if res["timed_out"]:
        out["status"] = "timeout"
    elif res["rc"] not in (0, 5):  # 5: no test collected
        out["status"] = "failed"
    return out


def step_fused(suite: Suite) -> dict:
    """The fused block (--kernels triton) against the torch path and DiT, in this order, each part's answer kept
    before the next starts: (1) bench_fused.py, one block per level: numerics against float64 (a failure stops
    the step), block times and the per-kernel table against the kernels' floors (OUT/gpu_fused_kernels.txt);
    (2) the forward at batch 64, bf16 and TF32: torch and triton kernels against DiT, in one process each;
    (3) the training step at batch 256 (halved after an out-of-memory): torch against triton, peak memory;
    (4) a profile of one fused training step (OUT/gpu_profile_fused.txt); (5) compiled: the forward with compiled
    blocks of both and of DiT, then with the whole network compiled, then compiled training, the slowest last."""
    s = suite.sizes
    env = {"TRITON_INTERPRET": "1"} if suite.dry_run else None  # the dry run's CPU runs the interpreter
    out = {}
    table = suite.out / "gpu_fused_kernels.txt"
    path = suite.work / "fused_blocks.json"
    res = suite.run([sys.executable, BENCH_FUSED, *suite.model_args(), "--latent-size", s.latent256,
                     "--batch-size", s.train_batch, "--dtype", "bf16", "--device", s.device, "--warmup", s.warmup,
                     "--repeats", max(s.repeats, 5 if not suite.dry_run else 1), "--vector-tflops", VECTOR_TFLOPS,
                     "--copy-gib", 2 if not suite.dry_run else 0.01, "--json", path, "--table", table],
                    timeout_s=240, env=env)
    if not path.is_file():
        return {"status": "timeout" if res["timed_out"] else "failed", "blocks": {"tail": res["tail"]}}
    out["blocks"] = json.loads(path.read_text()) | {"table_file": table.name}
    if res["rc"] != 0:  # the numerics check failed: nothing else is worth timing
        out["status"] = "failed"
        return out
    common = suite.model_args() + ["--latent-size", s.latent256]
    for dtype in s.forward_dtypes:
        label = "tf32" if dtype == "fp32" else dtype
        out[f"forward_{label}"] = _bench_step(suite, [(f"fused_forward_{label}", common + [
            "--batch-size", s.forward_batch, "--dtype", dtype, "--mode", "forward", "--extra-variants", "none+triton",
            "--compare", s.dit])], timeout_s=90, env=env)
    attempts = _batch_attempts("fused_train", s.train_batch, s.train_batch // 4, lambda batch: common + [
        "--batch-size", batch, "--dtype", "bf16", "--mode", "train", "--extra-variants", "none+triton",
        "--peak-tflops", NOMINAL_PEAK_TFLOPS])
    out["train"] = _bench_step(suite, attempts, timeout_s=150, env=env)
    out["train"]["fits_batch"] = fits = _fits_batch(out["train"])
    prof = suite.out / "gpu_profile_fused.txt"
    res = suite.run([sys.executable, __file__, "--worker", "profile", "--device", s.device, "--model", s.model,
                     *(["--model-kwargs", s.model_kwargs] if s.model_kwargs else []), "--latent-size", s.latent256,
                     "--batch-size", fits or s.train_batch, "--kernels", "triton", "--table", prof,
                     "--json", suite.work / "profile_fused.json"], timeout_s=120, env=env)
    out["profile"] = json.loads((suite.work / "profile_fused.json").read_text()) | {"table_file": prof.name} \
        if res["rc"] == 0 else {"status": "timeout" if res["timed_out"] else "failed", "tail": res["tail"]}
    if not s.compile:
        out["compiled"] = {"status": "skipped", "reason": "dry run: no compiled variants"}
        return out
    forward = common + ["--batch-size", s.forward_batch, "--dtype", "bf16", "--mode", "forward"]
    out["compiled_forward"] = _bench_step(suite, [("fused_forward_compiled", forward + [
        "--extra-variants", "none+compile,none+triton,none+triton+compile", "--compare", s.dit, "--compare-compile"])],
        timeout_s=240)
    out["compiled_network_forward"] = _bench_step(suite, [("fused_forward_compiled_net", forward + [
        "--extra-variants", "none+compile-net,none+triton,none+triton+compile-net"])], timeout_s=240) \
        if suite.remaining() >= 120 else {"status": "skipped", "reason": "budget"}
    if suite.remaining() < 120:
        out["compiled_train"] = {"status": "skipped", "reason": "budget"}
    else:
        out["compiled_train"] = _bench_step(suite, [("fused_train_compiled", common + [
            "--batch-size", fits or s.train_batch // 2, "--dtype", "bf16", "--mode", "train", "--extra-variants",
            "none+compile,none+triton+compile", "--peak-tflops", NOMINAL_PEAK_TFLOPS])], timeout_s=300)
    return out


def _junit_cases(path: Path) -> dict:
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, (child.get("message") or "")[:400]
        cases[case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time") or 0), "message": message}
    return cases


def step_train256(suite: Suite) -> dict:
    common = _train256_args(suite)
    # every variant holds weights + AdamW + EMA on the device: one process for the checkpointing modes
    # against the baseline, another (step compile256) for eager vs compiled
    out = {"checkpointing": _bench_step(suite, [
        ("train256", common + ["--compare-baseline", "--extra-variants", "selective,full"]),
        ("train256_small", common + ["--compare-baseline"]),
        ("train256_selective", common + ["--compare-baseline", "--checkpointing", "selective"]),
    ], timeout_s=150)}
    if out["checkpointing"].get("status"):
        out["status"] = out["checkpointing"]["status"]
    return out


def _train256_args(suite: Suite) -> List:
    s = suite.sizes
    return suite.model_args() + ["--latent-size", s.latent256, "--batch-size", s.train_batch, "--dtype", "bf16",
                                 "--mode", "train", "--peak-tflops", NOMINAL_PEAK_TFLOPS]


def step_compile256(suite: Suite) -> dict:
    """Eager vs compiled blocks in one process (every checkpointing mode). Its own step, after the cheap
    ones: compilation time is the least predictable part of the suite."""
    if not suite.sizes.compile:
        raise Skip("dry run: no compiled variants (C++ code generation on a CPU takes minutes)")
    # the default (no checkpointing) first, in a process of its own, so that its answer survives a slow
    # compilation of the checkpointed variants
    out = {"none": _bench_step(suite,
                               [("compile256_none", _train256_args(suite) + ["--extra-variants", "none+compile"])],
                               timeout_s=150)}
    if suite.remaining() < 90:
        out["checkpointed"] = {"status": "skipped", "reason": "budget"}
    else:
        out["checkpointed"] = _bench_step(suite, [("compile256_ckpt", _train256_args(suite) + [
            "--checkpointing", "selective", "--extra-variants", "selective+compile,full,full+compile"])], timeout_s=150)
    if out["none"].get("status"):
        out["status"] = out["none"]["status"]
    return out


def step_profile256(suite: Suite) -> dict:
    s = suite.sizes
    table = suite.out / "gpu_profile.txt"
    res = suite.run([sys.executable, __file__, "--worker", "profile", "--device", s.device, "--model", s.model,
                     *(["--model-kwargs", s.model_kwargs] if s.model_kwargs else []), "--latent-size", s.latent256,
                     "--batch-size", s.train_batch, "--table", table, "--json", suite.work / "profile.json"],
                    timeout_s=150)
    if res["rc"] != 0:
        return {"status": "timeout" if res["timed_out"] else "failed", "tail": res["tail"]}
    return json.loads((suite.work / "profile.json").read_text()) | {"table_file": table.name}


def step_train512(suite: Suite) -> dict:
    s = suite.sizes
    out = {}
    for mode in s.ckpt512:
        attempts = _batch_attempts(f"train512_{mode}", s.train_batch, s.train_batch // 8, lambda batch: (
            suite.model_args() + ["--latent-size", s.latent512, "--batch-size", batch, "--dtype", "bf16", "--mode",
                                  "train", "--checkpointing", mode, "--peak-tflops", NOMINAL_PEAK_TFLOPS]))
        if suite.remaining() < 30:
            out[mode] = {"status": "skipped", "reason": "budget"}
            continue
        out[mode] = _bench_step(suite, attempts, timeout_s=90)
        out[mode]["fits_batch"] = _fits_batch(out[mode])
    return out


def step_forward(suite: Suite) -> dict:
    s = suite.sizes
    out = {}
    for dtype in s.forward_dtypes:
        label = "tf32" if dtype == "fp32" else dtype  # bench_model turns TF32 on for fp32 on CUDA
        if suite.remaining() < 20:
            out[label] = {"status": "skipped", "reason": "budget"}
            continue
        out[label] = _bench_step(suite, [(f"forward_{label}", suite.model_args() + [
            "--compare", s.dit, "--latent-size", s.latent256, "--batch-size", s.forward_batch, "--dtype", dtype,
            "--mode", "forward"])], timeout_s=60)
    return out


def step_repa(suite: Suite) -> dict:
    """Representation alignment's cost (bench_repa.py): the training step with alignment against without, in
    one process, at the batch that fits (halved after an out-of-memory, down to a quarter)."""
    s = suite.sizes
    missing = [m for m in ("timm", "torchvision", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:  # the frozen encoder is a timm ViT (timm imports torchvision)
        raise Skip(f"{', '.join(missing)} not installed here: bench_repa.py builds its encoder with timm (.whl/ "
                   "carries timm; torchvision must be the machine's own, matching its torch)")
    return _halving_batches(suite, "repa", s.repa_batch, lambda batch, path: [
        sys.executable, BENCH_REPA, *suite.model_args(), "--latent-size", s.latent256, "--batch", batch, "--precision",
        "bf16", "--encoder", s.repa_encoder, "--site", s.repa_site, "--projector-width", s.repa_projector_width,
        "--device", s.device, "--warmup", s.warmup, "--repeats", s.repa_repeats, "--json", path], _repa_summary)


def _halving_batches(suite: Suite, tag: str, first: int, command: Callable[[int, Path], list],
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
                      "oom": _oom(res)})
        if res["rc"] == 0 and path.is_file():
            return {"batch": batch, "command": line, "attempts": tried, **summary(json.loads(path.read_text()))}
        if not tried[-1]["oom"] or batch // 2 < max(1, first // 4) or suite.remaining() < 40:
            break
        batch //= 2
        suite.log(f"  out of memory: trying batch {batch}")
    return {"status": "timeout" if tried[-1]["timed_out"] else "failed", "attempts": tried, "tail": res["tail"]}


def step_flow_times(suite: Suite) -> dict:
    """The flow time schedules' cost (bench_flow_times.py): a training iteration (the step's draws included) with
    uniform, logit-normal and shifted logit-normal times, interleaved in one process, as ratios to the uniform one."""
    s = suite.sizes
    return _halving_batches(suite, "flow_times", s.flow_batch, lambda batch, path: [
        sys.executable, BENCH_FLOW_TIMES, *suite.model_args(), "--latent-size", s.latent256, "--batch", batch,
        "--precision", "bf16", "--device", s.device, "--warmup", s.warmup, "--repeats", s.flow_repeats, "--quiet",
        "--json", path], _flow_times_summary)


def _flow_times_summary(report: dict) -> dict:
    """What the suite keeps of a bench_flow_times.py report: step and draw times per schedule, ratios, checks."""
    rows = report["results"]
    return {"step_ms": {k: r["step_ms"] for k, r in rows.items()},
            "draw_us": {k: r["draw_us"] for k, r in rows.items()},
            "ratios_to_uniform": report["ratios_to_uniform"], "checks": report["checks"], "model": report["model"],
            "environment": report["environment"]}


def _repa_summary(report: dict) -> dict:
    """What the suite keeps of a bench_repa.py report: the two step times, the ratio, the encoder's share, memory."""
    rows = report["results"]
    out = {"with_ms": rows["with alignment"]["step_ms"], "without_ms": rows["without alignment"]["step_ms"],
           "ratio_with_over_without": report["ratio_with_over_without"], "extra_ms": report["extra_ms"],
           "encoder_forward_ms": rows["encoder forward alone"]["ms"],
           "encoder_share_of_aligned_step": report["encoder_share_of_aligned_step"],
           "encoder_share_of_extra": report["encoder_share_of_extra"], "checks": report["checks"],
           "encoder": report["encoder"], "site_shape": report["repa"]["site_shape"],
           "projector_params_m": report["projector_params_m"], "model": report["model"],
           "environment": report["environment"]}
    for label, key in (("with alignment", "with"), ("without alignment", "without")):
        if "peak_gib" in rows[label]:
            out[f"{key}_peak_gib"] = rows[label]["peak_gib"]
            out[f"{key}_step_gib"] = rows[label]["step_gib"]
    return out


def step_sampling(suite: Suite, extra: List[str]) -> dict:
    s = suite.sizes
    if not has_sample_mode():
        raise Skip("bench_model.py has no --mode sample yet (another change adds it); nothing measured")
    out = {}
    # bench_model's --mode sample default: DPM++ 2M, 20 steps, guidance 4.0, batches 64 and 256. The paper's
    # guided DDPM-250 loop is one timed loop at batch 64 (at 256 it took more than the step's 90 s on an H200:
    # 500 network evaluations of 256 images at about 1,400 images/s). The compiled loop comes last, at batch 256
    # alone, with a longer cap: --compile autotunes every convolution and matmul shape ("max-autotune-no-
    # cudagraphs"), and at batches 64 and 256 that alone outlasted 90 s on an H200 (2026-12-04)
    ddpm_steps = 3 if suite.dry_run else 250
    variants = [("eager", [], {}, 90),
                (f"ddpm{ddpm_steps}_eager", ["--sampler", "ddpm", "--sampling-steps", str(ddpm_steps),
                                             "--sample-batches", str(s.forward_batch)],
                 {"warmup": 0, "repeats": 1}, 90),
                *([("compiled", ["--compile", "--sample-batches", str(s.sample_batch)], {"warmup": 1}, 180)]
                  if s.compile else [])]
    for label, flags, counts, cap in variants:
        if suite.remaining() < 30:
            out[label] = {"status": "skipped", "reason": "budget"}
            continue
        b = suite.bench(f"sample_{label}", suite.model_args() + [
            "--latent-size", s.latent256, "--batch-size", s.sample_batch, "--dtype", "bf16", "--mode", "sample",
            *flags, *extra], timeout_s=cap, **counts)
        entry = {"command": b["command"], "rc": b["run"]["rc"]}
        if b["report"] is None:
            entry |= {"status": "timeout" if b["run"]["timed_out"] else "failed", "tail": b["run"]["tail"]}
        else:
            entry["report"] = {k: v for k, v in b["report"].items() if k != "raw_times_s"}
            rates = _find_rates(b["report"].get("results", b["report"]))
            entry["img_per_s"] = rates
            entry["hours_for_50k"] = {k: 50_000 / v / 3600 for k, v in rates.items() if v > 0}
        out[label] = entry
    return out


def step_e2e(suite: Suite) -> dict:
    """The real programs one after another, as a user runs them on one GPU, each with its wall time:
    digits upscaled to ImageNet's size as an ImageFolder, a random AutoencoderKL of SD-VAE's shape and a
    random Inception (no downloads), extract_features.py, make_reference.py (torch backend),
    `accelerate launch train.py` in bf16 with a sample grid, `torchrun sample_ddp.py` (DDIM, guidance),
    evaluate.py (torch backend) and sample_ddp.py with autoguidance. The numbers of the metrics mean nothing
    (random networks); the wall times and that every stage runs do."""
    s = suite.sizes
    root = suite.work / "e2e"
    images, assets, store, runs = root / "images", root / "assets", root / "store.zarr", root / "runs"
    size = 8 * s.e2e_upscale
    py = sys.executable
    device = s.device
    model = ["--model", s.e2e_model] + (["--model-kwargs", s.e2e_model_kwargs] if s.e2e_model_kwargs else [])
    stages = [
        ("dataset", [py, REPO / "preparation" / "make_demo_dataset.py", "--out", images, "--upscale", s.e2e_upscale]),
        ("assets", [py, __file__, "--worker", "e2e_assets", "--vae-widths", ",".join(map(str, s.vae_widths)),
                    "--vae-layers", s.vae_layers, "--vae-image", size, "--table", assets,
                    "--json", suite.work / "e2e_assets.json"]),
        ("extract", [py, REPO / "preparation" / "extract_features.py", "--data-path", images, "--zarr-path",
                     store, "--image-size", size, "--vae", "sd", "--hf-model-dir", assets / "vae",
                     "--per-proc-batch-size", 64, "--num-workers", 4 if device == "cuda" else 0, "--device", device]),
        ("reference", [py, REPO / "evaluations" / "make_reference.py", "--data-path", images, "--out",
                       root / "ref.npz", "--image-size", size, "--backend", "torch", "--inception-weights",
                       assets / "inception.safetensors", "--num-images", s.e2e_ref_images, "--device", device]),
        ("train", [py, "-m", "accelerate.commands.launch", "--num_processes", 1, "--num_machines", 1,
                   "--mixed_precision", "bf16", "--dynamo_backend", "no", REPO / "train_gen" / "train.py", *model,
                   "--zarr-path", store, "--results-dir", runs, "--exp-name", "e2e", "--global-batch-size",
                   s.e2e_batch, "--max-train-steps", s.e2e_steps, "--ckpt-every", s.e2e_steps, "--log-every",
                   max(1, s.e2e_steps // 5), "--sample-every", s.e2e_steps, "--grid-sampler", "ddim",
                   "--grid-steps", s.e2e_sampling_steps, "--mixed-precision", "bf16", "--num-workers",
                   4 if device == "cuda" else 0, "--hf-model-dir", assets / "vae"]),
    ]
    out = {"stages": {}, "sizes": {"image": size, "model": s.e2e_model, "train_steps": s.e2e_steps,
                                   "global_batch": s.e2e_batch, "samples": s.e2e_samples,
                                   "ddim_steps": s.e2e_sampling_steps, "ref_images": s.e2e_ref_images}}

    def go(name, cmd, timeout_s=120, env=None):
        res = suite.run(cmd, timeout_s, env)
        out["stages"][name] = {"seconds": res["seconds"], "rc": res["rc"], "command": " ".join(map(str, cmd))}
        if res["rc"] != 0:
            out["stages"][name]["tail"] = res["tail"]
            why = "timed out" if res["timed_out"] else f"exited {res['rc']}"
            raise RuntimeError(f"stage {name} {why}")

    # the launchers: CPU runs of accelerate and torchrun need no GPU settings
    env = {} if device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}
    try:
        for name, cmd in stages:
            go(name, cmd, timeout_s=180 if name == "train" else 120, env=env)
        ckpts = sorted((runs / "e2e" / "checkpoints").glob("*.pt"))
        if not ckpts:
            raise RuntimeError(f"training wrote no checkpoint under {runs / 'e2e'}")
        out["grid_written"] = any((runs / "e2e").rglob("*.png"))
        go("sample", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 1,
                      REPO / "train_gen" / "sample_ddp.py", "--ckpt", ckpts[-1], "--sample-dir", root / "samples",
                      "--num-fid-samples", s.e2e_samples, "--sampler", "ddim", "--num-sampling-steps",
                      s.e2e_sampling_steps, "--cfg-scale", 1.5, "--per-proc-batch-size", min(256, s.e2e_samples),
                      "--forward-batch", min(256, s.e2e_samples),
                      "--precision", "bf16", "--label-sampling", "balanced", "--keep-pngs", "false",
                      "--device", device, "--hf-model-dir", assets / "vae"], env=env)
        archives = sorted((root / "samples").glob("*.npz"))
        if not archives:
            raise RuntimeError("sample_ddp.py wrote no archive")
        go("evaluate", [py, REPO / "train_gen" / "evaluate.py", "--sample-batch", archives[-1], "--ref-batch",
                        root / "ref.npz", "--backend", "torch", "--inception-weights",
                        assets / "inception.safetensors", "--device", device, "--output-json", root / "eval.json"])
        out["metrics"] = json.loads((root / "eval.json").read_text()).get("metrics")
        # autoguidance through the same program (the run's checkpoint guiding itself: the code path and its
        # wall time next to the "sample" stage's classifier-free guidance; a real guide is an earlier checkpoint)
        go("sample_autoguidance", [py, REPO / "train_gen" / "sample_ddp.py", "--ckpt", ckpts[-1], "--guide-ckpt",
                                   ckpts[-1], "--sample-dir", root / "samples_ag", "--num-fid-samples", s.e2e_samples,
                                   "--sampler", "ddim", "--num-sampling-steps", s.e2e_sampling_steps, "--cfg-scale",
                                   1.5, "--per-proc-batch-size", min(256, s.e2e_samples), "--forward-batch",
                                   min(256, s.e2e_samples), "--precision", "bf16", "--label-sampling", "balanced",
                                   "--keep-pngs", "false", "--device", device, "--hf-model-dir", assets / "vae"],
           env=env)
    except RuntimeError as e:
        out |= {"status": "failed", "error": str(e)}
    out["total_seconds"] = round(sum(v["seconds"] for v in out["stages"].values()), 2)
    return out


def has_sample_mode() -> bool:
    """Whether bench_model.py offers --mode sample: read from its source (no process start), else from --help."""
    found = re.search(r'"--mode",\s*choices=\(([^)]*)\)', BENCH_MODEL.read_text())
    if found:
        return '"sample"' in found.group(1)
    helptext = subprocess.run([sys.executable, BENCH_MODEL, "--help"], capture_output=True, text=True, cwd=REPO).stdout
    modes = re.search(r"--mode \{([^}]*)\}", helptext)
    return bool(modes) and "sample" in modes.group(1).split(",")


def _find_rates(obj, prefix="") -> dict:
    """Every images-per-second number in a nested report, keyed by its path."""
    found = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if isinstance(v, (int, float)) and re.search(r"(img|image)s?_per_s", str(k)):
                found[key] = float(v)
            elif isinstance(v, (dict, list)):
                found |= _find_rates(v, key + ".")
    elif isinstance(obj, list):  # e.g. --mode sample's rows, one per batch size
        for i, v in enumerate(obj):
            tag = f"batch{v['batch']}" if isinstance(v, dict) and "batch" in v else str(i)
            found |= _find_rates(v, f"{prefix}{tag}.")
    return found


def step_latents(suite: Suite) -> dict:
    s = suite.sizes
    out = {}
    res = suite.run([sys.executable, __file__, "--worker", "vae", "--device", s.device,
                     "--vae-widths", ",".join(map(str, s.vae_widths)), "--vae-layers", s.vae_layers,
                     "--vae-image", s.vae_image, "--batch-size", s.vae_batch, "--repeats", max(s.repeats, 1),
                     "--json", suite.work / "vae.json"], timeout_s=120)
    out["vae_encode"] = json.loads((suite.work / "vae.json").read_text()) if res["rc"] == 0 else \
        {"status": "timeout" if res["timed_out"] else "failed", "tail": res["tail"]}
    if suite.remaining() < 20:
        out["loader"] = {"status": "skipped", "reason": "budget"}
        return out
    path = suite.work / "loader.json"
    cmd = [sys.executable, BENCH_DATA, "--count", s.loader_count, "--batch-size", s.loader_batch, "--steps",
           s.loader_steps, "--warmup", 2, "--repeats", 2, "--device", s.device, "--json", path]
    res = suite.run(cmd, timeout_s=120)
    out["loader"] = json.loads(path.read_text()) if res["rc"] == 0 else \
        {"status": "timeout" if res["timed_out"] else "failed", "tail": res["tail"]}
    out["loader"]["command"] = " ".join(map(str, cmd))
    if any(isinstance(v, dict) and v.get("status") for v in out.values()):
        out["status"] = "failed"
    return out


# ---------------------------------------------------------------------------------------------- workers
# (run as subprocesses of the suite: each gets its own CUDA context and can be stopped at the budget)
def worker_env(args) -> dict:
    import torch  # deferred: the suite's own process runs without torch; only this worker needs it

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for dist in ("diffusers", "zarr", "numcodecs", "accelerate", "triton", "numpy", "pytest", "timm", "torchvision"):
        try:
            env[f"{dist}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[f"{dist}_version"] = "not installed"
    device = torch.device(args.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30,
                "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                "bf16_supported": torch.cuda.is_bf16_supported()}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"unavailable ({e})"
    env["tf32_default"] = {"matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                           "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    env["tf32_in_benchmarks"] = "on (bench_model.py and train.py --tf32 true enable it on CUDA)"
    # a practical bf16 peak: mean of 10 square matmuls after 3 warm-ups
    n = args.matmul_n
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    env["bf16_matmul_tflops"] = 10 * 2 * n**3 / (time.perf_counter() - t) / 1e12
    env["bf16_matmul_n"] = n
    return env


def worker_profile(args) -> dict:
    """One optimized training step (bf16, no checkpointing) under torch.profiler: the kernels (and the
    aten ops by input shape, which name the layer) that take the most device time."""
    import torch  # deferred: the suite's own process runs without torch; only this worker needs it

    # deferred: the suite's own process runs without torch; only this worker needs it
    from torch.profiler import ProfilerActivity, profile  # deferred, as torch above

    from benchmarks import bench_model, common  # deferred, as torch above

    bargs = bench_model.parse_args(["--model", args.model,
                                    *(["--model-kwargs", args.model_kwargs] if args.model_kwargs else []),
                                    "--latent-size", str(args.latent_size), "--batch-size", str(args.batch_size),
                                    "--dtype", "bf16", "--device", args.device, "--mode", "train",
                                    "--kernels", args.kernels])
    device = common.setup_device(bargs)
    v = bench_model.make_variant("profiled", args.model, bargs, False)
    bench_model.prepare_variant(v, bargs, device, args.latent_size, json.loads(args.model_kwargs or "{}"))
    for _ in range(2):
        common.timed(v.train_fn, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        v.train_fn()
        common.synchronize(device)
    on_gpu = device.type == "cuda"
    self_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    total_key = "device_time_total" if on_gpu else "cpu_time_total"
    events = prof.key_averages()

    def val(e, key):
        v = getattr(e, key, None)
        if v is None:  # older torch: cuda_* names
            v = getattr(e, key.replace("device", "cuda"), 0.0)
        return float(v)

    # on the GPU the kernels carry the device time (their launching ops repeat it): shares of kernel time
    rows = [e for e in events if not on_gpu or "CUDA" in str(getattr(e, "device_type", ""))] or list(events)
    total = sum(val(e, self_key) for e in rows) or 1.0
    top = sorted(rows, key=lambda e: -val(e, self_key))[:20]
    kernels = [{"name": e.key[:160], "self_ms": val(e, self_key) / 1e3, "share": val(e, self_key) / total,
                "calls": e.count} for e in top]
    by_shape = prof.key_averages(group_by_input_shape=True)
    ops = sorted((e for e in by_shape if e.key.startswith("aten::")), key=lambda e: -val(e, total_key))[:20]
    op_rows = [{"op": e.key, "shapes": str(e.input_shapes)[:200], "total_ms": val(e, total_key) / 1e3,
                "calls": e.count} for e in ops]
    sort = self_key.replace("device", "cuda") if on_gpu else self_key
    try:
        text = events.table(sort_by=self_key, row_limit=30)
    except (KeyError, AttributeError, ValueError):
        text = events.table(sort_by=sort, row_limit=30)
    lines = [f"one training step: {args.model} latent {args.latent_size} batch {args.batch_size} bf16 "
             f"checkpointing none, {args.kernels} kernels, {device} "
             f"({torch.cuda.get_device_name(device) if on_gpu else 'cpu'}), "
             f"torch {torch.__version__}", "", "top kernels by self time:", text, "",
             "aten ops by input shape (inclusive time):"]
    lines += [f"{r['total_ms']:10.2f} ms  x{r['calls']:<5d} {r['op']} {r['shapes']}" for r in op_rows]
    atomic_write_text(args.table, "\n".join(lines) + "\n")
    step_ms = total / 1e3
    return {"step_device_ms" if on_gpu else "step_cpu_ms": step_ms, "top_kernels": kernels, "top_ops": op_rows[:10]}


def worker_vae(args) -> dict:
    """Encode random images with a random AutoencoderKL of the given shape (saved and loaded back the way
    extract_features.py loads a snapshot), fp32 and bf16: images/s of encode_moments."""
    import torch  # deferred: the suite's own process runs without torch; only this worker needs it
    from diffusers import AutoencoderKL  # deferred, as torch above

    from models.autoencoders import load_autoencoder  # deferred, as torch above

    widths = tuple(int(w) for w in args.vae_widths.split(","))
    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
                          up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                          layers_per_block=args.vae_layers, latent_channels=4, sample_size=args.vae_image)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = {"vae_config": {"block_out_channels": list(widths), "layers_per_block": args.vae_layers,
                          "latent_channels": 4, "image_size": args.vae_image, "batch_size": args.batch_size},
           "encoder_params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            vae = load_autoencoder("sd", hf_model_dir=tmp, device=device, dtype=dtype)
            x = torch.rand(args.batch_size, 3, args.vae_image, args.vae_image, device=device) * 2 - 1
            sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
            vae.encode_moments(x)
            sync()
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                mean, std = vae.encode_moments(x)
                sync()
                times.append(time.perf_counter() - t)
            assert mean.shape == (args.batch_size, 4, args.vae_image // 8, args.vae_image // 8), mean.shape
            best = min(times)
            out[name] = {"img_per_s": args.batch_size / best, "batch_s": best, "times_s": times,
                         "hours_for_1_28m_images": 1_281_167 * 2 / (args.batch_size / best) / 3600}  # + hflip
            if device.type == "cuda":
                out[name]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            del vae
    return out


def worker_e2e_assets(args) -> dict:
    """Random stand-ins for the downloaded networks of the end-to-end pass, saved the way users keep the
    real ones: an AutoencoderKL of the given shape as a diffusers folder (OUT/vae) and an Inception-v3
    state_dict for the torch evaluation backend (OUT/inception.safetensors)."""
    import torch  # deferred: the suite's own process runs without torch; only this worker needs it
    from diffusers import AutoencoderKL  # deferred, as torch above
    from safetensors.torch import save_file  # deferred, as torch above

    from evaluations.features_torch import build_inception  # deferred, as torch above

    out = Path(args.table)
    widths = tuple(int(w) for w in args.vae_widths.split(","))
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
                  up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                  layers_per_block=args.vae_layers, latent_channels=4,
                  sample_size=args.vae_image).save_pretrained(out / "vae")
    inception = build_inception()
    for m in inception.modules():  # torchvision's own initialisation is skipped by build_inception
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(m.weight, std=0.05)
    save_file({k: v.contiguous() for k, v in inception.state_dict().items()}, str(out / "inception.safetensors"))
    return {"vae": str(out / "vae"), "inception": str(out / "inception.safetensors")}


WORKERS = {"env": worker_env, "profile": worker_profile, "vae": worker_vae, "e2e_assets": worker_e2e_assets}


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="folder of gpu_results.jsonl, gpu_log.txt, gpu_profile.txt (default: $OUT, else ./gpu_out)")
    p.add_argument("--budget-s", type=float_in(0.0, lo_open=True), default=450.0,
                   help="wall-clock budget of the whole suite in seconds; steps that no longer fit are skipped "
                        "and a running one is stopped at the budget (default: 450, for an 8-minute slot)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes, the same scripts (what CI runs); the pytest step only collects")
    p.add_argument("--steps", default=None,
                   help="comma-separated steps to run, in the order given (most wanted first: the budget skips the "
                        "last); default: all, in this order: " + ",".join(STEP_ORDER))
    p.add_argument("--sample-args", default="",
                   help="extra flags for bench_model.py --mode sample, as one string (e.g. the sampler and steps)")
    # worker mode (internal: the suite runs itself as a subprocess for steps that need their own process)
    p.add_argument("--worker", choices=tuple(WORKERS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--matmul-n", type=positive_int, default=8192, help=argparse.SUPPRESS)
    p.add_argument("--model", default="FCDM-XL", help=argparse.SUPPRESS)
    p.add_argument("--model-kwargs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--latent-size", type=positive_int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=positive_int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--table", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kernels", default="torch", help=argparse.SUPPRESS)
    p.add_argument("--vae-widths", default="128,256,512,512", help=argparse.SUPPRESS)
    p.add_argument("--vae-layers", type=positive_int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--vae-image", type=positive_int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=positive_int, default=3, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


STEP_ORDER = ("env", "cuda_tests", "fused", "train256", "profile256", "train512", "forward", "repa", "flow_times",
              "e2e", "compile256", "sampling", "latents")
# a step starts only with this much budget left
MIN_SECONDS = {"env": 10, "cuda_tests": 30, "fused": 120, "train256": 60, "profile256": 30, "train512": 45,
               "forward": 30, "repa": 60, "flow_times": 40, "e2e": 60, "compile256": 60, "sampling": 40, "latents": 25}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        atomic_write_text(args.json, json.dumps(result, indent=2, default=str) + "\n")
        return result
    steps = STEP_ORDER
    if args.steps:
        steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
        unknown = [s for s in steps if s not in STEP_ORDER]
        if unknown:
            raise UserError(f"unknown --steps {unknown}; choose from {','.join(STEP_ORDER)}")
        if len(set(steps)) != len(steps):
            raise UserError(f"--steps names a step twice: {args.steps}")
    sizes = DRY if args.dry_run else GPU
    if not args.dry_run:
        import torch  # deferred: the suite's own process needs torch only for this check

        if not torch.cuda.is_available():
            raise UserError("no CUDA device is visible (torch.cuda.is_available() is False); run on a GPU machine, "
                            "or pass --dry-run for the tiny CPU rehearsal")
    out = Path(args.out or os.environ.get("OUT") or REPO / "gpu_out")
    suite = Suite(out, args.budget_s, sizes, args.dry_run)
    signal.signal(signal.SIGTERM, suite._terminate)
    suite.log(f"FCDM GPU suite{' (dry run: CPU, tiny sizes)' if args.dry_run else ''}: steps {','.join(steps)}, "
              f"budget {args.budget_s:.0f}s, results in {suite.results}")
    fns = {"env": step_env, "cuda_tests": step_cuda_tests, "fused": step_fused, "train256": step_train256,
           "profile256": step_profile256,
           "train512": step_train512, "forward": step_forward, "repa": step_repa, "flow_times": step_flow_times,
           "e2e": step_e2e,
           "compile256": step_compile256, "sampling": lambda s: step_sampling(s, shlex.split(args.sample_args)),
           "latents": step_latents}
    for name in steps:
        suite.step(name, fns[name], 0 if args.dry_run else MIN_SECONDS[name])
    suite.log(f"done in {time.perf_counter() - suite.t0:.1f}s: {suite.summary()}; results: {suite.results}")
    if suite.failed():
        raise SystemExit(1)


if __name__ == "__main__":
    run_main(main)
