"""Give a latent store made before checksums existed its checksums, without re-encoding anything.

    python preparation/add_checksums.py data/imagenet256.zarr

Stores written since carry a CRC-32C of every compressed chunk, which every read verifies
(preparation/checksums.py). An older store keeps working without them, but bit rot in it would be read as
other numbers. This program rewrites each data array (`latents`, `labels`, `images`) with the checksum codec
added: shard by shard it decodes the stored bytes (blosc) and writes them again with their checksum, into a
new array beside the old one; then the new array takes the old one's place. The values stay bit for bit the
same, and no autoencoder is needed. It reads and writes the whole store once (the disk needs room for one more
copy of its largest array); run it while nothing else uses the store.

Checksums only vouch for the bytes from now on: a chunk that rotted before this run is copied as it reads. A
chunk that cannot be decoded at all stops the conversion with its shard named; re-encode it first by
rerunning the command that made the store with --verify.

Kills. For each array `A`: the copy is written to `A.checksummed` (a kill leaves it half-written; the rerun
deletes it and copies again), then `A` is renamed to `.A.unchecksummed`, `A.checksummed` to `A`, and the old
copy is deleted. A kill between these steps is finished by the rerun, which looks at which of the three
folders exist. Done arrays are skipped, so the rerun continues where the kill stopped.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from fcdm_common.cli import HelpFormatter, UserError, run_main
from fcdm_common.io import fault_point
from fcdm_common.progress import progress as tqdm
from preparation import checksums
from preparation import store as zstore
from preparation.checks import damaged_store

COPY = "{}.checksummed"  # the new array, beside the old one
ASIDE = ".{}.unchecksummed"  # the old array while it is replaced (hidden: not listed as a member)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0],
                                epilog="Rerun after an interruption: it continues where it stopped.")
    p.add_argument("store", help="a zarr latent store (preparation/extract_features.py or save_zarr.py); complete "
                                 "or not")
    return p


def finish_swaps(path: Path, name: str) -> None:
    """Complete what a killed run left of the replacement of array `name`, from the folders that exist."""
    array, copy, aside = path / name, path / COPY.format(name), path / ASIDE.format(name)
    if aside.exists() and not array.exists() and copy.exists():
        os.rename(copy, array)  # killed between the two renames
    if aside.exists() and array.exists():
        shutil.rmtree(aside)  # killed after the new array took its place
    if copy.exists():
        shutil.rmtree(copy)  # killed during the copy: it is made again


def copy_with_checksums(path: Path, group, name: str, say) -> None:
    """Write array `name` again as `name.checksummed` with the checksum codec added, shard by shard, then put it
    in the old one's place."""
    old = group[name]
    attrs = dict(group.attrs)
    count, shard_size = int(attrs["count"]), int(attrs["shard_size"])
    new = group.create_array(COPY.format(name), shape=old.shape, dtype=old.dtype, chunks=old.chunks,
                             shards=old.shards, compressors=(*old.compressors, *checksums.CHECKSUM),
                             fill_value=old.fill_value)
    layer = zstore.IMAGES if name in zstore.IMAGE_FILES else zstore.LATENTS
    every = new.with_config({"write_empty_chunks": True})  # every shard file exists (store.missing_shards)
    for k in tqdm(range(zstore.num_shards(count, shard_size)), desc=f"{name}: adding checksums", unit="shard"):
        start, end = zstore.shard_range(k, count, shard_size)
        with damaged_store(path, checksums.locate_damage(path, [k], layer)):
            values = old[start:end]
        every[start:end] = values
    fault_point("store-meta/checksums-copied")
    os.rename(path / name, path / ASIDE.format(name))
    fault_point("store-meta/checksums-aside")
    os.rename(path / COPY.format(name), path / name)
    fault_point("store-meta/checksums-renamed")
    shutil.rmtree(path / ASIDE.format(name))
    say(f"{path}: {name} now carries checksums")


def add_checksums(path: str | os.PathLike, say=print) -> list[str]:
    """Give every data array of the store at `path` its checksums; returns the arrays rewritten."""
    path = Path(path)
    attrs = zstore.store_attrs(path)
    if attrs is None or attrs.get("format") != zstore.STORE_FORMAT:
        raise UserError(f"{path} is not an FCDM latent store (made by preparation/extract_features.py or "
                        "preparation/save_zarr.py)")
    zstore.remove_leftovers(path)  # zarr's .partial files of a killed write
    names = list(zstore.LATENT_FILES) + list(zstore.IMAGE_FILES)
    for name in names:
        finish_swaps(path, name)
    group = zstore.open_store(path)
    todo = checksums.missing_checksums(group)
    if not todo:
        say(f"{path} already carries checksums; nothing to do")
        return []
    for name in todo:
        copy_with_checksums(path, group, name, say)
    return todo


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    add_checksums(args.store)


if __name__ == "__main__":
    run_main(main)
