"""Cost of the flow-matching time schedules of train.py (its time distribution, logit-normal parameters and time
shift flags): one training iteration of each schedule against the plain one (uniform times, no shift), in one
process.

An iteration is what the training loop runs per step: `StepDraws.draw(step)` (the step's times through the
objective's `sample_timesteps`, its noise and label-dropout mask; train_gen/step_draws.py) and then `train_step`
(train_gen/training_loop.py: objective.training_losses under the run's autocast, the global gradient norm, the
fused AdamW step and the EMA update). The draw is INSIDE the clock, since a schedule's only cost is in the draw
(a sigmoid of normals instead of uniforms, then the shift's few element-wise operations). Variants, all with the
flow objective (create_objective("flow", time_distribution=..., logit_mean=..., logit_std=..., time_shift=...)):
  uniform               t ~ U[0, 1], no shift (the defaults: the plain step)
  logit-normal          t = sigmoid(m + s n), n ~ N(0, 1) (--logit-mean m, --logit-std s; SD3's m = 0, s = 1)
  logit-normal + shift  the same times shifted, t' = a t / (1 + (a - 1) t) (--shift a; 3 is a typical 512 value)
Each variant has its own network, EMA and AdamW from the same initial weights and sees the same latents and
labels; warm-up steps are untimed, and the timed steps rotate the variants' order every repeat so that all see
the same machine load. The draw alone (`step_draws.draw(step)`) is also timed per variant, in microseconds.

The report: each variant's median step time, its ratio to the uniform step, the draw's cost, and checks that the
schedules really drew other times: at a fixed step the logit-normal times differ from the uniform ones; over
20 steps' draws the sample mean of logit(t) is near m (and near m + ln a when shifted, since the shift adds
exactly ln a to logit t); and the shifted times are shift_time(unshifted, a) of the same draw (so >= the
unshifted ones for a >= 1: our t = 1 is data, a > 1 moves times towards data).

Examples:
  python benchmarks/bench_flow_times.py --threads 1       # FCDM-S, 16x16x4 latents, batch 8, CPU
  python benchmarks/bench_flow_times.py --model FCDM-XL --latent-size 64 --batch 32 --precision bf16 \\
      --device cuda --shift 3 --json flow_times.json      # ImageNet 512x512 latents
"""
from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field

import torch

from benchmarks.common import environment, setup_device, synchronize, timed
from benchmarks.option_cost import add_model_args, add_run_args, probe_model, report_main, train_settings
from diffusion import create_objective
from diffusion.flow_schedules import LOGIT_MEAN_MAX, LOGIT_STD_RANGE, shift_time, time_shift_arg
from fcdm_common.cli import HelpFormatter, float_in, run_main
from fcdm_common.progress import progress
from models import create_model
from train_gen.step_draws import BatchPlan, StepDraws
from train_gen.training_loop import Meter, TrainState, setup_state, train_step

LABELS = ("uniform", "logit-normal", "logit-normal + shift")
STAT_DRAWS = 20  # steps whose times the logit statistics pool
DRAW_LOOP = 20  # draws per timing of the draw alone (one draw is tens of microseconds)


def variant_objectives(args) -> dict:
    """{label: the flow objective of that schedule}, as train.py builds it from its flags."""
    logit = {"time_distribution": "logit-normal", "logit_mean": args.logit_mean, "logit_std": args.logit_std}
    kwargs = {"uniform": {}, "logit-normal": logit, "logit-normal + shift": logit | {"time_shift": args.shift}}
    return {label: create_objective("flow", **kwargs[label]) for label in LABELS}


def schedule_checks(draws: dict, args) -> dict:
    """Evidence from the variants' own StepDraws that they draw the intended times (see the module docstring)."""
    t = {label: torch.cat([d.draw(s)["t"].double().cpu() for s in range(STAT_DRAWS)]) for label, d in draws.items()}
    plain, shifted = t["logit-normal"], t["logit-normal + shift"]
    logit, logit_shifted = torch.logit(plain), torch.logit(shifted)
    n = plain.numel()
    tol = 4 * args.logit_std / math.sqrt(n)  # 4 standard errors of a mean of n normals
    a = args.shift
    direction = (shifted >= plain) if a >= 1 else (shifted <= plain)
    return {
        "draws_pooled": n,
        "logit_normal_differs_from_uniform": not torch.equal(draws["uniform"].draw(0)["t"],
                                                              draws["logit-normal"].draw(0)["t"]),
        "logit_mean_sample": float(logit.mean()), "logit_std_sample": float(logit.std()),
        "logit_mean_near_m": abs(float(logit.mean()) - args.logit_mean) <= tol,
        "shifted_logit_mean_sample": float(logit_shifted.mean()), "shifted_logit_mean_expected": args.logit_mean
        + math.log(a),
        "shifted_logit_mean_near_m_plus_ln_a": abs(float(logit_shifted.mean()) - args.logit_mean - math.log(a)) <= tol,
        "shift_closed_form_max_err": float((shifted - shift_time(plain, a)).abs().max()),
        "shift_closed_form_holds": bool(torch.allclose(shifted, shift_time(plain, a), rtol=0, atol=1e-6)),
        "shift_direction": ">=" if a >= 1 else "<=", "shift_direction_holds": bool(direction.all()),
        "uniform_in_unit_interval": bool(((t["uniform"] >= 0) & (t["uniform"] <= 1)).all()),
    }


@dataclass
class Variant:
    """One schedule: its objective, step draws and training state (network, EMA, AdamW) on the device."""
    label: str
    objective: object
    state: TrainState
    draws: StepDraws
    meter: Meter
    times: list = field(default_factory=list)  # seconds per timed iteration (draw + step)
    draw_times: list = field(default_factory=list)  # seconds per draw alone
    last_losses: dict = field(default_factory=dict)


def run_benchmark(args) -> dict:
    # deferred: accelerate's import is slow and only the measurement needs it (--help and flag errors do not)
    from accelerate import Accelerator

    kwargs, probe = probe_model(args, learn_sigma=False)  # the flow objective learns no sigma
    latent_shape = (probe.in_channels, args.latent_size, args.latent_size)
    device = setup_device(args)
    mixed_precision = "bf16" if args.precision == "bf16" else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    config = train_settings(args, mixed_precision)
    b, plan = args.batch, BatchPlan(args.batch)

    variants = []
    for label, objective in variant_objectives(args).items():
        torch.manual_seed(args.seed)  # every variant from the same weights
        with torch.device(device):
            net = create_model(args.model, **kwargs)
        draws = StepDraws(args.seed, plan, latent_shape, device, objective.sample_timesteps, net.label_drop_shape,
                          float(net.class_dropout_prob))
        variants.append(Variant(label, objective, setup_state(config, net, accelerator), draws, Meter(device)))
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(b, *latent_shape, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, probe.num_classes, (b,), generator=g).to(device)

    def iteration(v: Variant) -> None:
        """One training iteration as the loop runs it: the step's draws, then the step."""
        draws = v.draws.draw(v.state.step)
        v.last_losses = train_step(v.state, v.state.model, v.objective, accelerator, x, y, draws, plan, config,
                                   v.meter)
        v.state.step += 1

    def draw_loop(v: Variant) -> None:
        for i in range(DRAW_LOOP):
            v.draws.draw(v.state.step + i)

    model_params = sum(p.numel() for p in variants[0].state.model.parameters())
    print(f"{args.model} ({model_params / 1e6:.2f}M parameters), latents {'x'.join(map(str, latent_shape))}, batch "
          f"{b}, {args.precision}, checkpointing {args.grad_checkpointing}; logit-normal m {args.logit_mean:g}, s "
          f"{args.logit_std:g}, shift {args.shift:g}; {device}"
          + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""), flush=True)
    with progress(total=len(variants) * (args.warmup + args.repeats), desc="steps", disable=args.quiet) as bar:
        for _ in range(args.warmup):  # untimed: allocator, lazy initialisation
            for v in variants:
                iteration(v)
                draw_loop(v)
                synchronize(device)
                bar.update(1)
        for r in range(args.repeats):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:  # rotate who goes first
                v.times.append(timed(lambda v=v: iteration(v), device))
                v.draw_times.append(timed(lambda v=v: draw_loop(v), device) / DRAW_LOOP)
                bar.update(1)
            bar.set_postfix({v.label: f"{v.times[-1] * 1e3:.1f}ms" for v in variants})

    results = {}
    for v in variants:
        ms = statistics.median(v.times) * 1e3
        results[v.label] = {"step_ms": ms, "steps_per_s": 1e3 / ms, "times_s": v.times,
                            "draw_us": statistics.median(v.draw_times) * 1e6, "draw_times_s": v.draw_times,
                            "loss_last": float(v.last_losses["loss"].mean()),
                            "objective_kwargs": {k: getattr(v.objective, k) for k in
                                                 ("time_distribution", "logit_mean", "logit_std", "time_shift")}}
    base = results["uniform"]["step_ms"]
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "quiet")}
        | {"model_kwargs_resolved": kwargs, "draw_loop": DRAW_LOOP},
        "environment": environment(device),
        "model": {"name": args.model, "params_m": model_params / 1e6},
        "results": results,
        "ratios_to_uniform": {label: r["step_ms"] / base for label, r in results.items()},
        "checks": schedule_checks({v.label: v.draws for v in variants}, args),
    }


def format_report(report: dict) -> str:
    r, cfg, env = report["results"], report["config"], report["environment"]
    lines = [f"torch {env['torch']}, {env.get('gpu', env['cpu'])}, {env['cpu_threads']} thread(s), load "
             f"{env['load_average']}, {env['date']}; median of {cfg['repeats']} interleaved repeats",
             "| schedule | ms/step (draw included) | steps/s | ratio to uniform | draw alone (us) |",
             "|---|---|---|---|---|"]
    for label in LABELS:
        lines.append(f"| {label} | {r[label]['step_ms']:.2f} | {r[label]['steps_per_s']:.3f} | "
                     f"{report['ratios_to_uniform'][label]:.3f}x | {r[label]['draw_us']:.1f} |")
    c = report["checks"]
    lines.append(f"checks ({c['draws_pooled']} times pooled): logit-normal differs from uniform "
                 f"{c['logit_normal_differs_from_uniform']}; mean logit(t) {c['logit_mean_sample']:.3f} (m "
                 f"{cfg['logit_mean']:g}) ok {c['logit_mean_near_m']}; shifted {c['shifted_logit_mean_sample']:.3f} "
                 f"(m + ln a {c['shifted_logit_mean_expected']:.3f}) ok {c['shifted_logit_mean_near_m_plus_ln_a']}; "
                 f"shifted = shift_time(t, a) {c['shift_closed_form_holds']} (max err "
                 f"{c['shift_closed_form_max_err']:.1e}), shifted {c['shift_direction']} unshifted "
                 f"{c['shift_direction_holds']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, model_help="registered FCDM preset: FCDM-S/B/L/XL, FCDM-digits",
                   latent_help="latent side (32 for ImageNet 256x256, 64 for 512x512); a multiple of 2^(levels-1)")
    p.add_argument("--shift", type=time_shift_arg, default=3.0, metavar="A",
                   help="time shift a of the shifted variant (train.py --time-shift; t = 1 is data, a > 1 moves "
                        "times towards data)")
    p.add_argument("--logit-mean", type=float_in(-LOGIT_MEAN_MAX, LOGIT_MEAN_MAX), default=0.0, metavar="M",
                   help="logit-normal m, as train.py's flag of the same name (default: 0)")
    p.add_argument("--logit-std", type=float_in(*LOGIT_STD_RANGE), default=1.0, metavar="S",
                   help="logit-normal s > 0, as train.py's flag of the same name")
    add_run_args(p, repeats_help="timed iterations per variant, order rotated each repeat; the medians are reported",
                 warmup_help="untimed iterations per variant first")
    return p


def main(argv=None):
    return report_main(argv, build_parser(), run_benchmark, format_report)


if __name__ == "__main__":
    run_main(main)
