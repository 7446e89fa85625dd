"""The latent store format and its writer (layout in docs/data.md; readers in preparation/readers.py).

One zarr v3 group. `latents` and `labels` are sharded along the image axis with one shard per
work unit of `shard_size` images, so the processes of a multi-GPU extraction never write the same
file. The bool array `done` (one chunk per shard) records finished shards: a rerun skips them and
a shard whose process died half-way is simply rewritten. The group attribute `complete` becomes
true only after every shard is done, so readers never mistake a half-written store for data.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from fcdm_common.cli import UserError
from fcdm_common.io import fault_point
from preparation.statistics import STATS_ATTR, ensure_stats_arrays, shard_sums, store_stats_from_rows, write_shard_sums

STORE_FORMAT = "fcdm-latents"  # attrs["format"] of a store
STORE_FORMAT_VERSION = 1  # bump on an incompatible layout change
STORE_MODES = ("moments", "sample")  # posterior (mean, std) per image, or one scaled draw
# Settings that must match when a store is reopened for writing (resume)
SETTING_KEYS = ("image_size", "vae", "scaling_factor", "store", "count", "latent_shape", "orientations",
                "class_names", "shard_size", "chunk_size", "seed", "vae_class", "shift_factor")
DEFAULT_SHARD_SIZE = 1024  # images per shard file = per work unit of one process
DEFAULT_CHUNK_SIZE = 64  # images per compressed inner chunk
ADDED_SETTING_KEYS = ("vae_class", "shift_factor")  # settings a store may lack (not compared when absent)


def latent_array_shape(count: int, mode: str, orientations: int, latent_shape) -> tuple[int, ...]:
    """(N, O, 2, C, H, W) for moments (mean, std), (N, O, C, H, W) for samples."""
    if mode == "moments":
        return (count, orientations, 2, *latent_shape)
    return (count, orientations, *latent_shape)


def latent_dtype(mode: str) -> str:
    # Moments in float16 halve the store (mean/std of the SD-VAE posterior fit easily); scaled
    # samples stay float32 like the paper's .npy files.
    return "float16" if mode == "moments" else "float32"


def make_settings(*, image_size: int, vae: str, scaling_factor: float, store: str, count: int, latent_shape,
                  orientations: int, class_names, shard_size: int, chunk_size: int, seed: int | None,
                  vae_class: str | None = None, shift_factor: float = 0.0) -> dict:
    """Attributes that identify how a store was made (compared on resume). vae_class defaults to
    "none" for pixel data and "AutoencoderKL" otherwise (the SD-VAE of the original release)."""
    vae_class = vae_class or ("none" if vae == "none" else "AutoencoderKL")
    return {"image_size": int(image_size), "vae": str(vae), "scaling_factor": float(scaling_factor),
            "vae_class": str(vae_class), "shift_factor": float(shift_factor),
            "store": store, "count": int(count), "latent_shape": [int(v) for v in latent_shape],
            "orientations": int(orientations), "class_names": None if class_names is None else list(class_names),
            "shard_size": int(shard_size), "chunk_size": int(chunk_size),
            "seed": None if seed is None else int(seed)}


def describe_mismatch(existing: dict, wanted: dict) -> str | None:
    """First differing setting as readable text, or None when the store matches."""
    for key in SETTING_KEYS:
        if key in ADDED_SETTING_KEYS and key not in existing:
            continue  # a store that does not record this key
        old, new = existing.get(key), wanted.get(key)
        if key == "class_names" and old is not None and new is not None and list(old) != list(new):
            return f"class_names (the store has {len(old)} classes, the data {len(new)} / different names)"
        if old != new:
            return f"{key} (store: {old!r}, this run: {new!r})"
    return None


def check_existing(path: str | os.PathLike, settings: dict, what: str = "--zarr-path",
                   overwrite: bool | None = None) -> str:
    """'absent', 'incomplete' or 'complete' for a store at `path` made with `settings`; UserError otherwise.

    overwrite: None when the program has no --overwrite flag; False: the mismatch message offers it;
    True: a store made with other settings is reported as 'replace' (the caller deletes it with
    `remove_store` and starts over) instead of refused."""
    path = Path(path)
    if not path.exists():
        return "absent"
    if not (path / "zarr.json").is_file():
        if path.is_dir() and not any(path.iterdir()):
            return "absent"
        raise UserError(f"{what} {path} exists but is not a zarr store; choose a new output path")
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        arrays = set(group.array_keys())
    except Exception as e:
        raise UserError(f"{what} {path} is a damaged zarr store ({e}); delete it and rerun") from None
    if not attrs and not arrays:
        return "absent"  # a group whose creation was interrupted before anything was recorded
    if attrs.get("format") != STORE_FORMAT:
        raise UserError(f"{what} {path} is a zarr group but not an FCDM latent store; choose a new output path")
    diff = describe_mismatch(attrs, settings)
    if diff is not None and overwrite:
        return "replace"
    if diff is not None:
        if attrs.get("count") != settings.get("count") and all(
                attrs.get(k) == settings.get(k) for k in SETTING_KEYS if k not in ("count", "class_names")):
            diff = (f"it holds {attrs.get('count')} images but the data now has {settings.get('count')} "
                    "(images were added or removed since)")
        fix = (f"rerun the same command with --overwrite to delete it and encode everything again, or choose a new "
               f"{what}" if overwrite is not None else f"delete it to start over, or choose a new {what}")
        raise UserError(f"the store {path} was made with other settings: {diff}; {fix}")
    if attrs.get("complete"):
        return "complete"
    if not {"latents", "labels", "done"} <= arrays:
        return "absent"  # creation was interrupted: nothing was encoded yet, start over
    return "incomplete"


def remove_store(path: str | os.PathLike) -> None:
    """Delete an FCDM latent store (refuses anything else, so a wrong path is never wiped)."""
    path = Path(path)
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        attrs = {}
    if attrs.get("format") != STORE_FORMAT:
        raise UserError(f"{path} is not an FCDM latent store; refusing to delete it")
    shutil.rmtree(path)


def create_store(path: str | os.PathLike, settings: dict, extra_attrs: dict | None = None):
    """Create an empty store (overwriting anything at `path`) and return the zarr group."""
    count, shard, chunk = settings["count"], settings["shard_size"], settings["chunk_size"]
    shape = latent_array_shape(count, settings["store"], settings["orientations"], settings["latent_shape"])
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    compressor = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    attrs = {"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION, **settings,
             "latents_axes": ("N, orientation, moment(mean,std), C, H, W" if settings["store"] == "moments"
                              else "N, orientation, C, H, W"),
             **(extra_attrs or {}), "complete": False}
    group.attrs.update(attrs)  # attributes first: an interrupted creation is recognised and redone
    group.create_array("latents", shape=shape, dtype=latent_dtype(settings["store"]),
                       chunks=(min(chunk, shard), *shape[1:]), shards=(shard, *shape[1:]),
                       compressors=compressor, fill_value=0)
    group.create_array("labels", shape=(count,), dtype="int64", chunks=(shard,), compressors=compressor,
                       fill_value=-1)
    group.create_array("done", shape=(num_shards(count, shard),), dtype="bool", chunks=(1,), fill_value=False)
    ensure_stats_arrays(group, num_shards(count, shard), settings["latent_shape"][0])
    return group


def num_shards(count: int, shard_size: int) -> int:
    return math.ceil(count / shard_size)


def shard_range(k: int, count: int, shard_size: int) -> tuple[int, int]:
    """[start, end) image indices of shard k."""
    return k * shard_size, min(count, (k + 1) * shard_size)


def done_shards(group) -> np.ndarray:
    return np.asarray(group["done"][:], dtype=bool)


def write_shard(group, k: int, latents: np.ndarray, labels: np.ndarray) -> None:
    """Write shard k's latents, labels and per-channel sums (preparation.statistics), then mark it done
    (the marker goes last)."""
    attrs = dict(group.attrs)
    count, shard = attrs["count"], attrs["shard_size"]
    start, end = shard_range(k, count, shard)
    if latents.shape[0] != end - start or labels.shape[0] != end - start:
        raise ValueError(f"shard {k} expects {end - start} items, got {latents.shape[0]} / {labels.shape[0]}")
    values = latents.astype(group["latents"].dtype, copy=False)  # statistics of exactly what is stored
    if "stat_sums" in set(group.array_keys()):
        write_shard_sums(group, k, shard_sums(values, attrs["store"], attrs["scaling_factor"],
                                              attrs.get("shift_factor", 0.0)))
    group["latents"][start:end] = values
    fault_point("store-shard")  # test hook (fcdm_common/io.py): a kill between the data and its marker
    group["labels"][start:end] = labels.astype(np.int64, copy=False)
    group["done"][k] = True


def mark_complete(group) -> None:
    """Set the completion attribute once every shard is done."""
    if not done_shards(group).all():
        raise RuntimeError("mark_complete called before every shard was written")
    if "stat_sums" in set(group.array_keys()):
        group.attrs[STATS_ATTR] = store_stats_from_rows(group)  # before `complete`: readers see both or neither
    group.attrs["complete"] = True
