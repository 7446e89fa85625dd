"""The evaluation run behind `train_gen/evaluate.py`: features from a backend, then ADM's five metrics.

Order of work follows ADM's `evaluator.py` main(): reference activations, reference statistics
(precomputed `mu`/`sigma`/`mu_s`/`sigma_s` in the reference npz are used as they are, otherwise
np.mean/np.cov of its activations), sample activations and statistics, then Inception Score of the
samples, FID (pool features), sFID (spatial features), and precision/recall of the samples against
the reference images' pool features (k=3, blocks of 10000).

Backends (see docs/evaluation.md): `tf` (ADM's graph, exact, in a subprocess), `torch` (Inception-v3
port, approximate), `digits` (the demo's small classifier; also reports class accuracy when the
samples carry `arr_1` labels).
"""
from __future__ import annotations

import importlib.metadata
import platform
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import scipy

from evaluations import metrics
from evaluations.batches import inspect_batch, iter_images, read_labels, read_ref_stats
from evaluations.digits import digits_features, held_out_accuracy
from evaluations.features_tf import compute_tf_features, resolve_pb
from fcdm_common.cli import UserError, error_summary
from fcdm_common.io import sha256_file
from fcdm_common.progress import progress as tqdm

BACKENDS = ("tf", "torch", "digits")
FEATURE_DIMS = {"tf": (2048, 2023), "torch": (2048, 2023), "digits": (64, 64)}  # (pool, spatial)
METRIC_LABELS = (  # key, printed label (ADM's wording)
    ("inception_score", "Inception Score"),
    ("fid", "FID"),
    ("sfid", "sFID"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("class_accuracy", "Class accuracy"),
)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _stream_features(path: str, fn, batch_size: int, desc: str) -> Dict[str, np.ndarray]:
    info = inspect_batch(path, warn_fid=False)
    parts: Dict[str, List[np.ndarray]] = {}
    total = (info.num_images + batch_size - 1) // batch_size
    for batch in tqdm(iter_images(path, batch_size), total=total, desc=desc):
        for key, value in fn(batch).items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def add_backend_args(parser, backend_flag: str = "--backend") -> None:
    """The feature-network flags shared by evaluate.py and train.py's evaluation (`backend_flag` names
    the backend choice: --backend there, --eval-backend in train.py); --inception-pb, --inception-weights
    and --tf-python keep their names in both."""
    parser.add_argument(backend_flag, choices=BACKENDS, default="tf",
                        help="feature network: tf = ADM's Inception graph (exact), torch = Inception-v3 port "
                             "(approximate), digits = the demo's digit classifier")
    parser.add_argument("--inception-pb", default=None,
                        help="tf backend: path to classify_image_graph_def.pb (default: $FCDM_INCEPTION_PB)")
    parser.add_argument("--inception-weights", default=None, help="torch backend: inception_v3 state_dict file")
    parser.add_argument("--tf-python", default=None,
                        help="tf backend: Python interpreter with TensorFlow that runs the graph in a subprocess "
                             "(default: $FCDM_TF_PYTHON or this interpreter)")


def compute_features(
    backend: str,
    npz_paths: Sequence[str],
    inception_pb: Optional[str] = None,
    inception_weights: Optional[str] = None,
    tf_python: Optional[str] = None,
    device: Optional[str] = None,
    batch_size: int = 64,
) -> List[Dict[str, np.ndarray]]:
    """Per ADM batch: dict with pool (N, Dp), spatial (N, Ds), softmax (N, C) [+ logits for digits]."""
    if backend == "tf":
        return compute_tf_features(npz_paths, inception_pb, tf_python, batch_size)
    if backend == "torch":
        if not inception_weights:
            raise UserError("the torch backend needs --inception-weights PATH (a torchvision inception_v3 "
                            "state_dict with 1008 classes); it is approximate, prefer --backend tf")
        # deferred: the torch backend's module loads torch and torchvision (~2.5 s), which the other backends
        # (and evaluate.py --help) do not need
        from evaluations.features_torch import TorchInception

        net = TorchInception(inception_weights, device)
        return [_stream_features(p, net, batch_size, f"inception {Path(p).name}") for p in npz_paths]
    if backend == "digits":
        return [_stream_features(p, lambda b, p=p: digits_features(b, p), max(batch_size, 1024),
                                 f"digits {Path(p).name}")
                for p in npz_paths]
    raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def check_feature_dims(feats: Dict[str, np.ndarray], backend: str, path: str) -> None:
    pool_dim, spatial_dim = FEATURE_DIMS[backend]
    if feats["pool"].shape[1] != pool_dim or feats["spatial"].shape[1] != spatial_dim:
        raise UserError(f"{path}: {backend} features have shapes {feats['pool'].shape}/{feats['spatial'].shape}, "
                        f"expected (N, {pool_dim})/(N, {spatial_dim}); is the graph the ADM Inception graph?")


# Numerical failures of one metric (scipy's sqrtm, a broken covariance, ...): that metric becomes NaN
# with its reason, the others are still computed and written.
NUMERICAL_ERRORS = (ValueError, ArithmeticError, np.linalg.LinAlgError, scipy.linalg.LinAlgError)


def _guarded(name: str, failed: Dict[str, str], fn, *args, count: int = 1):
    """fn(*args), or NaN (a tuple of `count` NaNs) with failed[name] = the reason on a numerical error."""
    try:
        return fn(*args)
    except NUMERICAL_ERRORS as e:
        failed[name] = error_summary(e, limit=300)
        warnings.warn(f"{name} failed ({failed[name]}); reported as NaN, the other metrics are still computed")
        return float("nan") if count == 1 else (float("nan"),) * count


def _safe_pr(ref_pool: np.ndarray, sample_pool: np.ndarray, k: int):
    if min(ref_pool.shape[0], sample_pool.shape[0]) <= k:
        warnings.warn(f"precision/recall need more than k={k} images in each batch; reporting NaN")
        return float("nan"), float("nan")
    return metrics.precision_recall(ref_pool, sample_pool, k=k)


def reference_statistics(ref_feats: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """mu/sigma (pool features) and mu_s/sigma_s (spatial features) of a reference batch's features."""
    mu, sigma = metrics.compute_statistics(ref_feats["pool"])
    mu_s, sigma_s = metrics.compute_statistics(ref_feats["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def metrics_from_features(ref_pool: np.ndarray, ref_stats: Dict[str, np.ndarray], sample_feats: Dict[str, np.ndarray],
                          labels: Optional[np.ndarray] = None, sample_batch: str = "samples", k: int = 3,
                          split_size: int = 5000, sample_stats: Optional[Dict[str, np.ndarray]] = None,
                          failed: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """IS, FID, sFID, precision, recall (+ class accuracy when `labels` are given, digits backend) of sample
    features against the reference's pool features and statistics (`reference_statistics` or the npz's).
    `sample_stats`: statistics stored in the sample batch, used instead of its features' as ADM does.
    A metric that fails numerically is NaN, with its reason in `failed` (metric key -> reason)."""
    failed = {} if failed is None else failed
    if sample_stats is None:
        sample_stats = reference_statistics(sample_feats)
    mu_s, sigma_s, mu_ss, sigma_ss = (sample_stats[key] for key in ("mu", "sigma", "mu_s", "sigma_s"))
    mu_r, sigma_r, mu_rs, sigma_rs = (ref_stats[key] for key in ("mu", "sigma", "mu_s", "sigma_s"))
    results: Dict[str, float] = {
        "inception_score": _guarded("inception_score", failed, metrics.inception_score, sample_feats["softmax"],
                                    split_size),
        "fid": _guarded("fid", failed, metrics.frechet_distance, mu_s, sigma_s, mu_r, sigma_r),
        "sfid": _guarded("sfid", failed, metrics.frechet_distance, mu_ss, sigma_ss, mu_rs, sigma_rs),
    }
    results["precision"], results["recall"] = _guarded("precision_recall", failed, _safe_pr, ref_pool,
                                                       sample_feats["pool"], k, count=2)
    if labels is not None:
        if labels.min() < 0 or labels.max() >= 10:
            raise UserError(f"{sample_batch}: arr_1 labels must be digits 0..9 for the digits backend, "
                            f"got {labels.min()}..{labels.max()}")
        predicted = np.argmax(sample_feats["logits"], axis=1)
        results["class_accuracy"] = float(np.mean(predicted == labels))
    return results


def evaluate(
    sample_batch: str,
    ref_batch: str,
    backend: str = "tf",
    inception_pb: Optional[str] = None,
    inception_weights: Optional[str] = None,
    tf_python: Optional[str] = None,
    device: Optional[str] = None,
    batch_size: int = 64,
    k: int = 3,
    split_size: int = 5000,
) -> Dict[str, object]:
    """All metrics of `sample_batch` against `ref_batch`; returns a JSON-ready dict (see docs/evaluation.md)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    sample_batch, ref_batch = str(sample_batch), str(ref_batch)
    ref_info = inspect_batch(ref_batch)
    sample_info = inspect_batch(sample_batch)
    pool_dim, spatial_dim = FEATURE_DIMS[backend]
    ref_stats = read_ref_stats(ref_batch, pool_dim, spatial_dim)  # validated before the slow part
    sample_stats = read_ref_stats(sample_batch, pool_dim, spatial_dim)  # ADM uses a sample batch's stored ones too
    labels = read_labels(sample_batch, sample_info.num_images) if backend == "digits" else None

    print(f"computing {backend} features of {ref_batch} ({ref_info.num_images} images) "
          f"and {sample_batch} ({sample_info.num_images} images)", flush=True)
    ref_feats, sample_feats = compute_features(backend, [ref_batch, sample_batch], inception_pb,
                                               inception_weights, tf_python, device, batch_size)
    check_feature_dims(ref_feats, backend, ref_batch)
    check_feature_dims(sample_feats, backend, sample_batch)

    print("computing statistics and metrics", flush=True)
    ref_statistics_source = "precomputed" if ref_stats is not None else "computed"
    if ref_stats is None:
        ref_stats = reference_statistics(ref_feats)
    failed: Dict[str, str] = {}  # metric key -> reason it is NaN
    results = metrics_from_features(ref_feats["pool"], ref_stats, sample_feats, labels, sample_batch, k, split_size,
                                    sample_stats=sample_stats, failed=failed)

    files = {
        "sample_batch": {"path": sample_batch, "sha256": sha256_file(sample_batch), "shape": list(sample_info.shape)},
        "ref_batch": {"path": ref_batch, "sha256": sha256_file(ref_batch), "shape": list(ref_info.shape)},
    }
    versions = {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                "fcdm": _version("fcdm")}
    if backend == "tf":
        pb = resolve_pb(inception_pb)
        files["inception_pb"] = {"path": pb, "sha256": sha256_file(pb)}
        versions["tensorflow"] = str(sample_feats["tf_version"])
    elif backend == "torch":
        files["inception_weights"] = {"path": str(inception_weights), "sha256": sha256_file(inception_weights)}
        versions["torch"] = _version("torch")
        versions["torchvision"] = _version("torchvision")
    else:
        versions["scikit-learn"] = _version("scikit-learn")
        results["classifier_held_out_accuracy"] = held_out_accuracy()
    return {
        "metrics": results,
        "failed": failed,
        "backend": backend,
        "exact_adm": backend == "tf",
        "num_samples": sample_info.num_images,
        "num_ref": ref_info.num_images,
        "ref_statistics": ref_statistics_source,
        "sample_statistics": "precomputed" if sample_stats is not None else "computed",
        "settings": {"batch_size": batch_size, "k": k, "split_size": split_size, "pr_row_batch": 10000,
                     "pr_distance_dtype": "float16"},
        "files": files,
        "versions": versions,
    }


def format_metrics(result: Dict[str, object]) -> str:
    """ADM-style lines `Name: value`, one per metric (nan for a failed one), then one
    `Name failed: reason` line per failed metric."""
    lines = []
    for key, label in METRIC_LABELS:
        if key in result["metrics"]:
            lines.append(f"{label}: {result['metrics'][key]}")
    labels = dict(METRIC_LABELS, precision_recall="Precision/Recall")
    for key, reason in result.get("failed", {}).items():
        lines.append(f"{labels.get(key, key)} failed: {reason}")
    return "\n".join(lines) + "\n"
