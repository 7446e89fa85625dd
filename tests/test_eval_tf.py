"""The TF backend end to end on a tiny synthetic GraphDef with ADM's tensor names and shapes.

The graph mimics `classify_image_graph_def.pb`: DecodeJpeg -> Cast -> ExpandDims -> ResizeBilinear
-> (x-128)/128 -> convs -> `mixed_6/conv` (N,17,17,768) -> `pool_3` (N,1,1,2048) ->
`softmax/logits/MatMul` (+ bias) -> softmax. It is saved as a .pb and read by the real loading path
(evaluations.features_tf in a subprocess). Expected features come from numpy on constant-colour
images (where the graph's resize is the identity on values) and from running the graph's own
single-image DecodeJpeg path, which bypasses our placeholder remapping and batching.

TensorFlow is required (CI installs tensorflow-cpu); without it these tests fail, they do not skip.
TensorFlow itself only ever runs in child processes (graph building here, feature extraction in
evaluations.features_tf): loading it into the pytest process next to torch can crash it.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fcdm_common.cli import UserError

# run in a child process: build the graph from weights.npz, save it, run its DecodeJpeg path
GRAPH_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, tensorflow as tf
    sys.path.insert(0, sys.argv[1])
    from test_eval_tf import build_pb
    w = dict(np.load(sys.argv[2]))
    graph = build_pb(tf, sys.argv[3], w)
    textured = np.load(sys.argv[4])["arr_0"]
    with tf.compat.v1.Session(graph=graph) as sess:
        outs = [sess.run(["pool_3:0", "mixed_6/conv:0"], {"DecodeJpeg:0": img}) for img in textured]
    bad = tf.Graph()  # a graph without ADM's tensors, for the error test
    with bad.as_default():
        tf.compat.v1.placeholder(tf.float32, [None, 3], name="ExpandDims")
    open(sys.argv[6], "wb").write(bad.as_graph_def().SerializeToString())
    np.savez(sys.argv[5], pool=np.stack([o[0].reshape(-1) for o in outs]),
             spatial=np.stack([o[1][0, :, :, :7].reshape(-1) for o in outs]), version=np.array(tf.__version__))
""")


@pytest.fixture(scope="module")
def tf_available():
    if importlib.util.find_spec("tensorflow") is None:
        pytest.fail("TensorFlow is needed for the tf evaluation backend tests: pip install tensorflow-cpu "
                    "(the eval-tf extra, `pip install -e '.[eval-tf]'`)")


def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "k1": rng.normal(0, 0.3, (3, 3, 3, 8)).astype(np.float32),  # 3x3 stride-2 conv, 35 -> 17
        "b1": rng.normal(0, 0.1, (8,)).astype(np.float32),
        "k2": rng.normal(0, 0.3, (1, 1, 8, 768)).astype(np.float32),  # mixed_6/conv
        "b2": rng.normal(0, 0.1, (768,)).astype(np.float32),
        "k3": rng.normal(0, 0.05, (1, 1, 768, 2048)).astype(np.float32),  # to pool_3
        "w": rng.normal(0, 0.05, (2048, 1008)).astype(np.float32),  # softmax/logits weight
        "bias": rng.normal(0, 1.0, (1008,)).astype(np.float32),  # must NOT be used by IS (ADM rule)
    }


def build_pb(tf, path, w):
    """The synthetic graph (runs where TensorFlow is imported; see GRAPH_SCRIPT)."""
    v1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        jpeg = v1.placeholder(tf.uint8, [None, None, 3], name="DecodeJpeg")
        x = tf.cast(jpeg, tf.float32, name="Cast")
        x = tf.expand_dims(x, 0, name="ExpandDims")  # (1, H, W, 3); the evaluator feeds here
        x = v1.image.resize_bilinear(x, [35, 35], name="ResizeBilinear")
        x = (x - 128.0) / 128.0
        h = tf.nn.relu(tf.nn.conv2d(x, w["k1"], strides=[1, 2, 2, 1], padding="VALID") + w["b1"])  # (b,17,17,8)
        m6 = tf.nn.relu(tf.nn.conv2d(h, w["k2"], strides=[1, 1, 1, 1], padding="VALID") + w["b2"],
                        name="mixed_6/conv")  # (b, 17, 17, 768)
        pooled = tf.reduce_mean(m6, axis=[1, 2], keepdims=True)  # (b, 1, 1, 768)
        pool3 = tf.identity(tf.nn.conv2d(pooled, w["k3"], strides=[1, 1, 1, 1], padding="VALID"),
                            name="pool_3")  # (b, 1, 1, 2048)
        flat = tf.reshape(pool3, [-1, 2048])
        logits = tf.matmul(flat, tf.constant(w["w"]), name="softmax/logits/MatMul") + w["bias"]
        tf.nn.softmax(logits, name="softmax")
    with open(path, "wb") as f:
        f.write(g.as_graph_def().SerializeToString())
    return g


def _numpy_constant_image_features(colors: np.ndarray, w):
    """Closed form for images of one colour each: every stage is spatially constant."""
    xn = (colors.astype(np.float64) - 128.0) / 128.0  # (N, 3)
    h = np.maximum(xn @ w["k1"].astype(np.float64).sum(axis=(0, 1)) + w["b1"], 0)  # (N, 8)
    m6 = np.maximum(h @ w["k2"][0, 0] + w["b2"], 0)  # (N, 768)
    pool = m6 @ w["k3"][0, 0]  # (N, 2048)
    spatial = np.tile(m6[:, :7], (1, 17 * 17))  # NHWC flatten of a constant map, (N, 2023)
    logits = pool @ w["w"]  # no bias
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return pool, spatial, e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def synthetic_pb(tf_available, tmp_path_factory):
    """(graph path, weights, textured images, the graph's own single-image outputs for them)."""
    tmp = tmp_path_factory.mktemp("tfgraph")
    w = _weights()
    np.savez(tmp / "weights.npz", **w)
    textured = np.random.default_rng(2).integers(0, 256, (3, 40, 40, 3)).astype(np.uint8)
    np.savez(tmp / "tex.npz", arr_0=textured)
    pb = tmp / "classify_image_graph_def.pb"
    here = str(__import__("pathlib").Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", GRAPH_SCRIPT, here, str(tmp / "weights.npz"), str(pb),
                           str(tmp / "tex.npz"), str(tmp / "direct.npz"), str(tmp / "bad.pb")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp / "direct.npz") as z:
        direct = {k: z[k] for k in z.files}
    return pb, w, tmp / "tex.npz", direct


def test_tf_features_match_closed_form_and_graph_single_image_path(synthetic_pb, tmp_path):
    from evaluations.features_tf import compute_tf_features

    pb, w, tex_npz, direct = synthetic_pb
    rng = np.random.default_rng(1)
    # 70 constant-colour images (one partial batch of 6 after a full batch of 64), side 12
    colors = rng.integers(0, 256, (70, 3)).astype(np.uint8)
    const = np.broadcast_to(colors[:, None, None, :], (70, 12, 12, 3)).copy()
    np.savez(tmp_path / "const.npz", arr_0=const)
    # random-texture 40x40 images, checked against the graph's own DecodeJpeg path (batch of one)
    feats_const, feats_tex = compute_tf_features([str(tmp_path / "const.npz"), str(tex_npz)], str(pb))

    pool, spatial, probs = _numpy_constant_image_features(colors, w)
    assert feats_const["pool"].shape == (70, 2048)
    assert feats_const["spatial"].shape == (70, 2023)
    assert feats_const["softmax"].shape == (70, 1008)
    np.testing.assert_allclose(feats_const["pool"], pool, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats_const["spatial"], spatial, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats_const["softmax"], probs, rtol=1e-3, atol=1e-7)
    assert str(feats_const["tf_version"]) == str(direct["version"])
    np.testing.assert_allclose(feats_tex["pool"], direct["pool"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats_tex["spatial"], direct["spatial"], rtol=1e-4, atol=1e-6)


def test_tf_backend_errors_are_user_errors(synthetic_pb, tmp_path, monkeypatch):
    from evaluations.features_tf import PB_ENV, compute_tf_features, resolve_pb

    np.savez(tmp_path / "a.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    monkeypatch.delenv(PB_ENV, raising=False)
    with pytest.raises(UserError, match="--inception-pb"):
        resolve_pb(None)
    monkeypatch.setenv(PB_ENV, str(synthetic_pb[0]))
    assert resolve_pb(None) == str(synthetic_pb[0])
    with pytest.raises(UserError, match="not found"):
        compute_tf_features([str(tmp_path / "a.npz")], str(tmp_path / "missing.pb"))
    # a graph without ADM's tensors: the subprocess exits 2 ("not the ADM Inception graph") -> UserError
    bad = synthetic_pb[0].parent / "bad.pb"
    with pytest.raises(UserError, match="TensorFlow feature extraction failed"):
        compute_tf_features([str(tmp_path / "a.npz")], str(bad))


def test_the_tensorflow_process_needs_no_torch():
    """compute_tf_features runs `python -m evaluations.features_tf` in another interpreter (--tf-python), which
    may have TensorFlow and numpy but no torch: that module's imports must not pull torch in."""
    code = "import sys, evaluations.features_tf; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]
