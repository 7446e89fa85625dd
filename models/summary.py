"""Model table: parameters and forward GFLOPs of every registered model next to the paper's Table 1.

FLOPs are multiply-accumulates of one forward pass of one image (the convention of DiT and the FCDM
paper), counted with `torch.utils.flop_counter` on the meta device, so even FCDM-XL is measured in a
second without allocating its weights.

    python -m models.summary                 # every registered model at 256 and 512 (SD-VAE latents)
    python -m models.summary --models FCDM-S FCDM-XL --resolutions 256
    python -m models.summary --models FCDM-XL --latents 32x8x8 16x32x32   # other latent spaces (CxHxW)
"""
from __future__ import annotations

import argparse
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from fcdm_common.cli import HelpFormatter, UserError, positive_int, run_main

from . import MODELS, create_model

# Table 1 of the paper (params in millions, GFLOPs at 256x256), and FCDM-XL at 512x512.
PAPER_TABLE1 = {
    "FCDM-S": {"params_m": 32.7, "gflops": {256: 3.1}},
    "FCDM-B": {"params_m": 127.7, "gflops": {256: 12.2}},
    "FCDM-L": {"params_m": 504.5, "gflops": {256: 48.3}},
    "FCDM-XL": {"params_m": 698.8, "gflops": {256: 64.6, 512: 257.7}},
    "DiT-XL/2": {"params_m": 675.0, "gflops": {256: 118.6}},
}
VAE_DOWNSAMPLE = 8  # SD-VAE: 256x256 images -> 32x32 latents


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_gmacs(model: torch.nn.Module, latent_size: int, in_channels: int | None = None) -> float:
    """Multiply-accumulates (in units of 1e9) of one forward pass at batch 1. Works on meta models."""
    p = next(model.parameters())
    c = in_channels if in_channels is not None else model.in_channels
    x = torch.zeros(1, c, latent_size, latent_size, device=p.device)
    t = torch.zeros(1, device=p.device)
    y = torch.zeros(1, dtype=torch.long, device=p.device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with counter, torch.no_grad():
            model(x, t, y)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2e9


def summarize(name: str, resolutions: Sequence[int] = (256, 512)) -> dict:
    """Params (M) and GFLOPs at each image resolution of a registered model, built on the meta device."""
    with torch.device("meta"):
        model = create_model(name)
    row = {"model": name, "params_m": count_params(model) / 1e6, "gflops": {}}
    down = VAE_DOWNSAMPLE if getattr(model, "in_channels", 4) == 4 else 1
    for res in resolutions:
        m = model
        if getattr(model, "input_size", None) not in (None, res // down):  # fixed-size models (DiT)
            with torch.device("meta"):
                m = create_model(name, input_size=res // down)
        row["gflops"][res] = forward_gmacs(m, res // down)
    return row


def latent_shape(value: str) -> tuple[int, int, int]:
    """'32x8x8' -> (32, 8, 8): channels x height x width of the latents."""
    try:
        c, h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 32x8x8, got {value!r}") from None
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"every size in {value!r} must be >= 1")
    return c, h, w


def latent_gflops(name: str, shape: tuple[int, int, int]) -> float:
    """GFLOPs (MACs) of one forward pass on C x H x W latents (in_channels = C; DiT gets input_size H)."""
    c, h, w = shape
    if h != w:
        raise UserError(f"latents {c}x{h}x{w}: only square latents are tabulated")
    with torch.device("meta"):
        try:
            model = create_model(name, in_channels=c, input_size=h)
        except TypeError:  # FCDM takes any size and has no input_size
            model = create_model(name, in_channels=c)
    levels = getattr(model, "num_levels", 1)
    if h % 2 ** (levels - 1):
        raise UserError(f"{name} has {levels} levels and needs sizes divisible by {2 ** (levels - 1)}; got {h}")
    return forward_gmacs(model, h, in_channels=c)


def format_table(rows: Sequence[dict], resolutions: Sequence[int]) -> str:
    head = ["model", "params (M)", "paper"] + [f"GFLOPs@{r}" for r in resolutions] + [
        f"paper@{r}" for r in resolutions
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        paper = PAPER_TABLE1.get(row["model"], {})
        cells = [row["model"], f"{row['params_m']:.2f}", f"{paper['params_m']:.1f}" if paper else "-"]
        cells += [f"{row['gflops'][r]:.2f}" for r in resolutions]
        cells += [f"{paper['gflops'][r]:.1f}" if r in paper.get("gflops", {}) else "-" for r in resolutions]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=None,
                        help="registered model names (default: every registered model except demo presets)")
    parser.add_argument("--resolutions", nargs="+", type=positive_int, default=[256, 512],
                        help="image resolutions; latent models see resolution/8 (default: 256 512)")
    parser.add_argument("--latents", nargs="+", type=latent_shape, default=None, metavar="CxHxW",
                        help="instead: GFLOPs on these latent shapes, e.g. 32x8x8 (DC-AE f32c32 at 256) "
                             "16x32x32 (16-channel SD3/FLUX-style VAE at 256)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    names = args.models or [n for n in MODELS if not n.endswith("digits")]
    for n in names:
        if n not in MODELS:
            raise UserError(f"unknown model {n!r}; registered: {', '.join(sorted(MODELS))}")
    for r in args.resolutions:
        if r % VAE_DOWNSAMPLE:
            raise UserError(f"resolution {r} is not a multiple of the VAE downsampling factor {VAE_DOWNSAMPLE}")
    if args.latents:
        head = ["model"] + [f"GFLOPs@{c}x{h}x{w}" for c, h, w in args.latents]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for n in names:
            print("| " + " | ".join([n] + [f"{latent_gflops(n, s):.2f}" for s in args.latents]) + " |")
        return
    rows = [summarize(n, args.resolutions) for n in names]
    print(format_table(rows, args.resolutions))


if __name__ == "__main__":
    run_main(main)
