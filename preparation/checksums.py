"""Checksums of the latent store: bit rot is found when it is read, named, and repaired by a rerun.

One flipped byte in a compressed chunk decodes to other numbers (blosc and zstd carry no checksum of the data),
so a store whose disk rots would train on wrong latents without a word. Every data array of a store (`latents`,
`labels`, `images`) is therefore written with zarr v3's `crc32c` codec after the compressor: each compressed
inner chunk carries the CRC-32C of its bytes, and zarr verifies it on every read (a mismatch raises ValueError).
The shard index already has one (zarr's default for sharded arrays). The small marker and statistics arrays
(`done`, `stat_sums`, ...) have none: a damaged marker makes a shard be redone or refused, never read wrong.

* `store.data_compressors()` (the store format owns its codecs): blosc zstd with bitshuffle, then crc32c.
* `has_checksums(array)`, `missing_checksums(group)`: stores made before checksums (no crc32c codec) keep
  working; readers note it once (`NO_CHECKSUMS`), and preparation/add_checksums.py gives them checksums without
  re-encoding (it rewrites each array's compressed chunks, decoding and encoding only with blosc).
* `damaged_shards(group, shards, layer)`: the shards of which some array of a layer fails to decode (checksum,
  codec, shard index). Readers call it when a read fails, to name the shards; `--verify` of the writers
  (preparation/extract_features.py, preparation/save_zarr.py) calls it on every done shard and re-encodes the
  damaged ones (`store.reset_shards`).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

from zarr.codecs import Crc32cCodec

from fcdm_common.progress import progress as tqdm
from preparation import store as zstore

CHECKSUM = (Crc32cCodec(),)  # the codec that follows the compressor of a data array

VERIFY_FIX = ("rerun the command that made it (preparation/extract_features.py, or preparation/save_zarr.py for a "
              "converted store) with the same arguments plus --verify: it checks every chunk and re-encodes the "
              "damaged shards")
NO_CHECKSUMS = ("{path} was written before stores carried checksums, so damaged bytes in it would go unnoticed; "
                "'python preparation/add_checksums.py {path}' adds them without re-encoding")


def has_checksums(array) -> bool:
    """Whether every chunk of `array` carries a crc32c (of its inner chunks, for a sharded array)."""
    return any(isinstance(codec, Crc32cCodec) for codec in array.compressors)


def data_arrays(group) -> list[str]:
    """The data arrays of a store: latents, labels, and the images when it has an image layer."""
    names = list(zstore.LATENT_FILES)
    if zstore.images_size_of(group) is not None:
        names += list(zstore.IMAGE_FILES)
    return names


def missing_checksums(group) -> list[str]:
    """The data arrays of `group` written without checksums (a store made before they existed)."""
    return [name for name in data_arrays(group) if not has_checksums(group[name])]


def damaged_shards(group, shards: Optional[Iterable[int]] = None, layer: zstore.Layer = zstore.LATENTS,
                   desc: Optional[str] = None) -> list[int]:
    """Shards (of `shards`, default all) of which an array of `layer` fails to read: a checksum mismatch, bytes the
    codec cannot decode, a damaged shard index. Each shard is decoded once (a progress bar when `desc` is given).
    Missing files are not found here (they read as the fill value): `store.missing_shards` finds those."""
    attrs = group.attrs
    count, shard_size = int(attrs["count"]), int(attrs["shard_size"])
    todo = list(range(zstore.num_shards(count, shard_size)) if shards is None else shards)
    arrays = [group[name] for name in layer.files]
    found = []
    for k in tqdm(todo, desc=desc or "verifying", unit="shard", disable=desc is None):
        start, end = zstore.shard_range(k, count, shard_size)
        for array in arrays:
            try:
                array[start:end]
            except Exception:  # noqa: BLE001 - a codec raises anything on damaged bytes
                found.append(k)
                break
    return found


def damage_message(path: str | os.PathLike, group, shards: list[int], layer: zstore.Layer = zstore.LATENTS) -> str:
    """The one line that names the damaged shards of the store at `path` and the repair."""
    attrs = dict(group.attrs)
    what = zstore.describe_shards(shards, int(attrs["count"]), int(attrs["shard_size"]))
    checked = "fail their checksum" if all(has_checksums(group[n]) for n in layer.files) else "cannot be decoded"
    return (f"zarr store {path} is damaged: the {layer.what} of {len(shards)} shard(s) {checked} ({what}), so "
            f"reading them would give wrong numbers; {VERIFY_FIX}")


def locate_damage(path: str | os.PathLike, shards: Optional[Iterable[int]] = None,
                  layer: zstore.Layer = zstore.LATENTS) -> Callable[[], Optional[str]]:
    """For `checks.damaged_store(path, locate=...)`: when a read failed, decode `shards` (default all) one by one
    and return the message naming the damaged ones (None when all read: the failure was something else). The
    store is opened anew (the reader's handle may belong to another process)."""
    def locate() -> Optional[str]:
        group = zstore.open_store(path, "r")
        found = damaged_shards(group, shards, layer)
        return damage_message(path, group, found, layer) if found else None
    return locate


def verify_store(path: str | os.PathLike, shards: Iterable[int], layer: zstore.Layer = zstore.LATENTS,
                 desc: Optional[str] = None) -> list[int]:
    """The shards of `shards` (done ones, typically) whose `layer` arrays fail to read; [] for a store without the
    layer. UserError when the store cannot be opened at all."""
    group = zstore.open_store(path, "r")
    if layer is zstore.IMAGES and zstore.images_size_of(group) is None:
        return []
    return damaged_shards(group, shards, layer, desc=desc)


def no_checksums_note(path: str | os.PathLike, group) -> Optional[str]:
    """The one-line note for a store whose data arrays carry no checksums; None when they all do."""
    return NO_CHECKSUMS.format(path=path) if missing_checksums(group) else None

