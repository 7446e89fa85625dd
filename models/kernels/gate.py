"""The block's gated residual, out = x + gate_n * o, on channels-last x and o (N, H, W, C) with a per-sample
(N, C) gate. Forward: one pass (`_gate_fwd`). Backward: one pass per (sample, channel block) that
writes d_o = dout * gate and sums d_gate = sum_hw dout * o (`_gate_bwd`); dx is dout itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.kernels import launch
from models.kernels.launch import pixel_tile, reduction_program, round_to


@triton.jit
def _gate_fwd(x_ptr, gate_ptr, o_ptr, out_ptr, P, HW, C,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    off, nc, m2, _ = pixel_tile(P, HW, C, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + off, mask=m2, other=0.0).to(ACC)
    o = tl.load(o_ptr + off, mask=m2, other=0.0).to(ACC)
    gate = tl.load(gate_ptr + nc, mask=m2, other=0.0).to(ACC)
    tl.store(out_ptr + off, round_to((x + gate * o), out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gate_bwd(dout_ptr, gate_ptr, o_ptr, do_ptr, dgate_ptr, HW, C, SPLITS, TILES_PER_SPLIT, CBLOCKS,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    n, s, ns, c, cm = reduction_program(SPLITS, CBLOCKS, C, BLOCK_C)
    gate = tl.load(gate_ptr + n.to(tl.int64) * C + c, mask=cm, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_C], ACC)
    t0 = s * TILES_PER_SPLIT
    for t in range(t0, t0 + TILES_PER_SPLIT):
        q = t * BLOCK_P + tl.arange(0, BLOCK_P)
        off = (n.to(tl.int64) * HW + q)[:, None] * C + c[None, :]
        m2 = (q < HW)[:, None] & cm[None, :]
        g = tl.load(dout_ptr + off, mask=m2, other=0.0).to(ACC)
        o = tl.load(o_ptr + off, mask=m2, other=0.0).to(ACC)
        acc += tl.sum(g * o, axis=0)
        tl.store(do_ptr + off, round_to((g * gate[None, :]), do_ptr.dtype.element_ty), mask=m2)
    tl.store(dgate_ptr + ns.to(tl.int64) * C + c, acc, mask=cm)


def forward(x: torch.Tensor, gate: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    n, h, w, c = x.shape
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, o.dtype))
    return launch.elementwise(_gate_fwd, [x, gate.contiguous(), o], out, n * h * w, h * w, c,
                              launch.accumulator(out.dtype))


def backward(dout: torch.Tensor, gate: torch.Tensor, o: torch.Tensor):
    """(d_gate, d_o) of `forward`."""
    n, h, w, c = o.shape
    d_o = torch.empty_like(o)
    (d_gate,) = launch.per_sample_sums(_gate_bwd, [dout.contiguous(), gate.contiguous(), o, d_o], 1, n, h * w, c,
                                       launch.accumulator(o.dtype))
    return d_gate.to(gate.dtype), d_o


@torch.library.custom_op("fcdm::gated_residual", mutates_args=())
def gated_residual_op(x: torch.Tensor, gate: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    return forward(x, gate, o)


@gated_residual_op.register_fake
def _(x, gate, o):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, o.dtype))


@torch.library.custom_op("fcdm::gated_residual_backward", mutates_args=())
def gated_residual_backward_op(dout: torch.Tensor, gate: torch.Tensor, o: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(dout, gate, o)


@gated_residual_backward_op.register_fake
def _(dout, gate, o):
    return torch.empty_like(gate), torch.empty_like(o)


def _setup_context(ctx, inputs, output):
    x, gate, o = inputs
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(gate, o)


def _backward(ctx, dout):
    gate, o = ctx.saved_tensors
    d_gate, d_o = gated_residual_backward_op(dout, gate, o)
    return dout.to(ctx.x_dtype), d_gate, d_o


gated_residual_op.register_autograd(_backward, setup_context=_setup_context)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """x + gate[:, None, None, :] * o for channels-last x, o (N, H, W, C) and gate (N, C)."""
    return gated_residual_op(x.contiguous(), gate, o.contiguous())
