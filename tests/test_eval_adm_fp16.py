"""ADM's precision/recall arithmetic reproduced: TensorFlow float16 ops in a child process compute ADM's
distance block (evaluations/evaluator.py of openai/guided-diffusion: norms reduce_sum(square(U), 1)
and max(norm_u - 2 U V^T + norm_v, 0), all float16), ADM's k-th-neighbour radii and its
precision/recall loop; ours must give identical norms, radii and P/R, and products and distances equal
to TF's except where TF's own float32 summation order (machine- and thread-dependent) decides them.

TensorFlow is required (CI installs tensorflow-cpu); it only runs in a child process (next to torch in
the pytest process it can crash)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from evaluations import metrics

BLOCK = 160  # ADM's row/column batch (10000 there); does not divide 420 or 390

TF_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, tensorflow as tf
    v1 = tf.compat.v1
    d = np.load(sys.argv[1]); ref, smp, block = d["ref"], d["smp"], int(d["block"])
    g = tf.Graph()
    with g.as_default():
        a = v1.placeholder(tf.float32, [None, None]); b = v1.placeholder(tf.float32, [None, None])
        u, v = tf.cast(a, tf.float16), tf.cast(b, tf.float16)
        norm_u = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
        norm_v = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
        dots = tf.matmul(u, v, False, True)
        dist = tf.cast(tf.maximum(norm_u - 2 * dots + norm_v, 0.0), tf.float32)
    sess = v1.Session(graph=g)
    def block_dist(x, y):
        return sess.run(dist, {a: x, b: y})
    def radii(x):  # ADM ManifoldEstimator.manifold_radii, k = 3 (rank 0 is the point itself)
        out = np.zeros(len(x), np.float32)
        for r0 in range(0, len(x), block):
            row = np.concatenate([block_dist(x[r0:r0 + block], x[c0:c0 + block]) for c0 in range(0, len(x), block)], 1)
            out[r0:r0 + block] = np.partition(row, 3, axis=1)[:, 3]
        return out
    r_ref, r_smp = radii(ref), radii(smp)
    ref_in = np.zeros(len(ref), bool); smp_in = np.zeros(len(smp), bool)
    for r0 in range(0, len(ref), block):  # ADM evaluate_pr
        for s0 in range(0, len(smp), block):
            dd = block_dist(ref[r0:r0 + block], smp[s0:s0 + block])
            ref_in[r0:r0 + block] |= (dd <= r_smp[None, s0:s0 + block]).any(1)
            smp_in[s0:s0 + block] |= (dd <= r_ref[r0:r0 + block, None]).any(0)
    nu, dots_, dist_ = sess.run([norm_u, dots, dist], {a: ref, b: smp})
    np.savez(sys.argv[2], r_ref=r_ref, r_smp=r_smp, precision=smp_in.mean(), recall=ref_in.mean(),
             norm_ref=nu[:, 0], dots=dots_, dist=dist_)
""")


@pytest.fixture(scope="module")
def adm(tmp_path_factory):
    if importlib.util.find_spec("tensorflow") is None:
        pytest.fail("TensorFlow is needed for the ADM float16 test: pip install tensorflow-cpu")
    tmp = tmp_path_factory.mktemp("adm16")
    rng = np.random.default_rng(0)
    ref = np.maximum(rng.normal(0.0, 1.0, (420, 2048)), 0).astype(np.float32)  # ReLU features
    smp = np.maximum(rng.normal(0.05, 1.0, (390, 2048)), 0).astype(np.float32)
    np.savez(tmp / "in.npz", ref=ref, smp=smp, block=BLOCK)
    r = subprocess.run([sys.executable, "-c", TF_SCRIPT, str(tmp / "in.npz"), str(tmp / "out.npz")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return ref, smp, dict(np.load(tmp / "out.npz"))


def test_norms_equal_tf_and_products_are_tf_wherever_its_order_does_not_matter(adm):
    """Norms: bit-exact. Products: TF sums the exact float32 products in an order its kernel picks
    (it changes with the CPU and the thread count), so every TF entry must lie in our bounds for any
    order, equal ours wherever the bounds settle it, and our fixed order may differ from TF's only
    at the few entries that depend on it. Distances follow the products entry for entry."""
    ref, smp, tf_out = adm
    r16, s16 = ref.astype(np.float16), smp.astype(np.float16)
    assert np.array_equal(metrics.tf_half_row_norms(r16), tf_out["norm_ref"])
    dots = tf_out["dots"]
    lo, hi = metrics.tf_half_dot_bounds(r16, s16)
    assert ((lo <= dots) & (dots <= hi)).all()
    settled = lo == hi
    assert 0.2 < settled.mean() < 1.0  # the bounds decide most entries, not all (the test has teeth)
    ours = metrics.tf_half_matmul(r16, s16)
    assert np.array_equal(ours[settled], dots[settled])
    differ = ours != dots
    assert differ.mean() < 1e-3, f"{differ.sum()} of {differ.size} products differ from TF"
    dist = metrics.pairwise_sq_distances(ref, smp)
    assert np.array_equal(dist[~differ], tf_out["dist"][~differ])


def test_fixed_order_is_one_float32_order():
    """The fixed order for D = 2048 is float32, sequential within two blocks of 1024, block sums added
    once, rounded to float16 once. Row A: 2049 plus 1022 products of 2^-14 in block 1, each below half
    a float32 ulp of 2049, so lost; 2049 is a float16 tie and rounds to even 2048 (the float64 dot,
    2049.06, rounds to 2050). Row B: the tiny products sit in block 2, sum exactly to 0.0625 there and
    lift 2049 off the tie: 2050 (one sequential pass would lose them: 2048)."""
    tiny = np.float16(2.0**-7)  # products tiny * tiny = 2^-14
    u = np.zeros((2, 2048), np.float16)
    u[:, 0], u[:, 1] = 2048, 1
    u[0, 2:1024] = tiny
    u[1, 1024:] = tiny
    v = np.full((1, 2048), tiny)
    v[0, :2] = 1
    got = metrics.tf_half_dots_exact(u, v, np.array([0, 1]), np.array([0, 0]))
    assert got.tolist() == [2048, 2050]
    lo, hi = metrics.tf_half_dot_bounds(u, v)
    assert (lo[:, 0] <= got).all() and (got <= hi[:, 0]).all() and (lo != hi).all()  # both order-dependent


def test_radii_and_precision_recall_equal_adm(adm):
    ref, smp, tf_out = adm
    assert np.array_equal(metrics.manifold_radii(ref, 3, BLOCK), tf_out["r_ref"])
    assert np.array_equal(metrics.manifold_radii(smp, 3, BLOCK), tf_out["r_smp"])
    p, r = metrics.precision_recall(ref, smp, k=3, row_batch=BLOCK)
    assert (p, r) == (float(tf_out["precision"]), float(tf_out["recall"]))


def test_eigen_half_sum_rules():
    """Closed-form cases of the emulated reduction: sums of ones are exact below 2048 per float16
    lane (32 lanes), and a large value absorbs the small ones that share its lane."""
    ones = np.ones((1, 4096), np.float16)
    assert metrics.eigen_half_sum(ones)[0] == 4096  # sequential float16 would stop at 2048
    x = np.full((1, 256), np.float16(0.25))
    x[0, 0] = 2048
    # lane 0 of accumulator 0 holds 2048 and swallows its 7 other quarters; the rest sum exactly
    assert float(metrics.eigen_half_sum(x)[0]) == 2048 + 255 * 0.25 - 7 * 0.25
