"""Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) as a model wrapper every sampler uses.

guided = uncond + s * (cond - uncond) on the guided channels of the prediction (epsilon for
diffusion, velocity for flow matching); every other output channel, the learned variance included,
is the conditional one. `cfg_channels="all"` guides every prediction channel (our default);
`cfg_channels=3` guides only the first three, which is what DiT's `forward_with_cfg` and the
original FCDM code do on 4-channel latents.

Guidance interval (Kynkaanniemi et al., "Applying guidance in a limited interval", arXiv 2404.07724):
guidance is applied only where the noise level lies in [lo, hi] (0 = clean data, 1 = pure noise).
Outside it only the conditional pass runs (half the compute); inside it the in-interval rows are
evaluated with the null label in the SAME forward call as the conditional batch.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch


class GuidedModel:
    """Callable like the raw network, model(x, t, y) -> output, with classifier-free guidance applied."""

    def __init__(self, model: Callable, cfg_scale: float, null_label: int, cfg_channels: Union[str, int] = "all",
                 guidance_interval: Optional[Tuple[float, float]] = None,
                 noise_level_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.model = model                          # raw network model(x, t, y), NCHW in and out
        self.cfg_scale = float(cfg_scale)           # s; 1 = no guidance (conditional pass only)
        self.null_label = int(null_label)           # the "drop the class" label (num_classes for FCDM/DiT)
        self.cfg_channels = cfg_channels            # "all" or k: guide the first k prediction channels
        self.guidance_interval = guidance_interval  # (lo, hi) in noise-level fraction, None = everywhere
        self.noise_level_fn = noise_level_fn        # t (as the model sees it) -> noise level in [0, 1]
        if not math.isfinite(self.cfg_scale):  # nan/inf would turn every image into NaN (a black grid)
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
        if not (cfg_channels == "all" or (isinstance(cfg_channels, int) and cfg_channels > 0)):
            raise ValueError(f"cfg_channels must be 'all' or a positive int, got {cfg_channels!r}")
        if guidance_interval is not None:
            lo, hi = guidance_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {guidance_interval!r}")
            if noise_level_fn is None:
                raise ValueError("a guidance interval needs noise_level_fn")

    def _guided_rows(self, t: torch.Tensor, n: int) -> Optional[torch.Tensor]:
        """Bool mask (N,) of rows to guide, or None for all rows."""
        if self.guidance_interval is None:
            return None
        lo, hi = self.guidance_interval
        level = self.noise_level_fn(t).float().reshape(-1).expand(n)
        return (level >= lo) & (level <= hi)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.cfg_scale == 1.0:
            return self.model(x, t, y, **kwargs)
        n = x.shape[0]
        rows = self._guided_rows(t, n)
        if rows is None:
            idx = None
        else:
            if not bool(rows.any()):  # host sync once per step; saves the whole unconditional pass
                return self.model(x, t, y, **kwargs)
            idx = None if bool(rows.all()) else rows.nonzero(as_tuple=True)[0]
        xu, tu = (x, t) if idx is None else (x[idx], t[idx])
        null = torch.full((xu.shape[0],), self.null_label, dtype=y.dtype, device=y.device)
        out = self.model(torch.cat([x, xu]), torch.cat([t, tu]), torch.cat([y, null]), **kwargs).float()  # one forward
        cond, uncond = out[:n], out[n:]
        k = x.shape[1] if self.cfg_channels == "all" else min(int(self.cfg_channels), x.shape[1])
        cond_k = cond[:, :k] if idx is None else cond[idx, :k]
        guided = uncond[:, :k] + self.cfg_scale * (cond_k - uncond[:, :k])
        result = cond.clone()
        if idx is None:
            result[:, :k] = guided
        else:
            result[idx, :k] = guided
        return result
