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
  float32; `distance_dtype="float16"` reproduces that with TensorFlow's CPU float16 arithmetic
  (squares rounded to float16 and Eigen's half-precision sum order for the norms, bit-exact; for the
  matmul, float32 accumulation of exact products, whose order TF itself varies with the CPU and the
  thread count, so it is bounded for any order and fixed only where it decides an entry; each
  elementwise step rounded to float16), `"float32"` skips the half-precision pass.

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


def sqrtm(mat: np.ndarray) -> np.ndarray:
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
    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # the product is (nearly) singular: regularise both covariances, as ADM/TTUR do
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))

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


# TensorFlow's CPU float16 arithmetic, as ADM's evaluator runs it (checked against tensorflow-cpu 2.21
# in tests/test_eval_adm_fp16.py):
# - reduce_sum over the last axis is Eigen's InnerMostDimReducer on 8-lane half packets: above
#   8 * 200 values (Eigen's LeafSize<half>) the range is halved at a packet-aligned split and the halves
#   summed; a leaf runs 4 packet accumulators over 32-value strides (each lane add rounded to float16),
#   folds them into the first (1 + 2, + 3, + 4), runs the remaining whole packets, sums that packet's
#   8 lanes in float32 ((a0+a4 + a2+a6) + (a1+a5 + a3+a7)) and rounds once, and adds the scalar tail.
#   This order is fixed: the norms are bit-exact.
# - the float16 matmul sums the exact float32 products of its float16 inputs in float32 and rounds once
#   to float16. The order of that float32 sum is TF's kernel's: it changes with the CPU (cache sizes)
#   and with the number of intra-op threads (on a 2-core AMD EPYC, TF's own 1- and 2-thread results
#   differ in about 1 entry in 10^4). So `tf_half_dot_bounds` bounds the result for *any* float32
#   order, which settles most entries (two thirds at D = 2048); only an entry whose float16 value depends
#   on the order, and that a radius comparison needs, is computed in one fixed order (`tf_half_dots_exact`:
#   sequential within blocks along D -- D itself up to 512, else the largest power of two below D, at most
#   1024 -- block sums added in float32; TF's order on the machine these numbers were first checked on).
_EIGEN_HALF_PACKET = 8
_EIGEN_HALF_LEAF = 200


def _tf_half_gemm_kblock(d: int) -> int:
    """Length of TF's sequential float32 accumulation blocks along D (see the note above)."""
    return d if d <= 512 else min(1024, 1 << ((d - 1).bit_length() - 1))


def _eigen_leaf_sum(x: np.ndarray) -> np.ndarray:
    """One Eigen leaf reduction of float16 rows (r, n) -> (r,) float16 (see the note above)."""
    p, n = _EIGEN_HALF_PACKET, x.shape[1]
    acc = np.zeros((x.shape[0], 4, p), np.float16)
    start = 0
    if n >= 4 * p:
        v4 = n // (4 * p) * (4 * p)
        for j in range(0, v4, 4 * p):
            acc += x[:, j : j + 4 * p].reshape(-1, 4, p)  # four packet accumulators, float16 lane adds
        for u in (1, 2, 3):
            acc[:, 0] += acc[:, u]
        start = v4
    if start <= n - p:
        for j in range(start, n // p * p, p):
            acc[:, 0] += x[:, j : j + p]
        start = n // p * p
    lanes = acc[:, 0].astype(np.float32)  # predux: float32 tree over the 8 lanes, rounded once
    halves = lanes[:, :4] + lanes[:, 4:]
    quarters = halves[:, :2] + halves[:, 2:]
    packet = (quarters[:, 0] + quarters[:, 1]).astype(np.float16)
    tail = np.zeros(x.shape[0], np.float16)
    for j in range(start, n):
        tail += x[:, j]
    return (packet + tail).astype(np.float16)


def eigen_half_sum(x: np.ndarray, first: int = 0) -> np.ndarray:
    """TF/Eigen CPU reduce_sum of float16 rows (r, n) -> (r,) float16; `first` is the flat index of
    column 0 (Eigen aligns its split points to packets of the flattened tensor)."""
    p, n = _EIGEN_HALF_PACKET, x.shape[1]
    if n <= p * _EIGEN_HALF_LEAF:
        return _eigen_leaf_sum(x)
    split = p * -(-(first + -(-n // 2)) // p)  # packet-aligned midpoint
    left = min(split - first, n)
    out = eigen_half_sum(x[:, :left], first)
    if left < n:
        out = (out + eigen_half_sum(x[:, left:], split)).astype(np.float16)
    return out


def tf_half_row_norms(x16: np.ndarray) -> np.ndarray:
    """ADM's reduce_sum(square(U), 1) on float16 U (n, D) -> (n,) float16, TF CPU's arithmetic."""
    with np.errstate(over="ignore", invalid="ignore"):
        sq = x16 * x16  # each square rounded to float16
        n, d = sq.shape
        if d <= _EIGEN_HALF_PACKET * _EIGEN_HALF_LEAF or d % _EIGEN_HALF_PACKET == 0:
            return eigen_half_sum(sq)  # every row's flat offset is packet-aligned: one vectorised pass
        out = np.empty(n, np.float16)
        for r in range(_EIGEN_HALF_PACKET):  # rows whose flat offsets share an alignment
            rows = np.arange(r, n, _EIGEN_HALF_PACKET)
            if rows.size:
                out[rows] = eigen_half_sum(sq[rows], (r * d) % _EIGEN_HALF_PACKET)
        return out


def tf_half_dots_exact(u16: np.ndarray, v16: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float16 matmul entries (rows[i], cols[i]), the float32 sum in one fixed blocked order (see the
    note above) -> float16."""
    d = u16.shape[1]
    kb = _tf_half_gemm_kblock(d)
    u32, v32 = u16.astype(np.float32), v16.astype(np.float32)
    out = np.empty(rows.size, np.float16)
    for s in range(0, rows.size, 4096):
        r, c = rows[s : s + 4096], cols[s : s + 4096]
        prods = u32[r] * v32[c]  # (e, D) exact products
        total = np.zeros(r.size, np.float32)
        for k0 in range(0, d, kb):  # cumsum is numpy's one strictly sequential float32 sum
            total += np.cumsum(prods[:, k0 : k0 + kb], axis=1, dtype=np.float32)[:, -1]
        with np.errstate(over="ignore", invalid="ignore"):
            out[s : s + r.size] = total.astype(np.float16)
    return out


def tf_half_dot_bounds(u16: np.ndarray, v16: np.ndarray):
    """Bounds (lo, hi) float16 (n, m) on TF's float16 matmul(U, V^T) for any float32 summation order.

    The products of float16 values are exact in float32, so the float64 dot product is exact up to
    ~D * 2^-53; a float32 sum of D terms in any order makes at most D - 1 roundings, each within
    2^-24 of the partial sum, and |partial sums| <= sum |u_i v_i|, so TF's float32 sum lies within
    `tol` of the exact one and its float16 rounding between the roundings of exact -/+ tol. Where
    those agree (most entries), that is TF's value whatever its order."""
    u64, v64 = u16.astype(np.float64), v16.astype(np.float64)
    exact = u64 @ v64.T  # (n, m)
    d = u16.shape[1]
    absdot = exact if (u16 >= 0).all() and (v16 >= 0).all() else np.abs(u64) @ np.abs(v64).T
    tol = absdot * (d * 2.0**-24 * (1 + 2.0**-10) + d * 2.0**-52) + 2.0**-149
    with np.errstate(over="ignore", invalid="ignore"):
        return (exact - tol).astype(np.float16), (exact + tol).astype(np.float16)


def tf_half_matmul(u16: np.ndarray, v16: np.ndarray) -> np.ndarray:
    """ADM's matmul(U, V^T) of float16 inputs -> float16 (n, m): TF CPU's value wherever it does not
    depend on TF's float32 summation order, the fixed order of `tf_half_dots_exact` elsewhere."""
    lo, hi = tf_half_dot_bounds(u16, v16)
    rows, cols = np.nonzero(lo != hi)
    lo[rows, cols] = tf_half_dots_exact(u16, v16, rows, cols)
    return lo


def _half_dist(norm_u, dots, norm_v):
    """ADM's max(norm_u - 2 dots + norm_v, 0), each step rounded to float16 (broadcasting)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.maximum((norm_u - dots * np.float16(2)) + norm_v, np.float16(0))


class _DistanceBlock:
    """ADM's distance block between rows of u (n, D) and v (m, D), float32 (n, m), resolved lazily.

    float16 (ADM's first pass): `lo` <= TF's distances <= `hi` elementwise (equal at most entries);
    `resolve(mask)` replaces the masked entries by their values in one fixed float32 summation order
    (`tf_half_dots_exact`), so the callers compute exact order statistics and comparisons, running
    that order only where it can matter. If the block is not finite in float16 it is computed in
    float32 (lo == hi), as ADM does."""

    def __init__(self, u: np.ndarray, v: np.ndarray, distance_dtype: str = "float16"):
        if distance_dtype not in ("float16", "float32"):
            raise ValueError(f"distance_dtype must be 'float16' or 'float32', got {distance_dtype!r}")
        if distance_dtype == "float16":
            self.u16 = _half(np.asarray(u, dtype=np.float32))  # rounded inputs, (n, D)
            self.v16 = _half(np.asarray(v, dtype=np.float32))  # (m, D)
            self.norm_u = tf_half_row_norms(self.u16)[:, None]  # (n, 1) float16
            self.norm_v = tf_half_row_norms(self.v16)[None, :]  # (1, m) float16
            dot_lo, dot_hi = tf_half_dot_bounds(self.u16, self.v16)
            # the distance decreases with the dot product: its bounds swap
            self.lo = _half_dist(self.norm_u, dot_hi, self.norm_v)
            self.hi = _half_dist(self.norm_u, dot_lo, self.norm_v)
            finite = bool(np.isfinite(self.lo).all() and np.isfinite(self.hi).all())
            if not finite:  # rare: decide ADM's finiteness check on the exact values
                self.resolve(~(np.isfinite(self.lo) & np.isfinite(self.hi)))
                finite = bool(np.isfinite(self.lo).all() and np.isfinite(self.hi).all())
            if finite:
                self.lo, self.hi = self.lo.astype(np.float32), self.hi.astype(np.float32)
                return
        u32 = np.asarray(u, dtype=np.float32)
        v32 = np.asarray(v, dtype=np.float32)
        norm_u = np.sum(u32 * u32, axis=1)[:, None]  # (n, 1)
        norm_v = np.sum(v32 * v32, axis=1)[None, :]  # (1, m)
        self.lo = self.hi = np.maximum(norm_u - 2.0 * (u32 @ v32.T) + norm_v, 0.0).astype(np.float32)

    def resolve(self, mask: np.ndarray) -> None:
        """Decide the entries of `mask` (bool (n, m)): lo == hi == the distance in the fixed order there."""
        rows, cols = np.nonzero(mask & (self.lo != self.hi))
        if rows.size:
            dots = tf_half_dots_exact(self.u16, self.v16, rows, cols)
            exact = _half_dist(self.norm_u[rows, 0], dots, self.norm_v[0, cols]).astype(self.lo.dtype)
            self.lo[rows, cols] = exact
            self.hi[rows, cols] = exact


def pairwise_sq_distances(u: np.ndarray, v: np.ndarray, distance_dtype: str = "float16") -> np.ndarray:
    """Squared Euclidean distances max(|u|^2 - 2 u.v + |v|^2, 0) between rows: (n, D), (m, D) -> (n, m) float32.

    float16: ADM's first pass with TF's float16 arithmetic (norms, matmul and each elementwise step in
    float16, see `tf_half_row_norms`, `tf_half_matmul`); falls back to float32 for the whole block
    when any entry is not finite, as ADM does.
    """
    block = _DistanceBlock(u, v, distance_dtype)
    block.resolve(np.ones(block.lo.shape, bool))
    return block.lo


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
            dist = _DistanceBlock(rows, feats[c0 : c0 + row_batch], distance_dtype)  # (r, c)
            if dist.lo.shape[1] > k + 1:
                # only entries that may be among a row's k+1 smallest need their exact value
                bound = np.partition(dist.hi, k, axis=1)[:, k : k + 1]  # >= the true (k+1)-th smallest
                dist.resolve(dist.lo <= bound)
                block = np.partition(np.where(dist.lo == dist.hi, dist.lo, np.inf), k, axis=1)[:, : k + 1]
            else:
                dist.resolve(np.ones(dist.lo.shape, bool))
                block = dist.lo
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
            block = _DistanceBlock(ref_feats[r0:r1], sample_feats[s0:s1], distance_dtype)  # (r, s)
            rs, rr = radii_sample[None, s0:s1], radii_ref[r0:r1, None]
            # exact values only where the bounds leave a comparison open
            block.resolve(((block.lo <= rs) & (block.hi > rs)) | ((block.lo <= rr) & (block.hi > rr)))
            ref_in[r0:r1] |= np.any(block.hi <= rs, axis=1)
            sample_in[s0:s1] |= np.any(block.hi <= rr, axis=0)
    precision = float(np.mean(sample_in.astype(np.float64)))
    recall = float(np.mean(ref_in.astype(np.float64)))
    return precision, recall
