"""Representation alignment (REPA; Yu et al., "Representation Alignment for Generation: Training Diffusion
Transformers Is Easier Than You Think", ICLR 2025) for the convolutional U-Net.

    loss = diffusion loss + lambda * align,    align = - mean over positions of cos(projector(h), y)

- h: the denoiser's hidden state at a site of the U-Net (`FCDM.parse_site` in models/fcdm.py; default "enc1", the
  end of encoder level 1: 16x16 at 256x256 images), computed on the noisy input inside the training forward pass.
- y: the frozen encoder's patch tokens of the clean image the latent came from, with the same flip
  (models/vision_encoders.py; the images are stored beside the latents by preparation/extract_features.py
  --repa-image-size). Class and register tokens are dropped.
- projector: a per-position MLP, 3 linear layers of width 2048 with SiLU (REPA's), from the site's channels to the
  encoder's width. It is trained with the network, saved in every checkpoint as "projector" and resumed with it;
  it is not part of the EMA nor of the exported generator, which stay the denoiser alone.

Grids. The encoder's input side defaults to the site's side times the encoder's patch size, so both grids are
the same: 224 for DINOv2-B/14 at 256x256 images (32x32 latents, enc1 16x16), 448 at 512x512 (64x64 latents,
enc1 32x32), REPA's own choices. When they still differ (--repa-encoder-resolution, a site at another level) the
projected feature map is brought to the encoder's grid before the cosine (`to_grid`): averaged over the area of
each token when it is larger, bilinearly interpolated when it is smaller.

Precision. The encoder runs under the run's autocast; the cosine is computed in float32 outside autocast (REPA's
reports of NaN losses came from normalising half-precision features).

No random draw is added: the encoder runs in eval mode, so every step stays a function of (seed, step, sample
index) (train_gen/step_draws.py) and a run is the same at any process count and accumulation.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fcdm_common.cli import UserError, float_in, positive_int
from train_gen.config import RepaConfig

DEFAULT_SITE = "enc1"  # the end of encoder level 1: 16x16 at 256x256, the grid of DINOv2-B/14 at 224
DEFAULT_WEIGHT = 0.5  # REPA's lambda
PROJECTOR_WIDTH = 2048  # REPA's projector: 3 linear layers of this width with SiLU
WEIGHT_MAX = 100.0  # a sanity bound of --repa-weight


# ---------------------------------------------------------------------------------- the pieces
class Projector(nn.Module):
    """Per-position MLP: Linear(C, W) -> SiLU -> Linear(W, W) -> SiLU -> Linear(W, D), on channels-last features."""

    def __init__(self, in_dim: int, out_dim: int, width: int = PROJECTOR_WIDTH):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, out_dim))  # torch's default init, as REPA's release

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)  # (N, H, W, C) -> (N, H, W, D)


def to_grid(p: torch.Tensor, grid) -> torch.Tensor:
    """Projected features (N, H, W, D) as tokens (N, gh * gw, D) on the encoder's grid (row-major). A larger
    feature map is averaged over the area each token covers (adaptive average pooling: the mean of each 2x2 block
    when it is twice the grid), a smaller one is interpolated bilinearly (align_corners=False)."""
    gh, gw = (int(v) for v in grid)
    h, w = p.shape[1:3]
    if (h, w) != (gh, gw):
        q = p.permute(0, 3, 1, 2)
        q = F.adaptive_avg_pool2d(q, (gh, gw)) if h >= gh and w >= gw else \
            F.interpolate(q, size=(gh, gw), mode="bilinear", align_corners=False)
        p = q.permute(0, 2, 3, 1)
    return p.reshape(p.shape[0], gh * gw, p.shape[-1])


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample align = - mean over positions of cos(projected, target), both (N, T, D); float32, computed
    outside autocast (normalising half-precision features overflows). In [-1, 1]: -1 when aligned."""
    if projected.shape != target.shape:
        raise ValueError(f"projected features {tuple(projected.shape)} and encoder tokens {tuple(target.shape)} differ")
    with torch.autocast(device_type=projected.device.type, enabled=False):
        p = F.normalize(projected.float(), dim=-1)
        y = F.normalize(target.float(), dim=-1)
        return -(p * y).sum(dim=-1).mean(dim=1)  # (N,)


class AlignedDenoiser(nn.Module):
    """What training differentiates (and DDP wraps) when alignment is on: the denoiser and the projector.
    `forward(x, t, y, drop_mask)` is the denoiser's output; the projected features of that same pass, on the
    encoder's grid, are kept in `projected` (N, T, D) for the alignment term."""

    def __init__(self, net: nn.Module, projector: Projector, site: str, grid):
        super().__init__()
        self.net = net  # the denoiser (its state dict, EMA and exports are its own)
        self.projector = projector
        self.site = site
        self.grid = tuple(int(v) for v in grid)
        self.projected: Optional[torch.Tensor] = None

    def forward(self, x, t, y, drop_mask=None):
        out, h = self.net(x, t, y, drop_mask=drop_mask, features_at=self.site)
        self.projected = to_grid(self.projector(h), self.grid)
        return out


class Repa:
    """The alignment of one run: the frozen encoder, the projector, lambda, and the module training runs."""

    def __init__(self, config: RepaConfig, model: nn.Module, projector: Projector, encoder: nn.Module):
        self.config = config
        self.weight = float(config.weight)
        self.encoder = encoder  # frozen, eval mode (models/vision_encoders.py)
        self.projector = projector
        self.module = AlignedDenoiser(model, projector, config.site, config.encoder_grid)

    def to(self, device) -> "Repa":
        self.projector.to(device)
        self.encoder.to(device)
        return self

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Per-sample align of the last forward pass of `module` against the encoder's tokens of `images`
        (B, 3, S, S) uint8, the micro-batch's clean images."""
        with torch.no_grad():
            target = self.encoder(images)  # (B, T, D), under the caller's autocast
        projected, self.module.projected = self.module.projected, None
        if projected is None:
            raise RuntimeError("Repa.loss needs a forward pass of Repa.module first")
        return alignment_loss(projected, target)


# ---------------------------------------------------------------------------------- flags and config
def add_repa_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("representation alignment (REPA; off unless an encoder is given)")
    g.add_argument("--repa-encoder", default=None, metavar="NAME",
                   help="timm architecture of the frozen encoder, e.g. vit_base_patch14_dinov2.lvd142m (REPA's "
                        "DINOv2-B/14); optional when --repa-encoder-path is a snapshot folder whose config.json "
                        "names it. Needs a store with images (extract_features.py --repa-image-size)")
    g.add_argument("--repa-encoder-path", default=None, metavar="PATH",
                   help="its local weights: a .safetensors/.pth file or a snapshot folder (download_snapshot.py "
                        "--repo-id timm/<name>); nothing is downloaded")
    g.add_argument("--repa-site", default=DEFAULT_SITE, metavar="SITE",
                   help="where the denoiser's features are aligned: enc<L> (end of encoder level L), enc<L>.<B> "
                        "(block B of it), mid, mid.<B>, dec<L>, dec<L>.<B>; levels count from 0 at the latent size. "
                        f"Default {DEFAULT_SITE}: 16x16 at 256x256 images, DINOv2-B/14's grid at 224")
    g.add_argument("--repa-weight", type=float_in(0, WEIGHT_MAX), default=DEFAULT_WEIGHT, metavar="LAMBDA",
                   help=f"lambda of the alignment term, in [0, {WEIGHT_MAX:g}] (REPA: {DEFAULT_WEIGHT}; 0 trains the "
                        "projector's existence only: the network's trajectory is the run without alignment)")
    g.add_argument("--repa-projector-width", type=positive_int, default=PROJECTOR_WIDTH,
                   help=f"hidden width of the 3-layer projector MLP (REPA: {PROJECTOR_WIDTH})")
    g.add_argument("--repa-encoder-resolution", type=positive_int, default=None, metavar="PIXELS",
                   help="the encoder's input side (default: the site's side x the encoder's patch size, so both "
                        "grids match: 224 for DINOv2-B/14 at 256x256, 448 at 512x512); a multiple of the patch size")


def repa_requested(args) -> bool:
    return bool(args.repa_encoder or args.repa_encoder_path)


def build_repa(args, model: nn.Module, latent_shape, images_size: int, device) -> tuple[RepaConfig, Repa]:
    """The encoder (loaded from its local file, checked against the site) and a fresh projector. Call it right
    after the model is built, under the same seed, so the projector's initialisation is a function of --seed."""
    # deferred: the encoder loader imports timm (~1.5 s per process); only runs with alignment need it
    from models.vision_encoders import load_vision_encoder, resolution_for_grid

    if not args.repa_encoder_path:
        raise UserError("--repa-encoder needs --repa-encoder-path, the encoder's local weights file or snapshot folder")
    if not hasattr(model, "parse_site"):
        raise UserError("representation alignment (--repa-*) needs a model with feature sites (FCDM); "
                        f"{type(model).__name__} has none")
    try:
        site_shape = model.site_shape(args.repa_site, *latent_shape[1:])
    except ValueError as e:
        raise UserError(f"--repa-site: {e}") from None
    resolution = args.repa_encoder_resolution
    projector_rng = torch.random.get_rng_state()  # loading must not move the stream the projector is drawn from
    encoder = load_vision_encoder(args.repa_encoder, args.repa_encoder_path, resolution=resolution, device=device)
    if resolution is None and encoder.resolution != resolution_for_grid(site_shape[1], encoder.patch_size):
        # default: the resolution whose grid is the site's (one more load, with the position embedding resampled)
        encoder = load_vision_encoder(args.repa_encoder, args.repa_encoder_path,
                                      resolution=resolution_for_grid(site_shape[1], encoder.patch_size),
                                      device=device)
    torch.random.set_rng_state(projector_rng)
    config = RepaConfig(encoder=encoder.name, encoder_path=str(args.repa_encoder_path),
                        encoder_resolution=int(encoder.resolution), encoder_grid=tuple(int(v) for v in encoder.grid),
                        encoder_dim=int(encoder.embed_dim), site=args.repa_site,
                        site_shape=tuple(int(v) for v in site_shape), weight=float(args.repa_weight),
                        projector_width=int(args.repa_projector_width), images_size=int(images_size))
    projector = Projector(site_shape[0], encoder.embed_dim, args.repa_projector_width)
    return config, Repa(config, model, projector, encoder)


def check_repa_flags(args) -> None:
    """Alignment settings given without an encoder would silently train without alignment: refuse them."""
    if repa_requested(args):
        return
    given = [flag for flag, key, default in (("--repa-site", "repa_site", DEFAULT_SITE),
                                             ("--repa-weight", "repa_weight", DEFAULT_WEIGHT),
                                             ("--repa-projector-width", "repa_projector_width", PROJECTOR_WIDTH),
                                             ("--repa-encoder-resolution", "repa_encoder_resolution", None))
             if getattr(args, key) != default]
    if given:
        raise UserError(f"{', '.join(given)} set without --repa-encoder/--repa-encoder-path: representation "
                        "alignment is off unless an encoder is given")


def repa_name_settings(args) -> Optional[dict]:
    """The alignment flags that the run name's hash covers (None when alignment is off)."""
    if not repa_requested(args):
        return None
    return {"encoder": args.repa_encoder or str(args.repa_encoder_path).rstrip("/").rsplit("/", 1)[-1],
            "site": args.repa_site, "weight": args.repa_weight, "width": args.repa_projector_width,
            "resolution": args.repa_encoder_resolution}


def repa_identity(repa: Optional[dict]) -> Optional[dict]:
    """The settings of a `RepaConfig` dict that decide the trajectory (the run name, resume checks): all but the
    encoder's file path, which may move."""
    if not repa:
        return None
    return {k: v for k, v in repa.items() if k != "encoder_path"}


def describe_repa(config: RepaConfig, encoder) -> str:
    """One log line."""
    c, h, w = config.site_shape
    gh, gw = config.encoder_grid
    resize = "" if (h, w) == (gh, gw) else f", resized {h}x{w} -> {gh}x{gw}"
    return (f"representation alignment: site {config.site} ({c} channels, {h}x{w}{resize}) -> projector "
            f"(width {config.projector_width}) -> {config.encoder} at {config.encoder_resolution}px "
            f"({gh}x{gw} tokens of {config.encoder_dim}, {getattr(encoder, 'num_params', 0) / 1e6:.2f}M frozen "
            f"parameters, from {config.encoder_path}); images stored at {config.images_size}px; "
            f"lambda {config.weight:g}")
