"""Reading ADM-format sample and reference batches (`.npz` with `arr_0` uint8 NHWC images).

Images are streamed from the archive in batches (the `arr_0.npy` member is read through its
header, as ADM's evaluator does), so 50,000 256x256 samples never sit in memory at once.
Validation happens on the header before any feature is computed, and every failure is a
`UserError` naming the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from fcdm_common.cli import UserError

FID_MIN_RECOMMENDED = 2048  # below this many images FID is dominated by estimation bias
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    path: str  # the npz file
    shape: Tuple[int, ...]  # arr_0 shape (N, H, W, 3)
    keys: Tuple[str, ...]  # array names in the archive

    @property
    def num_images(self) -> int:
        return int(self.shape[0])


@contextlib.contextmanager
def _open_member(path: str, name: str) -> Iterator[object]:
    try:
        zf = zipfile.ZipFile(path, "r")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(
            f"{path}: not a readable .npz archive ({e}); write it with np.savez(path, arr_0=images)") from None
    with zf:
        if f"{name}.npy" not in zf.namelist():
            raise UserError(f"{path}: no '{name}' array in the archive (found {_names(zf)}); "
                            f"save images as np.savez(path, arr_0=uint8[N,H,W,3])")
        with zf.open(f"{name}.npy", "r") as f:
            yield f


def _names(zf: zipfile.ZipFile) -> list:
    return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def _read_header(f) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)  # (shape, fortran_order, dtype)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def inspect_batch(path: str | Path, min_images: int = 2, warn_fid: bool = True) -> BatchInfo:
    """Check `arr_0` of an ADM batch: uint8, (N, H, W, 3), N >= min_images. Raises UserError."""
    path = str(path)
    try:
        with _open_member(path, "arr_0") as f:
            shape, fortran, dtype = _read_header(f)
        with zipfile.ZipFile(path, "r") as zf:
            keys = tuple(_names(zf))
    except UserError:
        raise
    except Exception as e:  # corrupt header or member
        raise UserError(f"{path}: cannot read arr_0 ({e}); write it with np.savez(path, arr_0=images)") from None
    if dtype != np.uint8:
        raise UserError(f"{path}: arr_0 has dtype {dtype}, expected uint8 images in 0..255 "
                        f"(convert with np.clip(x, 0, 255).round().astype(np.uint8))")
    if len(shape) != 4 or shape[3] != 3:
        raise UserError(f"{path}: arr_0 has shape {tuple(shape)}, expected (N, H, W, 3) RGB images in NHWC order")
    if shape[0] < min_images:
        raise UserError(f"{path}: arr_0 holds {shape[0]} images, at least {min_images} are needed")
    if min(shape[1:3]) < 1:
        raise UserError(f"{path}: arr_0 has empty images of shape {tuple(shape)}")
    if warn_fid and shape[0] < FID_MIN_RECOMMENDED:
        warnings.warn(f"{path}: only {shape[0]} images; FID is biased below {FID_MIN_RECOMMENDED} "
                      f"(the paper uses 50,000 samples)", stacklevel=2)
    return BatchInfo(path=path, shape=tuple(int(s) for s in shape), keys=keys)


def iter_images(path: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    """Yield uint8 (b, H, W, 3) batches of arr_0 in order, reading the archive member sequentially."""
    path = str(path)
    with _open_member(path, "arr_0") as f:
        shape, fortran, dtype = _read_header(f)
        if fortran or dtype.hasobject:  # rare layouts: load it whole
            arr = np.load(path)["arr_0"]
            for start in range(0, arr.shape[0], batch_size):
                yield np.ascontiguousarray(arr[start : start + batch_size])
            return
        per_image = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = f.read(count * per_image)
            if len(data) != count * per_image:
                raise UserError(f"{path}: arr_0 is truncated (image {start + len(data) // per_image} of {shape[0]})")
            yield np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]))


def load_array(z, key: str, path: str | Path, fix: str) -> np.ndarray:
    """`z[key]` of an open npz; an array of Python objects (which np.load never unpickles: allow_pickle is
    off, so a file cannot run code) or an unreadable member is a UserError naming the file, the key and `fix`."""
    try:
        return z[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(f"{path}: '{key}' is an array of Python objects (dtype object), which is never loaded "
                            f"(it could run code); {fix}") from None
        raise UserError(f"{path}: cannot read '{key}' ({e}); {fix}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: cannot read '{key}' ({type(e).__name__}: {e}); {fix}") from None


def read_labels(path: str | Path, num_images: int) -> Optional[np.ndarray]:
    """`arr_1` class labels (N,) int64 if the archive has them, else None."""
    with np.load(str(path)) as z:
        if "arr_1" not in z.files:
            return None
        labels = load_array(z, "arr_1", path, "save the labels as integers: np.savez(path, arr_0=images, "
                                              "arr_1=np.asarray(labels, dtype=np.int64))")
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: arr_1 has shape {labels.shape} and dtype {labels.dtype}, "
                        f"expected int labels of shape ({num_images},)")
    return labels.astype(np.int64)


def read_ref_stats(path: str | Path, pool_dim: int, spatial_dim: int) -> Optional[Dict[str, np.ndarray]]:
    """Precomputed `mu`, `sigma`, `mu_s`, `sigma_s` of a reference batch (used as they are), or None."""
    path = str(path)
    with np.load(path) as z:
        present = [k for k in STAT_KEYS if k in z.files]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            raise UserError(f"{path}: has {present} but not all of {list(STAT_KEYS)}; "
                            f"store all four statistics or none")
        fix = "store the statistics as float arrays (np.savez(path, ..., mu=mu.astype(np.float64), ...))"
        stats = {}
        for k in STAT_KEYS:
            value = load_array(z, k, path, fix)
            if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
                raise UserError(f"{path}: '{k}' has dtype {value.dtype}, expected floats; {fix}")
            stats[k] = np.asarray(value, dtype=np.float64)
    expected = {"mu": (pool_dim,), "sigma": (pool_dim, pool_dim), "mu_s": (spatial_dim,),
                "sigma_s": (spatial_dim, spatial_dim)}
    for key, shape in expected.items():
        if stats[key].shape != shape:
            raise UserError(f"{path}: '{key}' has shape {stats[key].shape}, this backend's features need {shape} "
                            f"(was the reference made with another --backend?)")
        if not np.isfinite(stats[key]).all():
            raise UserError(f"{path}: '{key}' contains NaN or inf; rebuild the reference batch")
    return stats
