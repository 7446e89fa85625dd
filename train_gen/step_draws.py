"""Random draws of a training step that depend only on (seed, step, index of the sample in the global batch).

Every random value a training step uses - the data order and flips, the posterior sample of stored
moments (both in train_gen/loader.py), the diffusion timesteps, the noise and the label-dropout mask
(here) - is drawn for the WHOLE global batch from a generator seeded by (seed, step, purpose), and
each process / micro-batch keeps its slice. So 1 process x accumulation 4, 2 x 2 and 4 x 1 see the
same numbers for every sample, and a checkpoint written by N processes resumes on M processes on the
same trajectory; what can still differ is float summation order (the gradient all-reduce, the batch
mean) and non-deterministic GPU kernels.

How the global batch is cut into processes and micro-batches is `BatchPlan`, computed and validated
once per run and handed to the step draws and to the loader.

Drawing the global batch's values on every process costs G * C * H * W normals per step (about 4M
for FCDM-XL 512 at G = 256: negligible on a GPU), and no host synchronisation: the generators are
re-seeded from Python integers each step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from fcdm_common.cli import UserError

# Version of the scheme, stored in checkpoints: a checkpoint without it (or with another one) was
# written by code whose draws were per process, and cannot continue the same trajectory.
RNG_SCHEME = "step-v1"
# One stream per purpose, so adding a draw never shifts the others.
PURPOSES = {"data": 0xDA7A, "timesteps": 0x7151, "noise": 0x0153, "label_drop": 0x1AB3}


def step_seed(seed: int, step: int, purpose: str) -> int:
    """A 63-bit seed that is a function of (seed, step, purpose) only (numpy SeedSequence hashing)."""
    entropy = [int(seed) % 2 ** 64, int(step), PURPOSES[purpose]]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split over processes and micro-batches, validated once.

    Process r of W holds samples [r * G/W, (r + 1) * G/W) of the global batch G; its micro-batch k of
    size B holds [r * G/W + k * B, r * G/W + (k + 1) * B). The step draws and the loader both take it."""
    global_batch: int  # G: samples per optimizer step over all processes (--global-batch-size)
    world_size: int = 1  # W: processes
    rank: int = 0  # this process
    micro_batch: Optional[int] = None  # B: samples per forward/backward (--per-proc-batch-size); None: G / W

    def __post_init__(self):
        G, W, r = self.global_batch, self.world_size, self.rank
        if G <= 0 or W <= 0 or not 0 <= r < W:
            raise ValueError(f"bad batch plan: global batch {G}, rank {r} of {W} processes")
        if G % W:
            raise UserError(f"--global-batch-size {G} is not divisible by the {W} processes")
        share = G // W
        if self.micro_batch is None:
            object.__setattr__(self, "micro_batch", share)
        B = self.micro_batch
        if B > share:
            raise UserError(f"--per-proc-batch-size {B} is larger than the per-process share of the global batch "
                            f"({G} / {W} processes = {share}); use --per-proc-batch-size <= {share}")
        if share % B:
            raise UserError(f"--global-batch-size {G} is not divisible by {W} process(es) x --per-proc-batch-size "
                            f"{B}; pick a --per-proc-batch-size that divides {share}")

    @property
    def per_process(self) -> int:
        """G / W: the samples of one step on this process."""
        return self.global_batch // self.world_size

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step."""
        return self.per_process // self.micro_batch

    @property
    def rows(self) -> slice:
        """This process's samples in the global batch."""
        return slice(self.rank * self.per_process, (self.rank + 1) * self.per_process)

    def micro_slices(self) -> list[slice]:
        """The micro-batches of this process's share, as slices of the share."""
        return [slice(k, k + self.micro_batch) for k in range(0, self.per_process, self.micro_batch)]

    def steps_per_epoch(self, items: int) -> int:
        """Whole global batches in a pass over `items` (the ragged tail is dropped); UserError when none fits."""
        steps = items // self.global_batch
        if steps == 0:
            raise UserError(f"the data has {items} items, fewer than one global batch of {self.global_batch}; "
                            "lower --global-batch-size")
        return steps


class StepDraws:
    """The step's timesteps, noise and label-dropout mask for this process's share of the global batch.

    `draw(step)` returns a dict with "t" (b,), "noise" (b, C, H, W) channels-last and, when the model
    drops labels, "drop_mask" (`label_drop_shape(b)`, bool), all on `device`, b = G / world_size.
    """

    def __init__(self, seed: int, plan: BatchPlan, latent_shape, device, sample_timesteps: Callable,
                 drop_shape: Optional[Callable[[int], tuple]] = None, drop_prob: float = 0.0):
        self.seed = seed  # the run's --seed
        self.global_batch = plan.global_batch  # G, samples per optimizer step over all processes
        self.rows = plan.rows  # this process's samples
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
