"""Training datasets and TrainLoader: determinism, rank splits, resume, posterior sampling, legacy layout.

References: a second (plain Python) computation of the epoch schedule, the closed form of the
reparameterised posterior sample, and the legacy .npy files themselves.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fcdm_common.cli import UserError
from preparation import save_zarr
from preparation import store as zstore
from preparation.readers import open_dataset
from train_gen.loader import TrainLoader, epoch_permutation
from train_gen.step_draws import BatchPlan

SF = 0.5


def make_store(path, count=40, mode="moments", shape=(2, 2, 2), std=0.25, shard=8, chunk=4, classes=5):
    """Item i: orientation o has mean = (i + 1) * (1 if o == 0 else -1) everywhere, std constant."""
    settings = zstore.make_settings(image_size=16, vae="sd:test", scaling_factor=SF, store=mode, count=count,
                                    latent_shape=shape, orientations=2,
                                    class_names=[f"c{k}" for k in range(classes)], shard_size=shard,
                                    chunk_size=chunk, seed=None)
    group = zstore.create_store(path, settings)
    for k in range(zstore.num_shards(count, shard)):
        start, end = zstore.shard_range(k, count, shard)
        ids = np.arange(start, end, dtype=np.float32)[:, None, None, None, None] + 1
        mean = np.concatenate([ids, -ids], axis=1) * np.ones((1, 2, *shape), np.float32)  # (n, 2, C, H, W)
        if mode == "moments":
            values = np.stack([mean, np.full_like(mean, std)], axis=2)
        else:
            values = mean * SF
        zstore.write_shard(group, k, values, np.arange(start, end) % classes)
    zstore.mark_complete(group)
    return path


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "s.zarr")


def collect(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def item_ids(x, scaled=True):
    """Recover (item index, orientation) from the batch: |mean| = i + 1, sign = orientation."""
    m = x.mean(dim=(1, 2, 3)) / SF
    return (m.abs().round() - 1).long(), (m < 0).long()


@pytest.mark.parametrize("cache", ["memory", "none", "mmap"])
def test_batches_identical_across_workers_and_caches(store, cache):
    ref = collect(TrainLoader(open_dataset(zarr_path=store, cache="memory"), BatchPlan(4), seed=7, num_workers=0), 12)
    got = collect(TrainLoader(open_dataset(zarr_path=store, cache=cache), BatchPlan(4), seed=7, num_workers=2), 12)
    for (x0, y0), (x1, y1) in zip(ref, got):
        torch.testing.assert_close(x0, x1, rtol=0, atol=0)
        torch.testing.assert_close(y0, y1, rtol=0, atol=0)


def test_epochs_are_permutations_split_disjointly_across_ranks(store):
    ds = open_dataset(zarr_path=store)
    world, bs = 3, 4
    loaders = [TrainLoader(ds, BatchPlan(bs * world, world, r), seed=1, num_workers=0) for r in range(world)]
    spe = loaders[0].steps_per_epoch
    assert spe == 40 // (bs * world) == 3
    for epoch in range(2):
        seen = np.concatenate([ld.batch_indices(epoch * spe + s) for ld in loaders for s in range(spe)])
        assert len(seen) == len(set(seen.tolist())) == spe * bs * world  # disjoint, ragged tail dropped
        # second implementation of the schedule: global batch i is perm[i*B*W:(i+1)*B*W], rank r its r-th slice
        perm = epoch_permutation(40, 1, epoch)
        for r, ld in enumerate(loaders):
            for s in range(spe):
                lo = (s * world + r) * bs
                np.testing.assert_array_equal(ld.batch_indices(epoch * spe + s), perm[lo:lo + bs])
    assert not np.array_equal(epoch_permutation(40, 1, 0), epoch_permutation(40, 1, 1))
    # labels and items agree
    x, y = loaders[0].batch(0)
    ids, _ = item_ids(x)
    np.testing.assert_array_equal(ids.numpy(), loaders[0].batch_indices(0))
    np.testing.assert_array_equal(y.numpy(), ids.numpy() % 5)


def test_start_step_resumes_exactly_and_tracks_epoch(store):
    ds = open_dataset(zarr_path=store)
    full = TrainLoader(ds, BatchPlan(8), seed=3, num_workers=2)
    batches = collect(full, 9)
    assert full.steps_per_epoch == 5 and full.step == 9 and full.epoch == 1
    resumed = TrainLoader(ds, BatchPlan(8), seed=3, start_step=6, num_workers=1)
    assert resumed.epoch == 1
    for (x0, y0), (x1, y1) in zip(batches[6:], collect(resumed, 3)):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    other_seed = TrainLoader(ds, BatchPlan(8), seed=4, num_workers=0).batch(0)
    assert not torch.equal(other_seed[0], batches[0][0])


def test_moments_give_fresh_scaled_posterior_samples_and_both_orientations(tmp_path):
    path = make_store(tmp_path / "m.zarr", count=64, shape=(4, 8, 8), std=0.25)
    ds = open_dataset(zarr_path=path)
    loader = TrainLoader(ds, BatchPlan(32), seed=0, num_workers=0)
    eps_all, orients = [], []
    for step in range(4):
        x, _ = loader.batch(step)
        idx = torch.from_numpy(loader.batch_indices(step))
        m = x.mean(dim=(1, 2, 3)) / SF
        orient = (m < 0).long()
        mean = (idx + 1).float() * (1 - 2 * orient).float()
        eps = (x / SF - mean[:, None, None, None]) / 0.25  # z = (mean + std * eps) * s  =>  eps
        eps_all.append(eps.flatten())
        orients.append(orient)
    eps = torch.cat(eps_all).double()
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05  # N(0, 1), 8192 draws
    frac = torch.cat(orients).float().mean().item()
    assert 0.3 < frac < 0.7  # both orientations are used
    x1, _ = TrainLoader(ds, BatchPlan(32), seed=0, num_workers=0).batch(5)
    x2, _ = loader.batch(5 + loader.steps_per_epoch)
    assert not torch.equal(x1, x2)  # a new epoch draws new noise


def test_sample_store_returns_stored_values(tmp_path):
    path = make_store(tmp_path / "s.zarr", mode="sample")
    ds = open_dataset(zarr_path=path)
    x, y = TrainLoader(ds, BatchPlan(4), seed=0, num_workers=0).batch(0)
    ids, orient = item_ids(x)
    expect = (ids + 1).float() * (1 - 2 * orient).float() * SF
    torch.testing.assert_close(x, expect[:, None, None, None].expand_as(x))


def test_incomplete_store_and_bad_labels_are_rejected(tmp_path):
    settings = zstore.make_settings(image_size=16, vae="sd:test", scaling_factor=SF, store="moments", count=8,
                                    latent_shape=(2, 2, 2), orientations=2, class_names=["a", "b"],
                                    shard_size=4, chunk_size=4, seed=None)
    group = zstore.create_store(tmp_path / "x.zarr", settings)
    zstore.write_shard(group, 0, np.zeros((4, 2, 2, 2, 2, 2)), np.zeros(4))
    with pytest.raises(UserError, match="incomplete"):
        open_dataset(zarr_path=tmp_path / "x.zarr")
    zstore.write_shard(group, 1, np.zeros((4, 2, 2, 2, 2, 2)), np.full(4, 5))  # label 5 with 2 classes
    zstore.mark_complete(group)
    with pytest.raises(UserError, match="labels"):
        open_dataset(zarr_path=tmp_path / "x.zarr")
    with pytest.raises(UserError, match="not a zarr"):
        open_dataset(zarr_path=tmp_path)
    with pytest.raises(UserError):
        open_dataset()
    with pytest.raises(UserError, match="fewer than one global batch"):
        TrainLoader(open_dataset(zarr_path=make_store(tmp_path / "y.zarr")), BatchPlan(16 * 3, 3, 0))


def write_legacy(root, count=10, shape=(1, 4, 2, 2)):
    feats, labels = root / "features", root / "labels"
    feats.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((count, *shape)).astype(np.float32)
    for i in range(count):
        np.save(feats / f"{i:03d}.npy", values[i])
        np.save(labels / f"{i:03d}.npy", np.array([i % 3]))
    return feats, labels, values


@pytest.mark.parametrize("shape", [(1, 4, 2, 2), (2, 4, 2, 2)])
def test_save_zarr_round_trip_matches_legacy_dataset(tmp_path, shape):
    feats, labels, values = write_legacy(tmp_path, shape=shape)
    out = save_zarr.convert(feats, labels, tmp_path / "legacy.zarr", shard_size=4, chunk_size=2, progress=False)
    ds = open_dataset(zarr_path=out)
    legacy = open_dataset(feature_path=feats, label_path=labels)
    assert len(ds) == len(legacy) == 10 and ds.num_classes == legacy.num_classes == 3
    assert ds.latent_shape == legacy.latent_shape == (4, 2, 2) and ds.orientations == shape[0]
    assert ds.info["store"] == "sample" and ds.info["image_size"] == 16
    for step in range(2):
        a = TrainLoader(ds, BatchPlan(5), seed=2, num_workers=0).batch(step)
        b = TrainLoader(legacy, BatchPlan(5), seed=2, num_workers=0).batch(step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        idx = TrainLoader(ds, BatchPlan(5), seed=2, num_workers=0).batch_indices(step)
        if shape[0] == 1:
            torch.testing.assert_close(a[0], torch.from_numpy(values[idx, 0]))
    # rerun is a no-op; other settings are refused
    save_zarr.convert(feats, labels, out, shard_size=4, chunk_size=2, progress=False)
    with pytest.raises(UserError, match="other settings"):
        save_zarr.convert(feats, labels, out, shard_size=4, chunk_size=2, scaling_factor=1.0, progress=False)


def test_save_zarr_count_mismatch_and_cli_exit_2(tmp_path, capsys):
    from fcdm_common.cli import run_main

    feats, labels, _ = write_legacy(tmp_path)
    (labels / "009.npy").unlink()
    with pytest.raises(SystemExit) as e:
        run_main(save_zarr.main, ["--feature-path", str(feats), "--label-path", str(labels),
                                  "--zarr-path", str(tmp_path / "o.zarr")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "009.npy" in err and "label" in err
    assert not (tmp_path / "o.zarr").exists()
    with pytest.raises(UserError, match="label"):
        open_dataset(feature_path=feats, label_path=labels)


def test_interrupted_store_creation_is_redone(tmp_path):
    import zarr

    settings = zstore.make_settings(image_size=16, vae="sd:test", scaling_factor=SF, store="moments", count=8,
                                    latent_shape=(2, 2, 2), orientations=2, class_names=["a"], shard_size=4,
                                    chunk_size=4, seed=None)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w", zarr_format=3)
    assert zstore.check_existing(tmp_path / "c.zarr", settings) == "absent"  # empty group
    group.attrs.update({"format": "fcdm-latents", **settings, "complete": False})  # arrays never created
    assert zstore.check_existing(tmp_path / "c.zarr", settings) == "absent"
    zstore.create_store(tmp_path / "c.zarr", settings)
    assert zstore.check_existing(tmp_path / "c.zarr", settings) == "incomplete"
    with pytest.raises(UserError, match="other settings: image_size"):
        zstore.check_existing(tmp_path / "c.zarr", {**settings, "image_size": 32})


def test_hflip_false_uses_the_original_orientation_only(store):
    ds = open_dataset(zarr_path=store, hflip=False)
    loader = TrainLoader(ds, BatchPlan(8), seed=0, num_workers=0)
    for step in range(5):
        x, _ = loader.batch(step)
        ids, orient = item_ids(x)
        assert (orient == 0).all()
        np.testing.assert_array_equal(ids.numpy(), loader.batch_indices(step))
    flipped = torch.cat([item_ids(TrainLoader(open_dataset(zarr_path=store), BatchPlan(8), seed=0, num_workers=0)
                                  .batch(s)[0])[1] for s in range(5)])
    assert flipped.any()  # the default does flip
