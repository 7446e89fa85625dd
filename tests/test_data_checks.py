"""Data value checks: NaN/inf and stray labels in the legacy .npy layout (reader and save_zarr.py alike),
and non-finite items of zarr batches reported by index when training stops.

References: the poisoned files/items are chosen here, so the expected names and indices are known.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fcdm_common.cli import UserError
from preparation import save_zarr
from preparation.checks import check_label_gaps, nonfinite_rows
from preparation.readers import open_dataset
from test_data import make_store as make_item_store
from test_data import write_legacy
from test_train import TINY, run_train
from test_train import make_store as make_train_store
from train_gen.loader import TrainLoader
from train_gen.step_draws import BatchPlan


def test_nonfinite_rows_and_label_gaps_closed_form():
    x = torch.zeros(5, 2, 3)
    x[1, 0, 2] = float("nan")
    x[4, 1, 1] = float("-inf")
    np.testing.assert_array_equal(nonfinite_rows(x), [1, 4])
    assert nonfinite_rows(torch.zeros(3, 2)).size == 0
    check_label_gaps(np.array([2, 0, 1, 1]), list("abcd"), "src")  # every class 0..2 has an item
    with pytest.raises(UserError, match=r"2 of these classes have no item \(the first is 1\).*c \(label 3\)"):
        check_label_gaps(np.array([0, 0, 3, 0]), list("abcd"), "src")


def test_legacy_stray_label_refused_by_reader_and_converter(tmp_path):
    feats, labels, _ = write_legacy(tmp_path)  # labels i % 3
    np.save(labels / "004.npy", np.array([999]))
    for call in (lambda: open_dataset(feature_path=feats, label_path=labels),
                 lambda: save_zarr.convert(feats, labels, tmp_path / "o.zarr", progress=False)):
        with pytest.raises(UserError, match=r"996 of these classes have no item.*004\.npy \(label 999\)"):
            call()
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_legacy_nonfinite_latent_names_the_file(tmp_path, bad):
    feats, labels, values = write_legacy(tmp_path)
    poisoned = values[6].copy()
    poisoned[0, 1, 0, 1] = bad
    np.save(feats / "006.npy", poisoned)
    ds = open_dataset(feature_path=feats, label_path=labels)  # the labels are fine; latents are read lazily
    loader = TrainLoader(ds, BatchPlan(5), seed=0, num_workers=2)
    it = iter(loader)
    with pytest.raises(UserError, match=r"006\.npy contains NaN or inf \(1 of 16 values\)"):
        for _ in range(2):  # one epoch of 2 batches reads every file
            next(it)
    with pytest.raises(UserError, match=r"006\.npy contains NaN or inf"):
        save_zarr.convert(feats, labels, tmp_path / "o.zarr", shard_size=4, chunk_size=2, progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_records_nonfinite_items_by_dataset_index(tmp_path, workers):
    import zarr

    path = make_item_store(tmp_path / "s.zarr", count=24, mode="moments", shard=8, chunk=4)
    poisoned = {3, 17}
    g = zarr.open_group(str(path), mode="r+")
    lat = g["latents"][:]
    lat[3, :, 0, 0] = np.nan  # one mean value of both orientations
    lat[17, :, 1] = np.inf  # the std of both orientations
    g["latents"][:] = lat
    loader = TrainLoader(open_dataset(zarr_path=path, cache="memory"), BatchPlan(4), seed=1, num_workers=workers)
    it = iter(loader)
    for _ in range(12):  # two epochs
        next(it)
    records = loader.nonfinite_items(before_step=12)
    for step in range(12):
        expected = sorted(set(loader.batch_indices(step).tolist()) & poisoned)
        assert sorted(records.get(step, [])) == expected, step
    assert {i for v in records.values() for i in v} == poisoned


def test_training_stop_blames_the_data_and_names_items(tmp_path):
    bad = make_train_store(tmp_path / "nan.zarr", nan=True)
    with pytest.raises(UserError) as e:
        run_train(TINY + ["--zarr-path", bad, "--results-dir", tmp_path, "--sample-every", 0, "--log-every", 5,
                      "--max-bad-steps", 3, "--max-train-steps", 10])
    msg = str(e.value)
    assert "dataset item(s) " in msg and "the data is the cause" in msg and str(bad) in msg
    assert "lower --lr" not in msg


def test_training_stop_on_finite_data_keeps_the_optimisation_advice(tmp_path):
    good = make_train_store(tmp_path / "ok.zarr")
    with pytest.raises(UserError) as e:  # lr 1e30 overflows the weights after the first step
        run_train(TINY + ["--zarr-path", good, "--results-dir", tmp_path, "--sample-every", 0, "--log-every", 5,
                      "--max-bad-steps", 3, "--max-train-steps", 10, "--lr", "1e30"])
    msg = str(e.value)
    assert "consecutive steps had non-finite" in msg and "lower --lr" in msg and "dataset item" not in msg
