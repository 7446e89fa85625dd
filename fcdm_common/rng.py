"""Every random state of a process: seeding, and capturing / restoring them for checkpoints and for work
(the evaluation during training) that must leave training's random streams untouched.

States are stored as tensors and plain Python values so checkpoints keep loading with
`torch.load(weights_only=True)` (numpy's MT19937 key becomes an int64 tensor).
"""
from __future__ import annotations

import random
import warnings
from typing import Optional

import numpy as np
import torch


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    """Seed of process `rank`: distinct per rank, fixed by (seed, rank, world_size) (DiT: seed * W + rank)."""
    return int(seed) * int(world_size) + int(rank)


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch CPU and every CUDA device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def capture_rng(generators: Optional[dict] = None) -> dict:
    """All random states of this process (+ named torch.Generators) as checkpoint-safe values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next)
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict, generators: Optional[dict] = None) -> None:
    """Inverse of `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available() and state.get("cuda"):
        if len(state["cuda"]) != torch.cuda.device_count():
            warnings.warn(f"checkpoint holds {len(state['cuda'])} CUDA RNG states but {torch.cuda.device_count()} "
                          "devices are visible; restoring the ones that fit")
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k].cpu())
        else:
            warnings.warn(f"checkpoint has no state for generator {k!r}; it keeps its fresh seed")
