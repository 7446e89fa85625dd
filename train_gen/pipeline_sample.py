"""Sample a grid from an exported FCDMPipeline folder (train_gen/export_pipeline.py), offline.

    python train_gen/pipeline_sample.py --pipeline fcdm-xl-256 --class-labels 207 360 --seed 0 --out grid.png

`--seed S` uses the per-sample random streams of sample.py, so the images equal
`train_gen/sample.py --seed S` with the same labels, sampler and steps. `--sampler` swaps the folder's
scheduler for a diffusers-driven sampler of sample.py (dpm++2m, unipc, ..., diffusers:<Class>) built from
the network's beta schedule.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from diffusion import create_objective
from diffusion.guidance import CFG_SCALE_HELP, cfg_scale_arg, parse_cfg_channels
from diffusion.pipeline import FCDMPipeline
from diffusion.schedulers import build_scheduler
from evaluations.archives import write_png
from fcdm_common.cli import HelpFormatter, UserError, alias_help, non_negative_int, positive_int, run_main, seed_int
from fcdm_common.images import save_grid
from fcdm_common.io import check_writable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--pipeline", required=True, help="folder written by train_gen/export_pipeline.py")
    p.add_argument("--class-labels", type=non_negative_int, nargs="+", required=True,
                   help="one image per label, each in 0..num_classes-1 of the exported network")
    p.add_argument("--num-sampling-steps", "--num-inference-steps", dest="num_sampling_steps", type=positive_int,
                   default=25, help=alias_help("scheduler steps, at most the network's diffusion steps T (1000) "
                                               "(default 25)", "--num-inference-steps"))
    p.add_argument("--cfg-scale", "--guidance-scale", dest="cfg_scale", type=cfg_scale_arg, default=4.0,
                   help=alias_help(f"classifier-free guidance scale {CFG_SCALE_HELP} (default 4.0)",
                                   "--guidance-scale"))
    p.add_argument("--cfg-channels", default="all", help="guide 'all' channels (default) or the first K (DiT: 3)")
    p.add_argument("--sampler", "--scheduler", dest="sampler", default=None,
                   help=alias_help("replace the folder's scheduler (a sample.py --sampler name)", "--scheduler"))
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed in 0..2**32-1: image k uses the stream of (seed, k), as sample.py (default 0)")
    p.add_argument("--out", default="pipeline_grid.png", help="grid PNG to write")
    p.add_argument("--save-individual", default=None, metavar="DIR", help="also write DIR/NNNNNN_label.png")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    for path in (args.out, *([Path(args.save_individual) / "x.png"] if args.save_individual else [])):
        check_writable(path)  # a read-only folder fails now, not after sampling

    pipe = FCDMPipeline.from_pretrained(args.pipeline, local_files_only=True).to(args.device)
    cfg = pipe.transformer.config
    bad = [v for v in args.class_labels if not 0 <= v < cfg.num_classes]
    if bad:
        raise UserError(f"--class-labels {' '.join(map(str, bad))} out of range 0..{cfg.num_classes - 1}")
    if args.sampler is not None:
        try:
            pipe.scheduler = build_scheduler(args.sampler, create_objective(cfg.objective, **cfg.objective_kwargs))
        except ValueError as e:
            raise UserError(f"--sampler {args.sampler}: {e}") from None
    total = int(pipe.scheduler.config.num_train_timesteps)
    if args.num_sampling_steps > total:
        raise UserError(f"--num-sampling-steps {args.num_sampling_steps} exceeds the network's {total} diffusion "
                        f"steps; a diffusion sampler takes at most {total}")
    channels = parse_cfg_channels(args.cfg_channels, int(cfg.latent_shape[0]))
    images = pipe(class_labels=args.class_labels, num_inference_steps=args.num_sampling_steps,
                  guidance_scale=args.cfg_scale, seed=args.seed, cfg_channels=channels, output_type="np").images
    uint8 = np.rint(images * 255.0).astype(np.uint8)
    save_grid(uint8, args.out, nrow=min(8, math.ceil(math.sqrt(len(uint8)))))
    print(f"wrote {args.out} ({len(uint8)} images, {type(pipe.scheduler).__name__} {args.num_sampling_steps} steps, "
          f"guidance {args.cfg_scale})")
    if args.save_individual:
        folder = Path(args.save_individual)
        for k, (img, lab) in enumerate(zip(uint8, args.class_labels)):
            write_png(folder / f"{k:06d}_{lab}.png", img)
        print(f"wrote {len(uint8)} images to {folder}")


if __name__ == "__main__":
    run_main(main)
