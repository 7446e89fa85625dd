"""Step flow_times: the cost of the flow time schedules (bench_flow_times.py), a training iteration with each
schedule's draws, interleaved in one process."""
from __future__ import annotations

import sys

from benchmarks.gpu_stages.core import REPO, Suite, halving_batches, stage

BENCH_FLOW_TIMES = REPO / "benchmarks" / "bench_flow_times.py"


@stage("flow_times", min_s=40)
def step_flow_times(suite: Suite) -> dict:
    """The flow time schedules' cost (bench_flow_times.py): a training iteration (the step's draws included) with
    uniform, logit-normal and shifted logit-normal times, interleaved in one process, as ratios to the uniform one."""
    s = suite.sizes
    return halving_batches(suite, "flow_times", s.flow_batch, lambda batch, path: [
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
