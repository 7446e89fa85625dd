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

Implementation notes (all mathematically identical to the description above):
- Activations are kept channels-last, (N, H, W, C), between the layers. The pointwise (1x1)
  convolutions are `nn.Linear` layers, i.e. plain matmuls over the last dimension; the depthwise and
  3x3 convolutions run on channels-last NCHW views, so no layout copies happen inside a block.
- PixelShuffle/PixelUnshuffle are written as reshapes of the channels-last tensor with the channel
  order of `torch.nn.PixelShuffle` (channel = c * 4 + dy * 2 + dx).
- The depthwise convolution crops its kernel to the feature map when the map is smaller than the
  kernel: taps that could only ever read zero padding are dropped (exact, and much cheaper for the
  2x2 and 4x4 maps of small inputs).
- GRN (ConvNeXt-V2, Woo et al. 2023) computes its L2 statistics in float32 with a sum of squares
  rather than `torch.norm`, and folds the residual into one multiply-add: x * (1 + gamma * N(x)) + beta.
  Its backward is written by hand (`_GRNFunction`): five passes over the (N, H, W, 3C) tensor instead
  of the dozen that autograd's chain of pow/mul/sum/addcmul backward functions makes.
- On CPU, the depthwise convolution's backward is written by hand (`_DepthwiseConvCPU`): oneDNN's
  depthwise weight gradient is several times slower than its forward; we compute the input gradient
  as a forward convolution with the flipped kernel and the weight gradient as a grouped convolution
  whose kernels are the output gradients. Other devices use the library's own backward.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHECKPOINT_MODES = ("none", "selective", "full")


# ----------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------


LABEL_DROPOUT_MODES = ("shared", "per-level")  # how label dropout is drawn across the U-Net levels


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


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


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


class FCDMBlock(nn.Module):
    """The FCDM block (PAPER.md, "FCDM block"): depthwise conv, adaLN-modulated LayerNorm,
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

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, H, W, C) channels-last activations; c: (N, C) condition of this level
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


def _selective_policy(ctx, op, *args, **kwargs):
    """Selective activation checkpointing: keep matmul and convolution outputs, recompute the
    cheap elementwise work (norms, GELU, GRN, modulation) in the backward pass."""
    from torch.utils.checkpoint import CheckpointPolicy

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
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    ctx = partial(create_selective_checkpoint_contexts, _selective_policy)
    return checkpoint(blk, *args, use_reentrant=False, context_fn=ctx)


class FCDM(nn.Module):
    """Fully Convolutional Diffusion Model. `forward(x, t, y)`: x (N, C_in, H, W) NCHW latents,
    t (N,) timesteps (int or float), y (N,) labels in [0, num_classes] (num_classes = null label).
    Returns (N, C_out, H, W) with C_out = 2 * C_in when learn_sigma else C_in."""

    def __init__(
        self,
        in_channels: int = 4,  # latent channels (4 for SD-VAE latents, 3 for pixels)
        hidden_size: int = 512,  # width C of the first level; level i has width C * 2^i
        depths: Sequence[int] = (3, 6, 12, 6, 3),  # blocks per stage: encoder levels, middle, decoder levels (odd length)
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, C_in, H, W), t (N,), y (N,); `drop_mask` optional (see `level_labels`)."""
        self._check_inputs(x, t, y)
        n_lv = self.num_levels
        ys = self.level_labels(y, drop_mask)
        conds = [te(t) + ye(yl) for te, ye, yl in zip(self.t_embedders, self.y_embedders, ys)]  # each (N, W_i)

        h = self.stem(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)  # (N, H, W, C)
        skips = []
        for i in range(n_lv - 1):
            for blk in self.encoder[i]:
                h = run_block(blk, self.checkpoint_mode, h, conds[i])
            skips.append(h)
            h = self.downsamples[i](h)  # (N, H/2, W/2, 2W)
        for blk in self.middle:
            h = run_block(blk, self.checkpoint_mode, h, conds[n_lv - 1])
        for i in reversed(range(n_lv - 1)):
            h = self.upsamples[i](h)  # (N, H_i, W_i, W)
            h = self.fuse[i](torch.cat([h, skips[i]], dim=-1))  # 1x1 conv 2W -> W
            for blk in self.decoder[i]:
                h = run_block(blk, self.checkpoint_mode, h, conds[i])
        return self.head(h, conds[0]).contiguous()  # (N, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        cfg_channels: int | str = "all",
    ) -> torch.Tensor:
        """Classifier-free guidance with DiT's calling convention: the batch is [cond; uncond] with the
        null label in the second half of y (only the first half of x is used). Returns the guided
        output for both halves. `cfg_channels="all"` guides every epsilon channel (our default); an int
        k guides only the first k channels (3 reproduces DiT and the original FCDM code). Learned-variance
        channels are always taken from the conditional pass."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        cond, uncond = out.chunk(2)
        guided = guide(cond, uncond, cfg_scale, self.in_channels, cfg_channels)
        return torch.cat([guided, guided])


def guide(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    cfg_scale: float,
    num_eps_channels: int,
    cfg_channels: int | str = "all",
) -> torch.Tensor:
    """uncond + s * (cond - uncond) on the guided channels; the remaining channels (incl. a learned
    variance) come from the conditional output. cond/uncond: (N, C_out, H, W)."""
    k = num_eps_channels if cfg_channels == "all" else int(cfg_channels)
    if not 0 < k <= num_eps_channels:
        raise ValueError(f"cfg_channels must be 'all' or an int in [1, {num_eps_channels}], got {cfg_channels!r}")
    guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)
