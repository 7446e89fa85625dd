"""Cost of gradient accumulation: train.py's training step at one global batch, split into 1, 2, 4 micro-batches.

Each variant runs the real step of train_gen/train.py (StepDraws for timesteps/noise/label dropout,
`accumulate_gradients` with the iDDPM hybrid loss, gradient norm, fused AdamW with found_inf, EMA)
on a random batch already in memory (the data path is benchmarked by bench_data.py). Variants are
interleaved (1, 2, 4, 1, 2, 4, ...) so they see the same machine load; the table gives the median
steps/s and the extra milliseconds per optimizer step against accumulation 1.

    python benchmarks/bench_accum.py                        # FCDM C=64, depths 1,2,2,2,1, 32x32x4, batch 16
    python benchmarks/bench_accum.py --accum 1,2,4,8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from accelerate import Accelerator

from diffusion import create_objective
from fcdm_common.cli import HelpFormatter, UserError, positive_int, run_main
from fcdm_common.cpu import tune_cpu_allocator
from fcdm_common.io import atomic_write_text
from models.fcdm import FCDM
from train_gen.ema import create_ema, update_ema
from train_gen.step_draws import BatchPlan, StepDraws
from train_gen.training_loop import accumulate_gradients


def _int_list(value: str) -> list:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--accum", type=_int_list, default=[1, 2, 4], help="accumulation steps to compare, comma-separated")
    p.add_argument("--global-batch-size", type=positive_int, default=16, help="samples per optimizer step")
    p.add_argument("--hidden-size", type=positive_int, default=64, help="FCDM width C")
    p.add_argument("--depths", type=_int_list, default=[1, 2, 2, 2, 1], help="FCDM blocks per level")
    p.add_argument("--latent-size", type=positive_int, default=32, help="latent height = width (4 channels)")
    p.add_argument("--steps", type=positive_int, default=3, help="timed optimizer steps per repeat")
    p.add_argument("--repeats", type=positive_int, default=5, help="interleaved repeats per variant (median)")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for a in args.accum:
        if args.global_batch_size % a:
            raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by accumulation {a}")
    if args.threads:
        torch.set_num_threads(args.threads)


    tune_cpu_allocator()
    accelerator = Accelerator(cpu=True)
    G, S = args.global_batch_size, args.latent_size
    torch.manual_seed(0)
    model = FCDM(in_channels=4, hidden_size=args.hidden_size, depths=tuple(args.depths), num_classes=1000).train()
    ema = create_ema(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    objective = create_objective("diffusion")
    draws = StepDraws(0, BatchPlan(G), (4, S, S), "cpu", objective.sample_timesteps, model.label_drop_shape,
                      model.class_dropout_prob)
    x = torch.randn(G, 4, S, S).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (G,))

    def step(i: int, accum: int) -> None:
        losses = accumulate_gradients(model, objective, accelerator, x, y, draws.draw(i),
                                      BatchPlan(G, micro_batch=G // accum).micro_slices())
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True).float()
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(losses["loss"]))
        opt.found_inf = bad.float()
        opt.step()
        del opt.found_inf
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9999, weight=(~bad).float())

    print(f"FCDM C={args.hidden_size} depths {tuple(args.depths)} latents 4x{S}x{S}, global batch {G}, "
          f"{torch.get_num_threads()} thread(s); accumulation {args.accum}", flush=True)
    for a in args.accum:
        for i in range(args.warmup):
            step(i, a)
    times = {a: [] for a in args.accum}
    for r in range(args.repeats):
        for a in args.accum:
            start = time.perf_counter()
            for i in range(args.steps):
                step(i, a)
            times[a].append((time.perf_counter() - start) / args.steps)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"x{a} {times[a][-1] * 1e3:.1f} ms" for a in args.accum),
              flush=True)
    median = {a: sorted(v)[len(v) // 2] for a, v in times.items()}
    base = median[args.accum[0]]
    print("| accumulation | micro-batch | steps/s | ms/step | overhead vs first (ms/step) | relative |")
    print("|---|---|---|---|---|---|")
    rows = []
    for a in args.accum:
        rows.append({"accum": a, "micro_batch": G // a, "steps_per_sec": 1 / median[a], "ms_per_step": median[a] * 1e3,
                     "overhead_ms": (median[a] - base) * 1e3, "relative": base / median[a], "raw_s": times[a]})
        r = rows[-1]
        print(f"| {a} | {r['micro_batch']} | {r['steps_per_sec']:.3f} | {r['ms_per_step']:.1f} | "
              f"{r['overhead_ms']:+.1f} | {r['relative']:.2f}x |")
    if args.json:
        atomic_write_text(args.json, json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows},
                                                indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
