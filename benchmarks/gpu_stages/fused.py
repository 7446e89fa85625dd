"""Step fused: the fused block kernels (--kernels triton) against the torch path and DiT; bench_fused.py's
numerics come first, since nothing else is worth timing when they fail."""
from __future__ import annotations

import json
import sys

from benchmarks.gpu_stages.core import (
    NOMINAL_PEAK_TFLOPS,
    REPO,
    SUITE_PY,
    Suite,
    batch_attempts,
    bench_step,
    fits_batch,
    stage,
)

BENCH_FUSED = REPO / "benchmarks" / "bench_fused.py"
VECTOR_TFLOPS = 67.0  # H100/H200 SXM float32 without tensor cores, the vendor's figure (the fused kernels' FLOP floor)


@stage("fused", min_s=120)
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
        out[f"forward_{label}"] = bench_step(suite, [(f"fused_forward_{label}", common + [
            "--batch-size", s.forward_batch, "--dtype", dtype, "--mode", "forward", "--extra-variants", "none+triton",
            "--compare", s.dit])], timeout_s=90, env=env)
    attempts = batch_attempts("fused_train", s.train_batch, s.train_batch // 4, lambda batch: common + [
        "--batch-size", batch, "--dtype", "bf16", "--mode", "train", "--extra-variants", "none+triton",
        "--peak-tflops", NOMINAL_PEAK_TFLOPS])
    out["train"] = bench_step(suite, attempts, timeout_s=150, env=env)
    out["train"]["fits_batch"] = fits = fits_batch(out["train"])
    prof = suite.out / "gpu_profile_fused.txt"
    res = suite.run([sys.executable, SUITE_PY, "--worker", "profile", "--device", s.device, "--model", s.model,
                     *(["--model-kwargs", s.model_kwargs] if s.model_kwargs else []), "--latent-size", s.latent256,
                     "--batch-size", fits or s.train_batch, "--kernels", "triton", "--table", prof,
                     "--json", suite.work / "profile_fused.json"], timeout_s=120, env=env)
    out["profile"] = json.loads((suite.work / "profile_fused.json").read_text()) | {"table_file": prof.name} \
        if res["rc"] == 0 else {"status": "timeout" if res["timed_out"] else "failed", "tail": res["tail"]}
    if not s.compile:
        out["compiled"] = {"status": "skipped", "reason": "dry run: no compiled variants"}
        return out
    forward = common + ["--batch-size", s.forward_batch, "--dtype", "bf16", "--mode", "forward"]
    out["compiled_forward"] = bench_step(suite, [("fused_forward_compiled", forward + [
        "--extra-variants", "none+compile,none+triton,none+triton+compile", "--compare", s.dit, "--compare-compile"])],
        timeout_s=240)
    out["compiled_network_forward"] = bench_step(suite, [("fused_forward_compiled_net", forward + [
        "--extra-variants", "none+compile-net,none+triton,none+triton+compile-net"])], timeout_s=240) \
        if suite.remaining() >= 120 else {"status": "skipped", "reason": "budget"}
    if suite.remaining() < 120:
        out["compiled_train"] = {"status": "skipped", "reason": "budget"}
    else:
        out["compiled_train"] = bench_step(suite, [("fused_train_compiled", common + [
            "--batch-size", fits or s.train_batch // 2, "--dtype", "bf16", "--mode", "train", "--extra-variants",
            "none+compile,none+triton+compile", "--peak-tflops", NOMINAL_PEAK_TFLOPS])], timeout_s=300)
    return out
