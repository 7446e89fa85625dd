"""The FCDM block (models/fcdm.py `FCDMBlock`) through the fused kernels. The same computation as the torch
path, in four launches plus the two pointwise matmuls, which stay on the BLAS library (cuBLAS):

    h = dwconv_norm_modulate(x)         depthwise conv + LayerNorm + adaLN shift/scale   (dwconv_norm.py)
    a = pwconv1(h)                      1x1 conv W -> 3W (matmul)
    r = gelu_grn(a)                     GELU + GRN statistics, then GRN's apply          (grn.py)
    o = pwconv2(r)                      1x1 conv 3W -> W (matmul)
    out = x + gate * o                  gated residual                                   (gate.py)

Each fused stage is a `torch.library` custom op with a registered backward, so autograd, activation
checkpointing and torch.compile see them as single operations. Activations keep the dtype of x (bf16 under
autocast: the stage outputs are what the torch path casts to bf16 before its matmuls); statistics are float32.
"""
from __future__ import annotations

import torch

from models.kernels.dwconv_norm import dwconv_norm_modulate
from models.kernels.gate import gated_residual
from models.kernels.grn import gelu_grn


def fused_block_forward(blk, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`blk` (an FCDMBlock) applied to channels-last x (N, H, W, C) with condition c (N, C)."""
    shift, scale, gate = blk.adaLN_modulation(c).chunk(3, dim=-1)  # 3 x (N, C)
    h = dwconv_norm_modulate(x, blk.dwconv.weight, blk.dwconv.bias, shift, scale, blk.norm.eps)
    r = gelu_grn(blk.pwconv1(h), blk.grn.weight, blk.grn.bias, blk.grn.eps)  # (N, H, W, 3C)
    return gated_residual(x, gate, blk.pwconv2(r))
