"""Per-channel latent statistics (mean, std) of an existing store, for `train.py --latent-norm channel`.

    python preparation/latent_stats.py data/imagenet256.zarr
    torchrun --nproc_per_node=N preparation/latent_stats.py data/imagenet256.zarr

Stores written by extract_features.py already hold them; this adds them to stores that lack them.
The statistics are exact (float64 sums per shard, added in shard order, so any number of
processes gives the same bits) and cover every item, both orientations and every position of
z = (latent - shift) * scale, with the posterior noise integrated out for "moments" stores (see
preparation/statistics.py). Each finished shard is recorded in the store, so an interrupted run
resumes where it stopped when the same command is rerun.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fcdm_common.cli import UserError, non_negative_int, run_main
from fcdm_common.distributed import barrier, cleanup, init_distributed
from preparation.checks import damaged_store
from preparation.checksums import locate_damage
from preparation.statistics import (
    STATS_ATTR,
    ensure_stats_arrays,
    shard_sums,
    stats_from_info,
    store_stats_from_rows,
    write_shard_sums,
)
from preparation.store import STORE_FORMAT, check_shard_files, open_store, remove_leftovers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="a complete zarr latent store (extract_features.py / save_zarr.py)")
    p.add_argument("--recompute", action="store_true",
                   help="discard statistics already in the store (complete or partial) and compute them again")
    p.add_argument("--debug-stop-after-shards", type=non_negative_int, default=None, help=argparse.SUPPRESS)
    return p


def _open(path: Path, mode: str):
    if not (path / "zarr.json").is_file():
        raise UserError(f"{path} is not a zarr latent store (no zarr.json)")
    try:
        group = open_store(path, mode)
        attrs = dict(group.attrs)
    except Exception as e:
        raise UserError(f"cannot open the store {path}: {e}") from None
    if attrs.get("format") != STORE_FORMAT:
        raise UserError(f"{path} is not an FCDM latent store")
    if not attrs.get("complete"):
        raise UserError(f"{path} is incomplete; finish it by rerunning its extract_features.py command "
                        "(which records the statistics itself)")
    check_shard_files(path, group)  # statistics of missing shards would be those of zeros
    return group, attrs


def main(argv=None):
    args = build_parser().parse_args(argv)
    path = Path(args.store)
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        group, attrs = _open(path, "r")  # every rank validates before anything is written
        if stats_from_info(attrs) is not None and not args.recompute:
            say(f"{path} already holds per-channel statistics; nothing to do (--recompute to redo them)")
            return
        count, shard, C = int(attrs["count"]), int(attrs["shard_size"]), int(attrs["latent_shape"][0])
        n_shards = -(-count // shard)
        if rank == 0:  # the only writer until the barrier
            remove_leftovers(path)  # zarr's .partial files of a killed run
            group, _ = _open(path, "r+")
            if args.recompute:
                for name in ("stat_sums", "stat_done"):
                    if name in set(group.array_keys()):
                        del group[name]
                if STATS_ATTR in group.attrs:
                    del group.attrs[STATS_ATTR]
            ensure_stats_arrays(group, n_shards, C)
        barrier()
        group, attrs = _open(path, "r+")
        done = np.asarray(group["stat_done"][:], dtype=bool)
        mine = [k for k in range(rank, n_shards, world) if not done[k]]
        say(f"{path}: {int(done.sum())}/{n_shards} shards already summed; {len(mine)} to read on rank 0 "
            f"({world} process(es))")
        mode, scale, shift = attrs["store"], float(attrs["scaling_factor"]), float(attrs.get("shift_factor") or 0.0)
        for i, k in enumerate(mine):
            start, end = k * shard, min(count, (k + 1) * shard)
            with damaged_store(path, locate_damage(path, [k])):  # a damaged chunk: one line naming the shard
                values = np.asarray(group["latents"][start:end])
            write_shard_sums(group, k, shard_sums(values, mode, scale, shift))
            if rank == 0 and (i + 1) % max(1, len(mine) // 10) == 0:
                say(f"  {i + 1}/{len(mine)} shards on rank 0")
            if args.debug_stop_after_shards is not None and i + 1 >= args.debug_stop_after_shards:
                print(f"rank {rank}: stopping after {i + 1} shard(s) (debug); rerun to resume", flush=True)
                return
        barrier()
        if rank == 0:
            stats = store_stats_from_rows(group)
            group.attrs[STATS_ATTR] = stats
            fmt = lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]"  # noqa: E731
            say(f"wrote per-channel statistics to {path}: mean {fmt(stats['mean'])}, std {fmt(stats['std'])}")
    finally:
        cleanup()


if __name__ == "__main__":
    run_main(main, resume_from="the shards already summed")  # what the rerun keeps when another process died
