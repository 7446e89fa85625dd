"""Random draws for the samplers, in one place, so a sample never depends on its batch neighbours.

Every sampler (DDPM step noise, DDIM eta > 0 noise, Euler-Maruyama increments) asks `randn` for its
Gaussian noise. `generators` may be
- None: the global torch RNG (what DiT and SiT do);
- one `torch.Generator`: one stream for the whole batch;
- a list of per-sample `torch.Generator`s (len = batch): row i is drawn from generators[i] only, so
  sample i is the same whatever else is in the batch and however many processes share the work.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def check_generators(generators: Generators, batch: int) -> None:
    """Fail early (ValueError) when a per-sample generator list does not match the batch size."""
    if generators is None or isinstance(generators, torch.Generator):
        return
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} per-sample generators for a batch of {batch}")


def randn(shape: Sequence[int], generators: Generators = None, device=None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal tensor of `shape` (first dim = batch) drawn as described in the module docstring."""
    shape = tuple(shape)
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generators, torch.Generator):
        return torch.randn(shape, generator=generators, device=generators.device, dtype=dtype).to(device)
    check_generators(generators, shape[0])
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in generators]
    return torch.stack(rows)  # (N, ...)


def randn_like(x: torch.Tensor, generators: Generators = None) -> torch.Tensor:
    """`randn` with the shape, device and dtype of `x`."""
    return randn(x.shape, generators, device=x.device, dtype=x.dtype)
