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
# The steps live in benchmarks/gpu_stages/, one module per stage (the runner, the shared helpers and the registry in
# its core.py, the sizes in sizes.py); this file is the entry point the shell script runs: the flags, main, and the
# names tests and notes use, re-exported.
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run by path from the shell script: the repo root is on PYTHONPATH already
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_stages import MIN_SECONDS, STEP_ORDER, STEPS, WORKERS  # noqa: E402
from benchmarks.gpu_stages.core import Skip, Suite  # noqa: E402
from benchmarks.gpu_stages.cuda_tests import step_cuda_tests  # noqa: E402
from benchmarks.gpu_stages.e2e import step_e2e  # noqa: E402
from benchmarks.gpu_stages.env import step_env  # noqa: E402
from benchmarks.gpu_stages.flow_times import step_flow_times  # noqa: E402
from benchmarks.gpu_stages.forward import step_forward  # noqa: E402
from benchmarks.gpu_stages.fused import step_fused  # noqa: E402
from benchmarks.gpu_stages.latents import step_latents  # noqa: E402
from benchmarks.gpu_stages.repa import step_repa  # noqa: E402
from benchmarks.gpu_stages.sampling import has_sample_mode, step_sampling  # noqa: E402
from benchmarks.gpu_stages.sizes import DRY, GPU, Sizes  # noqa: E402
from benchmarks.gpu_stages.training import (  # noqa: E402
    step_compile256,
    step_profile256,
    step_train256,
    step_train512,
)
from fcdm_common.cli import UserError, float_in, positive_int, run_main  # noqa: E402
from fcdm_common.io import atomic_write_text  # noqa: E402

# the suite's names as they were before the stages moved out (tests/test_gpu_suite.py uses them); a stand-in for a
# benchmark script is set where the step reads it: BENCH_MODEL on gpu_stages.core, BENCH_REPA on gpu_stages.repa
__all__ = ["DRY", "GPU", "MIN_SECONDS", "STEP_ORDER", "STEPS", "WORKERS", "Sizes", "Skip", "Suite", "has_sample_mode",
           "main", "step_compile256", "step_cuda_tests", "step_e2e", "step_env", "step_flow_times", "step_forward",
           "step_fused", "step_latents", "step_profile256", "step_repa", "step_sampling", "step_train256",
           "step_train512"]


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
    for name in steps:
        suite.step(name, STEPS[name].bind(args), 0 if args.dry_run else MIN_SECONDS[name])
    suite.log(f"done in {time.perf_counter() - suite.t0:.1f}s: {suite.summary()}; results: {suite.results}")
    if suite.failed():
        raise SystemExit(1)


if __name__ == "__main__":
    run_main(main)
