"""What the benchmarks of a training option's cost share (bench_repa.py, bench_flow_times.py): the network they
check before building it, the settings of the training loop's step they time, their common flags, and their main
(run, print the table, write the JSON report).

Each such benchmark times the training loop's own step (train_gen/training_loop.py) with the option against
without, in one process; the flags that say which network, how big a batch, where and how long are the same.
"""
from __future__ import annotations

import argparse
import json
import types
from typing import Callable

import torch

from fcdm_common.cli import UserError, non_negative_int, positive_int, seed_int
from fcdm_common.io import atomic_write_text
from models import MODELS, create_model
from train_gen.config import OptimConfig, PosthocEMAConfig
from train_gen.step_draws import RNG_SCHEME


def train_settings(args, mixed_precision: str) -> types.SimpleNamespace:
    """The `config` that setup_state / train_step read (its `train` section), with train.py's defaults."""
    b = args.batch
    optim = OptimConfig(global_batch_size=b, batch_per_process=b, batch_per_gpu=b, grad_accum_steps=1,
                        rng_scheme=RNG_SCHEME, posthoc_ema=PosthocEMAConfig(0, (), "fp32"), lr=1e-4,
                        betas=(0.9, 0.999), weight_decay=0.0, max_train_steps=args.warmup + args.repeats + 2,
                        ema_decay=0.9999, grad_clip=0.0, seed=args.seed, mixed_precision=mixed_precision,
                        grad_checkpointing=args.grad_checkpointing, compile=False, optimizer_impl="fused",
                        max_bad_steps=10, num_workers=0, data_cache="none", hflip=False)
    return types.SimpleNamespace(train=optim)


def probe_model(args, learn_sigma: bool) -> tuple[dict, torch.nn.Module]:
    """(constructor kwargs, the network built on the meta device) of --model / --model-kwargs, with `learn_sigma`
    as train.py sets it for the objective unless given; UserError for kwargs that are no JSON object or do not
    build, and for a --latent-size the network's levels cannot halve down to its bottleneck."""
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if not isinstance(kwargs, dict):
        raise UserError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    kwargs.setdefault("learn_sigma", learn_sigma)
    with torch.device("meta"):
        try:
            probe = create_model(args.model, **kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"cannot build {args.model} with --model-kwargs {json.dumps(kwargs)}: {e}") from None
    L, f = args.latent_size, 2 ** (probe.num_levels - 1)
    if L % f:
        raise UserError(f"--latent-size {L} is not divisible by {f}, which a {probe.num_levels}-level FCDM needs")
    return kwargs, probe


def add_model_args(p: argparse.ArgumentParser, model_help: str, latent_help: str) -> None:
    """The network and the batch: --model, --model-kwargs, --latent-size, --batch, --precision."""
    p.add_argument("--model", default="FCDM-S", choices=sorted(n for n in MODELS if n.startswith("FCDM")),
                   metavar="NAME", help=model_help)
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='constructor overrides of --model, e.g. \'{"hidden_size": 16, "depths": [1, 1, 1]}\'')
    p.add_argument("--latent-size", type=positive_int, default=16, help=latent_help)
    p.add_argument("--batch", type=positive_int, default=8, help="samples per optimizer step (one micro-batch)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (train.py --mixed-precision bf16); TF32 is on for fp32 on CUDA")


def add_run_args(p: argparse.ArgumentParser, repeats_help: str, warmup_help: str) -> None:
    """Where and how long: --grad-checkpointing, --device, --repeats, --warmup, --threads, --cpu-allocator,
    --seed, and the report: --quiet, --json."""
    p.add_argument("--grad-checkpointing", choices=("none", "selective", "full"), default="none",
                   help="activation checkpointing of the network (train.py --grad-checkpointing)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda when available)")
    p.add_argument("--repeats", type=positive_int, default=7, help=repeats_help)
    p.add_argument("--warmup", type=non_negative_int, default=2, help=warmup_help)
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="torch CPU threads (default: 0, torch's own count); 1 gives the steadiest CPU numbers")
    p.add_argument("--cpu-allocator", choices=("tuned", "default"), default="tuned",
                   help="CPU only: 'tuned' keeps freed memory in glibc's heap (what train.py does on CPU), "
                        "'default' leaves malloc as it is (default: tuned)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the weights, inputs and step draws, 0..2**32-1 (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full report (raw times too) here")


def report_main(argv, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict],
                table: Callable[[dict], str]) -> dict:
    """Parse `argv`, run the benchmark, print its table, write the JSON report with --json; the report."""
    args = parser.parse_args(argv)
    report = run(args)
    print(table(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2, default=str) + "\n")
    return report
