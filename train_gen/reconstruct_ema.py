"""Reconstruct a post-hoc EMA of any width, or a classic EMA of any decay, from a run's snapshots (EDM2).

    python train_gen/reconstruct_ema.py --run results/RUN --sigma-rel 0.07 --out ema-0.07.pt
    python train_gen/reconstruct_ema.py --run results/RUN --sweep 0.03,0.05,0.07,0.10,0.15 --out sweep/
    python train_gen/reconstruct_ema.py --run results/RUN --ema-decay 0.9999 --out ema-0.9999.pt

The run must have been trained with `--posthoc-ema-snapshot-every N` (train.py). The average with
relative width sigma_rel at step T (default: the newest snapshot) is the least-squares combination
of the snapshots <run>/posthoc_ema/*.safetensors whose response profiles best match the wanted one
(train_gen/ema.py has the math). The output is a checkpoint of train.py's format whose "ema" (and
"model") weights are the reconstruction, with the run's config, so train_gen/sample.py and
sample_ddp.py load it with --ckpt.

`--ema-decay BETA` reconstructs a classic EMA instead (ema_t = beta ema_(t-1) + (1 - beta) theta_t,
started as a copy of the initial weights, like train.py's --ema-decay EMA) the same way. The initial
weights' share beta^T is in no snapshot, so it is refused unless beta^T <= 1e-3 (train longer or
use a smaller beta). --ema-decay combines with --sigma-rel or --sweep.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fcdm_common.cli import HelpFormatter, UserError, positive_int, run_main
from models.checkpoints import save_checkpoint
from train_gen.ema import (
    EMATarget,
    classic_ema_initial_weight,
    gamma_to_sigma_rel,
    list_posthoc_snapshots,
    reconstruct_from_snapshots,
    sigma_rel_to_gamma,
)

MAX_INITIAL_WEIGHT = 1e-3  # largest beta^T (the classic EMA's share of theta_0, in no snapshot) accepted


def _float_list(value: str, what: str = "sigma_rel") -> list:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 0.03,0.05,0.1, got {value!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one {what}")
    return out


def _decay_list(value: str) -> list:
    out = _float_list(value, "decay")
    bad = [b for b in out if not 0 < b < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"an EMA decay must lie in (0, 1), got {bad[0]}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="run folder of train.py (holds config.json and posthoc_ema/)")
    p.add_argument("--sigma-rel", type=float, default=None,
                   help="relative width of the wanted average (EDM2: 0.05-0.15 typical; must be <= 0.2887)")
    p.add_argument("--sweep", type=_float_list, default=None,
                   help="several sigma_rel values, comma-separated: --out is then a folder, one checkpoint each")
    p.add_argument("--ema-decay", type=_decay_list, default=None,
                   help="classic EMA decay(s) beta to reconstruct, comma-separated (e.g. 0.9999, the paper's); "
                        "may be given with --sigma-rel/--sweep; needs beta^T <= 1e-3 at the step T")
    p.add_argument("--at-step", type=positive_int, default=None,
                   help="reconstruct the average as of this step (default: the newest snapshot's step)")
    p.add_argument("--out", required=True,
                   help="output checkpoint (.pt) for one target; a folder (one checkpoint each) with --sweep "
                        "or several targets")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.sigma_rel is not None and args.sweep is not None:
        raise UserError("give at most one of --sigma-rel S or --sweep S1,S2,...")
    if args.sigma_rel is None and args.sweep is None and args.ema_decay is None:
        raise UserError("give --sigma-rel S, --sweep S1,S2,... or --ema-decay BETA")
    run = Path(args.run)
    config_file = run / "config.json"
    if not config_file.is_file():
        raise UserError(f"{run} is not a train.py run folder (no config.json)")
    config = json.loads(config_file.read_text())
    snapshots = list_posthoc_snapshots(run)
    if not snapshots:
        raise UserError(f"{run} has no post-hoc EMA snapshots in {run / 'posthoc_ema'}; train with "
                        "--posthoc-ema-snapshot-every N to save them")
    newest = snapshots[-1]["step"]
    step = args.at_step or newest
    if step > newest:
        raise UserError(f"--at-step {step} is after the newest snapshot (step {newest}); use --at-step <= {newest}")
    if step < snapshots[0]["step"]:
        raise UserError(f"--at-step {step} is before the first snapshot (step {snapshots[0]['step']})")
    sigmas = args.sweep if args.sweep is not None else [] if args.sigma_rel is None else [args.sigma_rel]
    decays = args.ema_decay or []
    targets = []
    for s in sigmas:
        try:
            targets.append(EMATarget(step, gamma=sigma_rel_to_gamma(s)))
        except ValueError as e:
            raise UserError(f"--sigma-rel {s}: {e}") from None
    for beta in decays:
        w0 = classic_ema_initial_weight(step, beta)
        if w0 > MAX_INITIAL_WEIGHT:
            raise UserError(f"--ema-decay {beta}: at step {step} the classic EMA still holds beta^T = {w0:.3g} of the "
                            f"initial weights, which no snapshot contains (needs <= {MAX_INITIAL_WEIGHT:g}); use a "
                            f"smaller decay (1 - beta >= {-math.log(MAX_INITIAL_WEIGHT) / step:.3g}) or a later step")
        targets.append(EMATarget(step, decay=beta))
    used = [s for s in snapshots if s["step"] <= step]
    print(f"{len(used)} snapshots (steps {used[0]['step']}-{used[-1]['step']}, sigma_rel "
          f"{sorted({s['sigma_rel'] for s in used})}); reconstructing at step {step}: sigma_rel {sigmas}, "
          f"EMA decay {decays}", flush=True)
    results = reconstruct_from_snapshots(used, targets, log=lambda m: print(m, flush=True))
    out = Path(args.out)
    folder = args.sweep is not None or len(targets) > 1
    if folder:
        out.mkdir(parents=True, exist_ok=True)
    for label, target, (state, coefs) in zip(sigmas + decays, targets, results):
        t_step = target.step
        common = {"snapshots": [u["path"].name for u in used], "coefficients": [float(c) for c in coefs]}
        if target.decay is None:
            name, gamma = f"ema-sigma{label:.4f}-{t_step:07d}.pt", target.gamma
            info = {"sigma_rel": label, "gamma": gamma, "achieved_sigma_rel": gamma_to_sigma_rel(gamma), **common}
            what = f"sigma_rel {label}, gamma {gamma:.3f}"
        else:
            name = f"ema-decay{format(label, '.10g')}-{t_step:07d}.pt"
            info = {"ema_decay": label, "initial_weight_left_out": classic_ema_initial_weight(t_step, label), **common}
            what = f"EMA decay {label}, coefficients summing to {sum(coefs):.6f}"
        path = out / name if folder else out
        ckpt = {"model": state, "ema": state, "step": t_step, "config": config, "posthoc_ema": info}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt, path)
        print(f"wrote {path} ({what}, step {t_step})", flush=True)


if __name__ == "__main__":
    run_main(main)
