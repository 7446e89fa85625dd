"""Step forward: forward throughput at the paper's protocol (batch 64), FCDM against DiT in one process, per dtype
(bf16, and fp32, which bench_model.py runs as TF32 on CUDA)."""
from __future__ import annotations

from benchmarks.gpu_stages.core import Suite, bench_step, stage


@stage("forward", min_s=30)
def step_forward(suite: Suite) -> dict:
    s = suite.sizes
    out = {}
    for dtype in s.forward_dtypes:
        label = "tf32" if dtype == "fp32" else dtype  # bench_model turns TF32 on for fp32 on CUDA
        if suite.remaining() < 20:
            out[label] = {"status": "skipped", "reason": "budget"}
            continue
        out[label] = bench_step(suite, [(f"forward_{label}", suite.model_args() + [
            "--compare", s.dit, "--latent-size", s.latent256, "--batch-size", s.forward_batch, "--dtype", dtype,
            "--mode", "forward"])], timeout_s=60)
    return out
