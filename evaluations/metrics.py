"""Metric math of the ADM evaluation suite (FID, sFID, Inception Score, Precision, Recall), in numpy.

Written from the description of OpenAI's guided-diffusion `evaluations/evaluator.py` (the suite the
FCDM paper and its baselines report), so that the same features give the same numbers:

- Frechet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule", Eq. 6):
  ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). Like ADM (after TTUR's `fid.py`), when
  `scipy.linalg.sqrtm(S1 S2)` is not finite it is recomputed with `eps` added to both diagonals,
  and a complex square root is accepted (real part kept) only if the imaginary parts of its
  diagonal are within 1e-3 of zero; otherwise ValueError.
- Inception Score (Salimans et al. 2016, "Improved techniques for training GANs", Sec. 4):
  exp(E_x KL(p(y|x) || p(y))), computed on contiguous splits of `split_size` predictions and
  averaged over splits (ADM's split_size is 5000, and it reports the mean only).
- Improved precision and recall (Kynkaanniemi et al. 2019, Sec. 3, Eq. 1-2): a point is inside a
  set's manifold if its squared Euclidean distance to some member is <= that member's radius, the
  squared distance to its k-th nearest neighbour in its own set (k=3, the point itself counted at
  rank 0). Precision = fraction of samples inside the reference manifold, recall = fraction of
  references inside the sample manifold. ADM computes pairwise distances in blocks of 10000 rows
  and columns, first in float16 and, for a block whose float16 result is not finite, again in
  float32; `distance_dtype="float16"` reproduces that (inputs rounded to float16, products and
  sums accumulated in float32, each elementwise step rounded to float16 as a half-precision GEMM
  with float32 accumulation does), `"float32"` skips the half-precision pass.

Everything returns Python floats computed in float64 (statistics) or float32 distances (as ADM).
"""
from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np
from scipy import linalg
from scipy.special import xlogy

__all__ = [
    "compute_statistics",
    "frechet_distance",
    "inception_score",
    "pairwise_sq_distances",
    "manifold_radii",
    "precision_recall",
]


def compute_statistics(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features (N, D) -> ((D,), (D, D)) in float64, as ADM: np.mean, np.cov."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"compute_statistics needs features of shape (N >= 2, D), got {feats.shape}")
    mu = np.mean(feats, axis=0)
    sigma = np.cov(feats, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _sqrtm(mat: np.ndarray) -> np.ndarray:
    """scipy's matrix square root without its console output (ADM passes disp=False)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Matrix is singular" warnings: the finite check decides
        out = linalg.sqrtm(mat)
    if isinstance(out, tuple):  # old scipy with disp=False returns (sqrtm, errest)
        out = out[0]
    return out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) with ADM's singular/complex rules."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances have shapes {sigma1.shape} and {sigma2.shape} for means {mu1.shape}")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # the product is (nearly) singular: regularise both covariances, as ADM/TTUR do
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))

    # numerical error may leave a small imaginary component; a large one means a broken covariance
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(softmax_preds: np.ndarray, split_size: int = 5000) -> float:
    """Mean over contiguous splits of exp(mean_x KL(p(y|x) || p(y))); softmax_preds is (N, C).

    ADM computes p*(log p - log mean p), which is NaN where p == 0 exactly; here 0*log(0) is taken
    as 0 (its limit), which is identical whenever ADM's value is finite.
    """
    preds = np.asarray(softmax_preds, dtype=np.float64)
    if preds.ndim != 2 or preds.shape[0] == 0:
        raise ValueError(f"inception_score needs predictions of shape (N, C), got {preds.shape}")
    if split_size <= 0:
        raise ValueError(f"split_size must be positive, got {split_size}")
    scores = []
    for start in range(0, preds.shape[0], split_size):
        part = preds[start : start + split_size]  # (n, C)
        marginal = np.mean(part, axis=0, keepdims=True)  # p(y), (1, C)
        kl = xlogy(part, part) - xlogy(part, marginal)  # (n, C)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def _half(x: np.ndarray) -> np.ndarray:
    """Round to float16 (overflow -> inf, silently, as the GPU does)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float16)


def pairwise_sq_distances(u: np.ndarray, v: np.ndarray, distance_dtype: str = "float16") -> np.ndarray:
    """Squared Euclidean distances max(|u|^2 - 2 u.v + |v|^2, 0) between rows: (n, D), (m, D) -> (n, m) float32.

    float16: ADM's first pass; falls back to float32 for the whole block when any entry is not finite.
    """
    if distance_dtype not in ("float16", "float32"):
        raise ValueError(f"distance_dtype must be 'float16' or 'float32', got {distance_dtype!r}")
    if distance_dtype == "float16":
        u16 = _half(np.asarray(u, dtype=np.float32)).astype(np.float32)  # rounded inputs, (n, D)
        v16 = _half(np.asarray(v, dtype=np.float32)).astype(np.float32)  # (m, D)
        with np.errstate(over="ignore", invalid="ignore"):
            norm_u = _half(np.sum(u16 * u16, axis=1))[:, None]  # (n, 1) float16
            norm_v = _half(np.sum(v16 * v16, axis=1))[None, :]  # (1, m) float16
            dots = _half(u16 @ v16.T)  # (n, m) float16
            dist = np.maximum((norm_u - dots * np.float16(2)) + norm_v, np.float16(0))  # float16 steps
        if np.isfinite(dist).all():
            return dist.astype(np.float32)
    u32 = np.asarray(u, dtype=np.float32)
    v32 = np.asarray(v, dtype=np.float32)
    norm_u = np.sum(u32 * u32, axis=1)[:, None]  # (n, 1)
    norm_v = np.sum(v32 * v32, axis=1)[None, :]  # (1, m)
    return np.maximum(norm_u - 2.0 * (u32 @ v32.T) + norm_v, 0.0).astype(np.float32)


def manifold_radii(
    feats: np.ndarray, k: int = 3, row_batch: int = 10000, distance_dtype: str = "float16"
) -> np.ndarray:
    """Squared distance of each row to its k-th nearest row (rank 0 = itself): (N, D) -> (N,) float32.

    Distances are computed in (row_batch x row_batch) blocks like ADM's; per block only the k+1
    smallest entries of each row are kept, which gives the same k-th order statistic as ADM's
    partition of the whole row while holding (row_batch, blocks * (k+1)) instead of (row_batch, N).
    """
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"manifold radii with k={k} need more than {k} feature vectors, got {n}")
    radii = np.zeros([n], dtype=np.float32)
    for r0 in range(0, n, row_batch):
        rows = feats[r0 : r0 + row_batch]
        candidates = []
        for c0 in range(0, n, row_batch):
            block = pairwise_sq_distances(rows, feats[c0 : c0 + row_batch], distance_dtype)  # (r, c)
            if block.shape[1] > k + 1:
                block = np.partition(block, k, axis=1)[:, : k + 1]  # the k+1 smallest, (r, k+1)
            candidates.append(block)
        merged = np.concatenate(candidates, axis=1)  # (r, <= blocks*(k+1))
        radii[r0 : r0 + rows.shape[0]] = np.partition(merged, k, axis=1)[:, k]
    return radii


def precision_recall(
    ref_feats: np.ndarray,
    sample_feats: np.ndarray,
    k: int = 3,
    row_batch: int = 10000,
    distance_dtype: str = "float16",
) -> Tuple[float, float]:
    """ADM's improved precision and recall of samples against references: ((N1, D), (N2, D)) -> (P, R).

    Needs more than k vectors in each set (the k-th neighbour must exist).
    """
    ref_feats = np.asarray(ref_feats, dtype=np.float32)
    sample_feats = np.asarray(sample_feats, dtype=np.float32)
    if ref_feats.ndim != 2 or sample_feats.ndim != 2 or ref_feats.shape[1] != sample_feats.shape[1]:
        raise ValueError(f"feature shapes do not match: {ref_feats.shape} vs {sample_feats.shape}")
    radii_ref = manifold_radii(ref_feats, k, row_batch, distance_dtype)  # (N1,)
    radii_sample = manifold_radii(sample_feats, k, row_batch, distance_dtype)  # (N2,)
    ref_in = np.zeros([ref_feats.shape[0]], dtype=bool)  # reference inside the sample manifold
    sample_in = np.zeros([sample_feats.shape[0]], dtype=bool)  # sample inside the reference manifold
    for r0 in range(0, ref_feats.shape[0], row_batch):
        r1 = r0 + row_batch
        for s0 in range(0, sample_feats.shape[0], row_batch):
            s1 = s0 + row_batch
            dist = pairwise_sq_distances(ref_feats[r0:r1], sample_feats[s0:s1], distance_dtype)  # (r, s)
            ref_in[r0:r1] |= np.any(dist <= radii_sample[None, s0:s1], axis=1)
            sample_in[s0:s1] |= np.any(dist <= radii_ref[r0:r1, None], axis=0)
    precision = float(np.mean(sample_in.astype(np.float64)))
    recall = float(np.mean(ref_in.astype(np.float64)))
    return precision, recall
