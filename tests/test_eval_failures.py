"""A numerical failure of one metric (FID's matrix square root with a large imaginary part) is
reported as failed - NaN plus the reason - while the other metrics are computed and written.

Reference: the same evaluation without the forced failure (the other metrics must not change).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from evaluations import digits, metrics
from train_gen.evaluate import main


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalfail")
    x_tr, _, x_te, y_te = digits.digits_split()
    np.savez(tmp / "ref.npz", arr_0=digits.digits_to_images(x_tr[:300], 2))
    np.savez(tmp / "samples.npz", arr_0=digits.digits_to_images(x_te[:200], 2), arr_1=y_te[:200])
    return tmp


def _args(batches, out):
    return ["--sample-batch", str(batches / "samples.npz"), "--ref-batch", str(batches / "ref.npz"),
            "--backend", "digits", "--output_fid", str(out)]


def test_failed_fid_is_nan_with_reason_and_the_rest_is_written(batches, monkeypatch, capsys):
    good = main(_args(batches, batches / "good.txt"))["metrics"]
    real_sqrtm = metrics.sqrtm
    calls = []

    def broken_for_pool(mat):  # the first call is FID (pool features); sFID's goes through
        calls.append(mat.shape)
        out = real_sqrtm(mat).astype(np.complex128)
        if len(calls) == 1:
            out += 5j * np.eye(mat.shape[0])
        return out

    monkeypatch.setattr(metrics, "sqrtm", broken_for_pool)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="fid failed"):
        res = main(_args(batches, batches / "out.txt"))
    assert np.isnan(res["metrics"]["fid"]) and "Imaginary component 5" in res["failed"]["fid"]
    assert list(res["failed"]) == ["fid"]
    for key in ("inception_score", "sfid", "precision", "recall", "class_accuracy"):
        assert res["metrics"][key] == good[key], key
    text = (batches / "out.txt").read_text().splitlines()
    assert "FID: nan" in text and any(line.startswith("FID failed: ValueError: Imaginary component") for line in text)
    assert f"sFID: {good['sfid']}" in text and f"Recall: {good['recall']}" in text
    report = json.loads((batches / "out.json").read_text())
    assert report["metrics"]["fid"] is None and report["metrics"]["sfid"] == good["sfid"]
    assert report["failed"]["fid"].startswith("ValueError: Imaginary component")
    assert "FID failed" in capsys.readouterr().out
