"""A self-supervised encoder of the 8x8 digits, for the representation-alignment experiment (docs/training.md).

Representation alignment (train.py --repa-*) pulls the denoiser's features towards a frozen encoder's patch
tokens. On ImageNet that is DINOv2; the digits demo has no such model and nothing may be downloaded, so this
program trains one: a small timm ViT (patch 2, so a 4x4 grid of tokens on an 8x8 digit, the grid of FCDM-digits'
enc1 site) by masked-patch reconstruction (half of the 2x2 patches blanked, a linear decoder predicts their
pixels from the tokens; no labels). Its objective and architecture differ from the evaluation's digits
classifier (a supervised MLP on the 64 grey values, evaluations/digits.py), so alignment is not scored by the
network it was pulled towards.

    python benchmarks/repa_digits_encoder.py --out encoders/digits-mpr --steps 3000
    python train_gen/train.py ... --repa-encoder-path encoders/digits-mpr

The output is a Hub-style snapshot folder (config.json + weights), loaded offline by models/vision_encoders.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fcdm_common.cli import HelpFormatter, float_in, positive_int, run_main, seed_int
from fcdm_common.progress import progress
from preparation.make_demo_dataset import digits_images

ARCH = "vit_tiny_patch16_224"  # timm's ViT, resized by ENCODER_ARGS
ENCODER_ARGS = dict(patch_size=2, img_size=8, embed_dim=64, depth=4, num_heads=4)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="snapshot folder to write (config.json + weights)")
    p.add_argument("--steps", type=positive_int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per step (default 256)")
    p.add_argument("--lr", type=float_in(0, 1, lo_open=True), default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--mask-ratio", type=float_in(0, 1, lo_open=True, hi_open=True), default=0.5,
                   help="fraction of the 2x2 patches blanked per image (default 0.5)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the initialisation, batches and masks")
    return p


def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), row-major patches."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def train_encoder(steps: int, batch_size: int, lr: float, mask_ratio: float, seed: int):
    """The trained ViT and the final masked-patch reconstruction loss (mean of the last 100 steps)."""
    import timm  # deferred: only this experiment needs it here

    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **ENCODER_ARGS)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    p, dim = ENCODER_ARGS["patch_size"], ENCODER_ARGS["embed_dim"]
    decoder = nn.Linear(dim, p * p * 3)
    images = torch.from_numpy(digits_images(upscale=1)[0]).permute(0, 3, 1, 2).float() / 255  # (N, 3, 8, 8)
    x_all = (images - mean) / std  # the normalisation the encoder applies when it is used (VisionEncoder)
    opt = torch.optim.AdamW([*model.parameters(), *decoder.parameters()], lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    n_patch = (8 // p) ** 2
    losses = []
    for _ in progress(range(steps), desc="masked-patch reconstruction"):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        x = x_all[idx]
        keep = torch.rand(batch_size, n_patch, generator=gen) >= mask_ratio  # (B, T) visible patches
        grid = keep.view(batch_size, 1, 8 // p, 8 // p).float()
        visible = x * grid.repeat_interleave(p, 2).repeat_interleave(p, 3)  # blanked patches are 0
        tokens = model.forward_features(visible)[:, model.num_prefix_tokens:]  # (B, T, dim)
        pred = decoder(tokens)
        err = ((pred - patches(x, p)) ** 2).mean(-1)  # (B, T)
        loss = (err * (~keep)).sum() / (~keep).sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return model.eval(), float(np.mean(losses[-100:]))


def main(argv=None):
    args = build_parser().parse_args(argv)
    from timm.models import save_for_hf  # deferred, as above

    model, loss = train_encoder(args.steps, args.batch_size, args.lr, args.mask_ratio, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, out, model_args=ENCODER_ARGS)
    (out / "training.json").write_text(json.dumps({"objective": "masked-patch reconstruction", **vars(args),
                                                   "final_loss": loss, "arch": ARCH, "model_args": ENCODER_ARGS},
                                                  indent=2) + "\n")
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters); masked-patch "
          f"reconstruction loss {loss:.4f} (normalised pixels; predicting 0 scores about 1)")


if __name__ == "__main__":
    run_main(main)
