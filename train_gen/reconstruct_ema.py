"""Reconstruct a post-hoc EMA of any width, or a classic EMA of any decay, from a run's snapshots (EDM2).

    python train_gen/reconstruct_ema.py --run results/RUN --sigma-rel 0.07 --out ema-0.07.pt
    python train_gen/reconstruct_ema.py --run results/RUN --sweep 0.03,0.05,0.07,0.10,0.15 --out sweep/
    python train_gen/reconstruct_ema.py --run results/RUN --ema-decay 0.9999 --out ema-0.9999.pt

The run must have been trained with `--posthoc-ema-snapshot-every N` (train.py). The average with
relative width sigma_rel at step T (default: the newest snapshot) is the least-squares combination,
with coefficients summing to one, of the snapshots <run>/posthoc_ema/*.safetensors at or before T
whose response profiles best match the wanted one (train_gen/ema.py has the math); a T between
snapshots gives the average as of the newest snapshot before it (later weights are in none).
Damaged snapshots are skipped, and named. The output is a checkpoint of train.py's format whose
"ema" (and "model") weights are the reconstruction, with the run's config, written atomically, so
train_gen/sample.py and sample_ddp.py load it with --ckpt.

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

from fcdm_common.cli import HelpFormatter, UserError, error_summary, float_in, positive_int, run_main
from fcdm_common.io import remove_stale_temps
from models.checkpoints import save_checkpoint
from train_gen.ema import (
    EMATarget,
    classic_ema_initial_weight,
    fit_error,
    gamma_to_sigma_rel,
    reconstruct_from_snapshots,
    scan_posthoc_snapshots,
    sigma_rel_to_gamma,
)

MAX_INITIAL_WEIGHT = 1e-3  # largest beta^T (the classic EMA's share of theta_0, in no snapshot) accepted
SIGMA_REL_MAX = gamma_to_sigma_rel(0.0)  # 1/sqrt(12) = 0.2887: the widest power profile (gamma = 0, uniform)
sigma_rel_arg = float_in(0.0, SIGMA_REL_MAX, lo_open=True)  # EDM2's range of sigma_rel
decay_arg = float_in(0.0, 1.0, lo_open=True, hi_open=True)  # a classic EMA decay beta


def list_arg(parse, example: str):
    """argparse `type=` for a comma-separated list, each item checked by `parse` (a range-checked type)."""
    def parse_list(value: str) -> list:
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers like {example}, got {value!r}")
        try:
            return [parse(v) for v in items]
        except argparse.ArgumentTypeError as e:  # "expected a finite number in (0, 1), got 'x'"
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers like {example}, each "
                                             f"{str(e).removeprefix('expected ')} in {value!r}") from None

    parse_list.__name__ = f"list of {parse.__name__}"
    return parse_list


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="run folder of train.py (holds config.json and posthoc_ema/)")
    p.add_argument("--sigma-rel", type=sigma_rel_arg, default=None,
                   help=f"relative width of the wanted average, in (0, {SIGMA_REL_MAX:.4f}] (EDM2: 0.05-0.15 typical)")
    p.add_argument("--sweep", type=list_arg(sigma_rel_arg, "0.03,0.05,0.1"), default=None,
                   help="several sigma_rel values, comma-separated: --out is then a folder, one checkpoint each")
    p.add_argument("--ema-decay", type=list_arg(decay_arg, "0.999,0.9999"), default=None,
                   help="classic EMA decay(s) beta in (0, 1) to reconstruct, comma-separated (e.g. 0.9999, the "
                        "paper's); may be given with --sigma-rel/--sweep; needs beta^T <= 1e-3 at the step T")
    p.add_argument("--at-step", type=positive_int, default=None,
                   help="reconstruct the average as of this step (default: the newest snapshot's step; a step "
                        "between snapshots gives the average as of the newest snapshot before it)")
    p.add_argument("--out", required=True,
                   help="output checkpoint (.pt) for one target; a folder (one checkpoint each) with --sweep "
                        "or several targets")
    return p


def load_run_config(run: Path) -> dict:
    """The run's config.json (a JSON object), or UserError saying what is wrong with it."""
    config_file = run / "config.json"
    if not config_file.is_file():
        raise UserError(f"{run} is not a train.py run folder (no config.json)")
    fix = ("it is rewritten by every start of train.py with the run's flags, and every checkpoint of the run "
           "holds a copy (its 'config')")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        what = "empty" if not config_file.stat().st_size else error_summary(e)
        raise UserError(f"{config_file} is damaged ({what}); {fix}") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} holds a JSON {type(config).__name__}, not the object of a train.py config; "
                        f"{fix}")
    return config


def output_paths(out: Path, names: list, folder: bool) -> list:
    """The output file of each target (names: their file names in a folder), checked and its folder made;
    temp files of killed earlier writes of these outputs removed."""
    if folder and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; several targets need a folder (one checkpoint each)")
    if not folder and out.is_dir():
        raise UserError(f"--out {out} is a folder; give the path of the .pt file to write")
    paths = [out / n for n in names] if folder else [out]
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out {out}: a parent of it is a file, not a folder") from None
    remove_stale_temps(paths[0].parent, names=[p.name for p in paths])
    return paths


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.sigma_rel is not None and args.sweep is not None:
        raise UserError("give at most one of --sigma-rel S or --sweep S1,S2,...")
    if args.sigma_rel is None and args.sweep is None and args.ema_decay is None:
        raise UserError("give --sigma-rel S, --sweep S1,S2,... or --ema-decay BETA")
    run = Path(args.run)
    config = load_run_config(run)
    snapshots, damaged = scan_posthoc_snapshots(run)
    if damaged:
        print(f"WARNING: skipping {len(damaged)} damaged snapshot(s), reconstructing from the others: "
              + "; ".join(f"{d['path'].name} ({d['reason']})" for d in damaged), flush=True)
    if not snapshots:
        raise UserError(f"{run} has no {'readable ' if damaged else ''}post-hoc EMA snapshots in "
                        f"{run / 'posthoc_ema'}; train with --posthoc-ema-snapshot-every N to save them")
    newest = snapshots[-1]["step"]
    requested = args.at_step or newest
    if requested > newest:
        raise UserError(f"--at-step {requested} is after the newest snapshot (step {newest}); "
                        f"use --at-step <= {newest}")
    if requested < snapshots[0]["step"]:
        raise UserError(f"--at-step {requested} is before the first snapshot (step {snapshots[0]['step']})")
    used = [s for s in snapshots if s["step"] <= requested]
    step = used[-1]["step"]  # the newest step whose weights are in a usable snapshot
    if step != requested:
        print(f"no snapshot at step {requested}: the weights after step {step} are in none, so the averages are "
              f"those as of step {step}, the newest snapshot before it", flush=True)
    sigmas = args.sweep if args.sweep is not None else [] if args.sigma_rel is None else [args.sigma_rel]
    decays = args.ema_decay or []
    targets = [EMATarget(step, gamma=sigma_rel_to_gamma(s)) for s in sigmas]
    for beta in decays:
        w0 = classic_ema_initial_weight(step, beta)
        if w0 > MAX_INITIAL_WEIGHT:
            raise UserError(f"--ema-decay {beta}: at step {step} the classic EMA still holds beta^T = {w0:.3g} of the "
                            f"initial weights, which no snapshot contains (needs <= {MAX_INITIAL_WEIGHT:g}); use a "
                            f"smaller decay (1 - beta >= {-math.log(MAX_INITIAL_WEIGHT) / step:.3g}) or a later step")
        targets.append(EMATarget(step, decay=beta))
    names = [f"ema-sigma{s:.4f}-{step:07d}.pt" for s in sigmas] + \
            [f"ema-decay{format(b, '.10g')}-{step:07d}.pt" for b in decays]
    folder = args.sweep is not None or len(targets) > 1
    paths = output_paths(Path(args.out), names, folder)
    print(f"{len(used)} snapshots (steps {used[0]['step']}-{step}, sigma_rel "
          f"{sorted({s['sigma_rel'] for s in used})}); reconstructing at step {step}: sigma_rel {sigmas}, "
          f"EMA decay {decays}", flush=True)
    try:
        results = reconstruct_from_snapshots(used, targets, log=lambda m: print(m, flush=True))
    except ValueError as e:
        raise UserError(str(e)) from None
    snap_steps, snap_gammas = [u["step"] for u in used], [u["gamma"] for u in used]
    for label, target, (state, coefs), path in zip(sigmas + decays, targets, results, paths):
        err = fit_error(snap_steps, snap_gammas, target, coefs)
        common = {"snapshots": [u["path"].name for u in used], "coefficients": [float(c) for c in coefs],
                  "fit_error": err, "requested_step": requested,
                  "skipped_damaged": [d["path"].name for d in damaged]}
        if target.decay is None:
            gamma = target.gamma
            info = {"sigma_rel": label, "gamma": gamma, "achieved_sigma_rel": gamma_to_sigma_rel(gamma), **common}
            what = f"sigma_rel {label}, gamma {gamma:.3f}"
        else:
            info = {"ema_decay": label, "initial_weight_left_out": classic_ema_initial_weight(step, label), **common}
            what = f"EMA decay {label}"
        ckpt = {"model": state, "ema": state, "step": step, "config": config, "posthoc_ema": info}
        save_checkpoint(ckpt, path)
        print(f"wrote {path} ({what}, step {step}; coefficients summing to {sum(coefs):.6f}, relative L2 error of "
              f"the fitted profile {err:.2%})", flush=True)


if __name__ == "__main__":
    run_main(main)
