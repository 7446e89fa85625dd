"""Step repa: the cost of representation alignment (bench_repa.py), the training step with alignment against
without, interleaved in one process."""
from __future__ import annotations

import importlib.util
import sys

from benchmarks.gpu_stages.core import REPO, Skip, Suite, halving_batches, stage

BENCH_REPA = REPO / "benchmarks" / "bench_repa.py"


@stage("repa", min_s=60)
def step_repa(suite: Suite) -> dict:
    """Representation alignment's cost (bench_repa.py): the training step with alignment against without, in
    one process, at the batch that fits (halved after an out-of-memory, down to a quarter)."""
    s = suite.sizes
    missing = [m for m in ("timm", "torchvision", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:  # the frozen encoder is a timm ViT (timm imports torchvision)
        raise Skip(f"{', '.join(missing)} not installed here: bench_repa.py builds its encoder with timm (.whl/ "
                   "carries timm; torchvision must be the machine's own, matching its torch)")
    return halving_batches(suite, "repa", s.repa_batch, lambda batch, path: [
        sys.executable, BENCH_REPA, *suite.model_args(), "--latent-size", s.latent256, "--batch", batch, "--precision",
        "bf16", "--encoder", s.repa_encoder, "--site", s.repa_site, "--projector-width", s.repa_projector_width,
        "--device", s.device, "--warmup", s.warmup, "--repeats", s.repa_repeats, "--json", path], _repa_summary)


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
