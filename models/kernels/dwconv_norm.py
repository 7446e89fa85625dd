"""The block's first stage in one pass: k x k depthwise convolution, LayerNorm over the channels (no affine)
and the adaLN modulation, on channels-last activations (N, H, W, C):

    d = dwconv(x) + bias,   ln = (d - mean_c d) * rstd,   h = ln * (1 + scale_n) + shift_n

Forward (`_dwconv_norm_fwd`): a program holds `block_p` pixels x all C channels, sums the k*k shifted loads
of x with the tap weights in float32 (taps that fall outside the map read zeros: the same numbers as the
torch path's cropped kernel), rounds d to the activation dtype as the torch path's convolution does,
takes the LayerNorm statistics of that d in float32 and writes h. For the backward pass it also keeps d
and the per-pixel mean and 1/std (skipped under no_grad).

Backward, three kernels:
- `_dwconv_norm_bwd`: the LayerNorm and modulation backward per pixel,
      dln = dh * (1 + scale),   dd = rstd * (dln - mean_c dln - ln * mean_c(dln * ln)),
  and the per-(sample, channel) sums d_shift = sum_hw dh, d_scale = sum_hw dh * ln;
- `_dwconv_input_grad`: dx = the 'same' convolution of dd with the spatially flipped kernel;
- `_dwconv_weight_grad`: dw[tap, c] = sum_{n,hw} x[hw + tap] * dd[hw] and dbias = sum dd, per sample and
  pixel range, gathered as a (taps, pixels, channels) tensor and summed over the pixels.
Partial sums are added by torch in a fixed order: the results do not depend on scheduling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.kernels import launch
from models.kernels.launch import reduction_program, round_to


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _dwconv_norm_fwd(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, h_ptr, d_ptr, mean_ptr, rstd_ptr,
                     P, H, W, C, eps,
                     K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SAVE: tl.constexpr,
                     ACC: tl.constexpr):
    R: tl.constexpr = K // 2
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # pixel index in the flattened (N*H*W)
    c = tl.arange(0, BLOCK_C)
    pm = p < P
    cm = c < C
    hw = H * W
    n = p // hw
    ph = (p % hw) // W
    pw = p % W
    off = p.to(tl.int64)[:, None] * C + c[None, :]  # (BLOCK_P, BLOCK_C) element offsets
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for ky in range(K):  # a run-time loop: unrolled, the k*k loads would all be hoisted and spill
        ih = ph + (ky - R)
        row_ok = pm & (ih >= 0) & (ih < H)
        for kx in tl.static_range(K):
            iw = pw + (kx - R)
            ok = row_ok & (iw >= 0) & (iw < W)  # taps off the map read zeros ('same' padding)
            delta = ((ky - R) * W + (kx - R)) * C  # the same sample, (ky, kx) pixels away
            xv = tl.load(x_ptr + off + delta, mask=ok[:, None] & cm[None, :], other=0.0)
            wv = tl.load(w_ptr + (ky * K + kx) * C + c, mask=cm, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
    acc += tl.load(b_ptr + c, mask=cm, other=0.0).to(ACC)[None, :]
    d = round_to(acc, h_ptr.dtype.element_ty)  # the convolution's output in the activation dtype
    df = d.to(ACC)
    mean = tl.sum(df, axis=1) / C
    diff = tl.where(cm[None, :], df - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    m2 = pm[:, None] & cm[None, :]
    nc = n.to(tl.int64)[:, None] * C + c[None, :]
    shift = tl.load(shift_ptr + nc, mask=m2, other=0.0).to(ACC)
    scale = tl.load(scale_ptr + nc, mask=m2, other=0.0).to(ACC)
    h = diff * rstd[:, None] * (1.0 + scale) + shift
    tl.store(h_ptr + off, round_to(h, h_ptr.dtype.element_ty), mask=m2)
    if SAVE:
        tl.store(d_ptr + off, d, mask=m2)
        tl.store(mean_ptr + p, mean, mask=pm)
        tl.store(rstd_ptr + p, rstd, mask=pm)


@triton.jit
def _dwconv_norm_bwd(dh_ptr, d_ptr, mean_ptr, rstd_ptr, scale_ptr, dd_ptr, dshift_ptr, dscale_ptr,
                     HW, C, SPLITS, TILES_PER_SPLIT,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    n, s, ns, c, cm = reduction_program(SPLITS, 1, C, BLOCK_C)
    scale = tl.load(scale_ptr + n.to(tl.int64) * C + c, mask=cm, other=0.0).to(ACC)
    acc_shift = tl.zeros([BLOCK_C], ACC)
    acc_scale = tl.zeros([BLOCK_C], ACC)
    t0 = s * TILES_PER_SPLIT
    for t in range(t0, t0 + TILES_PER_SPLIT):
        q = t * BLOCK_P + tl.arange(0, BLOCK_P)
        qm = q < HW
        p = n.to(tl.int64) * HW + q
        m2 = qm[:, None] & cm[None, :]
        off = p[:, None] * C + c[None, :]
        dh = tl.load(dh_ptr + off, mask=m2, other=0.0).to(ACC)
        d = tl.load(d_ptr + off, mask=m2, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + p, mask=qm, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + p, mask=qm, other=0.0).to(ACC)
        ln = tl.where(m2, (d - mean[:, None]) * rstd[:, None], 0.0)
        acc_shift += tl.sum(dh, axis=0)
        acc_scale += tl.sum(dh * ln, axis=0)
        dln = dh * (1.0 + scale[None, :])
        c1 = tl.sum(dln, axis=1) / C
        c2 = tl.sum(dln * ln, axis=1) / C
        dd = rstd[:, None] * (dln - c1[:, None] - ln * c2[:, None])
        tl.store(dd_ptr + off, round_to(dd, dd_ptr.dtype.element_ty), mask=m2)
    out = ns.to(tl.int64) * C + c
    tl.store(dshift_ptr + out, acc_shift, mask=cm)
    tl.store(dscale_ptr + out, acc_scale, mask=cm)


@triton.jit
def _dwconv_input_grad(dd_ptr, w_ptr, dx_ptr, P, H, W, C,
                       K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    R: tl.constexpr = K // 2
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < P
    cm = c < C
    hw = H * W
    ph = (p % hw) // W
    pw = p % W
    off = p.to(tl.int64)[:, None] * C + c[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for ky in range(K):  # a run-time loop: unrolled, the k*k loads would all be hoisted and spill
        ih = ph - (ky - R)  # dx[q] gets dd[q - tap] * w[tap]
        row_ok = pm & (ih >= 0) & (ih < H)
        for kx in tl.static_range(K):
            iw = pw - (kx - R)
            ok = row_ok & (iw >= 0) & (iw < W)
            delta = ((ky - R) * W + (kx - R)) * C
            g = tl.load(dd_ptr + off - delta, mask=ok[:, None] & cm[None, :], other=0.0)
            wv = tl.load(w_ptr + (ky * K + kx) * C + c, mask=cm, other=0.0)
            acc += g.to(ACC) * wv.to(ACC)[None, :]
    tl.store(dx_ptr + off, round_to(acc, dx_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])


@triton.jit
def _dwconv_weight_grad(x_ptr, dd_ptr, dw_ptr, db_ptr, H, W, C, SPLITS, TILES_PER_SPLIT, CBLOCKS,
                        K: tl.constexpr, TAPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                        ACC: tl.constexpr):
    R: tl.constexpr = K // 2
    n, s, ns, c, cm = reduction_program(SPLITS, CBLOCKS, C, BLOCK_C)
    hw = H * W
    tap = tl.arange(0, TAPS)
    tm = tap < K * K
    ty = tap // K - R
    tx = tap % K - R
    acc_w = tl.zeros([TAPS, BLOCK_C], ACC)
    acc_b = tl.zeros([BLOCK_C], ACC)
    t0 = s * TILES_PER_SPLIT
    for t in range(t0, t0 + TILES_PER_SPLIT):
        q = t * BLOCK_P + tl.arange(0, BLOCK_P)
        qm = q < hw
        qh = q // W
        qw = q % W
        p = n.to(tl.int64) * hw + q
        g = tl.load(dd_ptr + p[:, None] * C + c[None, :], mask=qm[:, None] & cm[None, :], other=0.0).to(ACC)
        acc_b += tl.sum(g, axis=0)
        ih = qh[None, :] + ty[:, None]  # (TAPS, BLOCK_P): the input pixel each tap reads
        iw = qw[None, :] + tx[:, None]
        ok = tm[:, None] & qm[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        src = (p[None, :] + (ty * W + tx)[:, None]) * C
        xv = tl.load(x_ptr + src[:, :, None] + c[None, None, :], mask=ok[:, :, None] & cm[None, None, :],
                     other=0.0)
        acc_w += tl.sum(xv.to(ACC) * g[None, :, :], axis=1)
    out = ns.to(tl.int64) * (K * K * C) + tap[:, None] * C + c[None, :]
    tl.store(dw_ptr + out, acc_w, mask=tm[:, None] & cm[None, :])
    tl.store(db_ptr + ns.to(tl.int64) * C + c, acc_b, mask=cm)


# ------------------------------------------------------------------------------------------------ launchers
def _taps_major(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, K, K) depthwise weight -> (K*K, C) contiguous, the layout the kernels read."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def forward(x, weight, bias, shift, scale, eps: float, save: bool):
    """h (and for the backward pass d, mean, rstd; empty when not `save`) of channels-last x (N, H, W, C)."""
    n, hgt, wid, c = x.shape
    k = weight.shape[-1]
    p = n * hgt * wid
    stat = launch.stat_dtype(x.dtype)
    h = torch.empty_like(x)
    d = torch.empty_like(x) if save else x.new_empty(0)
    mean = x.new_empty(p if save else 0, dtype=stat)
    rstd = x.new_empty(p if save else 0, dtype=stat)
    if p:
        tiles = launch.row_tiles(c, p)
        grid = (launch.cdiv(p, tiles.block_p),)
        _dwconv_norm_fwd[grid](x, _taps_major(weight), bias, shift.contiguous(), scale.contiguous(), h, d, mean,
                               rstd, p, hgt, wid, c, float(eps), K=k, BLOCK_P=tiles.block_p, BLOCK_C=tiles.block_c,
                               SAVE=bool(save), ACC=launch.accumulator(x.dtype), num_warps=tiles.num_warps)
    return h, d, mean, rstd


def backward(dh, x, d, mean, rstd, weight, scale):
    """(dx, dweight, dbias, dshift, dscale) of `forward`."""
    n, hgt, wid, c = x.shape
    k = weight.shape[-1]
    hw = hgt * wid
    p = n * hw
    acc = launch.accumulator(x.dtype)
    stat = launch.stat_dtype(x.dtype)
    dh = dh.contiguous()
    scale = scale.contiguous()
    dd = torch.empty_like(d)
    rows = launch.row_tiles(c, hw)
    red = launch.reduction(n, hw, c, block_c=rows.block_c, tile=rows.block_p * rows.block_c)
    dshift = x.new_empty((n, red.splits, c), dtype=stat)
    dscale = x.new_empty((n, red.splits, c), dtype=stat)
    dx = torch.empty_like(x)
    gather = launch.profile().gather
    wtaps = launch.pow2(k * k)
    wred = launch.reduction(n, hw, c, block_c=min(launch.pow2(c), launch.profile().channels // 2),
                            tile=max(1, gather // wtaps))
    dw = x.new_empty((n * wred.splits, k * k, c), dtype=stat)
    db = x.new_empty((n * wred.splits, c), dtype=stat)
    if p:
        _dwconv_norm_bwd[(n * red.splits,)](
            dh, d, mean, rstd, scale, dd, dshift, dscale, hw, c, red.splits, red.tiles_per_split,
            BLOCK_P=red.block_p, BLOCK_C=rows.block_c, ACC=acc, num_warps=rows.num_warps)
        wt = _taps_major(weight)
        tiles = launch.elementwise_tiles(c, p, tile=2048)  # 4096: 150 registers a thread, one block per SM
        _dwconv_input_grad[(launch.cdiv(p, tiles.block_p), launch.cdiv(c, tiles.block_c))](
            dd, wt, dx, p, hgt, wid, c, K=k, BLOCK_P=tiles.block_p, BLOCK_C=tiles.block_c, ACC=acc,
            num_warps=tiles.num_warps)
        _dwconv_weight_grad[(n * wred.splits * wred.channel_blocks,)](
            x, dd, dw, db, hgt, wid, c, wred.splits, wred.tiles_per_split, wred.channel_blocks, K=k, TAPS=wtaps,
            BLOCK_P=wred.block_p, BLOCK_C=wred.block_c, ACC=acc,
            num_warps=launch.warps(wtaps * wred.block_p * wred.block_c))
    else:
        dshift.zero_(), dscale.zero_(), dw.zero_(), db.zero_()
    d_weight = dw.sum(0).t().reshape(weight.shape).to(weight.dtype)
    d_bias = db.sum(0).to(weight.dtype)
    return dx, d_weight, d_bias, dshift.sum(1).to(scale.dtype), dscale.sum(1).to(scale.dtype)


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("fcdm::dwconv_norm_modulate", mutates_args=())
def dwconv_norm_modulate_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor,
                            scale: torch.Tensor, eps: float, save: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward(x, weight, bias, shift, scale, eps, save)


@dwconv_norm_modulate_op.register_fake
def _(x, weight, bias, shift, scale, eps, save):
    p = x.shape[0] * x.shape[1] * x.shape[2]
    stat = launch.stat_dtype(x.dtype)
    return (torch.empty_like(x), torch.empty_like(x) if save else x.new_empty(0),
            x.new_empty(p if save else 0, dtype=stat), x.new_empty(p if save else 0, dtype=stat))


@torch.library.custom_op("fcdm::dwconv_norm_modulate_backward", mutates_args=())
def dwconv_norm_modulate_backward_op(dh: torch.Tensor, x: torch.Tensor, d: torch.Tensor, mean: torch.Tensor,
                                     rstd: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(dh, x, d, mean, rstd, weight, scale)


@dwconv_norm_modulate_backward_op.register_fake
def _(dh, x, d, mean, rstd, weight, scale):
    n, c = scale.shape
    return (torch.empty_like(x), torch.empty_like(weight), weight.new_empty(c), scale.new_empty(n, c),
            scale.new_empty(n, c))


def _setup_context(ctx, inputs, output):
    x, weight, bias, shift, scale, eps, save = inputs
    _, d, mean, rstd = output
    ctx.mark_non_differentiable(d, mean, rstd)
    ctx.kept = save
    ctx.save_for_backward(x, d, mean, rstd, weight, scale)


def _backward(ctx, dh, *_):
    if not ctx.kept:
        raise RuntimeError("fcdm::dwconv_norm_modulate ran with save=False: nothing was kept for a backward pass")
    x, d, mean, rstd, weight, scale = ctx.saved_tensors
    dx, dw, db, dshift, dscale = dwconv_norm_modulate_backward_op(dh, x, d, mean, rstd, weight, scale)
    return dx, dw, db, dshift, dscale, None, None


dwconv_norm_modulate_op.register_autograd(_backward, setup_context=_setup_context)


def dwconv_norm_modulate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor,
                         scale: torch.Tensor, eps: float) -> torch.Tensor:
    """modulate(LayerNorm(dwconv(x)), shift, scale) of channels-last x (N, H, W, C), with (N, C) shift and scale,
    in x's dtype (statistics in float32)."""
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias, shift, scale))
    return dwconv_norm_modulate_op(x.contiguous(), weight, bias, shift, scale, float(eps), save)[0]
