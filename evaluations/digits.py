"""The `digits` feature backend: a tiny classifier of scikit-learn's 8x8 digits for the embedded demo.

The demo trains FCDM on scikit-learn's `load_digits` images (8x8, values 0..16) written as grey RGB
images upscaled by an integer factor with nearest neighbour (value * 255 / 16). This backend undoes
that: grey = mean of the 3 channels, area-average down to 8x8, rescale 0..255 -> 0..16, and feeds a
one-hidden-layer MLP (64 -> 64 ReLU -> 10) trained deterministically (fixed split, fixed seed) in a
second or two on CPU. Its outputs play the roles Inception plays in ADM's suite, so the same metric
code (evaluations/metrics.py) gives:
- FID, precision, recall: the 64 hidden-layer activations ("pool" features);
- sFID: the 64 pixel values of the 8x8 digit themselves ("spatial" features: the spatial layout
  with no learned weights, the analogue of ADM's early-layer mixed_6 features);
- Inception Score and class accuracy: the softmax of the 10 logits.
The classifier is trained once per process and cached in memory; training is deterministic, so
results do not depend on the cache.
"""
from __future__ import annotations

import functools
import warnings
from typing import Dict, Tuple

import numpy as np

from fcdm_common.cli import UserError

DIGIT_SIZE = 8  # scikit-learn digits are 8x8
DIGIT_MAX = 16.0  # their pixel values are 0..16
NUM_CLASSES = 10
HIDDEN = 64  # hidden units = "pool" feature dimension
SEED = 0  # split and initialisation seed
TRAIN_FRACTION = 0.75  # the first 75% of a seeded permutation trains, the rest is held out


def digits_split() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split of load_digits: (x_train (n,64) 0..16, y_train, x_test, y_test)."""
    # deferred: scikit-learn serves the digits demo only
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float64)  # (1797, 64), 0..16
    y = data.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y))
    n_train = int(round(TRAIN_FRACTION * len(y)))
    tr, te = order[:n_train], order[n_train:]
    return x[tr], y[tr], x[te], y[te]


class DigitsClassifier:
    """MLP 64 -> 64 (ReLU) -> 10 on digits scaled to 0..1; weights as numpy float64 arrays."""

    def __init__(self, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray):
        self.w1, self.b1 = w1, b1  # (64, HIDDEN), (HIDDEN,)
        self.w2, self.b2 = w2, b2  # (HIDDEN, 10), (10,)

    def hidden(self, digits: np.ndarray) -> np.ndarray:
        """(N, 64) pixels 0..16 -> (N, HIDDEN) ReLU activations."""
        return np.maximum(digits / DIGIT_MAX @ self.w1 + self.b1, 0.0)

    def logits(self, digits: np.ndarray) -> np.ndarray:
        """(N, 64) pixels 0..16 -> (N, 10) logits."""
        return self.hidden(digits) @ self.w2 + self.b2


@functools.lru_cache(maxsize=1)
def digits_classifier() -> DigitsClassifier:
    """Train (once per process) the deterministic digits classifier on the fixed training split."""
    # deferred: scikit-learn serves the digits demo only
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x_train, y_train, _, _ = digits_split()
    mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN,), activation="relu", solver="adam", alpha=1e-4,
                        batch_size=64, learning_rate_init=1e-3, max_iter=200, shuffle=True,
                        random_state=SEED, tol=0.0, n_iter_no_change=10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed number of epochs is intended
        mlp.fit(x_train / DIGIT_MAX, y_train)
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    return DigitsClassifier(w1.astype(np.float64), b1.astype(np.float64), w2.astype(np.float64), b2.astype(np.float64))


def images_to_digits(images: np.ndarray, source: str = "images") -> np.ndarray:
    """uint8 (N, H, W, 3), H = W a multiple of 8 -> (N, 64) float64 pixels on the 0..16 scale."""
    if images.ndim != 4 or images.shape[3] != 3:
        raise UserError(f"{source}: digits backend needs (N, H, W, 3) images, got {images.shape}")
    n, h, w, _ = images.shape
    if h != w or h % DIGIT_SIZE != 0:
        raise UserError(f"{source}: digits backend needs square images whose side is a multiple of 8, got {h}x{w}")
    f = h // DIGIT_SIZE  # upscaling factor
    grey = images.astype(np.float64).mean(axis=3)  # (N, H, W)
    small = grey.reshape(n, DIGIT_SIZE, f, DIGIT_SIZE, f).mean(axis=(2, 4))  # area average, (N, 8, 8)
    return small.reshape(n, DIGIT_SIZE * DIGIT_SIZE) * (DIGIT_MAX / 255.0)


def digits_to_images(digits: np.ndarray, scale: int = 2) -> np.ndarray:
    """(N, 64) values 0..16 -> uint8 (N, 8*scale, 8*scale, 3) grey images, the demo's format."""
    d = np.asarray(digits, dtype=np.float64).reshape(-1, DIGIT_SIZE, DIGIT_SIZE)
    img = np.round(d * 255.0 / DIGIT_MAX).clip(0, 255).astype(np.uint8)
    img = img.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest-neighbour upscale
    return np.repeat(img[..., None], 3, axis=3)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def digits_features(images: np.ndarray, source: str = "images") -> Dict[str, np.ndarray]:
    """Backend output for a batch: pool (N,64) hidden, spatial (N,64) pixels, logits (N,10), softmax (N,10)."""
    digits = images_to_digits(images, source)
    clf = digits_classifier()
    logits = clf.logits(digits)
    return {"pool": clf.hidden(digits), "spatial": digits, "logits": logits, "softmax": softmax(logits)}


def held_out_accuracy() -> float:
    """Accuracy of the classifier on the held-out split of real digits (a sanity number for reports)."""
    _, _, x_test, y_test = digits_split()
    return float(np.mean(np.argmax(digits_classifier().logits(x_test), axis=1) == y_test))
