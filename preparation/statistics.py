"""Per-channel statistics of a latent store, and the training data normalised with them.

The statistics describe the training input z = (latent - shift) * scale over the whole data set:
every item, both stored orientations and every spatial position. For "sample" stores z is what is
stored. For "moments" stores z = (mean + std * eps - shift) * scale with eps ~ N(0, I) drawn afresh
each step, so the statistics integrate the posterior noise out exactly:
E[z] = scale * E[mean - shift], E[z^2] = scale^2 * E[(mean - shift)^2 + std^2].

Exact and independent of the number of processes: each shard of the store contributes float64 sums
of z and z^2 per channel (array `stat_sums`, one row per shard, flagged in `stat_done`), computed from
the values exactly as stored (float16 moments included); the final mean/std add the rows in shard
order, so 1 and N processes give the same bits. Extraction writes a shard's row with the shard;
preparation/latent_stats.py fills missing rows of an existing store (resumable) and writes the
result into the store attribute `latent_stats` = {"mean": [...], "std": [...], "elements_per_channel"}.

With `--latent-norm channel` training reads `NormalizedDataset` batches, (z - mean_c) / std_c; the
normalisation itself and its inverse belong to the latent space (models/latent_space.py).
"""
from __future__ import annotations

import numpy as np

from fcdm_common.cli import UserError
from models.latent_space import NORM_MODES, LatentNorm

STATS_ATTR = "latent_stats"


# ----------------------------------------------------------------------------- statistics
def shard_sums(values: np.ndarray, mode: str, scaling_factor: float, shift_factor: float,
               items_per_step: int = 64) -> np.ndarray:
    """(2, C) float64: per-channel sum of z and of z^2 (expected, for moments) over one shard's values.

    values: (n, O, 2, C, H, W) raw moments (mean, std) or (n, O, C, H, W) stored z samples. Summed in
    fixed groups of `items_per_step` items (bounded float64 temporaries; the order depends on n only)."""
    if len(values) > items_per_step:
        out = np.zeros((2, values.shape[3 if mode == "moments" else 2]), dtype=np.float64)
        for start in range(0, len(values), items_per_step):
            out += _sums(values[start:start + items_per_step], mode, scaling_factor, shift_factor)
        return out
    return _sums(values, mode, scaling_factor, shift_factor)


def _sums(values: np.ndarray, mode: str, scaling_factor: float, shift_factor: float) -> np.ndarray:
    if mode == "moments":
        m = values[:, :, 0].astype(np.float64) - float(shift_factor)  # (n, O, C, H, W)
        s = values[:, :, 1].astype(np.float64)
        axes = (0, 1, 3, 4)
        a = float(scaling_factor)
        return np.stack([a * m.sum(axis=axes), a * a * (np.square(m).sum(axis=axes) + np.square(s).sum(axis=axes))])
    z = values.astype(np.float64)
    axes = (0, 1, 3, 4)
    return np.stack([z.sum(axis=axes), np.square(z).sum(axis=axes)])


def elements_per_channel(count: int, orientations: int, latent_shape) -> int:
    return int(count) * int(orientations) * int(latent_shape[1]) * int(latent_shape[2])


def finalize_stats(sums: np.ndarray, n_elements: int) -> dict:
    """Mean and (population) std per channel from the per-shard rows (k, 2, C), added in shard order."""
    total = np.zeros(sums.shape[1:], dtype=np.float64)
    for row in sums:  # fixed order: the result does not depend on which process wrote which row
        total += row
    mean = total[0] / n_elements
    var = np.maximum(total[1] / n_elements - mean * mean, 0.0)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in np.sqrt(var)],
            "elements_per_channel": int(n_elements),
            "of": "z = (latent - shift) * scale over all items, both orientations and positions"}


def ensure_stats_arrays(group, n_shards: int, channels: int) -> None:
    """Create `stat_sums` (k, 2, C) float64 and `stat_done` (k,) bool in a store if absent."""
    names = set(group.array_keys())
    if "stat_sums" not in names:
        group.create_array("stat_sums", shape=(n_shards, 2, channels), dtype="float64", chunks=(1, 2, channels),
                           fill_value=0.0)
    if "stat_done" not in names:
        group.create_array("stat_done", shape=(n_shards,), dtype="bool", chunks=(1,), fill_value=False)


def write_shard_sums(group, k: int, sums: np.ndarray) -> None:
    group["stat_sums"][k] = sums
    group["stat_done"][k] = True  # the marker goes last


def store_stats_from_rows(group) -> dict:
    """Final statistics once every shard has its row (UserError otherwise)."""
    done = np.asarray(group["stat_done"][:], dtype=bool)
    if not done.all():
        raise RuntimeError(f"statistics of {int((~done).sum())} shard(s) are missing")
    a = dict(group.attrs)
    return finalize_stats(np.asarray(group["stat_sums"][:]), elements_per_channel(
        a["count"], a.get("orientations", 2), a["latent_shape"]))


def stats_from_info(info: dict) -> dict | None:
    stats = info.get(STATS_ATTR)
    return stats if isinstance(stats, dict) and stats.get("mean") and stats.get("std") else None




def norm_for_training(dataset, mode: str, where: str) -> LatentNorm | None:
    """The normalisation asked for by --latent-norm, from the store's statistics (UserError if absent)."""
    if mode not in NORM_MODES:
        raise UserError(f"--latent-norm must be one of {', '.join(NORM_MODES)}, got {mode!r}")
    if mode == "none":
        return None
    stats = stats_from_info(getattr(dataset, "info", {}) or {})
    if stats is None:
        if (dataset.info or {}).get("format") == "legacy-npy":
            raise UserError(f"--latent-norm channel needs per-channel statistics, which the .npy layout ({where}) "
                            "cannot hold; convert it with preparation/save_zarr.py, then run "
                            "preparation/latent_stats.py STORE, or train with --latent-norm none")
        raise UserError(f"the store {where} has no per-channel latent statistics (it was made before they were "
                        f"recorded); add them with 'python preparation/latent_stats.py {where}' "
                        "(or train with --latent-norm none)")
    norm = LatentNorm(stats["mean"], stats["std"])
    C = int(dataset.latent_shape[0])
    if norm.mean.numel() != C:
        raise UserError(f"the store {where} records statistics of {norm.mean.numel()} channels but holds {C}; "
                        f"recompute them with 'python preparation/latent_stats.py {where} --recompute'")
    return norm


class NormalizedDataset:
    """A training data set whose batches are (z - mean_c) / std_c; everything else is the wrapped one's."""

    def __init__(self, dataset, norm: LatentNorm):
        self.dataset = dataset  # ZarrLatentDataset (or any object with get_batch)
        self.norm = norm

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def get_batch(self, indices, rng, **draws):
        """The wrapped batch with its latents normalised; the labels and any further outputs (the images of
        representation alignment) are passed through unchanged."""
        x, *rest = self.dataset.get_batch(indices, rng, **draws)  # draws: orient, noise_seeds (TrainLoader)
        return (self.norm.normalize(x), *rest)


