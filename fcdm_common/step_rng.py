"""Random draws of a training step that depend only on (seed, step, index of the sample in the global batch).

Every random value a training step uses - the data order and flips, the posterior sample of stored
moments (both in fcdm_common/data.py), the diffusion timesteps, the noise and the label-dropout mask
(here) - is drawn for the WHOLE global batch from a generator seeded by (seed, step, purpose), and
each process / micro-batch keeps its slice. So 1 process x accumulation 4, 2 x 2 and 4 x 1 see the
same numbers for every sample, and a checkpoint written by N processes resumes on M processes on the
same trajectory; what can still differ is float summation order (the gradient all-reduce, the batch
mean) and non-deterministic GPU kernels.

Slices: process r of W holds samples [r * G/W, (r + 1) * G/W) of the global batch G; its
micro-batch k of size B holds [r * G/W + k * B, r * G/W + (k + 1) * B).

Drawing the global batch's values on every process costs G * C * H * W normals per step (about 4M
for FCDM-XL 512 at G = 256: negligible on a GPU), and no host synchronisation: the generators are
re-seeded from Python integers each step.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

# Version of the scheme, stored in checkpoints: a checkpoint without it (or with another one) was
# written by code whose draws were per process, and cannot continue the same trajectory.
RNG_SCHEME = "step-v1"
# One stream per purpose, so adding a draw never shifts the others.
PURPOSES = {"data": 0xDA7A, "timesteps": 0x7151, "noise": 0x0153, "label_drop": 0x1AB3}


def step_seed(seed: int, step: int, purpose: str) -> int:
    """A 63-bit seed that is a function of (seed, step, purpose) only (numpy SeedSequence hashing)."""
    entropy = [int(seed) % 2 ** 64, int(step), PURPOSES[purpose]]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def process_slice(global_batch: int, world_size: int, rank: int) -> slice:
    """Samples of the global batch held by process `rank` (contiguous, G / W of them)."""
    share = global_batch // world_size
    return slice(rank * share, (rank + 1) * share)


def micro_batches(share: int, batch_per_gpu: int) -> list[slice]:
    """Slices of a process's share for each accumulation step (`share` divisible by `batch_per_gpu`)."""
    return [slice(k, k + batch_per_gpu) for k in range(0, share, batch_per_gpu)]


class StepDraws:
    """The step's timesteps, noise and label-dropout mask for this process's share of the global batch.

    `draw(step)` returns a dict with "t" (b,), "noise" (b, C, H, W) channels-last and, when the model
    drops labels, "drop_mask" (`label_drop_shape(b)`, bool), all on `device`, b = G / world_size.
    """

    def __init__(self, seed: int, global_batch: int, world_size: int, rank: int, latent_shape, device,
                 sample_timesteps: Callable, drop_shape: Optional[Callable[[int], tuple]] = None,
                 drop_prob: float = 0.0):
        self.seed = seed  # the run's --seed
        self.global_batch = global_batch  # G, samples per optimizer step over all processes
        self.rows = process_slice(global_batch, world_size, rank)  # this process's samples
        self.latent_shape = tuple(int(v) for v in latent_shape)  # (C, H, W)
        self.device = torch.device(device)
        self.sample_timesteps = sample_timesteps  # objective.sample_timesteps(n, device, generator=)
        self.drop_shape = drop_shape if drop_prob > 0 else None  # model.label_drop_shape, None: no dropout
        self.drop_prob = float(drop_prob)  # model.class_dropout_prob
        self._gens = {k: torch.Generator(self.device) for k in ("timesteps", "noise", "label_drop")}

    def _gen(self, step: int, purpose: str) -> torch.Generator:
        return self._gens[purpose].manual_seed(step_seed(self.seed, step, purpose))

    def draw(self, step: int) -> dict:
        G, rows = self.global_batch, self.rows
        t = self.sample_timesteps(G, self.device, generator=self._gen(step, "timesteps"))[rows]
        noise = torch.randn((G, *self.latent_shape), device=self.device, generator=self._gen(step, "noise"))
        out = {"t": t, "noise": noise[rows].contiguous(memory_format=torch.channels_last)}
        if self.drop_shape is not None:
            u = torch.rand(self.drop_shape(G), device=self.device, generator=self._gen(step, "label_drop"))
            out["drop_mask"] = (u < self.drop_prob)[..., rows]  # the sample index is the last dim
        return out


def take(draws: dict, rows: slice) -> dict:
    """The micro-batch `rows` (of the process's share) of `StepDraws.draw`'s output."""
    out = {"t": draws["t"][rows], "noise": draws["noise"][rows]}
    if "drop_mask" in draws:
        out["drop_mask"] = draws["drop_mask"][..., rows]
    return out
