"""Cost of representation alignment (REPA): one training step with alignment against one without, in one process.

Both variants run the training loop's own step (train_gen/training_loop.py): `setup_state` builds the EMA and
the AdamW over the network (and, with alignment, the projector, as train.py does), `train_step` runs
`accumulate_gradients` (objective.training_losses under the run's autocast, + lambda * align with alignment),
the global gradient norm, the fused AdamW step with its on-device skip of a non-finite step and the EMA update.
The alignment variant is what train.py builds from --repa-*: `build_repa` loads the frozen encoder through
models/vision_encoders.py's loader, checks the site and makes the 3-layer projector. Both variants start from
the same weights and see the same latents, labels, clean images and step draws (drawn before the clock starts:
the loader and the draws are not part of the step); their timed steps alternate (with, without, then without,
with, ...) so that both see the same machine load. The frozen encoder's forward pass on the batch's images is
also timed alone, interleaved with the steps, and given as a share of the aligned step.

The report: the median step time of each variant, the ratio with / without, the extra milliseconds, the encoder's
share, and checks that the alignment really ran (encoder forward passes per aligned step, backward passes that
reached the projector, projector weights moved by AdamW; none of it in the plain variant).

Encoders have random weights (a ViT's cost does not depend on its values) and nothing is downloaded: timm builds
the architecture with pretrained=False at the resolution whose patch grid is the site's (site side x 14, e.g.
224 for enc1 at 32x32 latents), saves it as a timm snapshot folder in a temporary directory, and
`load_vision_encoder` (the loader training uses) reads it back:
  tiny      vit_small_patch14_dinov2 narrowed to width 192, depth 4, 3 heads (1.9M parameters): CPU-sized
  dinov2-b  vit_base_patch14_dinov2, the architecture of DINOv2-B/14 (86M parameters), REPA's default

Examples:
  python benchmarks/bench_repa.py --threads 1             # FCDM-S, 16x16x4 latents, batch 8, tiny encoder, CPU
  python benchmarks/bench_repa.py --model FCDM-XL --latent-size 32 --batch 32 --encoder dinov2-b \\
      --precision bf16 --device cuda --json repa.json     # ImageNet 256x256 with REPA's DINOv2-B at 224
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from benchmarks.common import environment, peak_memory, setup_device, synchronize, timed
from benchmarks.option_cost import add_model_args, add_run_args, probe_model, report_main, train_settings
from diffusion import create_objective
from fcdm_common.cli import HelpFormatter, UserError, positive_int, run_main
from fcdm_common.progress import progress
from models import create_model
from train_gen.repa import DEFAULT_SITE, DEFAULT_WEIGHT, PROJECTOR_WIDTH, Repa, build_repa
from train_gen.step_draws import BatchPlan, StepDraws
from train_gen.training_loop import REPA_METER_KEYS, Meter, TrainState, setup_state, train_step

PATCH = 14  # both encoders' patch size (DINOv2's)
# --encoder: timm architecture and constructor arguments (random weights; img_size is added per run)
ENCODERS = {
    "tiny": ("vit_small_patch14_dinov2", {"embed_dim": 192, "depth": 4, "num_heads": 3}),
    "dinov2-b": ("vit_base_patch14_dinov2", {}),
}


# ---------------------------------------------------------------------------------- the pieces
def write_encoder_snapshot(kind: str, resolution: int, folder: Path, seed: int) -> None:
    """A timm snapshot folder (config.json + model.safetensors) of the `kind` encoder with random weights, built
    for `resolution` (its native input size, so that loading it needs no position-embedding resampling)."""
    # deferred: timm costs ~1.5 s to import; only this part of the program needs it directly
    import timm
    from timm.models import save_for_hf

    arch, extra = ENCODERS[kind]
    model_args = {**extra, "img_size": int(resolution)}
    with torch.random.fork_rng(devices=[]):  # the encoder's draws leave the networks' stream alone
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args)
    save_for_hf(model, str(folder), model_args=model_args, safe_serialization=True)


@dataclass
class Variant:
    """One side of the comparison: its own network, EMA, AdamW (and alignment) on the device."""
    label: str
    state: TrainState
    module: nn.Module  # what the step differentiates: the network, or alignment's AlignedDenoiser
    meter: Meter
    repa: Optional[Repa] = None
    times: list = field(default_factory=list)  # seconds per timed step
    steps: int = 0  # steps run (warm-up included)
    encoder_calls: int = 0  # encoder forward passes during this variant's steps
    projector_backwards: int = 0  # backward passes that reached the projector during its steps
    last_losses: dict = field(default_factory=dict)


class Counters:
    """Forward passes of the encoder and gradients accumulated into the projector, as the steps run them."""

    def __init__(self, repa: Repa):
        self.encoder = 0
        self.projector = 0
        repa.encoder.register_forward_hook(self._encoder_ran)
        first = next(repa.projector.parameters())
        first.register_post_accumulate_grad_hook(self._projector_reached)

    def _encoder_ran(self, module, inputs, output) -> None:
        self.encoder += 1

    def _projector_reached(self, param) -> None:
        self.projector += 1


def resolve_sizes(args, probe: nn.Module) -> dict:
    """Latent shape, site shape, encoder resolution and image side of the network `probe` (option_cost.probe_model),
    checked before anything is built."""
    # deferred: models.vision_encoders imports timm (~1.5 s); --help and flag errors do not need it
    from models.vision_encoders import patch_grid, resolution_for_grid

    if not hasattr(probe, "site_shape"):
        raise UserError(f"representation alignment needs a model with feature sites (FCDM); {args.model} "
                        f"({type(probe).__name__}) has none")
    L = args.latent_size
    try:
        site_shape = probe.site_shape(args.site, L, L)
    except ValueError as e:
        raise UserError(f"--site: {e}") from None
    resolution = args.encoder_resolution or resolution_for_grid(site_shape[1], PATCH)
    patch_grid(resolution, PATCH)  # UserError naming the nearest valid resolutions
    return {"latent_shape": (probe.in_channels, L, L), "site_shape": tuple(site_shape), "num_classes":
            probe.num_classes, "encoder_resolution": resolution, "image_size": args.image_size or resolution}


def _median_ms(times: list) -> float:
    return statistics.median(times) * 1e3


# ---------------------------------------------------------------------------------- the benchmark
def run_benchmark(args) -> dict:
    # deferred: accelerate's import is slow and only the measurement needs it (--help and flag errors do not)
    from accelerate import Accelerator

    kwargs, probe = probe_model(args, learn_sigma=args.objective == "diffusion")
    sizes = resolve_sizes(args, probe)
    device = setup_device(args)
    mixed_precision = "bf16" if args.precision == "bf16" else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    objective = create_objective(args.objective)
    config = train_settings(args, mixed_precision)
    C, L, _ = sizes["latent_shape"]

    with tempfile.TemporaryDirectory(prefix="fcdm_bench_repa_") as tmp:
        snapshot = Path(tmp) / f"encoder-{args.encoder}"
        write_encoder_snapshot(args.encoder, sizes["encoder_resolution"], snapshot, args.seed)
        torch.manual_seed(args.seed)  # both networks from the same weights; the projector follows, as in train.py
        with torch.device(device):
            aligned_net = create_model(args.model, **kwargs)
        repa_args = argparse.Namespace(repa_encoder=None, repa_encoder_path=str(snapshot), repa_site=args.site,
                                       repa_weight=DEFAULT_WEIGHT, repa_projector_width=args.projector_width,
                                       repa_encoder_resolution=args.encoder_resolution)
        repa_config, repa = build_repa(repa_args, aligned_net, sizes["latent_shape"], sizes["image_size"], device)
    torch.manual_seed(args.seed)
    with torch.device(device):
        plain_net = create_model(args.model, **kwargs)

    aligned_state = setup_state(config, aligned_net, accelerator, repa)
    plain_state = setup_state(config, plain_net, accelerator)
    variants = [Variant("with alignment", aligned_state, repa.module, Meter(device, REPA_METER_KEYS), repa),
                Variant("without alignment", plain_state, plain_state.model, Meter(device))]
    counters = Counters(repa)
    projector_start = [p.detach().clone() for p in repa.projector.parameters()]

    b = args.batch
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(b, C, L, L, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, sizes["num_classes"], (b,), generator=g).to(device)
    side = sizes["image_size"]
    images = torch.randint(0, 256, (b, 3, side, side), generator=g, dtype=torch.uint8).to(device)
    plan = BatchPlan(b)
    step_draws = StepDraws(args.seed, plan, sizes["latent_shape"], device, objective.sample_timesteps,
                           plain_net.label_drop_shape, float(plain_net.class_dropout_prob))

    def run_step(v: Variant, draws: dict) -> None:
        enc, proj = counters.encoder, counters.projector
        v.last_losses = train_step(v.state, v.module, objective, accelerator, x, y, draws, plan, config, v.meter,
                                   v.repa, images if v.repa is not None else None)
        v.state.step += 1
        v.steps += 1
        v.encoder_calls += counters.encoder - enc
        v.projector_backwards += counters.projector - proj

    encoder_times: list = []

    def encoder_forward() -> None:
        with accelerator.autocast():
            repa.encoder(images)

    model_params = sum(p.numel() for p in plain_net.parameters())
    print(f"{args.model} ({model_params / 1e6:.2f}M parameters), latents {C}x{L}x{L}, batch {b}, {args.precision}, "
          f"{args.objective}, checkpointing {args.grad_checkpointing}; site {args.site} {repa_config.site_shape} -> "
          f"projector width {args.projector_width} -> {args.encoder} ({repa.encoder.num_params / 1e6:.2f}M "
          f"parameters) at {repa_config.encoder_resolution}px, images {side}px; {device}"
          + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""), flush=True)
    with progress(total=2 * (args.warmup + args.repeats), desc="steps", disable=args.quiet) as bar:
        for i in range(args.warmup):  # untimed: allocator, autotuning, lazy initialisation
            draws = step_draws.draw(i)
            for v in variants:
                run_step(v, draws)
                synchronize(device)
                bar.update(1)
            encoder_forward()
        for r in range(args.repeats):
            draws = step_draws.draw(args.warmup + r)
            synchronize(device)
            for v in (variants if r % 2 == 0 else variants[::-1]):  # alternate who goes first
                v.times.append(timed(lambda v=v: run_step(v, draws), device))
                bar.update(1)
            encoder_times.append(timed(encoder_forward, device))
            bar.set_postfix({"with_ms": f"{variants[0].times[-1] * 1e3:.1f}",
                             "without_ms": f"{variants[1].times[-1] * 1e3:.1f}"})

    peak = {}
    if device.type == "cuda":  # after the timing: one more step each, its peak (both variants' states included)
        draws = step_draws.draw(args.warmup + args.repeats)
        for v in variants:
            before = torch.cuda.memory_allocated(device)
            top = peak_memory(lambda v=v: run_step(v, draws), device)
            peak[v.label] = {"peak_gib": top / 2**30, "step_gib": (top - before) / 2**30}

    with_ms, without_ms, enc_ms = (_median_ms(variants[0].times), _median_ms(variants[1].times),
                                   _median_ms(encoder_times))
    moved = max(float((p.detach() - p0).abs().max()) for p, p0 in zip(repa.projector.parameters(), projector_start))
    aligned, plain = variants
    results = {}
    for v in variants:
        ms = _median_ms(v.times)
        results[v.label] = {"step_ms": ms, "steps_per_s": 1e3 / ms, "img_per_s": b * 1e3 / ms, "times_s": v.times,
                            "loss_last": float(v.last_losses["loss"]), **peak.get(v.label, {})}
    results["encoder forward alone"] = {"ms": enc_ms, "times_s": encoder_times}
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "quiet")}
        | {"model_kwargs_resolved": kwargs, "image_size": side, "encoder_resolution": repa_config.encoder_resolution},
        "environment": environment(device),
        "model": {"name": args.model, "params_m": model_params / 1e6},
        "encoder": repa.encoder.describe() | {"kind": args.encoder, "random_weights": True},
        "repa": asdict(repa_config) | {"encoder_path": "(temporary snapshot, random weights)"},
        "projector_params_m": sum(p.numel() for p in repa.projector.parameters()) / 1e6,
        "results": results,
        "ratio_with_over_without": with_ms / without_ms,
        "extra_ms": with_ms - without_ms,
        "encoder_share_of_aligned_step": enc_ms / with_ms,
        "encoder_share_of_extra": enc_ms / (with_ms - without_ms) if with_ms > without_ms else None,
        "checks": {
            "encoder_calls_per_step": {v.label: v.encoder_calls / v.steps for v in variants},
            "projector_backwards_per_step": {v.label: v.projector_backwards / v.steps for v in variants},
            "projector_max_change": moved,
            "repa_cos_last": float(aligned.last_losses["repa_cos"].mean()),
            "repa_loss_last": float(aligned.last_losses["repa_loss"].mean()),
            "plain_has_alignment_losses": "repa_loss" in plain.last_losses,
        },
    }
    return report


def format_report(report: dict) -> str:
    r, cfg, env = report["results"], report["config"], report["environment"]
    lines = [f"torch {env['torch']}, {env.get('gpu', env['cpu'])}, {env['cpu_threads']} thread(s), load "
             f"{env['load_average']}, {env['date']}; median of {cfg['repeats']} interleaved repeats",
             "| step | ms/step | steps/s | images/s |", "|---|---|---|---|"]
    for label in ("with alignment", "without alignment"):
        lines.append(f"| {label} | {r[label]['step_ms']:.1f} | {r[label]['steps_per_s']:.3f} | "
                     f"{r[label]['img_per_s']:.1f} |")
    share = report["encoder_share_of_extra"]
    lines += [f"ratio with / without: {report['ratio_with_over_without']:.3f}x ({report['extra_ms']:+.1f} ms/step)",
              f"encoder forward alone: {r['encoder forward alone']['ms']:.1f} ms = "
              f"{report['encoder_share_of_aligned_step']:.1%} of the aligned step"
              + (f", {share:.0%} of the extra time" if share is not None else "")]
    for label in ("with alignment", "without alignment"):
        if "peak_gib" in r[label]:
            lines.append(f"{label}: peak {r[label]['peak_gib']:.2f} GiB (both variants' states included), "
                         f"{r[label]['step_gib']:.2f} GiB for the step")
    c = report["checks"]
    lines.append(f"checks: encoder passes per step {c['encoder_calls_per_step']}, projector backward passes per "
                 f"step {c['projector_backwards_per_step']}, projector moved by {c['projector_max_change']:.2e}, "
                 f"last repa_cos {c['repa_cos_last']:.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, model_help="registered FCDM preset (alignment needs feature sites): FCDM-S/B/L/XL, FCDM-digits",
                   latent_help="latent side (32 for ImageNet 256x256 SD-VAE latents); a multiple of 2^(levels-1)")
    p.add_argument("--site", default=DEFAULT_SITE, metavar="SITE",
                   help="where the denoiser's features are aligned (train.py --repa-site): enc<L>, enc<L>.<B>, mid, "
                        "dec<L>, ...")
    p.add_argument("--encoder", choices=tuple(ENCODERS), default="tiny",
                   help="frozen encoder with random weights: tiny (a 192-wide, 4-deep DINOv2-style ViT/14, CPU-sized) "
                        "or dinov2-b (DINOv2-B/14's architecture, REPA's default)")
    p.add_argument("--encoder-resolution", type=positive_int, default=None, metavar="PIXELS",
                   help="the encoder's input side, a multiple of 14 (default: the site's side x 14, so the grids "
                        "match: 224 for enc1 at 32x32 latents)")
    p.add_argument("--image-size", type=positive_int, default=None, metavar="PIXELS",
                   help="side of the stored clean images fed to the encoder (default: the encoder's resolution, "
                        "as extract_features.py --repa-image-size 224 stores them; another side adds a resize)")
    p.add_argument("--projector-width", type=positive_int, default=PROJECTOR_WIDTH,
                   help="hidden width of the 3-layer projector MLP (train.py --repa-projector-width)")
    p.add_argument("--objective", choices=("diffusion", "flow"), default="diffusion",
                   help="training objective (diffusion: iDDPM hybrid loss with learned sigma)")
    add_run_args(p, repeats_help="timed steps per variant, interleaved; the medians are reported",
                 warmup_help="untimed steps per variant first")
    return p


def main(argv=None):
    return report_main(argv, build_parser(), run_benchmark, format_report)


if __name__ == "__main__":
    run_main(main)
