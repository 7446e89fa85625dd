"""Throughput of the training data path: latents/s delivered by TrainLoader from a local store.

Builds (or reuses) a moments-mode zarr store of random 4x32x32 latents (ImageNet 256 with the
SD-VAE) and iterates the loader with the training settings (batch 256, 2 workers). Every batch is
complete model input: orientation choice, fresh posterior sample and scaling included.

    python benchmarks/bench_data.py                       # default: 20,000 items, cache auto
    python benchmarks/bench_data.py --cache none          # read zarr per batch (no RAM cache)
    python benchmarks/bench_data.py --compare-checksums --count 4096   # the cost of the chunks' checksums

`--compare-checksums` writes the same random data twice, with and without the CRC-32C of every chunk
(preparation/checksums.py), and times the two reads training does, interleaved: decoding the whole store
(the RAM cache's load) and random batches of items (`--cache none`); it reports each time and the ratio.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fcdm_common.cli import HelpFormatter, UserError, non_negative_int, positive_int, run_main
from fcdm_common.io import atomic_write_text
from preparation import store as zstore
from preparation.readers import open_dataset
from train_gen.loader import TrainLoader
from train_gen.step_draws import BatchPlan


def make_random_store(path: Path, count: int, latent_shape=(4, 32, 32), seed: int = 0, checksums: bool = True) -> None:
    """A complete moments store of random data (mean ~ N(0, 1), std ~ U(0, 0.1)) with 1000 classes; its chunks
    without checksums when `checksums` is False (a store as written before they existed)."""
    settings = zstore.make_settings(image_size=latent_shape[1] * 8, vae="sd:random", scaling_factor=0.18215,
                                    store="moments", count=count, latent_shape=latent_shape, orientations=2,
                                    class_names=[f"c{i}" for i in range(1000)], shard_size=1024, chunk_size=64,
                                    seed=None)
    group = zstore.create_store(path, settings, checksums=checksums)
    rng = np.random.default_rng(seed)
    for k in range(zstore.num_shards(count, 1024)):
        start, end = zstore.shard_range(k, count, 1024)
        n = end - start
        mean = rng.standard_normal((n, 2, 1, *latent_shape), dtype=np.float32)
        std = rng.uniform(0, 0.1, (n, 2, 1, *latent_shape)).astype(np.float32)
        zstore.write_shard(group, k, np.concatenate([mean, std], axis=2), rng.integers(0, 1000, n))
    zstore.mark_complete(group)


def measure(path: Path, batch_size: int, num_workers: int, steps: int, warmup: int, cache: str,
            device: str = "none") -> float:
    ds = open_dataset(zarr_path=path, cache=cache)
    t_open = time.perf_counter()
    loader = TrainLoader(ds, BatchPlan(batch_size), seed=0, num_workers=num_workers,
                         pin_memory=device == "cuda")
    to_device = _device_copy(device)
    print(f"  loader ready in {time.perf_counter() - t_open:.2f}s (in-memory cache: {ds.cached})")
    it = iter(loader)
    for _ in range(warmup):
        to_device(*next(it))
    to_device(None, None)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(steps):
        x, y = next(it)
        to_device(x, y)
        n += x.shape[0]
    to_device(None, None)  # wait for the last copy
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU time of all threads of this process: latents per CPU-second does not depend on how busy
    # the machine is (other jobs steal wall-clock time, not our CPU time)
    print(f"  {n / cpu:,.0f} latents per CPU-second ({cpu / wall:.2f} cores used on average)")
    return n / wall


def compare_checksums(tmp: Path, count: int, batch_size: int, steps: int, repeats: int) -> dict:
    """Seconds to decode the whole store and to read `steps` random batches, with and without checksums (the same
    data), interleaved over `repeats`; the medians and their ratios."""
    paths = {"checksums": tmp / "crc.zarr", "none": tmp / "plain.zarr"}
    for name, path in paths.items():
        make_random_store(path, count, checksums=name == "checksums")
    sets = {name: open_dataset(zarr_path=path, cache="none") for name, path in paths.items()}
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, count, batch_size), rng.integers(0, 2, batch_size)) for _ in range(steps)]
    times: dict = {name: {"whole": [], "batches": []} for name in paths}
    for _ in range(repeats):
        for name, ds in sets.items():
            t0 = time.perf_counter()
            np.asarray(ds._zarr_array()[:])
            t1 = time.perf_counter()
            for indices, orient in batches:
                ds.read(indices, orient)
            times[name]["whole"].append(t1 - t0)
            times[name]["batches"].append(time.perf_counter() - t1)
    out = {name: {k: float(np.median(v)) for k, v in t.items()} for name, t in times.items()}
    for k in ("whole", "batches"):
        out[f"ratio_{k}"] = out["checksums"][k] / out["none"][k]
    nbytes = sets["none"].nbytes
    print(f"{count} items ({nbytes / 2**20:.0f} MiB decoded), median of {repeats}:")
    print(f"  whole store: {out['checksums']['whole']:.3f} s with checksums, {out['none']['whole']:.3f} s without "
          f"(ratio {out['ratio_whole']:.3f})")
    print(f"  {steps} random batches of {batch_size}: {out['checksums']['batches']:.3f} s with checksums, "
          f"{out['none']['batches']:.3f} s without (ratio {out['ratio_batches']:.3f})")
    return out


def _device_copy(device: str):
    """f(x, y): copy a batch to `device` the way train.py does (non-blocking from pinned memory, x in
    channels-last); f(None, None) waits for the copies. "none": the batch stays on the host."""
    if device == "none":
        return lambda x, y: None
    dev = torch.device(device)

    def copy(x, y):
        if x is None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return
        x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y.to(dev, non_blocking=True)

    return copy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                description="Measure latents/s of the training data loader on CPU.")
    p.add_argument("--store", default=None, help="existing store to read (default: build a random one in a temp dir)")
    p.add_argument("--count", type=positive_int, default=20_000, help="items in the generated store")
    p.add_argument("--batch-size", type=positive_int, default=256, help="batch size (training default 256)")
    p.add_argument("--num-workers", type=non_negative_int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--steps", type=positive_int, default=200, help="timed batches")
    p.add_argument("--warmup", type=non_negative_int, default=10, help="untimed batches first")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs; the best is reported")
    p.add_argument("--cache", choices=("auto", "memory", "mmap", "none"), default="auto", help="dataset cache mode")
    p.add_argument("--device", choices=("none", "cpu", "cuda"), default="none",
                   help="also copy every batch to this device as train.py does (cuda: pinned memory, "
                        "non-blocking), so the rate is latents/s arriving on the GPU (default: none)")
    p.add_argument("--compare-checksums", action="store_true",
                   help="instead of the loader: time decoding the whole store and random batches with and without "
                        "the chunks' checksums (the same random data written twice), as set by --count --batch-size "
                        "--steps --repeats")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the rates as JSON here")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda requested but torch.cuda.is_available() is False")
    if args.compare_checksums:
        with tempfile.TemporaryDirectory() as tmp:
            out = compare_checksums(Path(tmp), args.count, args.batch_size, args.steps, args.repeats)
        if args.json:
            atomic_write_text(args.json, json.dumps({**out, "config": vars(args)}, indent=2) + "\n")
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if args.store is None:
            path = Path(tmp) / "bench.zarr"
            t0 = time.perf_counter()
            make_random_store(path, args.count)
            print(f"built {path} ({args.count} items, 4x32x32 moments) in {time.perf_counter() - t0:.1f}s")
        else:
            path = Path(args.store)
            if not path.exists():
                raise UserError(f"--store {path} does not exist")
        rates = []
        for r in range(args.repeats):
            rate = measure(path, args.batch_size, args.num_workers, args.steps, args.warmup, args.cache, args.device)
            rates.append(rate)
            print(f"run {r + 1}: {rate:,.0f} latents/s")
        print(f"best: {max(rates):,.0f} latents/s (batch {args.batch_size}, {args.num_workers} workers, "
              f"cache {args.cache}, device {args.device})")
    if args.json:
        atomic_write_text(args.json, json.dumps({"latents_per_s": rates, "best_latents_per_s": max(rates),
                                                 "config": vars(args)}, indent=2) + "\n")
    return rates


if __name__ == "__main__":
    run_main(main)
