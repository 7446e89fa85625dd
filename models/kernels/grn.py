"""GELU and Global Response Normalization (ConvNeXt-V2) of the inverted bottleneck, fused, on channels-last
a (N, H, W, 3C) = the first pointwise convolution's output:

    g = GELU(a) (exact, erf),   ss_nc = sum_hw g^2,   G = sqrt(ss),   N(g) = G / (mean_c G + eps),
    r = g * f + beta  with  f = 1 + gamma * N(g)

Forward: `_grn_stats` reads a once for ss (GELU recomputed, never stored); torch turns the (N, 3C) sums into
f (tiny tensors, float32); `_grn_apply` reads a again and writes r. The torch path instead writes g,
converts it to float32, squares it and multiplies it back: about three times the bytes.

Backward, with s = sum_hw dr * g and the hand-derived GRN gradient of models/layers.py (`_GRNFunction`):
`_grn_grad_stats` reads (dr, a) for s and sum_hw dr; torch forms dgamma, dbeta and
k = dL/dG / G on (N, 3C); `_grn_grad_apply` reads (dr, a) again and writes
    da = GELU'(a) * (dr * f + g * k),   GELU'(a) = Phi(a) + a * phi(a).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.kernels import launch
from models.kernels.launch import pixel_tile, reduction_program, round_to

_TINY = 1e-30  # sums of squares at or below this count as an all-zero channel (models/layers.py)
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _gelu(a):
    return 0.5 * a * (1.0 + tl.erf(a * _SQRT1_2))


@triton.jit
def _gelu_grad(a):
    return 0.5 * (1.0 + tl.erf(a * _SQRT1_2)) + a * _INV_SQRT_2PI * tl.exp(-0.5 * a * a)


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _grn_stats(a_ptr, ss_ptr, HW, C, SPLITS, TILES_PER_SPLIT, CBLOCKS,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    n, s, ns, c, cm = reduction_program(SPLITS, CBLOCKS, C, BLOCK_C)
    acc = tl.zeros([BLOCK_C], ACC)
    t0 = s * TILES_PER_SPLIT
    for t in range(t0, t0 + TILES_PER_SPLIT):
        q = t * BLOCK_P + tl.arange(0, BLOCK_P)
        p = n.to(tl.int64) * HW + q
        a = tl.load(a_ptr + p[:, None] * C + c[None, :], mask=(q < HW)[:, None] & cm[None, :], other=0.0)
        g = _gelu(a.to(ACC))
        acc += tl.sum(g * g, axis=0)
    tl.store(ss_ptr + ns.to(tl.int64) * C + c, acc, mask=cm)


@triton.jit
def _grn_apply(a_ptr, f_ptr, beta_ptr, r_ptr, P, HW, C,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    off, nc, m2, c = pixel_tile(P, HW, C, BLOCK_P, BLOCK_C)
    a = tl.load(a_ptr + off, mask=m2, other=0.0).to(ACC)
    f = tl.load(f_ptr + nc, mask=m2, other=0.0)
    beta = tl.load(beta_ptr + c, mask=c < C, other=0.0).to(ACC)
    r = _gelu(a) * f + beta[None, :]
    tl.store(r_ptr + off, round_to(r, r_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _grn_grad_stats(dr_ptr, a_ptr, s_ptr, sb_ptr, HW, C, SPLITS, TILES_PER_SPLIT, CBLOCKS,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    n, s, ns, c, cm = reduction_program(SPLITS, CBLOCKS, C, BLOCK_C)
    acc_s = tl.zeros([BLOCK_C], ACC)
    acc_b = tl.zeros([BLOCK_C], ACC)
    t0 = s * TILES_PER_SPLIT
    for t in range(t0, t0 + TILES_PER_SPLIT):
        q = t * BLOCK_P + tl.arange(0, BLOCK_P)
        p = n.to(tl.int64) * HW + q
        off = p[:, None] * C + c[None, :]
        m2 = (q < HW)[:, None] & cm[None, :]
        dr = tl.load(dr_ptr + off, mask=m2, other=0.0).to(ACC)
        a = tl.load(a_ptr + off, mask=m2, other=0.0).to(ACC)
        acc_s += tl.sum(dr * _gelu(a), axis=0)
        acc_b += tl.sum(dr, axis=0)
    out = ns.to(tl.int64) * C + c
    tl.store(s_ptr + out, acc_s, mask=cm)
    tl.store(sb_ptr + out, acc_b, mask=cm)


@triton.jit
def _grn_grad_apply(dr_ptr, a_ptr, f_ptr, k_ptr, da_ptr, P, HW, C,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    off, nc, m2, c = pixel_tile(P, HW, C, BLOCK_P, BLOCK_C)
    dr = tl.load(dr_ptr + off, mask=m2, other=0.0).to(ACC)
    a = tl.load(a_ptr + off, mask=m2, other=0.0).to(ACC)
    f = tl.load(f_ptr + nc, mask=m2, other=0.0)
    k = tl.load(k_ptr + nc, mask=m2, other=0.0)
    da = _gelu_grad(a) * (dr * f + _gelu(a) * k)
    tl.store(da_ptr + off, round_to(da, da_ptr.dtype.element_ty), mask=m2)


# ------------------------------------------------------------------------------------------------ launchers
def _factor(ss: torch.Tensor, gamma: torch.Tensor, eps: float):
    """GRN's (N, C) statistics from the sums of squares: G, m = mean_c G + eps, N(g) = G / m, f = 1 + gamma N(g)."""
    g = ss.clamp_min(_TINY).sqrt()
    m = g.mean(dim=-1, keepdim=True) + eps
    nx = g / m
    return g, m, nx, 1 + gamma.to(ss.dtype) * nx


def forward(a: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    """(r, ss): GRN(GELU(a)) of channels-last a (N, H, W, C) in a's dtype, and the (N, C) sums of squares."""
    n, h, w, c = a.shape
    acc = launch.accumulator(a.dtype)
    (ss,) = launch.per_sample_sums(_grn_stats, [a], 1, n, h * w, c, acc)
    *_, f = _factor(ss, gamma, eps)
    r = launch.elementwise(_grn_apply, [a, f.contiguous(), beta], torch.empty_like(a), n * h * w, h * w, c, acc)
    return r, ss


def backward(dr: torch.Tensor, a: torch.Tensor, ss: torch.Tensor, gamma: torch.Tensor, eps: float):
    """(da, dgamma, dbeta) of `forward`."""
    n, h, w, c = a.shape
    acc = launch.accumulator(a.dtype)
    dr = dr.contiguous()
    s, sb = launch.per_sample_sums(_grn_grad_stats, [dr, a], 2, n, h * w, c, acc)
    g, m, nx, f = _factor(ss, gamma, eps)
    d_gamma = (s * nx).sum(0).to(gamma.dtype)
    d_beta = sb.sum(0).to(gamma.dtype)
    q = s * gamma.to(s.dtype)  # dL/dN(g)
    d_g = q / m - (q * g).sum(dim=-1, keepdim=True) / (m * m * c)
    k = torch.where(ss > _TINY, d_g / g, torch.zeros_like(g))
    da = launch.elementwise(_grn_grad_apply, [dr, a, f.contiguous(), k.contiguous()], torch.empty_like(a),
                      n * h * w, h * w, c, acc)
    return da, d_gamma, d_beta


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("fcdm::gelu_grn", mutates_args=())
def gelu_grn_op(a: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(a, gamma, beta, eps)


@gelu_grn_op.register_fake
def _(a, gamma, beta, eps):
    return torch.empty_like(a), a.new_empty((a.shape[0], a.shape[-1]), dtype=launch.stat_dtype(a.dtype))


@torch.library.custom_op("fcdm::gelu_grn_backward", mutates_args=())
def gelu_grn_backward_op(dr: torch.Tensor, a: torch.Tensor, ss: torch.Tensor, gamma: torch.Tensor, eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(dr, a, ss, gamma, eps)


@gelu_grn_backward_op.register_fake
def _(dr, a, ss, gamma, eps):
    return torch.empty_like(a), torch.empty_like(gamma), torch.empty_like(gamma)


def _setup_context(ctx, inputs, output):
    a, gamma, _, eps = inputs
    _, ss = output
    ctx.mark_non_differentiable(ss)
    ctx.eps = eps
    ctx.save_for_backward(a, ss, gamma)


def _backward(ctx, dr, _):
    a, ss, gamma = ctx.saved_tensors
    da, d_gamma, d_beta = gelu_grn_backward_op(dr, a, ss, gamma, ctx.eps)
    return da, d_gamma, d_beta, None


gelu_grn_op.register_autograd(_backward, setup_context=_setup_context)


def gelu_grn(a: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """GRN(GELU(a)) of channels-last a (N, H, W, C) in a's dtype; statistics in float32."""
    return gelu_grn_op(a.contiguous(), gamma, beta, float(eps))[0]
