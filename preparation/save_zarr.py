"""Convert the original release's latent layout into the zarr store of extract_features.py.

The original FCDM/DiT pipeline wrote one `.npy` per image: `--feature-path` holds the scaled latent
samples ((1, C, H, W), (C, H, W), or (2, C, H, W) with both orientations) and `--label-path` a
label `.npy` with the same file name. Files are taken in sorted name order. The result is a
"sample" store (docs/data.md) with 1 or 2 orientations, written shard by shard with the same
done markers as extraction, so an interrupted conversion resumes: a kill at any moment leaves
something the same command finishes (docs/data.md), and shards whose files went missing are converted
again. `--overwrite` replaces a store made with other settings; one with the same settings is resumed.
`--verify` reads every stored chunk back (its checksum) and converts the shards that fail again.

    python preparation/save_zarr.py --feature-path features/ --label-path labels/ --zarr-path out.zarr
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fcdm_common.cli import HelpFormatter, UserError, float_in, positive_int, run_main, str2bool
from fcdm_common.progress import progress as tqdm
from models.autoencoders import DEFAULT_SCALING_FACTOR, DEFAULT_VAE_ID
from preparation import checksums
from preparation import store as zstore
from preparation.checks import check_label_gaps, load_label_file, load_latent_file


def convert(feature_path, label_path, zarr_path, image_size: int | None = None, vae: str = DEFAULT_VAE_ID,
            scaling_factor: float = DEFAULT_SCALING_FACTOR, shard_size: int = zstore.DEFAULT_SHARD_SIZE,
            chunk_size: int = zstore.DEFAULT_CHUNK_SIZE, progress: bool = True, overwrite: bool = False,
            verify: bool = False) -> Path:
    """Write the store; returns its path. Raises UserError on bad input. `overwrite`: replace a store at
    `zarr_path` made with other settings (one with the same settings is resumed). `verify`: read every done shard
    back and convert those that fail (a damaged chunk) again."""
    feature_path, label_path, zarr_path = Path(feature_path), Path(label_path), Path(zarr_path)
    for folder, flag in ((feature_path, "--feature-path"), (label_path, "--label-path")):
        if not folder.is_dir():
            raise UserError(f"{flag} {folder} is not a folder")
    names = sorted(p.name for p in feature_path.iterdir() if p.suffix == ".npy")
    if not names:
        raise UserError(f"--feature-path {feature_path} holds no .npy files")
    label_names = sorted(p.name for p in label_path.iterdir() if p.suffix == ".npy")
    if len(label_names) != len(names):
        extra = sorted(set(label_names) - set(names))[:1] or sorted(set(names) - set(label_names))[:1]
        raise UserError(f"{len(names)} latent files in {feature_path} but {len(label_names)} label files in "
                        f"{label_path} (e.g. {extra[0] if extra else '?'} has no partner); "
                        "the two folders must hold the same file names")
    if shard_size % chunk_size:
        raise UserError(f"--chunk-size {chunk_size} must divide --shard-size {shard_size}")
    labels = np.array([load_label_file(label_path / name) for name in
                       tqdm(names, desc="reading labels", disable=not progress or len(names) < 10000)], np.int64)
    check_label_gaps(labels, names, f"--label-path {label_path}")
    first = load_latent_file(feature_path / names[0])
    orientations, latent_shape = first.shape[0], tuple(first.shape[1:])
    settings = zstore.make_settings(
        image_size=image_size if image_size is not None else latent_shape[-1] * 8, vae=vae,
        scaling_factor=scaling_factor, store="sample", count=len(names), latent_shape=latent_shape,
        orientations=orientations, class_names=None, shard_size=shard_size, chunk_size=chunk_size, seed=None)
    state = zstore.check_existing(zarr_path, settings, what="--zarr-path", overwrite=overwrite)
    # shards recorded as done whose files were deleted are converted again
    missing = zstore.shards_to_repair(zarr_path) if state in ("complete", "incomplete") else []
    damaged = []
    if verify and state in ("complete", "incomplete"):
        done = zstore.done_shards(zstore.open_store(zarr_path, "r"))
        damaged = checksums.verify_store(zarr_path, [k for k in range(len(done)) if done[k] and k not in missing],
                                         desc="verifying" if progress else None)
        print(f"{zarr_path}: every stored shard reads back intact" if not damaged else
              f"{zarr_path}: {zstore.describe_shards(damaged, len(names), shard_size)} fail to read back (damaged); "
              "converting them again")
    zstore.remove_leftovers(zarr_path)  # of killed runs: creation folders, zarr's .partial files
    if state == "complete" and not missing and not damaged:
        print(f"{zarr_path} is already complete ({len(names)} items); nothing to do"
              + ("" if verify else " (--verify checks that every stored chunk reads back intact)"))
        return zarr_path
    if state in ("absent", "replace"):
        zstore.create_store(zarr_path, settings, extra_attrs={"source": str(feature_path)})
        if state == "replace":
            print(f"--overwrite: deleted {zarr_path}, which was made with other settings, and created it anew")
    group = zstore.open_store(zarr_path)
    zstore.reset_shards(group, damaged)
    if missing:
        zstore.reset_shards(group, missing)
        print(f"{zarr_path}: the files of {zstore.describe_shards(missing, len(names), shard_size)} are missing; "
              "converting them again")
    done = zstore.done_shards(group)
    todo = [k for k in range(len(done)) if not done[k]]
    for k in tqdm(todo, desc="converting", unit="shard", disable=not progress):
        start, end = zstore.shard_range(k, len(names), shard_size)
        lat = np.empty((end - start, orientations, *latent_shape), np.float32)
        lab = np.empty(end - start, np.int64)
        for j, name in enumerate(names[start:end]):
            arr = load_latent_file(feature_path / name)
            if arr.shape != (orientations, *latent_shape):
                raise UserError(f"{feature_path / name} has shape {arr.shape} but {names[0]} has "
                                f"{(orientations, *latent_shape)}; all latents must share one shape")
            lat[j] = arr
            lab[j] = labels[start + j]
        zstore.write_shard(group, k, lat, lab)
    zstore.mark_complete(group)
    return zarr_path


def main(argv=None):
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                description="Convert per-image latent/label .npy folders (the original "
                                "release's layout) into one zarr latent store.")
    p.add_argument("--feature-path", required=True, help="folder of per-image latent .npy files (scaled samples)")
    p.add_argument("--label-path", required=True, help="folder of per-image label .npy files, same file names")
    p.add_argument("--zarr-path", required=True, help="output zarr store (rerun to resume an interrupted run)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="pixel size the latents came from (default: 8 x latent width)")
    p.add_argument("--vae", default=DEFAULT_VAE_ID, help=f"VAE id stored with the data (default {DEFAULT_VAE_ID})")
    p.add_argument("--vae-scaling-factor", type=float_in(0, lo_open=True), default=DEFAULT_SCALING_FACTOR,
                   help=f"scaling factor the latents were multiplied by (default {DEFAULT_SCALING_FACTOR})")
    p.add_argument("--shard-size", type=positive_int, default=zstore.DEFAULT_SHARD_SIZE, help="images per shard")
    p.add_argument("--chunk-size", type=positive_int, default=zstore.DEFAULT_CHUNK_SIZE,
                   help="images per compressed chunk (divides --shard-size)")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="replace a store at --zarr-path that was made with other settings (e.g. after files were "
                        "added or removed); a store with the same settings is resumed as usual")
    p.add_argument("--verify", type=str2bool, nargs="?", const=True, default=False,
                   help="read back every stored shard (each chunk's checksum) and convert the damaged ones again; "
                        "the fix for a store that training reports as damaged")
    args = p.parse_args(argv)
    out = convert(args.feature_path, args.label_path, args.zarr_path, args.image_size, args.vae,
                  args.vae_scaling_factor, args.shard_size, args.chunk_size, overwrite=args.overwrite,
                  verify=args.verify)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
