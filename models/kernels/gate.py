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
    p = n * h * w
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, o.dtype))
    tiles = launch.elementwise_tiles(c, p)
    if p:
        _gate_fwd[(launch.cdiv(p, tiles.block_p), launch.cdiv(c, tiles.block_c))](
            x, gate.contiguous(), o, out, p, h * w, c, BLOCK_P=tiles.block_p, BLOCK_C=tiles.block_c,
            ACC=launch.accumulator(out.dtype), num_warps=tiles.num_warps)
    return out


def backward(dout: torch.Tensor, gate: torch.Tensor, o: torch.Tensor):
    """(d_gate, d_o) of `forward`."""
    n, h, w, c = o.shape
    hw = h * w
    red = launch.reduction(n, hw, c)
    dout = dout.contiguous()
    d_o = torch.empty_like(o)
    part = o.new_empty((n, red.splits, c), dtype=launch.stat_dtype(o.dtype))
    if n * hw:
        _gate_bwd[(n * red.splits * red.channel_blocks,)](
            dout, gate.contiguous(), o, d_o, part, hw, c, red.splits, red.tiles_per_split, red.channel_blocks,
            BLOCK_P=red.block_p, BLOCK_C=red.block_c, ACC=launch.accumulator(o.dtype), num_warps=red.num_warps)
    else:
        part.zero_()
    return part.sum(1).to(gate.dtype), d_o


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
