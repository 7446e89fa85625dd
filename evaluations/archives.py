"""Sample files: PNGs and ADM-format .npz archives, shared by the sampling programs and the evaluator.

Archives follow ADM's format (guided-diffusion `evaluations/evaluator.py`): `arr_0` uint8 (N, H, W, 3),
`arr_1` int64 (N,) labels; `write_npz` streams the images into the zip member so 50K images at 512
never sit in memory at once. Every file is written atomically (temp file + rename).
"""
from __future__ import annotations

import json
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import PIL
from PIL import Image

from fcdm_common.cli import UserError
from fcdm_common.io import atomic_path, atomic_write_text


def write_png(path, image: np.ndarray) -> None:
    """One uint8 (H, W, 3) image as a PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")


def read_png(path, shape: Optional[Tuple[int, int, int]] = None) -> Optional[np.ndarray]:
    """The uint8 (H, W, 3) image in `path`, or None when it is missing, does not decode or has another shape."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                return None
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError):
        return None
    if shape is not None and arr.shape != tuple(shape):
        return None
    return arr


def write_npz(path, images: Union[np.ndarray, Iterable[np.ndarray]], labels: np.ndarray,
              image_shape: Optional[Tuple[int, int, int]] = None) -> None:
    """ADM archive: arr_0 uint8 (N, H, W, 3), arr_1 int64 (N,), written atomically. `images` is an array or
    an iterable of uint8 (b, H, W, 3) chunks (then `image_shape` = (H, W, 3) is required); the chunks are
    streamed into an uncompressed zip member exactly as `np.savez` lays it out."""
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    if isinstance(images, np.ndarray):
        image_shape = images.shape[1:]
        if images.shape[0] != n:
            raise ValueError(f"{images.shape[0]} images but {n} labels")
        images = [images]
    if image_shape is None:
        raise ValueError("image_shape is required when images is an iterable of chunks")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, *image_shape)}
    written = 0
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for chunk in images:
                    chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                    if chunk.shape[1:] != tuple(image_shape):
                        raise ValueError(f"image chunk of shape {chunk.shape}, expected (b, {image_shape})")
                    f.write(chunk.tobytes())
                    written += chunk.shape[0]
            if written != n:
                raise ValueError(f"wrote {written} images but {n} labels")
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels, allow_pickle=False)


def validate_npz(path, num_samples: Optional[int] = None, num_classes: Optional[int] = None) -> dict:
    """Check an ADM archive (keys, dtypes, shapes, label range) without loading the images; UserError if bad.
    Returns {"num_samples", "image_shape", "labels"}."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if not {"arr_0.npy", "arr_1.npy"} <= names:
                raise UserError(f"{path}: expected members arr_0 and arr_1, found {sorted(names)}")
            with zf.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
            with zf.open("arr_1.npy") as f:
                labels = np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(
            f"{path}: not a readable .npz archive ({e}); rerun the sampling command to rewrite it") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise UserError(f"{path}: arr_0 is {dtype} {shape}, expected uint8 (N, H, W, 3)")
    if labels.dtype != np.int64 or labels.shape != (shape[0],):
        raise UserError(f"{path}: arr_1 is {labels.dtype} {labels.shape}, expected int64 ({shape[0]},)")
    if num_samples is not None and shape[0] != num_samples:
        raise UserError(f"{path}: holds {shape[0]} images, expected {num_samples}")
    if num_classes is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{path}: labels outside 0..{num_classes - 1}")
    return {"num_samples": int(shape[0]), "image_shape": tuple(int(v) for v in shape[1:]), "labels": labels}


def package_versions() -> dict:
    """Versions that matter for reproducing an archive."""
    import torch  # deferred: its only use here; evaluate.py and make_reference.py import this module without torch

    out = {"torch": torch.__version__, "numpy": np.__version__, "pillow": PIL.__version__}
    try:
        out["fcdm"] = metadata.version("fcdm")
    except metadata.PackageNotFoundError:
        out["fcdm"] = "unknown"
    return out


def write_json(path, obj: dict) -> None:
    """Pretty JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
