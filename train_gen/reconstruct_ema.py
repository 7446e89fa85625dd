"""Reconstruct a post-hoc EMA of any width from the snapshots a run saved (EDM2's power-function EMA).

    python train_gen/reconstruct_ema.py --run results/RUN --sigma-rel 0.07 --out ema-0.07.pt
    python train_gen/reconstruct_ema.py --run results/RUN --sweep 0.03,0.05,0.07,0.10,0.15 --out sweep/

The run must have been trained with `--posthoc-ema-snapshot-every N` (train.py). The average with
relative width sigma_rel at step T (default: the newest snapshot) is the least-squares combination
of the snapshots <run>/posthoc_ema/*.safetensors whose response profiles best match the wanted one
(fcdm_common/ema.py has the math). The output is a checkpoint of train.py's format whose "ema" (and
"model") weights are the reconstruction, with the run's config, so train_gen/sample.py and
sample_ddp.py load it with --ckpt.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fcdm_common.checkpoint import save_checkpoint
from fcdm_common.cli import HelpFormatter, UserError, positive_int, run_main
from fcdm_common.ema import (gamma_to_sigma_rel, list_posthoc_snapshots, reconstruct_from_snapshots,
                             sigma_rel_to_gamma)


def _float_list(value: str) -> list:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.03,0.05,0.1, got {value!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one sigma_rel")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="run folder of train.py (holds config.json and posthoc_ema/)")
    p.add_argument("--sigma-rel", type=float, default=None,
                   help="relative width of the wanted average (EDM2: 0.05-0.15 typical; must be <= 0.2887)")
    p.add_argument("--sweep", type=_float_list, default=None,
                   help="several sigma_rel values, comma-separated: --out is then a folder, one checkpoint each")
    p.add_argument("--at-step", type=positive_int, default=None,
                   help="reconstruct the average as of this step (default: the newest snapshot's step)")
    p.add_argument("--out", required=True, help="output checkpoint (.pt), or a folder with --sweep")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if (args.sigma_rel is None) == (args.sweep is None):
        raise UserError("give exactly one of --sigma-rel S or --sweep S1,S2,...")
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
    sigmas = args.sweep if args.sweep is not None else [args.sigma_rel]
    targets = []
    for s in sigmas:
        try:
            targets.append((step, sigma_rel_to_gamma(s)))
        except ValueError as e:
            raise UserError(f"--sigma-rel {s}: {e}") from None
    used = [s for s in snapshots if s["step"] <= step]
    print(f"{len(used)} snapshots (steps {used[0]['step']}-{used[-1]['step']}, sigma_rel "
          f"{sorted({s['sigma_rel'] for s in used})}); reconstructing sigma_rel {sigmas} at step {step}", flush=True)
    results = reconstruct_from_snapshots(used, targets, log=lambda m: print(m, flush=True))
    out = Path(args.out)
    if args.sweep is not None:
        out.mkdir(parents=True, exist_ok=True)
    for s, (t_step, gamma), (state, coefs) in zip(sigmas, targets, results):
        path = out / f"ema-sigma{s:.4f}-{t_step:07d}.pt" if args.sweep is not None else out
        ckpt = {"model": state, "ema": state, "step": t_step, "config": config,
                "posthoc_ema": {"sigma_rel": s, "gamma": gamma, "achieved_sigma_rel": gamma_to_sigma_rel(gamma),
                                "snapshots": [u["path"].name for u in used],
                                "coefficients": [float(c) for c in coefs]}}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt, path)
        print(f"wrote {path} (sigma_rel {s}, gamma {gamma:.3f}, step {t_step})", flush=True)


if __name__ == "__main__":
    run_main(main)
