"""Damage checks for zarr latent stores: a broken store is one clear message, never zeros or a traceback.

zarr reads a missing or empty chunk file as the fill value (for our sharded latents: silent zeros), and
a damaged one raises whatever its codec raises (checksum ValueError, blosc RuntimeError, JSON errors in
the array metadata). `check_chunk_files` finds empty files (zarr never writes one) and, for arrays whose
fill value is no valid data (labels: -1), missing ones when a store is opened (one stat per shard file);
zarr skips writing an all-fill-value chunk, so a missing latents shard (fill 0) cannot be told from zeros.
`damaged_store` turns read failures into a `UserError` naming the store and the fix.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from pathlib import Path
from typing import Iterator

from .cli import UserError, error_summary

FIX = "delete it and rerun preparation/extract_features.py (or preparation/save_zarr.py) to rebuild it"


@contextlib.contextmanager
def damaged_store(path: str | os.PathLike) -> Iterator[None]:
    """Run a block that reads the store at `path`; any failure but a UserError becomes one."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - codecs and stores raise anything on damaged bytes
        raise UserError(f"zarr store {path} is damaged ({error_summary(e)}); {FIX}") from None


def check_chunk_files(path: str | os.PathLike, array, allow_missing: bool = False) -> None:
    """UserError when a chunk (shard) file of a zarr v3 `array` of the store at `path` is empty, or missing
    (unless `allow_missing`: chunks equal to the fill value are not written)."""
    shape = array.shape
    grid = array.metadata.chunk_grid.chunk_shape  # the stored objects: shards where the array is sharded
    counts = [math.ceil(n / c) for n, c in zip(shape, grid)]
    folder = Path(path) / array.path
    for coords in itertools.product(*(range(n) for n in counts)):
        key = array.metadata.encode_chunk_key(coords)
        f = folder / key
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            size = None
        if size == 0 or (size is None and not allow_missing):
            state = "missing" if size is None else "empty (0 bytes)"
            raise UserError(f"zarr store {path} is damaged (chunk file {f} is {state}); {FIX}")
