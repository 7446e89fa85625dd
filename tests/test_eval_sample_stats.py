"""Like ADM's evaluator (read_statistics for both batches), statistics stored in the *sample* batch
(mu, sigma, mu_s, sigma_s) are used as they are for FID/sFID; precision/recall/IS use its images."""
from __future__ import annotations

import numpy as np
import pytest

from evaluations import digits, metrics
from train_gen.evaluate import main


def test_sample_batch_statistics_are_used_as_is(tmp_path):
    x_tr, _, x_te, _ = digits.digits_split()
    ref_images = digits.digits_to_images(x_tr[:600], 2)
    smp_images = digits.digits_to_images(x_te[:300], 2)
    other = digits.digits_features(digits.digits_to_images(x_tr[600:1000], 2))
    mu, sigma = metrics.compute_statistics(other["pool"])
    mu_s, sigma_s = metrics.compute_statistics(other["spatial"])
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    np.savez(tmp_path / "samples.npz", arr_0=smp_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    res = main(["--sample-batch", str(tmp_path / "samples.npz"), "--ref-batch", str(tmp_path / "ref.npz"),
                "--backend", "digits", "--output_fid", str(tmp_path / "o.txt")])
    ref = digits.digits_features(ref_images)
    smp = digits.digits_features(smp_images)
    mu_r, sigma_r = metrics.compute_statistics(ref["pool"])
    mu_rs, sigma_rs = metrics.compute_statistics(ref["spatial"])
    assert res["sample_statistics"] == "precomputed" and res["ref_statistics"] == "computed"
    assert res["metrics"]["fid"] == pytest.approx(metrics.frechet_distance(mu, sigma, mu_r, sigma_r), rel=1e-9)
    assert res["metrics"]["sfid"] == pytest.approx(metrics.frechet_distance(mu_s, sigma_s, mu_rs, sigma_rs), rel=1e-9)
    own = metrics.frechet_distance(*metrics.compute_statistics(smp["pool"]), mu_r, sigma_r)
    assert abs(res["metrics"]["fid"] - own) > 1e-6  # the stored statistics really replaced the computed ones
    assert (res["metrics"]["precision"], res["metrics"]["recall"]) == metrics.precision_recall(ref["pool"], smp["pool"])
