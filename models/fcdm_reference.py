"""The "paper-mode" FCDM: the same network as `models.fcdm.FCDM`, written the straightforward way.

This is the baseline of `benchmarks/bench_model.py --baseline` and the independent reference the
fast-path tests compare against. It follows the paper's description (Figure 4) literally:

- NCHW activations everywhere, the pointwise (1x1) convolutions as `nn.Conv2d(kernel_size=1)`;
- a channels-first LayerNorm written with mean/variance over the channel dimension (as ConvNeXt's
  reference code does);
- GRN with `torch.norm(p=2)` over the spatial dimensions (ConvNeXt-V2's formula);
- the full k x k depthwise kernel at every feature-map size (no crop);
- `nn.PixelShuffle` / `nn.PixelUnshuffle` modules;
- every block gradient-checkpointed (full recompute) by default, fp32, no compile.

Parameter names match `FCDM` exactly; only the shapes of the pointwise convolutions differ
(Linear (out, in) versus Conv2d (out, in, 1, 1)). `fcdm_to_reference_state_dict` and
`reference_to_fcdm_state_dict` convert between the two, and `FCDMReference.from_fcdm(model)` builds a
reference carrying the same weights.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.fcdm import FCDM
from models.layers import TimestepEmbedder


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm without affine over dim 1 of an NCHW tensor: (x - mean_c) / sqrt(var_c + eps)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps  # added to the (biased) channel variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)  # (N, 1, H, W)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return (x - u) / torch.sqrt(s + self.eps)


class GRNReference(nn.Module):
    """ConvNeXt-V2 GRN on NCHW input: gamma * (x * N(x)) + beta + x with N(x) = G / (mean_c G + eps),
    G = ||x||_2 over (H, W) computed with `torch.norm`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # gamma
        self.bias = nn.Parameter(torch.zeros(dim))  # beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        nx = gx / (gx.mean(dim=1, keepdim=True) + self.eps)
        w = self.weight.view(1, -1, 1, 1)
        b = self.bias.view(1, -1, 1, 1)
        return w * (x * nx) + b + x


class FCDMBlockReference(nn.Module):
    """dwconv k x k -> LN -> modulate -> 1x1 W->rW -> GELU -> GRN -> 1x1 rW->W -> * gate -> + x (NCHW)."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: int = 3):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = ChannelsFirstLayerNorm(eps=1e-6)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.grn = GRNReference(hidden)
        self.pwconv2 = nn.Conv2d(hidden, dim, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, C, H, W); c: (N, C)
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)  # 3 x (N, C)
        h = self.norm(self.dwconv(x))
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.pwconv2(self.grn(self.act(self.pwconv1(h))))  # (N, C, H, W)
        return x + gate[:, :, None, None] * h


class DownsampleReference(nn.Module):
    """3x3 conv W -> W/2 (no bias) then PixelUnshuffle(2): (N, W, H, W_) -> (N, 2W, H/2, W_/2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False)
        self.shuffle = nn.PixelUnshuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


class UpsampleReference(nn.Module):
    """3x3 conv 2W -> 4W (no bias) then PixelShuffle(2): (N, 2W, H, W_) -> (N, W, 2H, 2W_)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * dim, 4 * dim, 3, padding=1, bias=False)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


class HeadReference(nn.Module):
    """3x3 conv C -> C, adaLN-modulated LayerNorm, 3x3 conv C -> out (NCHW)."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm = ChannelsFirstLayerNorm(eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Conv2d(dim, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        h = self.norm(self.conv(x))
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.out(h)


class FCDMReference(nn.Module):
    """Paper-mode FCDM with the constructor of `models.fcdm.FCDM`. `forward(x, t, y)` on NCHW x.
    Label dropout draws `torch.rand` exactly like FCDM, so both see the same labels under one seed."""

    def __init__(
        self,
        in_channels: int = 4,  # latent channels
        hidden_size: int = 512,  # width C of level 0; level i has C * 2^i
        depths: Sequence[int] = (3, 6, 12, 6, 3),  # blocks per stage (odd length 2n-1)
        kernel_size: int = 7,  # depthwise kernel size
        mlp_ratio: int = 3,  # inverted-bottleneck expansion
        num_classes: int = 1000,  # num_classes is the null label
        class_dropout_prob: float = 0.1,  # label dropout in training mode
        learn_sigma: bool = True,  # output 2 * in_channels
        grad_checkpointing: bool = True,  # checkpoint every block (the paper's code path)
    ):
        super().__init__()
        depths = tuple(int(d) for d in depths)
        if len(depths) % 2 != 1:
            raise ValueError(f"depths must have odd length, got {depths}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depths = depths
        self.kernel_size = kernel_size
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.learn_sigma = learn_sigma
        self.grad_checkpointing = grad_checkpointing
        self.num_levels = n = (len(depths) + 1) // 2
        self.widths = tuple(hidden_size * 2**i for i in range(n))

        self.stem = nn.Conv2d(in_channels, hidden_size, 3, padding=1)
        self.t_embedders = nn.ModuleList(TimestepEmbedder(w) for w in self.widths)
        self.y_embedders = nn.ModuleList(nn.Embedding(num_classes + 1, w) for w in self.widths)

        def block(w):
            return FCDMBlockReference(w, kernel_size, mlp_ratio)

        self.encoder = nn.ModuleList(
            nn.ModuleList(block(self.widths[i]) for _ in range(depths[i])) for i in range(n - 1)
        )
        self.downsamples = nn.ModuleList(DownsampleReference(self.widths[i]) for i in range(n - 1))
        self.middle = nn.ModuleList(block(self.widths[n - 1]) for _ in range(depths[n - 1]))
        self.upsamples = nn.ModuleList(UpsampleReference(self.widths[i]) for i in range(n - 1))
        self.fuse = nn.ModuleList(nn.Conv2d(2 * self.widths[i], self.widths[i], 1) for i in range(n - 1))
        self.decoder = nn.ModuleList(
            nn.ModuleList(block(self.widths[i]) for _ in range(depths[2 * n - 2 - i])) for i in range(n - 1)
        )
        self.head = HeadReference(hidden_size, self.out_channels)

    @classmethod
    def from_fcdm(cls, model: FCDM, grad_checkpointing: bool = True) -> "FCDMReference":
        """A reference network with the architecture and (converted) weights of an `FCDM`."""
        ref = cls(
            in_channels=model.in_channels,
            hidden_size=model.hidden_size,
            depths=model.depths,
            kernel_size=model.kernel_size,
            mlp_ratio=model.mlp_ratio,
            num_classes=model.num_classes,
            class_dropout_prob=model.class_dropout_prob,
            learn_sigma=model.learn_sigma,
            grad_checkpointing=grad_checkpointing,
        )
        p = next(model.parameters())
        ref.to(device=p.device, dtype=p.dtype)
        ref.load_state_dict(fcdm_to_reference_state_dict(model.state_dict(), ref.state_dict()))
        return ref

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (True, the baseline default) or none (False)."""
        self.grad_checkpointing = bool(enable)

    def blocks(self):
        for stage in self.encoder:
            yield from stage
        yield from self.middle
        for stage in reversed(self.decoder):
            yield from stage

    def _run_block(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, c, use_reentrant=False)
        return blk(x, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n_lv = self.num_levels
        if self.training and self.class_dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.class_dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        conds = [te(t) + ye(y) for te, ye in zip(self.t_embedders, self.y_embedders)]
        h = self.stem(x)  # (N, C, H, W)
        skips = []
        for i in range(n_lv - 1):
            for blk in self.encoder[i]:
                h = self._run_block(blk, h, conds[i])
            skips.append(h)
            h = self.downsamples[i](h)
        for blk in self.middle:
            h = self._run_block(blk, h, conds[n_lv - 1])
        for i in reversed(range(n_lv - 1)):
            h = self.fuse[i](torch.cat([self.upsamples[i](h), skips[i]], dim=1))
            for blk in self.decoder[i]:
                h = self._run_block(blk, h, conds[i])
        return self.head(h, conds[0])  # (N, C_out, H, W)


def fcdm_to_reference_state_dict(
    src: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Reshape an `FCDM` state dict for `FCDMReference`: Linear pointwise weights (out, in) become
    1x1 conv weights (out, in, 1, 1). `like` is the target's state dict (for the shapes)."""
    if set(src) != set(like):
        missing, extra = sorted(set(like) - set(src)), sorted(set(src) - set(like))
        raise KeyError(f"state dicts differ: missing {missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for k, v in src.items():
        shape = like[k].shape
        if v.shape != shape:
            if v.ndim != 2 or tuple(shape) != (*v.shape, 1, 1):
                raise ValueError(f"{k}: cannot convert shape {tuple(v.shape)} to {tuple(shape)}")
            v = v.reshape(shape)
        out[k] = v
    return out


def reference_to_fcdm_state_dict(
    src: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """The inverse of `fcdm_to_reference_state_dict`: 1x1 conv weights back to Linear weights."""
    out = {}
    for k, v in src.items():
        shape = like[k].shape
        if v.shape != shape:
            if v.ndim != 4 or v.shape[2:] != (1, 1) or tuple(shape) != tuple(v.shape[:2]):
                raise ValueError(f"{k}: cannot convert shape {tuple(v.shape)} to {tuple(shape)}")
            v = v.reshape(shape)
        out[k] = v
    return out


__all__ = [
    "FCDMReference",
    "fcdm_to_reference_state_dict",
    "reference_to_fcdm_state_dict",
]
