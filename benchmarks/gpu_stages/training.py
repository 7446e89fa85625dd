"""Steps train256, compile256, profile256 and train512: the FCDM training step through bench_model.py (at 32x32x4
against the paper's baseline and per checkpointing mode, eager against compiled, under torch.profiler, and at
64x64x4 with the batch halved until it fits). One module because they share the step's flags; the profile's
worker is here too, and the fused step runs it with --kernels triton."""
from __future__ import annotations

import json
import sys
from typing import List

from benchmarks.gpu_stages.core import (
    NOMINAL_PEAK_TFLOPS,
    SUITE_PY,
    Skip,
    Suite,
    batch_attempts,
    bench_step,
    fits_batch,
    stage,
    worker,
)
from fcdm_common.io import atomic_write_text


@stage("train256", min_s=60)
def step_train256(suite: Suite) -> dict:
    common = _train256_args(suite)
    # every variant holds weights + AdamW + EMA on the device: one process for the checkpointing modes
    # against the baseline, another (step compile256) for eager vs compiled
    out = {"checkpointing": bench_step(suite, [
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


@stage("compile256", min_s=60)
def step_compile256(suite: Suite) -> dict:
    """Eager vs compiled blocks in one process (every checkpointing mode). Its own step, after the cheap
    ones: compilation time is the least predictable part of the suite."""
    if not suite.sizes.compile:
        raise Skip("dry run: no compiled variants (C++ code generation on a CPU takes minutes)")
    # the default (no checkpointing) first, in a process of its own, so that its answer survives a slow
    # compilation of the checkpointed variants
    out = {"none": bench_step(suite,
                              [("compile256_none", _train256_args(suite) + ["--extra-variants", "none+compile"])],
                              timeout_s=150)}
    if suite.remaining() < 90:
        out["checkpointed"] = {"status": "skipped", "reason": "budget"}
    else:
        out["checkpointed"] = bench_step(suite, [("compile256_ckpt", _train256_args(suite) + [
            "--checkpointing", "selective", "--extra-variants", "selective+compile,full,full+compile"])], timeout_s=150)
    if out["none"].get("status"):
        out["status"] = out["none"]["status"]
    return out


@stage("profile256", min_s=30)
def step_profile256(suite: Suite) -> dict:
    s = suite.sizes
    table = suite.out / "gpu_profile.txt"
    res = suite.run([sys.executable, SUITE_PY, "--worker", "profile", "--device", s.device, "--model", s.model,
                     *(["--model-kwargs", s.model_kwargs] if s.model_kwargs else []), "--latent-size", s.latent256,
                     "--batch-size", s.train_batch, "--table", table, "--json", suite.work / "profile.json"],
                    timeout_s=150)
    if res["rc"] != 0:
        return {"status": "timeout" if res["timed_out"] else "failed", "tail": res["tail"]}
    return json.loads((suite.work / "profile.json").read_text()) | {"table_file": table.name}


@stage("train512", min_s=45)
def step_train512(suite: Suite) -> dict:
    s = suite.sizes
    out = {}
    for mode in s.ckpt512:
        attempts = batch_attempts(f"train512_{mode}", s.train_batch, s.train_batch // 8, lambda batch: (
            suite.model_args() + ["--latent-size", s.latent512, "--batch-size", batch, "--dtype", "bf16", "--mode",
                                  "train", "--checkpointing", mode, "--peak-tflops", NOMINAL_PEAK_TFLOPS]))
        if suite.remaining() < 30:
            out[mode] = {"status": "skipped", "reason": "budget"}
            continue
        out[mode] = bench_step(suite, attempts, timeout_s=90)
        out[mode]["fits_batch"] = fits_batch(out[mode])
    return out


@worker("profile")
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
