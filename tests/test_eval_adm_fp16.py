"""ADM's precision/recall arithmetic reproduced bit for bit: TensorFlow float16 ops in a child process
compute ADM's distance block (evaluations/evaluator.py of openai/guided-diffusion: norms
reduce_sum(square(U), 1) and max(norm_u - 2 U V^T + norm_v, 0), all float16), ADM's k-th-neighbour
radii and its precision/recall loop; ours must give identical norms, products, distances, radii and P/R.

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


def test_norms_products_and_distances_equal_tf(adm):
    ref, smp, tf_out = adm
    r16, s16 = ref.astype(np.float16), smp.astype(np.float16)
    assert np.array_equal(metrics._tf_half_row_norms(r16), tf_out["norm_ref"])
    assert np.array_equal(metrics._tf_half_matmul(r16, s16), tf_out["dots"])
    assert np.array_equal(metrics.pairwise_sq_distances(ref, smp), tf_out["dist"])


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
    assert metrics._eigen_half_sum(ones)[0] == 4096  # sequential float16 would stop at 2048
    x = np.full((1, 256), np.float16(0.25))
    x[0, 0] = 2048
    # lane 0 of accumulator 0 holds 2048 and swallows its 7 other quarters; the rest sum exactly
    assert float(metrics._eigen_half_sum(x)[0]) == 2048 + 255 * 0.25 - 7 * 0.25
