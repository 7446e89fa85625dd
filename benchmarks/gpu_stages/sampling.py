"""Step sampling: the sampling loop through bench_model.py --mode sample (guided DPM++ and DDPM eager, then
compiled), as images/s and the hours 50K samples take. It takes the suite's --sample-args."""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from typing import List

from benchmarks.gpu_stages import core
from benchmarks.gpu_stages.core import REPO, Skip, Suite, stage


def _sample_args(args: argparse.Namespace) -> tuple:
    """The step's second argument: gpu_suite.py --sample-args, as a list of flags for bench_model.py."""
    return (shlex.split(args.sample_args),)


@stage("sampling", min_s=40, options=_sample_args)
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


def has_sample_mode() -> bool:
    """Whether bench_model.py offers --mode sample: read from its source (no process start), else from --help."""
    # core.BENCH_MODEL looked up when called: the file Suite.bench runs, also when a test replaces it there
    found = re.search(r'"--mode",\s*choices=\(([^)]*)\)', core.BENCH_MODEL.read_text())
    if found:
        return '"sample"' in found.group(1)
    helptext = subprocess.run([sys.executable, core.BENCH_MODEL, "--help"], capture_output=True, text=True,
                              cwd=REPO).stdout
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
