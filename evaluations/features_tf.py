"""ADM's exact feature extractor: the TensorFlow Inception graph `classify_image_graph_def.pb`.

Behaviour reproduced from guided-diffusion `evaluations/evaluator.py` (the ADM suite):
- the GraphDef is imported with its tensor `ExpandDims:0` remapped to a float32 placeholder of shape
  (None, None, None, 3), so raw uint8 images are fed as float32 0..255 NHWC at their own size; the
  graph itself resizes them (its bilinear resize to 299x299 and normalisation follow ExpandDims);
- images go through in batches of 64, in file order;
- FID/precision/recall features: `pool_3:0` reshaped to (N, 2048);
- sFID features: the first 7 channels of `mixed_6/conv:0` (N, 17, 17, 768 -> N, 17, 17, 7),
  flattened in NHWC order to (N, 2023);
- Inception Score: softmax(pool_3 @ W) in batches of 512, W being the weight input (inputs[1]) of
  the op `softmax/logits/MatMul`; the bias of the original classifier is not added.

It runs in its own process (`python -m evaluations.features_tf ...`, started by
`compute_tf_features`), so TensorFlow never shares a process, or a GPU context, with torch, and can
live in another Python environment (`python_exe`). Nothing is downloaded: the graph is a local path.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from evaluations.batches import inspect_batch, iter_images
from fcdm_common.cli import HelpFormatter, UserError, alias_help, positive_int, run_main
from fcdm_common.io import atomic_path
from fcdm_common.progress import progress as tqdm

INPUT_NAME = "ExpandDims:0"  # where the graph's decoded JPEG enters (before its resize)
POOL_NAME = "pool_3:0"  # (N, 1, 1, 2048)
SPATIAL_NAME = "mixed_6/conv:0"  # (N, 17, 17, 768)
SPATIAL_CHANNELS = 7  # ADM keeps channels [:7] -> 17*17*7 = 2023 features
LOGITS_MATMUL = "softmax/logits/MatMul"  # its inputs[1] is the (2048, 1008) classifier weight
BATCH_SIZE = 64  # ADM's Evaluator batch_size
SOFTMAX_BATCH_SIZE = 512  # ADM's Evaluator softmax_batch_size
PB_ENV = "FCDM_INCEPTION_PB"  # environment variable naming the graph file
PYTHON_ENV = "FCDM_TF_PYTHON"  # environment variable naming a Python with TensorFlow


def resolve_pb(path: Optional[str]) -> str:
    """The Inception graph from --inception-pb or $FCDM_INCEPTION_PB; UserError if neither names a file."""
    path = path or os.environ.get(PB_ENV)
    if not path:
        raise UserError(f"the tf backend needs the ADM Inception graph: pass --inception-pb "
                        f"classify_image_graph_def.pb or set {PB_ENV} (see docs/evaluation.md; "
                        f"nothing is downloaded automatically)")
    if not Path(path).is_file():
        raise UserError(f"{path}: Inception graph not found (pass --inception-pb or set {PB_ENV})")
    return str(path)


# ---------------------------------------------------------------- in the TensorFlow process


def _import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        # deferred: TensorFlow is heavy and optional (the tf backend only)
        import tensorflow as tf
    except ImportError as e:
        raise UserError(f"TensorFlow is not importable by {sys.executable} ({e}); install the optional "
                        f"extra with `pip install -e '.[eval-tf]'` (tensorflow-cpu), or point "
                        f"--tf-python / {PYTHON_ENV} at a Python that has it") from None
    return tf


class TFInception:
    """The ADM graph in a tf.compat.v1 session: `__call__(uint8 or float (b,H,W,3)) -> (pool, spatial)`."""

    def __init__(self, pb_path: str):
        tf = _import_tf()
        self.tf = tf
        v1 = tf.compat.v1
        graph_def = v1.GraphDef()
        try:
            graph_def.ParseFromString(Path(pb_path).read_bytes())
        except Exception as e:  # protobuf DecodeError
            raise UserError(f"{pb_path}: not a TensorFlow GraphDef ({e})") from None
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images = v1.placeholder(tf.float32, shape=[None, None, None, 3])  # 0..255 NHWC
            self.pool_in = v1.placeholder(tf.float32, shape=[None, 2048])
            try:
                pool, spatial, matmul = v1.import_graph_def(
                    graph_def,
                    input_map={INPUT_NAME: self.images},
                    return_elements=[POOL_NAME, SPATIAL_NAME, LOGITS_MATMUL],
                    name="inception",
                )
            except (ValueError, KeyError) as e:
                raise UserError(f"{pb_path}: not the ADM Inception graph, a tensor is missing ({e})") from None
            self.pool = v1.reshape(pool, [-1, 2048])  # (b, 2048)
            spatial = spatial[..., :SPATIAL_CHANNELS]  # (b, 17, 17, 7)
            self.spatial = v1.reshape(spatial, [v1.shape(spatial)[0], -1])  # (b, 2023), NHWC order
            weight = matmul.inputs[1]  # (2048, 1008)
            self.softmax = tf.nn.softmax(tf.matmul(self.pool_in, weight))  # (b, 1008), no bias
        config = v1.ConfigProto(allow_soft_placement=True)
        config.gpu_options.allow_growth = True  # share a GPU politely if this TF has one
        self.sess = v1.Session(graph=self.graph, config=config)

    def features(self, batch: np.ndarray):
        pool, spatial = self.sess.run([self.pool, self.spatial], {self.images: batch.astype(np.float32)})
        return pool, spatial

    def softmax_of(self, pool: np.ndarray) -> np.ndarray:
        out = [self.sess.run(self.softmax, {self.pool_in: pool[i : i + SOFTMAX_BATCH_SIZE]})
               for i in range(0, pool.shape[0], SOFTMAX_BATCH_SIZE)]
        return np.concatenate(out, axis=0)


def extract(pb_path: str, image_paths: Sequence[str], out_paths: Sequence[str], batch_size: int = BATCH_SIZE) -> None:
    """For each ADM batch, write an npz with pool (N,2048), spatial (N,2023), softmax (N,1008) float32."""
    net = TFInception(pb_path)
    for img_path, out_path in zip(image_paths, out_paths):
        info = inspect_batch(img_path, warn_fid=False)
        pools, spatials = [], []
        n_batches = (info.num_images + batch_size - 1) // batch_size
        for batch in tqdm(iter_images(img_path, batch_size), total=n_batches, desc=f"inception {Path(img_path).name}"):
            pool, spatial = net.features(batch)
            pools.append(pool)
            spatials.append(spatial)
        pool = np.concatenate(pools, axis=0)
        with atomic_path(out_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, pool=pool, spatial=np.concatenate(spatials, axis=0), softmax=net.softmax_of(pool),
                         tf_version=np.array(net.tf.__version__))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                     description="Inception features of ADM batches with the TF graph "
                                                 "(run by evaluations/evaluator.py in a subprocess).")
    parser.add_argument("--inception-pb", required=True, help="path to classify_image_graph_def.pb")
    parser.add_argument("--images", nargs="+", required=True, help="ADM .npz batches (arr_0 uint8 NHWC)")
    parser.add_argument("--out", nargs="+", required=True, help="one output .npz per --images file")
    parser.add_argument("--forward-batch", "--batch-size", dest="forward_batch", type=positive_int, default=BATCH_SIZE,
                        help=alias_help("images per graph run (ADM: 64)", "--batch-size"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if len(args.images) != len(args.out):
        raise UserError("--images and --out need the same number of paths")
    extract(resolve_pb(args.inception_pb), args.images, args.out, args.forward_batch)


# ---------------------------------------------------------------- in the caller's process


# TensorFlow's start-up lines that TF_CPP_MIN_LOG_LEVEL does not silence (TF 2.21, logged before absl
# is initialised). TF_ENABLE_ONEDNN_OPTS=0 would silence the first but changes the numbers (oneDNN
# and Eigen convolutions sum in different orders: up to 1e-6 relative on a conv stack), so the
# lines are dropped from the child's stderr instead and the computation stays as it was.
TF_NOISE = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
            "oneDNN custom operations are on.")


def _is_tf_noise(line: str) -> bool:
    return any(marker in line for marker in TF_NOISE)


def run_filtering_tf_noise(cmd: List[str], env: dict) -> subprocess.CompletedProcess:
    """Run `cmd`, passing its stderr through (progress bars included, as they come) minus TF_NOISE lines."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    pending = b""
    while True:
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            break
        pending += chunk
        cut = max(pending.rfind(b"\n"), pending.rfind(b"\r"))  # write complete lines and bar redraws
        if cut < 0:
            continue
        done, pending = pending[:cut + 1], pending[cut + 1:]
        kept = [ln for ln in done.splitlines(keepends=True) if not _is_tf_noise(ln.decode(errors="replace"))]
        sys.stderr.write(b"".join(kept).decode(errors="replace"))
        sys.stderr.flush()
    if pending and not _is_tf_noise(pending.decode(errors="replace")):
        sys.stderr.write(pending.decode(errors="replace"))
    proc.stderr.close()
    return subprocess.CompletedProcess(cmd, proc.wait())


def compute_tf_features(
    npz_paths: Sequence[str],
    pb_path: Optional[str] = None,
    python_exe: Optional[str] = None,
    batch_size: int = BATCH_SIZE,
) -> List[Dict[str, np.ndarray]]:
    """Run the TF graph on each ADM batch in a child process; returns dicts pool/spatial/softmax/tf_version."""
    pb_path = resolve_pb(pb_path)
    python_exe = python_exe or os.environ.get(PYTHON_ENV) or sys.executable
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    repo_root = str(Path(__file__).resolve().parents[1])  # so another environment can import evaluations
    env["PYTHONPATH"] = os.pathsep.join([repo_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory(prefix="fcdm_tf_feats_") as tmp:
        outs = [str(Path(tmp) / f"feats_{i}.npz") for i in range(len(npz_paths))]
        cmd = [python_exe, "-m", "evaluations.features_tf", "--inception-pb", pb_path, "--images", *map(str, npz_paths),
               "--out", *outs, "--forward-batch", str(batch_size)]
        if "FCDM_PROGRESS" not in env and sys.stderr.isatty():
            env["FCDM_PROGRESS"] = "1"  # the child's stderr is our pipe, but its bar ends on this terminal
        try:
            proc = run_filtering_tf_noise(cmd, env)
        except FileNotFoundError:
            raise UserError(
                f"{python_exe}: Python interpreter for TensorFlow not found (--tf-python / {PYTHON_ENV})") from None
        if proc.returncode != 0:
            raise UserError(
                f"TensorFlow feature extraction failed (exit status {proc.returncode}); see the message above")
        results = []
        for out in outs:
            with np.load(out) as z:
                results.append({k: z[k] for k in z.files})
        return results


if __name__ == "__main__":
    run_main(main)
