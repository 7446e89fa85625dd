r"""Quick look at a checkpoint: sample a few class labels in one process (CPU or GPU) and save a grid PNG.

    python train_gen/sample.py --ckpt results/FCDM-XL-diffusion-imagenet256-bs256-lr1e-4-seed0/checkpoints/0400000.pt \
        --class-labels 207 360 387 974 88 979 417 279 --cfg-scale 4.0 --out grid.png

Autoguidance: add `--guide-ckpt EARLY.pt` (an early checkpoint of the same run, or a smaller model on the same
latents); --cfg-scale is then the autoguidance weight.

The model, objective and VAE come from the checkpoint's config; the sampler flags are those of
train_gen/sample_ddp.py. Image k uses the random stream of (--seed, k), the same as sample index k of
sample_ddp.py with that global seed.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from diffusion.sampling import (
    DIT_SAMPLE_LABELS,
    SamplerSettings,
    add_sampler_args,
    generate,
    guidance_text,
    load_setup,
)
from evaluations.archives import write_png
from fcdm_common.cli import HelpFormatter, UserError, non_negative_int, positive_int, run_main, seed_int
from fcdm_common.images import save_grid
from fcdm_common.io import check_writable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="checkpoint written by train_gen/train.py (<step>.pt, or its EMA export "
                        "<step>-ema.safetensors) or models.convert_official, or a plain DiT state dict (e.g. "
                        "DiT-XL-2-256x256.pt, with --model DiT-XL/2)")
    p.add_argument("--model", default=None, help="optional: the model name the checkpoint must hold")
    p.add_argument("--class-labels", type=non_negative_int, nargs="+", default=None,
                   help="labels to sample, one image each, in 0..num_classes-1 of the checkpoint (default: DiT's 8 "
                        "classes for 1000-class models, else every class up to 8)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed in 0..2**32-1; image k depends on (seed, k) only")
    p.add_argument("--out", default="sample.png", help="grid PNG to write")
    p.add_argument("--nrow", type=positive_int, default=None,
                   help="images per grid row, >= 1 (default: about sqrt(N), max 8)")
    p.add_argument("--save-individual", default=None, metavar="DIR",
                   help="also write each image as DIR/NNNNNN_label.png")
    add_sampler_args(p, cfg_scale_default=4.0, forward_batch_default=0)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    for path in (args.out, *([Path(args.save_individual) / "x.png"] if args.save_individual else [])):
        check_writable(path)  # a read-only folder fails now, not after sampling

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    setup = load_setup(args.ckpt, model_name=args.model, use_ema=args.use_ema, vae=args.vae,
                       hf_model_name=args.hf_model_name, hf_model_dir=args.hf_model_dir, device=device,
                       guide_ckpt=args.guide_ckpt, guide_use_ema=args.guide_use_ema)
    s = SamplerSettings.from_args(args, setup)
    labels = args.class_labels
    if labels is None:
        labels = list(DIT_SAMPLE_LABELS) if setup.num_classes == 1000 else list(range(min(setup.num_classes, 8)))
    bad = [v for v in labels if not 0 <= v < setup.num_classes]
    if bad:
        raise UserError(f"--class-labels {' '.join(map(str, bad))} out of range: {setup.model_name} in {args.ckpt} "
                        f"has classes 0..{setup.num_classes - 1}")
    stats = {}
    images, labels = generate(setup, range(len(labels)), s, seed=args.seed, labels=labels, progress=True,
                              stats=stats)
    nrow = args.nrow or min(8, math.ceil(math.sqrt(len(images))))
    save_grid(images, args.out, nrow=nrow)
    print(f"wrote {args.out} ({len(images)} images, {s.sampler} {s.num_steps} steps, {guidance_text(s, setup)}, "
          f"{stats['nfe']} network evaluations, {s.kernels or 'torch'} kernels)")
    if args.save_individual:
        folder = Path(args.save_individual)
        for k, (img, lab) in enumerate(zip(images, labels)):
            write_png(folder / f"{k:06d}_{lab}.png", img)
        print(f"wrote {len(images)} images to {folder}")


if __name__ == "__main__":
    run_main(main)
