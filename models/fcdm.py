"""FCDM: the fully convolutional diffusion model (Kwon et al., "Reviving ConvNeXt for Efficient
Convolutional Diffusion Models", CVPR 2026; Figure 4 and Table 6 of the paper).

A class-conditional U-Net built only from ConvNeXt-style blocks:

    stem 3x3 conv -> [encoder blocks -> downsample] x (n-1) -> middle blocks
                  -> [upsample -> concat skip -> 1x1 fuse -> decoder blocks] x (n-1) -> adaLN head

Each level has its own timestep embedder and class-embedding table; a block's condition is
c = t_emb + y_emb at its level's width. The block is

    x -> 7x7 depthwise conv -> LayerNorm (no affine) -> (1 + scale) * . + shift
      -> 1x1 conv W->3W -> GELU -> GRN -> 1x1 conv 3W->W -> * gate -> + x

with (shift, scale, gate) from a zero-initialised adaLN (so every block starts as the identity).

The layers, their channels-last layout and their fast backward passes are in models/layers.py;
models/fcdm_reference.py is the same network written plainly in NCHW, for tests and benchmarks.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn as nn

from models.kernels import KERNELS
from models.kernels import load as load_kernels
from models.layers import (
    GRN,
    Conv3x3,
    DepthwiseConv,
    Downsample,
    TimestepEmbedder,
    Upsample,
    functorch_transformed,
    modulate,
    resolve_checkpoint_mode,
    run_block,
)
from models.registry import register

# ----------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------


LABEL_DROPOUT_MODES = ("shared", "per-level")  # how label dropout is drawn across the U-Net levels


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class FCDMBlock(nn.Module):
    """The FCDM block (the paper, Figure 4): depthwise conv, adaLN-modulated LayerNorm,
    inverted bottleneck with GELU and GRN, gated residual. Channels-last in and out."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: int = 3):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dwconv = DepthwiseConv(dim, kernel_size)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)  # 1x1 conv W -> rW
        self.act = nn.GELU()
        self.grn = GRN(hidden)
        self.pwconv2 = nn.Linear(hidden, dim)  # 1x1 conv rW -> W
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.fused = None  # the fused forward of models/kernels (FCDM.set_kernels), None: this torch path

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, H, W, C) channels-last activations; c: (N, C) condition of this level
        if self.fused is not None and not functorch_transformed(x):
            return self.fused(self, x, c)  # the same block through fused kernels (models/kernels/)
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)  # 3 x (N, C)
        h = modulate(self.norm(self.dwconv(x)), shift, scale)
        h = self.pwconv2(self.grn(self.act(self.pwconv1(h))))  # (N, H, W, C)
        return torch.addcmul(x, gate[:, None, None, :].to(h.dtype), h)


class Head(nn.Module):
    """3x3 conv C -> C, LayerNorm modulated by adaLN (level-1 condition), 3x3 conv C -> out."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.conv = Conv3x3(dim, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Conv2d(dim, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        h = modulate(self.norm(self.conv(x)), shift, scale)  # (N, H, W, C)
        return self.out(h.permute(0, 3, 1, 2))  # (N, out, H, W), channels-last memory


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


class FCDM(nn.Module):
    """Fully Convolutional Diffusion Model. `forward(x, t, y)`: x (N, C_in, H, W) NCHW latents,
    t (N,) timesteps (int or float), y (N,) labels in [0, num_classes] (num_classes = null label).
    Returns (N, C_out, H, W) with C_out = 2 * C_in when learn_sigma else C_in."""

    def __init__(
        self,
        in_channels: int = 4,  # latent channels (4 for SD-VAE latents, 3 for pixels)
        hidden_size: int = 512,  # width C of the first level; level i has width C * 2^i
        depths: Sequence[int] = (3, 6, 12, 6, 3),  # blocks per stage: encoder levels, middle, decoder levels (odd)
        kernel_size: int = 7,  # depthwise kernel size (paper ablates 3, 5, 7)
        mlp_ratio: int = 3,  # expansion r of the inverted bottleneck
        num_classes: int = 1000,  # class labels 0..num_classes-1; num_classes is the null label
        class_dropout_prob: float = 0.1,  # label dropout for classifier-free guidance (training only)
        learn_sigma: bool = True,  # also predict the iDDPM variance interpolation v (doubles the output)
        label_dropout: str = "shared",  # "shared": one draw per sample (paper); "per-level": one per level (release)
    ):
        super().__init__()
        depths = tuple(int(d) for d in depths)
        if len(depths) % 2 != 1 or any(d < 0 for d in depths):
            raise ValueError(f"depths must have odd length 2n-1 of non-negative ints, got {depths}")
        if hidden_size % 2:
            raise ValueError(f"hidden_size must be even, got {hidden_size}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depths = depths
        self.kernel_size = kernel_size
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        if label_dropout not in LABEL_DROPOUT_MODES:
            raise ValueError(f"label_dropout must be one of {LABEL_DROPOUT_MODES}, got {label_dropout!r}")
        self.label_dropout = label_dropout
        self.learn_sigma = learn_sigma
        self.num_levels = n = (len(depths) + 1) // 2
        self.widths = tuple(hidden_size * 2**i for i in range(n))
        self.checkpoint_mode = "none"
        self.kernels = "torch"  # the blocks' implementation (set_kernels)

        self.stem = nn.Conv2d(in_channels, hidden_size, 3, padding=1)
        self.t_embedders = nn.ModuleList(TimestepEmbedder(w) for w in self.widths)
        self.y_embedders = nn.ModuleList(nn.Embedding(num_classes + 1, w) for w in self.widths)
        block = partial(FCDMBlock, kernel_size=kernel_size, mlp_ratio=mlp_ratio)
        self.encoder = nn.ModuleList(
            nn.ModuleList(block(self.widths[i]) for _ in range(depths[i])) for i in range(n - 1)
        )
        self.downsamples = nn.ModuleList(Downsample(self.widths[i]) for i in range(n - 1))
        self.middle = nn.ModuleList(block(self.widths[n - 1]) for _ in range(depths[n - 1]))
        self.upsamples = nn.ModuleList(Upsample(self.widths[i]) for i in range(n - 1))
        self.fuse = nn.ModuleList(nn.Linear(2 * self.widths[i], self.widths[i]) for i in range(n - 1))
        # decoder[i] runs at level i; its depth is the mirror entry of `depths`
        self.decoder = nn.ModuleList(
            nn.ModuleList(block(self.widths[i]) for _ in range(depths[2 * n - 2 - i])) for i in range(n - 1)
        )
        self.head = Head(hidden_size, self.out_channels)
        self.initialize_weights()

    # -- initialisation (DiT's recipe as the authors' release applies it, module by module) -----
    def initialize_weights(self) -> None:
        """xavier_uniform_ on every Linear/conv weight as it is: a 4-D conv weight (out, in/groups, kh, kw)
        has torch's fans fan_in = in/groups*kh*kw, fan_out = out*kh*kw (the depthwise weight is
        (dim, 1, k, k) like the release's Conv2d(groups=dim)); 1x1 convs are Linear layers here, whose
        (out, in) fans equal the release's (out, in, 1, 1) conv. The stem only: xavier on the flattened
        (out, in*kh*kw) matrix (DiT's patch-embedding idiom). Zero biases; normal(0, 0.02) label tables
        and timestep-MLP weights; zero GRN, adaLN output layers and the head's last conv."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, DepthwiseConv)):
                nn.init.xavier_uniform_(m.weight)  # torch's fans of the tensor as it is
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.stem.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # fans of the (out, in*k*k) matrix
        for emb in self.y_embedders:
            nn.init.normal_(emb.weight, std=0.02)
        for te in self.t_embedders:
            nn.init.normal_(te.mlp[0].weight, std=0.02)
            nn.init.normal_(te.mlp[2].weight, std=0.02)
        for blk in self.blocks():
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            nn.init.zeros_(blk.grn.weight)
            nn.init.zeros_(blk.grn.bias)
        nn.init.zeros_(self.head.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.head.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.head.out.weight)
        nn.init.zeros_(self.head.out.bias)

    def blocks(self):
        """All FCDM blocks in execution order."""
        for stage in self.encoder:
            yield from stage
        yield from self.middle
        for stage in reversed(self.decoder):
            yield from stage

    # -- switches ------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool | str = True) -> None:
        """Recompute blocks in backward: True/'full' (everything), 'selective' (keep matmul and
        conv outputs, recompute the rest), False/'none'. Non-reentrant; outputs are unchanged."""
        mode = resolve_checkpoint_mode(enable)
        self.checkpoint_mode = mode

    def set_handwritten_backward(self, depthwise: bool = True, grn: bool = True) -> None:
        """Use the hand-written backward passes (the default) or let the library/autograd differentiate
        the same forward: `depthwise` (CPU only; other devices always use the library's) and `grn`.
        Outputs and gradients agree either way; this exists so that benchmarks can measure each."""
        for m in self.modules():
            if isinstance(m, DepthwiseConv):
                m.handwritten_backward = bool(depthwise)
            elif isinstance(m, GRN):
                m.handwritten_backward = bool(grn)

    def set_kernels(self, kernels: str = "torch") -> None:
        """The blocks' implementation: "torch" (models/layers.py, the readable reference) or "triton" (the fused
        kernels of models/kernels: CUDA, or CPU under TRITON_INTERPRET=1). The same function with other rounding;
        under forward-mode autodiff (torch.func.jvp) the blocks take the torch path either way."""
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        fused = load_kernels(kernels) if kernels != "torch" else None
        for blk in self.blocks():
            blk.fused = fused
        self.kernels = kernels

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile every block in place (static shapes; composes with checkpointing)."""
        compile_kwargs.setdefault("dynamic", False)  # all blocks share one forward; levels differ in shape
        for blk in self.blocks():
            blk.compile(**compile_kwargs)

    # -- forward -------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FCDM expects x of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        f = 2 ** (self.num_levels - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {f} for a "
                f"{self.num_levels}-level FCDM"
            )
        n = x.shape[0]
        if t.shape != (n,) or y.shape != (n,):
            raise ValueError(f"t and y must have shape ({n},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        if y.device.type == "cpu" and not torch.compiler.is_compiling():
            if n and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null label), "
                    f"got values in [{int(y.min())}, {int(y.max())}]"
                )
        elif y.device.type != "meta" and not torch.compiler.is_compiling():
            # no host synchronisation on accelerators: an asynchronous device-side assertion
            torch._assert_async(((y >= 0) & (y <= self.num_classes)).all())

    def label_drop_shape(self, n: int) -> tuple:
        """Shape of the boolean label-dropout mask for a batch of n: (n,) shared, (levels, n) per-level."""
        return (n,) if self.label_dropout == "shared" else (self.num_levels, n)

    def level_labels(self, y: torch.Tensor, drop_mask: Optional[torch.Tensor] = None) -> list:
        """The labels each level's embedder sees. Classifier-free guidance training replaces a label by the
        null label with probability class_dropout_prob, in training mode only: from `drop_mask` (bool,
        `label_drop_shape(N)`) when the caller draws it (train.py does, so that every draw is a function
        of the seed, step and sample index), else from torch's global RNG. "shared" drops a sample at
        every level at once (the paper); "per-level" draws each level on its own (the authors' release,
        where ~27% of the samples see mixed labels at dropout 0.1)."""
        n_lv = self.num_levels
        if not self.training or self.class_dropout_prob <= 0:
            return [y] * n_lv
        shape = self.label_drop_shape(y.shape[0])
        if drop_mask is None:
            drop_mask = torch.rand(shape, device=y.device) < self.class_dropout_prob
        elif tuple(drop_mask.shape) != shape or drop_mask.dtype != torch.bool:
            raise ValueError(f"drop_mask must be a bool tensor of shape {shape} for label_dropout="
                             f"{self.label_dropout!r}, got {drop_mask.dtype} {tuple(drop_mask.shape)}")
        null = torch.full_like(y, self.num_classes)
        if drop_mask.ndim == 1:
            return [torch.where(drop_mask, null, y)] * n_lv
        return [torch.where(drop_mask[i], null, y) for i in range(n_lv)]

    # -- feature sites (representation alignment, train_gen/repa.py) -------------------------------
    def parse_site(self, site: str) -> tuple:
        """A place in the U-Net by name, as (stage, level, block): "enc<L>" the end of encoder level L (its
        skip tensor, before the downsampling), "enc<L>.<B>" the output of block B of that level (0-based),
        "mid" / "mid.<B>" the middle stage, "dec<L>" / "dec<L>.<B>" decoder level L. Block -1 stands for the
        level's input (a level without blocks). ValueError, listing the sites, for anything else."""
        m = re.fullmatch(r"(enc|mid|dec)(\d*)(?:\.(\d+))?", str(site).strip())
        n = self.num_levels
        if m is not None:
            stage, level, block = m.group(1), m.group(2), m.group(3)
            if stage == "mid" and not level:
                level = n - 1
            elif stage != "mid" and level and int(level) < n - 1:
                level = int(level)
            else:
                level = None
            if level is not None:
                blocks = self._stage_blocks(stage, int(level))
                if block is None:
                    return stage, int(level), len(blocks) - 1
                if int(block) < len(blocks):
                    return stage, int(level), int(block)
        raise ValueError(f"unknown feature site {site!r} for this {n}-level FCDM; sites: {', '.join(self.sites())}")

    def _stage_blocks(self, stage: str, level: int):
        return {"enc": self.encoder, "dec": self.decoder}[stage][level] if stage != "mid" else self.middle

    def sites(self) -> list:
        """Every feature site name, in execution order (the level ends first, then their blocks)."""
        out = []
        for i in range(self.num_levels - 1):
            out += [f"enc{i}"] + [f"enc{i}.{b}" for b in range(len(self.encoder[i]))]
        out += ["mid"] + [f"mid.{b}" for b in range(len(self.middle))]
        for i in reversed(range(self.num_levels - 1)):
            out += [f"dec{i}"] + [f"dec{i}.{b}" for b in range(len(self.decoder[i]))]
        return out

    def site_shape(self, site: str, height: int, width: int) -> tuple:
        """(channels, height, width) of the features at `site` for latents of height x width: level L runs at
        1/2^L of the latent side with width hidden_size * 2^L."""
        _, level, _ = self.parse_site(site)
        return self.widths[level], height // 2 ** level, width // 2 ** level

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop_mask: Optional[torch.Tensor] = None, features_at: Optional[str] = None):
        """x (N, C_in, H, W), t (N,), y (N,); `drop_mask` optional (see `level_labels`). With `features_at` (a
        site of `parse_site`) returns (output, the hidden state there (N, H_s, W_s, C_s) channels-last), the
        same output as without it; representation alignment reads it (train_gen/repa.py)."""
        self._check_inputs(x, t, y)
        want = self.parse_site(features_at) if features_at is not None else None
        kept = []  # the hidden state at `want`

        def run_stage(stage: str, level: int, blocks, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            if want == (stage, level, -1):
                kept.append(h)
            for b, blk in enumerate(blocks):
                h = run_block(blk, self.checkpoint_mode, h, c)
                if want == (stage, level, b):
                    kept.append(h)
            return h

        n_lv = self.num_levels
        ys = self.level_labels(y, drop_mask)
        conds = [te(t) + ye(yl) for te, ye, yl in zip(self.t_embedders, self.y_embedders, ys)]  # each (N, W_i)

        h = self.stem(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)  # (N, H, W, C)
        skips = []
        for i in range(n_lv - 1):
            h = run_stage("enc", i, self.encoder[i], h, conds[i])
            skips.append(h)
            h = self.downsamples[i](h)  # (N, H/2, W/2, 2W)
        h = run_stage("mid", n_lv - 1, self.middle, h, conds[n_lv - 1])
        for i in reversed(range(n_lv - 1)):
            h = self.upsamples[i](h)  # (N, H_i, W_i, W)
            h = self.fuse[i](torch.cat([h, skips[i]], dim=-1))  # 1x1 conv 2W -> W
            h = run_stage("dec", i, self.decoder[i], h, conds[i])
        out = self.head(h, conds[0]).contiguous()  # (N, C_out, H, W)
        return (out, kept[0]) if want is not None else out


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


def _fcdm(L: int, C: int, **overrides) -> FCDM:
    kwargs = dict(hidden_size=C, depths=(L, 2 * L, 4 * L, 2 * L, L))
    kwargs.update(overrides)
    return FCDM(**kwargs)


# Table 1: FCDM-S/B/L/XL (params 32.7M / 127.7M / 504.5M / 698.8M; 3.1 / 12.2 / 48.3 / 64.6 GFLOPs at 256)
@register("FCDM-S")
def fcdm_s(**kw):
    return _fcdm(2, 128, **kw)


@register("FCDM-B")
def fcdm_b(**kw):
    return _fcdm(2, 256, **kw)


@register("FCDM-L")
def fcdm_l(**kw):
    return _fcdm(2, 512, **kw)


@register("FCDM-XL")
def fcdm_xl(**kw):
    return _fcdm(3, 512, **kw)


# The embedded demo: scikit-learn's 8x8 digits in pixel space (RGB), 10 classes. A 3-level FCDM at
# 8x8 -> 4x4 -> 2x2 with widths 32/64/128; about 1,000 CPU steps reach > 0.95 class accuracy.
@register("FCDM-digits")
def fcdm_digits(**kw):
    kwargs = dict(in_channels=3, num_classes=10, hidden_size=32, depths=(1, 1, 2, 1, 1))
    kwargs.update(kw)
    return FCDM(**kwargs)
