"""The training loader: batches of latents that are a pure function of (seed, step, index in the global batch).

Epoch e is the global permutation `default_rng(SeedSequence([seed, e, ...])).permutation(N)`, cut into
global batches of G = batch_size * world_size (the ragged tail is dropped); process r takes the
contiguous slice [r * batch_size, (r + 1) * batch_size) of each. The orientations and posterior-noise
seeds of all G samples come from one generator seeded by (seed, step), each item's eps from its own
seed. So the batches do not depend on num_workers, and for a fixed G neither on world_size
(concatenating the ranks' batches gives the 1-process batch); `start_step=k` resumes at step k without
reading what was skipped. The other random draws of a step live in train_gen/step_draws.py.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from preparation.checks import nonfinite_rows
from train_gen.step_draws import BatchPlan, step_seed


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded shuffle of epoch `epoch` (same on every rank)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5EED])).permutation(n)


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """Generator of the orientation choices and posterior-noise seeds of one GLOBAL batch."""
    return np.random.default_rng(step_seed(seed, step, "data"))


class _StepBatches:
    """Item `step` is the whole batch of that step (called from worker threads)."""

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, seed: int, steps_per_epoch: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation (the last two epochs)
        self._lock = threading.Lock()

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = epoch_permutation(len(self.dataset), self.seed, epoch)
                self._perms[epoch] = perm
                for old in [e for e in self._perms if e < epoch - 1]:
                    del self._perms[old]
        start = (i * self.world_size + self.rank) * self.batch_size
        return perm[start:start + self.batch_size]

    def __getitem__(self, step: int):
        rng = batch_rng(self.seed, step)
        g, ds = self.batch_size * self.world_size, self.dataset
        orient = rng.integers(0, ds.orientations if ds.hflip else 1, size=g)  # every sample of the global batch
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        if getattr(ds, "mode", "sample") == "moments":
            seeds = rng.integers(0, 2 ** 63 - 1, size=g)
            return ds.get_batch(self.indices(step), None, orient=orient[rows], noise_seeds=seeds[rows])
        return ds.get_batch(self.indices(step), None, orient=orient[rows])


class TrainLoader:
    """Infinite deterministic iterator of (x (B, C, H, W) float32 scaled latents, y (B,) int64), followed by the
    clean images (B, 3, S, S) uint8 of the same items and flips when the data set reads them (alignment).

    `step` is the step of the next batch; rebuilding with start_step=step resumes exactly.
    """

    def __init__(self, dataset, plan: BatchPlan, seed: int = 0, start_step: int = 0, num_workers: int = 2,
                 prefetch_factor: int = 4, pin_memory: bool = False):
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.dataset = dataset  # ZarrLatentDataset or LegacyNpyDataset
        self.plan = plan  # the split of each global batch over the processes
        self.batch_size = plan.per_process  # per-rank batch
        self.rank = plan.rank  # this process
        self.world_size = plan.world_size  # number of processes sharing each epoch
        self.seed = seed  # global seed (same on every rank)
        self.num_workers = num_workers  # background reader threads (0: read in the calling thread)
        self.prefetch_factor = prefetch_factor  # batches queued per worker thread
        self.pin_memory = pin_memory  # page-locked batches for faster host-to-GPU copies
        self.steps_per_epoch = plan.steps_per_epoch(len(dataset))
        self.step = start_step
        self.nonfinite: dict[int, np.ndarray] = {}  # step -> dataset indices of items with NaN/inf inputs
        self._batches = _StepBatches(dataset, self.batch_size, self.rank, self.world_size, seed,
                                     self.steps_per_epoch)
        dataset.prepare()  # fill the cache (RAM or memory-mapped file) before the first batch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def batch_indices(self, step: int) -> np.ndarray:
        """Dataset indices of this rank's batch at `step` (for tests and debugging)."""
        return self._batches.indices(step).copy()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step`, computed in this process."""
        return self._batches[step]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_workers == 0:
            while True:
                out = self._produce(self.step)
                self.step += 1
                yield out
        # Worker THREADS, not processes: the heavy parts (gather, half->float, randn, zarr/blosc
        # decoding) release the GIL, and threads avoid copying every batch through shared memory,
        # which costs more than producing it. Results are consumed strictly in step order.
        pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="fcdm-data")
        pending: deque = deque()
        next_submit = self.step
        try:
            while True:
                while len(pending) < self.num_workers * self.prefetch_factor:
                    pending.append(pool.submit(self._produce, next_submit))
                    next_submit += 1
                out = pending.popleft().result()
                self.step += 1
                yield out
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def nonfinite_items(self, before_step: int | None = None) -> dict[int, list[int]]:
        """{step: dataset indices} of the batches (before `before_step`) that held NaN/inf inputs."""
        return {s: [int(i) for i in v] for s, v in sorted(self.nonfinite.items())
                if before_step is None or s < before_step}

    def _produce(self, step: int):
        batch = self._batches[step]  # (x, y), or (x, y, images) for representation alignment
        rows = nonfinite_rows(batch[0])  # on the host, in the worker thread: no device sync in the step
        if rows.size and len(self.nonfinite) < 1000:
            self.nonfinite[step] = self._batches.indices(step)[rows]
        if self.pin_memory:
            batch = tuple(v.pin_memory() for v in batch)
        return batch
