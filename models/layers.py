"""The layers FCDM is built from, in channels-last layout, with the fast paths that make them cheap.

Every activation is channels-last, (N, H, W, C), between the layers: the pointwise (1x1) convolutions
of a block are `nn.Linear` layers (plain matmuls over the last dimension), and the depthwise and 3x3
convolutions run on channels-last NCHW views, so no layout copy happens inside a block. All of it is
mathematically identical to the NCHW description of the paper (models/fcdm_reference.py is that
description, written plainly, and the tests compare the two).

- `timestep_embedding`, `TimestepEmbedder`: DiT/ADM's sinusoidal timestep features and MLP (float32).
- `modulate`: adaLN, (1 + scale) * x + shift with per-sample (N, C) scale and shift.
- `GRN`: Global Response Normalization (ConvNeXt-V2, Woo et al. 2023). Its L2 statistics are computed
  in float32 with a sum of squares rather than `torch.norm`, the residual is folded into one
  multiply-add, x * (1 + gamma * N(x)) + beta, and its backward is written by hand (`_GRNFunction`):
  five passes over the (N, H, W, 3C) tensor instead of the dozen that autograd's chain of
  pow/mul/sum/addcmul backward functions makes.
- `DepthwiseConv`: k x k depthwise convolution. It crops its kernel to the feature map when the map is
  smaller than the kernel (taps that could only ever read zero padding are dropped: exact, and much
  cheaper for the 2x2 and 4x4 maps of small inputs). On CPU its backward is written by hand
  (`_DepthwiseConvCPU`): oneDNN's depthwise weight gradient is several times slower than its forward,
  so the input gradient is a forward convolution with the flipped kernel and the weight gradient a
  grouped convolution whose kernels are the output gradients. Other devices use the library's backward.
- `Conv3x3`, `Downsample`, `Upsample`: 3x3 convolutions and the PixelUnshuffle/PixelShuffle resampling
  of the U-Net, written as reshapes of the channels-last tensor with the channel order of
  `torch.nn.PixelShuffle` (channel = c * 4 + dy * 2 + dx).
- `run_block`: activation checkpointing as a switch, none / selective (keep matmul and convolution
  outputs, recompute the elementwise work) / full, non-reentrant.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CHECKPOINT_MODES = ("none", "selective", "full")


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DiT/ADM: [cos(t f), sin(t f)]
    with frequencies f_i = max_period^(-i / (dim/2)). Always computed in float32. (N,) -> (N, dim)."""
    half = dim // 2
    no_autocast = (
        torch.autocast(device_type=t.device.type, enabled=False)
        if t.device.type in ("cpu", "cuda", "xpu", "mps")
        else contextlib.nullcontext()
    )
    with no_autocast:
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """256 sinusoidal frequencies -> Linear(256, W) -> SiLU -> Linear(W, W)."""

    def __init__(self, width: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size  # number of sinusoid features
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, width), nn.SiLU(), nn.Linear(width, width)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size)  # float32 (N, 256)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (N, W); a no-op cast unless the net is float64/bf16


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of a channels-last tensor x (N, H, W, C) with per-sample (N, C) shift/scale."""
    return torch.addcmul(shift[:, None, None, :], x, 1 + scale[:, None, None, :])


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt-V2) on channels-last input (N, H, W, C).

    G(x)_c = ||x_c||_2 over the spatial dims; N(x)_c = G(x)_c / (mean_c G(x)_c + eps);
    GRN(x) = gamma * (x * N(x)) + beta + x. gamma (`weight`) and beta (`bias`) start at zero.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps  # added to the channel-mean of the norms
        self.weight = nn.Parameter(torch.zeros(dim))  # gamma
        self.bias = nn.Parameter(torch.zeros(dim))  # beta
        self.handwritten_backward = True  # False: autograd differentiates the same forward (benchmarks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.handwritten_backward:
            return _GRNFunction.apply(x, self.weight, self.bias, self.eps)
        *_, f = _grn_statistics(x, self.weight, self.eps)
        return torch.addcmul(self.bias.to(x.dtype), x, f.to(x.dtype))


_GRN_TINY = 1e-30  # sums of squares at or below this count as an all-zero channel (zero subgradient)


def _grn_statistics(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """GRN's per-(sample, channel) statistics of channels-last x, in float32 (float64 for float64 x):
    ss = sum_hw x^2, g = sqrt(ss) (clamped: an all-zero channel gets a zero subgradient, as torch.norm
    gives), m = mean_c g + eps, N(x) = g / m and the factor f = 1 + gamma * N(x). Shapes (N, 1, 1, C)."""
    stat = torch.promote_types(x.dtype, torch.float32)
    ss = x.to(stat).square().sum(dim=(1, 2), keepdim=True)
    g = ss.clamp_min(_GRN_TINY).sqrt()
    m = g.mean(dim=-1, keepdim=True) + eps  # (N, 1, 1, 1)
    nx = g / m
    return ss, g, m, nx, 1 + weight.to(stat) * nx


class _GRNFunction(torch.autograd.Function):
    """y = x * f + beta with f = 1 + gamma * N(x), N(x) = g / (mean_c g + eps), g = ||x||_2 over (H, W).
    Statistics in float32 whatever the dtype of x (N, H, W, C). Backward, per sample n and channel c:

        dL/dx     = dy * f + x * (dL/dg / g)           (the second term: through g = sqrt(sum x^2))
        dL/df     = s = sum_hw dy * x                   dL/dgamma = sum_n s * N(x),  dL/dbeta = sum dy
        dL/dg_c   = q_c / m - (sum_j q_j g_j) / (m^2 C)  with q = s * gamma, m = mean_c g + eps

    and dL/dg / g taken as 0 on an all-zero channel (torch.norm's subgradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        ss, g, m, nx, f = _grn_statistics(x, weight, eps)
        ctx.save_for_backward(x, weight, ss, g, m, nx, f)
        return torch.addcmul(bias.to(x.dtype), x, f.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, weight, ss, g, m, nx, f = ctx.saved_tensors
        stat = g.dtype
        s = (dy * x).sum(dim=(1, 2), keepdim=True, dtype=stat)  # dL/df, (N, 1, 1, C)
        d_weight = (s * nx).sum(dim=(0, 1, 2)).to(weight.dtype)
        d_bias = dy.sum(dim=(0, 1, 2), dtype=stat).to(weight.dtype)
        q = s * weight.to(stat)  # dL/dN(x)
        d_g = q / m - (q * g).sum(dim=-1, keepdim=True) / (m * m * g.shape[-1])
        k = torch.where(ss > _GRN_TINY, d_g / g, torch.zeros_like(g))
        dx = dy * f.to(dy.dtype)
        dx.addcmul_(x.to(dy.dtype), k.to(dy.dtype))
        return dx, d_weight, d_bias, None


class DepthwiseConv(nn.Module):
    """k x k depthwise convolution (with bias) on channels-last input (N, H, W, C), 'same' padding.

    When H or W is smaller than k, the kernel is cropped to the (2 * min(k//2, size-1) + 1) central
    taps along that axis: the dropped taps would only ever multiply zero padding.
    """

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.handwritten_backward = True  # on CPU (_DepthwiseConvCPU); False: the library's (benchmarks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, c = x.shape
        r = self.kernel_size // 2
        rh, rw = min(r, h - 1), min(r, w - 1)
        weight = self.weight
        if rh < r or rw < r:
            weight = weight[:, :, r - rh : r + rh + 1, r - rw : r + rw + 1]
        x = x.permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        if self.handwritten_backward and x.device.type == "cpu" and torch.is_grad_enabled():
            y = _DepthwiseConvCPU.apply(x, weight, self.bias, (rh, rw))
        else:
            y = F.conv2d(x, weight, self.bias, padding=(rh, rw), groups=c)
        return y.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous when y is channels-last


class _DepthwiseConvCPU(torch.autograd.Function):
    """Depthwise 'same' convolution (odd kernel, padding = kernel // 2) with a faster CPU backward.

    dL/dx is the convolution of dy with the spatially flipped kernel (same padding). dL/dw[c] is the
    correlation of x[n, c] with dy[n, c] summed over n: one convolution of x seen as a single image
    with N*C channels against the N*C kernels dy[n, c] (groups = N*C), whose 'same'-padded output is
    exactly kernel-sized. Both run on oneDNN's fast forward kernels. Autocast state is kept for the
    backward (custom_fwd/custom_bwd), so a bf16 forward has a bf16 backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, bias, padding: tuple[int, int]):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n, c, h, w = x.shape
        d_x = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_x = F.conv2d(dy, weight.flip(2, 3).to(dy.dtype), None, padding=ctx.padding, groups=c)
        if ctx.needs_input_grad[1]:
            d_weight = F.conv2d(
                x.to(dy.dtype).reshape(1, n * c, h, w), dy.reshape(n * c, 1, h, w), padding=ctx.padding, groups=n * c
            )  # (1, N*C, kh, kw)
            acc = torch.promote_types(d_weight.dtype, torch.float32)
            d_weight = d_weight.reshape(n, c, *weight.shape[2:]).sum(0, dtype=acc)[:, None].to(weight.dtype)
        if ctx.needs_input_grad[2]:
            d_bias = dy.sum(dim=(0, 2, 3), dtype=torch.promote_types(dy.dtype, torch.float32)).to(weight.dtype)
        return d_x, d_weight, d_bias, None


class Conv3x3(nn.Conv2d):
    """A 3x3 'same' convolution applied to channels-last input (N, H, W, Cin) -> (N, H, W, Cout)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def pixel_unshuffle_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> (N, H/2, W/2, 4C), channel order of torch.nn.PixelUnshuffle(2)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4)  # (N, H/2, W/2, C, 2, 2)
    return x.reshape(n, h // 2, w // 2, 4 * c)


def pixel_shuffle_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 4C) -> (N, 2H, 2W, C), channel order of torch.nn.PixelShuffle(2)."""
    n, h, w, c4 = x.shape
    c = c4 // 4
    x = x.reshape(n, h, w, c, 2, 2).permute(0, 1, 4, 2, 5, 3)  # (N, H, 2, W, 2, C)
    return x.reshape(n, 2 * h, 2 * w, c)


class Downsample(nn.Module):
    """3x3 conv W -> W/2 (no bias), then PixelUnshuffle(2): (N, H, W, C) -> (N, H/2, W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"Downsample needs an even width, got {dim}")
        self.conv = Conv3x3(dim, dim // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_unshuffle_nhwc(self.conv(x))


class Upsample(nn.Module):
    """3x3 conv 2W -> 4W (no bias), then PixelShuffle(2): (N, H, W, 2C) -> (N, 2H, 2W, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = Conv3x3(2 * dim, 4 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_nhwc(self.conv(x))


def functorch_transformed(x: torch.Tensor) -> bool:
    """Whether `x` is seen through a functorch transform (torch.func.jvp, vmap, grad) or forward-mode autodiff
    is on: code without forward-mode rules (the fused kernels) must then take a differentiable torch path.
    Always False while torch.compile traces (it traces plain tensors)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(x) or forward_ad._current_level >= 0


def _selective_policy(ctx, op, *args, **kwargs):
    """Selective activation checkpointing: keep matmul and convolution outputs, recompute the
    cheap elementwise work (norms, GELU, GRN, modulation) in the backward pass."""
    save = op in (
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten.convolution.default,
    )
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


def resolve_checkpoint_mode(enable: bool | str) -> str:
    """True -> 'full', False -> 'none'; strings must be one of CHECKPOINT_MODES."""
    mode = {True: "full", False: "none"}[enable] if isinstance(enable, bool) else enable
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint mode must be one of {CHECKPOINT_MODES} or a bool, got {enable!r}")
    return mode


def run_block(blk: nn.Module, mode: str, *args: torch.Tensor) -> torch.Tensor:
    """Run a block under activation checkpointing `mode` (non-reentrant); plain call without grad."""
    if mode == "none" or not torch.is_grad_enabled():
        return blk(*args)
    if mode == "full":
        return checkpoint(blk, *args, use_reentrant=False)
    ctx = partial(create_selective_checkpoint_contexts, _selective_policy)
    return checkpoint(blk, *args, use_reentrant=False, context_fn=ctx)
