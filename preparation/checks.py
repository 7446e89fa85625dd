"""Checks of the training data: damaged stores, non-finite latents, labels that do not form a class list.

Every reader (preparation/readers.py), preparation/save_zarr.py and the training loader use these, so
every path refuses the same files with the same message naming them.

* `damaged_store(path, locate)`: zarr reads a missing or empty chunk file as the fill value (for our
  sharded latents: silent zeros), and a damaged one raises whatever its codec raises (checksum ValueError,
  blosc RuntimeError, JSON errors in the array metadata); inside this block every failure becomes one
  `UserError` naming the store and the fix, and the damaged shards when `locate` finds them.
* Missing or empty shard files (which zarr would also read as the fill value) are found when a store
  is opened by `preparation.store.check_shard_files`, which knows the layout: every shard file is written.
* `load_latent_file(path)`, `load_label_file(path)`: the legacy per-image files, checked.
* `check_finite(array, path)`: a latent file holding NaN or inf is refused, naming the file.
* `check_label_gaps(labels, names, source)`: without a class list the number of classes is max
  label + 1, so one stray label (999 among 0..9) would silently build a model with 990 empty
  classes; labels must instead cover every class 0..K-1, and the files holding the labels past
  the first empty class are named.
* `nonfinite_rows(x)`: the rows of a batch (B, ...) that hold a NaN or inf, computed on the host
  in the loader's worker thread, where the batch already is, so the training step never waits
  for the device to answer.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from fcdm_common.cli import UserError, error_summary

FIX = "delete it and rerun preparation/extract_features.py (or preparation/save_zarr.py) to rebuild it"


@contextlib.contextmanager
def damaged_store(path: str | os.PathLike, locate: Optional[Callable[[], Optional[str]]] = None) -> Iterator[None]:
    """Run a block that reads the store at `path`; any failure but a UserError becomes one.

    `locate` (preparation.checksums.locate_damage): called after a failure, it decodes the shards the block read
    one by one and returns the message naming the damaged ones and the repair, or None (then the generic one)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - codecs and stores raise anything on damaged bytes
        message = None
        if locate is not None:
            with contextlib.suppress(Exception):
                message = locate()
        raise UserError(message or f"zarr store {path} is damaged ({error_summary(e)}); {FIX}") from None


def check_finite(array: np.ndarray, path) -> None:
    """UserError naming `path` when `array` holds NaN or inf."""
    if not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise UserError(f"{path} contains NaN or inf ({bad} of {array.size} values); regenerate or remove it")


def check_label_gaps(labels: np.ndarray, names: Sequence[str], source: str, limit: int = 5) -> None:
    """UserError when some class in [0, max label] has no item (labels without a class list).

    names[i] is the file holding labels[i]; the message lists up to `limit` files whose label lies
    beyond the first empty class (the stray ones when the gap is large)."""
    if labels.size == 0:
        return
    counts = np.bincount(labels[labels >= 0], minlength=int(labels.max()) + 1)
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return
    first = int(empty[0])
    stray = np.flatnonzero(labels > first)
    shown = ", ".join(f"{names[i]} (label {int(labels[i])})" for i in stray[:limit])
    more = f" and {stray.size - limit} more" if stray.size > limit else ""
    raise UserError(f"{source}: labels range over [0, {int(labels.max())}] but {empty.size} of these classes have "
                    f"no item (the first is {first}), so the model would get empty classes; labels must number the "
                    f"classes 0..K-1. Files with labels past {first}: {shown}{more}; fix or remove them")


def load_latent_file(path) -> np.ndarray:
    """One legacy latent file as (O, C, H, W), O = 1 or 2 orientations; UserError naming a bad file."""
    try:
        arr = np.load(path)
    except Exception as e:  # numpy raises many kinds for a damaged file
        raise UserError(f"{path} is not a readable .npy file ({e}); remove or regenerate it") from None
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] not in (1, 2):
        raise UserError(f"{path} has shape {arr.shape}; expected (C,H,W), (1,C,H,W) or (2,C,H,W)")
    check_finite(arr, path)
    return arr


def load_label_file(path) -> int:
    """The one integer >= 0 of a legacy label file; UserError naming a bad file."""
    if not path.is_file():
        raise UserError(f"label file {path} is missing; every latent needs a label .npy with the same name")
    try:
        arr = np.asarray(np.load(path)).reshape(-1)
    except Exception as e:
        raise UserError(f"{path} is not a readable .npy file ({e})") from None
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.integer) and not float(arr[0]).is_integer():
        raise UserError(f"{path} should hold one integer label, got {arr!r}")
    label = int(arr[0])
    if label < 0:
        raise UserError(f"{path} holds a negative label {label}")
    return label


def nonfinite_rows(x: torch.Tensor) -> np.ndarray:
    """Positions along dim 0 of `x` (a CPU tensor) whose values are not all finite; empty when all are."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return np.empty(0, dtype=np.int64)
    return torch.nonzero(~finite.reshape(x.shape[0], -1).all(dim=1)).reshape(-1).numpy()


def describe_nonfinite(records: dict, source: str, limit: int = 8) -> str | None:
    """Sentence naming the items of `records` ({step: dataset indices}), or None when it is empty."""
    if not records:
        return None
    items = sorted({int(i) for v in records.values() for i in v})
    steps = sorted(records)
    shown = ", ".join(str(i) for i in items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
    return (f"the input latents themselves are not finite: dataset item(s) {shown} of {source} hold NaN or inf "
            f"(first seen at step {steps[0] + 1}, in {len(steps)} batch(es)); the data is the cause, not the "
            "optimisation: re-extract the data or remove these items")
