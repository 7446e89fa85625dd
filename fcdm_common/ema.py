"""Exponential moving average (EMA) of network weights, as in DiT's `update_ema` (Polyak averaging).

    ema <- decay * ema + (1 - decay) * param        (decay 0.9999 in the paper, Table 6)

`update_ema` does this for every floating-point parameter with a handful of `torch._foreach_*`
kernels (one launch per op for the whole list instead of two per parameter) and copies buffers.
`weight` may be a 0-dim tensor that scales the step (1 - decay) on the device: the training loop
passes 0 for a skipped (non-finite) step so the EMA is not moved, without a host synchronisation.

`update_ema_reference` is the plain per-parameter loop (DiT's formulation) kept as the baseline
for benchmarks and as the independent reference in tests.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn


def _pairs(ema: nn.Module, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ema_params = dict(ema.named_parameters())
    e_list, m_list = [], []
    for name, p in model.named_parameters():
        if name not in ema_params:
            raise KeyError(f"EMA model has no parameter {name!r}; it must be a copy of the trained model")
        e = ema_params[name]
        if e.dtype.is_floating_point:
            e_list.append(e.data)
            m_list.append(p.data)
    return e_list, m_list


def _copy_buffers(ema: nn.Module, model: nn.Module) -> None:
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        if name in ema_buffers:
            ema_buffers[name].copy_(b)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999,
               weight: Optional[torch.Tensor] = None) -> None:
    """ema <- ema + w * (1 - decay) * (param - ema) with foreach kernels; w = `weight` (0-dim tensor
    on the parameters' device) or 1. decay=0 copies the model (the start of training)."""
    e_list, m_list = _pairs(ema, model)
    if not e_list:
        return
    if weight is None and decay == 0:
        torch._foreach_copy_(e_list, m_list)  # exact copy (lerp by 1 may round)
    elif weight is None:
        torch._foreach_lerp_(e_list, m_list, 1.0 - decay)  # e + (1 - decay) * (m - e)
    else:
        delta = torch._foreach_sub(m_list, e_list)  # (m - e)
        torch._foreach_mul_(delta, weight * (1.0 - decay))  # tensor scalar: stays on the device
        torch._foreach_add_(e_list, delta)
    _copy_buffers(ema, model)


@torch.no_grad()
def update_ema_reference(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """The per-parameter loop of DiT's train.py: ema = decay * ema + (1 - decay) * param."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.data, alpha=1.0 - decay)
    _copy_buffers(ema, model)


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy of `model` (eval mode, no gradients) to hold the EMA weights."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()
