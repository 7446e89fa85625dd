"""ADM metric math (evaluations/metrics.py) against closed forms and independent implementations."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import linalg
from scipy.spatial.distance import cdist

from evaluations import metrics


def _fid_eig(mu1, s1, mu2, s2):
    """Independent FID: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), symmetric eigensolvers only."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))


def test_compute_statistics_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(0).normal(size=(50, 6))
    mu, sigma = metrics.compute_statistics(x)
    centred = x - x.mean(axis=0)
    np.testing.assert_allclose(mu, x.sum(axis=0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)


def test_fid_of_a_distribution_with_itself_is_zero():
    x = np.random.default_rng(1).normal(size=(400, 10)) @ np.random.default_rng(2).normal(size=(10, 10))
    mu, sigma = metrics.compute_statistics(x)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_of_shifted_gaussians_is_squared_shift():
    rng = np.random.default_rng(3)
    m = np.array([1.0, -2.0, 0.5, 0.0])
    a = metrics.compute_statistics(rng.normal(size=(20000, 4)))
    b = metrics.compute_statistics(rng.normal(size=(20000, 4)) + m)
    fid = metrics.frechet_distance(*a, *b)
    # sampling error: mu_a - mu_b = m + e with e ~ N(0, 2/N I), so ||.||^2 - ||m||^2 has std about
    # 2 ||m|| sqrt(2/N) (0.046 here); the covariance terms add O(d^2/N). Allow 5 standard deviations.
    n = 20000
    tol = 5 * 2 * np.linalg.norm(m) * np.sqrt(2 / n) + 4 * 4 / n
    assert abs(fid - m @ m) < tol, (fid, tol)
    # the same draws shifted: identical covariances, so FID is ||m||^2 up to rounding
    z = rng.normal(size=(5000, 4))
    fid_same = metrics.frechet_distance(*metrics.compute_statistics(z), *metrics.compute_statistics(z + m))
    assert fid_same == pytest.approx(m @ m, rel=1e-8)


def test_fid_agrees_with_independent_eigen_implementation():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    y = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.3
    a, b = metrics.compute_statistics(x), metrics.compute_statistics(y)
    np.testing.assert_allclose(metrics.frechet_distance(*a, *b), _fid_eig(*a, *b), rtol=1e-7)
    # and with scipy's sqrtm written out plainly
    covmean = linalg.sqrtm(a[1] @ b[1]).real
    d = a[0] - b[0]
    plain = d @ d + np.trace(a[1]) + np.trace(b[1]) - 2 * np.trace(covmean)
    np.testing.assert_allclose(metrics.frechet_distance(*a, *b), plain, rtol=1e-10)


def test_fid_singular_product_falls_back_to_eps_on_diagonals():
    # sqrtm([[0,1],[0,0]]) has no finite value; with eps on both diagonals the product is
    # [[a, 1+eps], [0, a]], a = eps(1+eps), whose square root has trace 2 sqrt(a).
    s1 = np.array([[0.0, 1.0], [0.0, 0.0]])
    s2 = np.eye(2)
    mu = np.zeros(2)
    eps = 1e-6
    with pytest.warns(UserWarning, match="singular product"):
        fid = metrics.frechet_distance(mu, s1, mu, s2, eps=eps)
    expected = 0.0 + 0.0 + 2.0 - 2.0 * 2.0 * np.sqrt(eps * (1 + eps))
    np.testing.assert_allclose(fid, expected, rtol=1e-6)


def test_fid_rejects_large_imaginary_component_and_keeps_small():
    mu = np.zeros(2)
    with pytest.raises(ValueError, match="Imaginary component"):
        metrics.frechet_distance(mu, np.diag([-1.0, 1.0]), mu, np.eye(2))  # sqrt(-1) on the diagonal
    # a complex sqrtm whose diagonal imaginary parts are tiny is accepted and its real part used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        val = metrics.frechet_distance(mu, np.diag([-1e-8, 1.0]), mu, np.eye(2))
    np.testing.assert_allclose(val, -1e-8 + 1.0 + 2.0 - 2.0 * 1.0, atol=1e-7)


def test_fid_shape_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_closed_forms():
    c = 10
    one_hot = np.eye(c)[np.arange(100) % c]  # confident and balanced: IS = number of classes
    assert metrics.inception_score(one_hot) == pytest.approx(c, rel=1e-12)
    uniform = np.full((100, c), 1.0 / c)  # no information: IS = 1
    assert metrics.inception_score(uniform) == pytest.approx(1.0, rel=1e-12)
    # contiguous splits averaged: [4 one-hot over 4 classes | 4 uniform] with split 4 -> (4 + 1) / 2
    mixed = np.concatenate([np.eye(4), np.full((4, 4), 0.25)])
    assert metrics.inception_score(mixed, split_size=4) == pytest.approx(2.5, rel=1e-12)
    assert metrics.inception_score(mixed, split_size=8) < 2.5


def test_inception_score_matches_improved_gan_formula_on_softmax_outputs():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(1200, 20)) * 3
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(p), 500):  # the improved-GAN / ADM formula, written out
        part = p[i : i + 500]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    assert metrics.inception_score(p, split_size=500) == pytest.approx(np.mean(scores), rel=1e-12)


def test_precision_recall_hand_placed_points():
    ref = np.array([[0.0], [1.0], [2.0], [3.0]])
    samples = np.array([[10.0], [11.0], [12.0], [13.0], [1.5]])
    # ref radii (squared distance to the 3rd neighbour, self at rank 0): 9, 4, 4, 9 -> only 1.5 is
    # inside (0.25 <= 4): precision 1/5. Sample 1.5's radius is 110.25 (its 3rd neighbour is 12),
    # which covers every reference: recall 1.
    for dtype in ("float16", "float32"):
        p, r = metrics.precision_recall(ref, samples, k=3, distance_dtype=dtype)
        assert p == pytest.approx(0.2) and r == pytest.approx(1.0)
    np.testing.assert_array_equal(metrics.manifold_radii(ref.astype(np.float32), k=3), [9, 4, 4, 9])
    p, r = metrics.precision_recall(samples, ref, k=3)  # roles swapped
    assert p == pytest.approx(1.0) and r == pytest.approx(0.2)


def _brute_force_pr(ref, samples, k):
    d_rr = cdist(ref, ref, "sqeuclidean")
    d_ss = cdist(samples, samples, "sqeuclidean")
    r_ref = np.sort(d_rr, axis=1)[:, k]
    r_s = np.sort(d_ss, axis=1)[:, k]
    d_rs = cdist(ref, samples, "sqeuclidean")
    precision = np.mean(np.any(d_rs <= r_ref[:, None], axis=0))
    recall = np.mean(np.any(d_rs <= r_s[None, :], axis=1))
    return precision, recall


def test_precision_recall_matches_brute_force_and_blocking_does_not_matter():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(120, 8)).astype(np.float32)
    samples = (rng.normal(size=(90, 8)) * 1.3 + 0.4).astype(np.float32)
    expected = _brute_force_pr(ref.astype(np.float64), samples.astype(np.float64), 3)
    got = metrics.precision_recall(ref, samples, k=3, distance_dtype="float32")
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    np.testing.assert_allclose(got, expected, atol=1.5 / 90)  # float32 vs float64 ties at most
    blocked = metrics.precision_recall(ref, samples, k=3, row_batch=7, distance_dtype="float32")
    assert blocked == got
    blocked16 = metrics.precision_recall(ref, samples, k=3, row_batch=7)
    assert blocked16 == metrics.precision_recall(ref, samples, k=3)
    np.testing.assert_allclose(blocked16, expected, atol=3 / 90)  # half precision moves few points


def test_pairwise_distances_float16_and_overflow_fallback():
    rng = np.random.default_rng(7)
    u, v = rng.normal(size=(5, 16)), rng.normal(size=(6, 16))
    exact = cdist(u, v, "sqeuclidean")
    np.testing.assert_allclose(metrics.pairwise_sq_distances(u, v, "float32"), exact, rtol=1e-5, atol=1e-5)
    half = metrics.pairwise_sq_distances(u, v, "float16")
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, exact, rtol=2e-2, atol=0.1)  # float16 has 11 significant bits
    assert np.any(half != metrics.pairwise_sq_distances(u, v, "float32"))  # really rounded
    # squared norms of ~1e6 overflow float16 (max 65504): ADM recomputes the block in float32
    big_u, big_v = u * 300, v * 300
    np.testing.assert_array_equal(metrics.pairwise_sq_distances(big_u, big_v, "float16"),
                                  metrics.pairwise_sq_distances(big_u, big_v, "float32"))


def test_manifold_radii_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3"):
        metrics.manifold_radii(np.zeros((3, 2), np.float32), k=3)
