"""Per-step draws (train_gen/step_draws.py) and TrainLoader batches do not depend on the process count:
the ranks' slices of any world size concatenate bitwise to the one-process values."""
from __future__ import annotations

import numpy as np
import torch

from preparation.readers import open_dataset
from test_data import make_store
from train_gen.loader import TrainLoader
from train_gen.step_draws import BatchPlan, StepDraws, step_seed, take

G = 8


def test_step_seed_depends_on_seed_step_and_purpose_only():
    assert step_seed(0, 5, "noise") == step_seed(0, 5, "noise")
    seeds = {step_seed(s, t, p) for s in (0, 1, -1) for t in (0, 1, 2) for p in ("noise", "timesteps", "data")}
    assert len(seeds) == 27 and all(0 <= s < 2 ** 63 for s in seeds)


def test_loader_batches_concatenate_across_world_sizes(tmp_path):
    ds = open_dataset(zarr_path=make_store(tmp_path / "m.zarr", count=40), cache="memory")
    one = TrainLoader(ds, BatchPlan(G), seed=3, num_workers=0)
    for world in (2, 4):
        loaders = [TrainLoader(ds, BatchPlan(G, world, r), seed=3, num_workers=0) for r in range(world)]
        for step in (0, 4, 7):  # 5 steps per epoch: 7 is in the second epoch
            x1, y1 = one.batch(step)
            parts = [ld.batch(step) for ld in loaders]
            assert torch.equal(torch.cat([p[0] for p in parts]), x1)
            assert torch.equal(torch.cat([p[1] for p in parts]), y1)
    # the posterior noise really is drawn (two steps of the same items differ), flips happen
    x0 = one.batch(0)[0]
    x5 = one.batch(5)[0]  # epoch 1, another permutation: compare the same item
    i0, i5 = one.batch_indices(0), one.batch_indices(5)
    common = np.intersect1d(i0, i5)
    assert len(common) > 0
    a, b = x0[list(i0).index(common[0])], x5[list(i5).index(common[0])]
    assert not torch.equal(a.abs(), b.abs())


class Tiny(torch.nn.Module):
    num_levels = 3

    def label_drop_shape(self, n):
        return (self.num_levels, n)


def test_step_draws_slices_concatenate_and_micro_batches_tile_them():
    from diffusion import create_diffusion

    objective = create_diffusion()
    full = StepDraws(7, BatchPlan(G), (2, 4, 4), "cpu", objective.sample_timesteps, Tiny().label_drop_shape,
                     0.5).draw(3)
    assert full["drop_mask"].shape == (3, G) and full["drop_mask"].dtype == torch.bool
    assert 0 < int(full["drop_mask"].sum()) < 3 * G
    for world in (2, 4):
        parts = [StepDraws(7, BatchPlan(G, world, r), (2, 4, 4), "cpu", objective.sample_timesteps,
                           Tiny().label_drop_shape, 0.5).draw(3) for r in range(world)]
        assert torch.equal(torch.cat([p["t"] for p in parts]), full["t"])
        assert torch.equal(torch.cat([p["noise"] for p in parts]), full["noise"])
        assert torch.equal(torch.cat([p["drop_mask"] for p in parts], dim=-1), full["drop_mask"])
        # micro-batches of one rank tile its share
        plan = BatchPlan(G, world, 1, micro_batch=1)
        share = plan.rows
        pieces = [take(parts[1], rows) for rows in plan.micro_slices()]
        assert torch.equal(torch.cat([p["noise"] for p in pieces]), full["noise"][share])
        assert torch.equal(torch.cat([p["drop_mask"] for p in pieces], dim=-1), full["drop_mask"][:, share])
    other = StepDraws(7, BatchPlan(G), (2, 4, 4), "cpu", objective.sample_timesteps).draw(4)
    assert not torch.equal(other["noise"], full["noise"]) and "drop_mask" not in other
    assert full["noise"].is_contiguous(memory_format=torch.channels_last)
