"""Timestep respacing: sample (or train) with a subset of the T diffusion steps (iDDPM Sec. 4).

Given kept steps S = {s_1 < ... < s_K} of the original process, the respaced process has
abar'_k = abar_{s_k} and hence betas beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} (abar_{s_0} = 1), so
its forward marginals equal the original ones at the kept steps. The network always receives the
ORIGINAL timestep s_k (0..T-1), so a model trained on T steps samples with any respacing.
"""
from __future__ import annotations

from typing import Callable, Iterable, Set, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[str, Iterable[int]]) -> Set[int]:
    """The set of original steps to keep.

    section_counts:
    - "ddimN": steps 0, k, 2k, ... with the stride k that gives exactly N steps (DDIM's even stride);
    - "N" or "N1,N2,...": split [0, T) into equal sections and take N_i evenly spaced steps (both
      ends included) from section i, walking a fractional stride (size-1)/(N_i-1) and rounding the
      running position, exactly as improved-diffusion/ADM/DiT do; e.g. "10,15,20" over 300 steps;
    - a list of ints, same as the comma-separated form.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = int(spec[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            if desired == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(f"cannot take exactly {desired} equally strided steps from {num_timesteps}; "
                             f"use a plain count such as '{desired}' instead of 'ddim{desired}'")
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad timestep respacing {section_counts!r}: expected 'N', 'N1,N2,...' or 'ddimN'") from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c <= 0 for c in counts):
        raise ValueError(f"bad timestep respacing {section_counts!r}: section counts must be positive")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []  # type: int, List[int]
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0  # iDDPM's running position: the rounding of the accumulated sum, not of j * stride,
        for _ in range(count):  # decides the steps near .5 (e.g. N=21 of 1000 keeps 499, not 500)
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


class _OriginalTimestepModel:
    """Calls `model` with the original timestep of each respaced index: model(x, map[t], **kw)."""

    def __init__(self, model: Callable, timestep_map: torch.Tensor):
        self.model = model                  # the network (or a guidance wrapper around it)
        self.timestep_map = timestep_map    # (K,) int64, respaced index -> original step

    def __call__(self, x, t, **kwargs):
        if self.timestep_map.device != t.device:  # copied once, not at every step
            self.timestep_map = self.timestep_map.to(t.device)
        return self.model(x, self.timestep_map[t.long()], **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps `use_timesteps` of a base beta schedule."""

    def __init__(self, use_timesteps: Iterable[int], *, betas: np.ndarray, **kwargs):
        # use_timesteps: original steps to keep; betas: the ORIGINAL float64 schedule (T,);
        # kwargs: model_mean_type, model_var_type, loss_type as for GaussianDiffusion.
        self.use_timesteps = set(int(s) for s in use_timesteps)
        self.original_betas = np.asarray(betas, dtype=np.float64)
        self.original_num_steps = len(self.original_betas)
        if not self.use_timesteps or min(self.use_timesteps) < 0 or max(self.use_timesteps) >= self.original_num_steps:
            raise ValueError(f"kept timesteps must lie in [0, {self.original_num_steps})")
        base_alphas_cumprod = np.cumprod(1.0 - self.original_betas)
        last, new_betas, timestep_map = 1.0, [], []
        for i, abar in enumerate(base_alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1.0 - abar / last)  # beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}
                last = abar
                timestep_map.append(i)
        self.timestep_map = torch.tensor(timestep_map, dtype=torch.long)
        self._init_kwargs = kwargs
        super().__init__(betas=np.asarray(new_betas, dtype=np.float64), **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _OriginalTimestepModel):
            return model
        return _OriginalTimestepModel(model, self.timestep_map)

    def respace(self, timestep_respacing: Union[str, Iterable[int]]) -> "SpacedDiffusion":
        """A SpacedDiffusion over the ORIGINAL schedule ("" = all steps), same objective settings.

        Cached per spec, so calling it for every sampling batch costs nothing after the first time."""
        key = timestep_respacing if isinstance(timestep_respacing, str) else tuple(timestep_respacing)
        cache = self.__dict__.setdefault("_respaced", {})
        if key not in cache:
            if isinstance(timestep_respacing, str) and timestep_respacing.strip() == "":
                steps = range(self.original_num_steps)
            else:
                steps = space_timesteps(self.original_num_steps, timestep_respacing)
            cache[key] = SpacedDiffusion(steps, betas=self.original_betas, **self._init_kwargs)
        return cache[key]
