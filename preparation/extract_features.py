"""Encode an ImageFolder into VAE latents: one resumable zarr store, one or many processes.

    torchrun --nproc_per_node=N preparation/extract_features.py --data-path IMAGEFOLDER --zarr-path OUT
    python preparation/extract_features.py --data-path IMAGEFOLDER --zarr-path OUT   # one process / CPU

Preprocessing follows ADM/DiT: center crop to --image-size (fcdm_common.images.center_crop_arr),
pixels to [-1, 1]. Every image is encoded twice, as is and horizontally flipped, so training flips
by choosing the stored orientation. `--store moments` keeps the posterior mean and std (float16) and
training draws a fresh latent each step; `--store sample` keeps one draw z = (mean + std * eps -
shift_factor) * scaling_factor per image and orientation, the DiT/FCDM paper pipeline, with eps seeded
by (--seed, shard) so the store does not depend on the number of processes. Any autoencoder of
models/autoencoders.py works (class, channels, downsampling, scale and shift from its config);
deterministic encoders (AutoencoderDC) store `sample`. Per-channel statistics of z are recorded with
each shard and combined when the store completes (preparation/statistics.py).

With --repa-image-size S the store also keeps, per item, the clean image the latents come from (the same
center crop, resized to SxS with PIL's bicubic filter, uint8, original orientation only) for
representation alignment during training. Rerunning the command that made a store without images, plus
--repa-image-size S, adds them: shards whose latents are done are only read and resized, not encoded
again, and the latents stay as they are (the store remains usable for training without images meanwhile).
A store that has images keeps getting them on a rerun without the flag.

Work is split into shards of --shard-size images (= zarr shard files); shard k goes to rank
k % world_size, so no two processes write one file. Finished shards are recorded in the store and
skipped when the same command is rerun after an interruption; the result equals an uninterrupted
run. A kill at any moment, store creation included, leaves something the rerun finishes (the store is
created under a temporary name and renamed into place; rank 0 removes what killed runs left, see
preparation/store.py), and shards recorded as done whose files have gone missing are encoded again.
Every chunk carries a checksum that every read verifies; `--verify` reads the whole store back and encodes
the shards that fail again (bit rot: training names them and this flag). Layout: docs/data.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image

from fcdm_common.cli import (
    HelpFormatter,
    UserError,
    alias_help,
    float_in,
    non_negative_int,
    positive_int,
    run_main,
    seed_int,
    str2bool,
)
from fcdm_common.distributed import all_gather_object, barrier, cleanup, init_distributed
from fcdm_common.images import center_crop_arr, pil_to_tensor, to_rgb8
from fcdm_common.progress import progress
from models.autoencoders import DEFAULT_HF_MODEL, SUPPORTED_CLASSES, describe, load_autoencoder, vae_id
from preparation import checksums
from preparation import store as zstore
from preparation.statistics import stats_from_info

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's list


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (path, label) pairs in torchvision ImageFolder order (sorted classes, sorted walk).

    Unlike ImageFolder, a visible file without an image extension is an error instead of being
    skipped silently (hidden files such as .DS_Store are ignored).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data-path {root} does not exist or is not a folder; point it at an ImageFolder "
                        "(one sub-folder of images per class)")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise UserError(f"--data-path {root} has no class sub-folders; an ImageFolder needs one folder per class")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        n_before = len(samples)
        for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
            for fname in sorted(fnames):
                path = os.path.join(dirpath, fname)
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((path, label))
                elif not fname.startswith("."):
                    raise UserError(f"{path} is not an image (allowed: {', '.join(IMG_EXTENSIONS)}); "
                                    "move it out of --data-path")
        if len(samples) == n_before:
            raise UserError(f"class folder {root / name} holds no images; remove it or add images")
    return classes, samples


def repa_image_size(value: str) -> int:
    """argparse `type=` of --repa-image-size: 0 (no images) or a side of at least MIN_IMAGES_SIZE pixels."""
    expected = f"expected 0 (no images) or an integer >= {zstore.MIN_IMAGES_SIZE}, got {value!r}"
    try:
        v = non_negative_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(expected) from None
    if 0 < v < zstore.MIN_IMAGES_SIZE:
        raise argparse.ArgumentTypeError(expected)
    return v


def small_image(crop: Image.Image, size: int) -> np.ndarray:
    """The stored image of a center crop: resized to size x size with PIL's bicubic filter (not resized when
    it already has that size), uint8 (3, size, size)."""
    if crop.size != (size, size):
        crop = crop.resize((size, size), resample=Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(crop.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))


class CroppedImages(torch.utils.data.Dataset):
    """Item i -> (image (3, S, S) in [-1, 1], label, error text or "", stored image (3, s, s) uint8 or None).

    The stored image (for representation alignment) is made only when `images_size` > 0, from the same crop."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, images_size: int = 0):
        self.samples = samples  # (path, label) pairs
        self.image_size = image_size  # output side length in pixels
        self.images_size = images_size  # side of the stored images; 0: none

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = to_rgb8(img)  # 16-bit images scaled to 8 bits, not saturated
            crop = center_crop_arr(img, self.image_size)
            small = small_image(crop, self.images_size) if self.images_size else None
            return pil_to_tensor(crop), label, "", small
        except Exception as e:  # unreadable file: reported by the main process as one line
            size = self.image_size
            return (torch.zeros(3, size, size), label, f"{path} cannot be read as an image ({type(e).__name__}: {e})",
                    None)


def _collate(items):
    images = torch.stack([it[0] for it in items])  # (B, 3, S, S)
    labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
    errors = [it[2] for it in items if it[2]]
    small = None if errors or items[0][3] is None else np.stack([it[3] for it in items])  # (B, 3, s, s) uint8
    return images, labels, errors, small


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                description="Encode an ImageFolder into a zarr store of VAE latents "
                                "(both orientations), resumable, one or many processes (torchrun).")
    p.add_argument("--data-path", required=True, help="ImageFolder root: one sub-folder of images per class")
    p.add_argument("--zarr-path", "--features-path", dest="zarr_path", required=True,
                   help=alias_help("output zarr store (a folder); rerun to resume", "--features-path"))
    p.add_argument("--image-size", type=positive_int, default=256,
                   help="center-crop side in pixels (multiple of the VAE downsampling, 8); default 256")
    p.add_argument("--vae", choices=("sd", "none"), default="sd",
                   help=f"'sd': a diffusers autoencoder ({', '.join(SUPPORTED_CLASSES)}; class from the snapshot's "
                        "config); 'none': pixel space (identity, used by the demo)")
    p.add_argument("--vae-class", choices=tuple(SUPPORTED_CLASSES), default=None,
                   help="diffusers class of the VAE (default: the config's _class_name)")
    p.add_argument("--vae-shift-factor", type=float_in(), default=None,
                   help="latent shift: z = (latent - shift) * scale (default: the config's shift_factor, else 0)")
    p.add_argument("--vae-latent-channels", type=positive_int, default=None,
                   help="latent channels (default: the config's latent_channels)")
    p.add_argument("--vae-downsample", type=positive_int, default=None,
                   help="spatial downsampling of the VAE (default: from the config's encoder blocks)")
    p.add_argument("--hf-model-name", default=DEFAULT_HF_MODEL,
                   help=f"Hugging Face repo of the VAE when --hf-model-dir is not given: taken from the local hub "
                        f"cache, else downloaded (default {DEFAULT_HF_MODEL})")
    p.add_argument("--hf-model-dir", default=None,
                   help="local VAE snapshot folder (loaded with local_files_only; see download_snapshot.py)")
    p.add_argument("--vae-scaling-factor", type=float_in(0, lo_open=True), default=None,
                   help="latent scaling factor stored with the data (default: the config's scaling_factor; "
                        "0.18215 for SD-VAE)")
    p.add_argument("--vae-dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="VAE compute precision (default fp32, as the paper)")
    p.add_argument("--store", choices=("moments", "sample"),
                   default=None, help="'moments': posterior mean and std (float16), a fresh sample each "
                   "training step; 'sample': one scaled sample per image and orientation (the paper). Default: "
                   "moments, and always sample for deterministic encoders (AutoencoderDC)")
    p.add_argument("--per-proc-batch-size", "--batch-size", dest="per_proc_batch_size", type=positive_int, default=32,
                   help=alias_help("images per process per batch", "--batch-size"))
    p.add_argument("--num-workers", type=non_negative_int, default=4, help="DataLoader workers per process")
    p.add_argument("--shard-size", type=positive_int, default=zstore.DEFAULT_SHARD_SIZE,
                   help="images per zarr shard = per work unit (default 1024); part of the store settings")
    p.add_argument("--chunk-size", type=positive_int, default=zstore.DEFAULT_CHUNK_SIZE,
                   help="images per compressed chunk inside a shard (divides --shard-size; default 64)")
    p.add_argument("--repa-image-size", type=repa_image_size, default=0,
                   help="also store each image (the same center crop, resized to SxS with PIL bicubic, uint8) for "
                        "representation alignment: 224 for DINOv2 at 256x256 images, 448 at 512x512; rerun a "
                        "finished store's command with it to add the images without re-encoding the latents. "
                        "Default 0: no images")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the posterior samples in --store sample")
    p.add_argument("--overwrite", type=str2bool, nargs="?", const=True, default=False,
                   help="replace a store at --zarr-path that was made with other settings (e.g. after images "
                        "were added or removed); a store with the same settings is resumed as usual")
    p.add_argument("--verify", type=str2bool, nargs="?", const=True, default=False,
                   help="read back every stored shard (each chunk's checksum) and encode the damaged ones again; "
                        "the fix for a store that training reports as damaged. Reads the whole store once")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--debug-stop-after-shards", type=non_negative_int, default=None, help=argparse.SUPPRESS)
    return p


def _plan_batches(shards: list[int], count: int, shard_size: int, batch_size: int):
    """Batches (lists of indices) that never cross a shard boundary, and the shard of each batch."""
    batches, owner = [], []
    for k in shards:
        start, end = zstore.shard_range(k, count, shard_size)
        for b in range(start, end, batch_size):
            batches.append(list(range(b, min(end, b + batch_size))))
            owner.append(k)
    return batches, owner


def _shard_len(k: int, count: int, shard_size: int) -> int:
    start, end = zstore.shard_range(k, count, shard_size)
    return end - start


def worker_count(requested: int, say) -> int:
    """--num-workers, at most the CPUs this process may use (more only makes torch warn and contend)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cpus:
        say(f"--num-workers {requested} is more than the {cpus} CPU(s) this process may use; using {cpus}")
        return cpus
    return requested


def _finished_shards(group, images: bool) -> np.ndarray:
    """Shards with nothing left to do: latents done, and images done when the store has an image layer."""
    done = zstore.done_shards(group)
    return done & zstore.done_shards(group, zstore.IMAGES) if images else done


def _add_finished(bar, group, shards: list, shown: int, count: int, shard_size: int, images: bool = False) -> int:
    """Advance `bar` by the images of `shards` finished since `shown` were counted; the new count."""
    done = _finished_shards(group, images)
    n = sum(_shard_len(k, count, shard_size) for k in shards if done[k])
    bar.update(int(n) - shown)
    return int(n)


def _shard_values(mean: np.ndarray, std: np.ndarray, mode: str, scaling_factor: float, seed: int, k: int,
                  shift_factor: float = 0.0):
    """Values stored for shard k from float32 mean/std (n, 2, C, H, W): raw moments, or
    z = (mean + std * eps - shift) * scale."""
    if mode == "moments":
        return np.stack([mean, std], axis=2)  # (n, O, 2, C, H, W)
    rng = np.random.default_rng(np.random.SeedSequence([seed, k, 0xE7C]))
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    latent = mean + std * eps
    if shift_factor:
        latent = latent - np.float32(shift_factor)
    return (latent * np.float32(scaling_factor)).astype(np.float32)  # (n, O, C, H, W)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.shard_size % args.chunk_size != 0:
        raise UserError(f"--chunk-size {args.chunk_size} must divide --shard-size {args.shard_size}")
    dist_info = init_distributed(args.device)
    rank, world = dist_info.rank, dist_info.world_size
    device = dist_info.device
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        _run(args, rank, world, device, say)
    finally:
        cleanup()


def zstore_has_stats(path) -> bool:
    return stats_from_info(dict(zarr.open_group(str(path), mode="r").attrs)) is not None


@dataclass
class Work:
    """What this command has to do to the store at --zarr-path (every rank computes the same)."""
    state: str  # of zstore.check_existing: absent, incomplete, complete, replace
    images_size: int  # side of the stored images; 0: none
    add_images: bool  # give an existing store an image layer
    images_left: bool  # the store's image layer is not complete yet
    missing: list = field(default_factory=list)  # done shards whose latents or labels file is gone
    missing_images: list = field(default_factory=list)  # done shards whose images file is gone
    damaged: list = field(default_factory=list)  # done shards whose latents or labels fail to decode (--verify)
    damaged_images: list = field(default_factory=list)  # done shards whose images fail to decode (--verify)

    @property
    def nothing_to_do(self) -> bool:
        return self.state == "complete" and not (self.missing or self.missing_images or self.damaged
                                                 or self.damaged_images or self.add_images or self.images_left)


def _run(args, rank, world, device, say):
    """The steps of an extraction: scan the images, load the autoencoder, decide what is left to do (with
    --verify: check every stored chunk), prepare the store (rank 0), encode this rank's shards, finish."""
    classes, samples = scan_image_folder(args.data_path)
    count = len(samples)
    say(f"{args.data_path}: {count} images in {len(classes)} classes; {world} process(es) on {device}")
    vae, props = _load_vae(args, device, say)
    settings = _store_settings(args, vae, props, classes, count, say)
    work = _plan_work(args, settings, rank, world, say)
    if work.nothing_to_do:
        if rank == 0:
            zstore.remove_leftovers(args.zarr_path)  # the other ranks only return
        _say_complete(args.zarr_path, count, work.images_size, args.verify, rank, say)
        return
    barrier()
    if rank == 0:  # the only writer until the next barrier
        _prepare_store(args, settings, props, work, say)
    barrier()
    group = zstore.open_store(args.zarr_path)
    encoded, seconds = _encode_shards(args, group, settings, work.images_size, vae, samples, rank, world, say)
    if encoded is None:
        return  # --debug-stop-after-shards
    barrier()
    if rank == 0:
        _finish(args, group, settings, work.images_size, encoded / max(seconds, 1e-9), say)


def _load_vae(args, device, say):
    """The autoencoder (class, channels, downsampling, scale and shift from the snapshot's config; flags
    override) and its properties; settles --store for deterministic encoders."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.vae_dtype]
    vae = load_autoencoder(args.vae, args.hf_model_name, args.hf_model_dir, vae_class=args.vae_class,
                           latent_channels=args.vae_latent_channels, downsample=args.vae_downsample,
                           scaling_factor=args.vae_scaling_factor, shift_factor=args.vae_shift_factor,
                           device=device, dtype=dtype)
    props = describe(vae)
    if args.image_size % props["downsample"]:
        raise UserError(f"--image-size {args.image_size} must be a multiple of the VAE downsampling "
                        f"{props['downsample']}")
    if args.store is None or (vae.deterministic and args.store == "moments"):
        if vae.deterministic and args.store == "moments":
            say(f"the {vae.vae_class} encoder is deterministic (no posterior std): storing one latent per image "
                "(--store sample)")
        args.store = "sample" if vae.deterministic else "moments"
    name = vae_id(args.vae, args.hf_model_name, args.hf_model_dir)
    say(f"VAE {name} ({props['vae_class']}): {props['latent_channels']} latent channels, {props['downsample']}x "
        f"downsampling, z = (latent - {props['shift_factor']:g}) * {props['scaling_factor']:g}")
    return vae, props


def _store_settings(args, vae, props, classes, count: int, say) -> dict:
    """The settings that identify the store (compared when it is reopened)."""
    down = props["downsample"]
    latent_shape = (props["latent_channels"], args.image_size // down, args.image_size // down)
    return zstore.make_settings(
        image_size=args.image_size, vae=vae_id(args.vae, args.hf_model_name, args.hf_model_dir),
        scaling_factor=props["scaling_factor"], store=args.store, count=count, latent_shape=latent_shape,
        orientations=2, class_names=classes, shard_size=args.shard_size, chunk_size=args.chunk_size,
        seed=args.seed if args.store == "sample" else None, vae_class=props["vae_class"],
        shift_factor=props["shift_factor"])


def _plan_work(args, settings: dict, rank: int, world: int, say) -> Work:
    """What is left: the store's state, its image layer, shards whose files are missing and (--verify) shards
    that fail to decode. Every rank decides alike (the --verify scan is split over the ranks and gathered)."""
    path = args.zarr_path
    state = zstore.check_existing(path, settings, overwrite=args.overwrite)
    stored = stored_images(path) if state in ("complete", "incomplete") else None  # (size, complete) or None
    if args.repa_image_size and stored is not None and stored[0] != args.repa_image_size:
        if not args.overwrite:
            raise UserError(f"the store {path} holds images of {stored[0]}x{stored[0]} pixels but this run asks for "
                            f"--repa-image-size {args.repa_image_size}; choose a new --zarr-path for images of "
                            f"{args.repa_image_size}x{args.repa_image_size}, or rerun with --overwrite to delete the "
                            f"store and encode everything (latents included) again")
        state, stored = "replace", None
    images_size = args.repa_image_size or (stored[0] if stored else 0)  # a store with images keeps getting them
    existing = state in ("complete", "incomplete")
    work = Work(state, images_size, add_images=bool(images_size) and existing and stored is None,
                images_left=bool(stored) and not stored[1])
    if existing:  # shards whose files were deleted are redone
        work.missing = zstore.shards_to_repair(path)
        work.missing_images = zstore.shards_to_repair(path, zstore.IMAGES) if stored else []
    if args.verify and existing:
        work.damaged, work.damaged_images = _verify(path, work, rank, world, say)
    return work


def _verify(path, work: Work, rank: int, world: int, say) -> tuple[list, list]:
    """--verify: the done shards (of the latents, and of the images when the store has them) that fail to decode,
    each rank decoding every world-th shard; the union, on every rank."""
    group = zstore.open_store(path, "r")
    note = checksums.no_checksums_note(path, group)
    if note:
        say(f"note: {note}; --verify can only find chunks that no longer decode")
    layers = [(zstore.LATENTS, work.missing)]
    if zstore.images_size_of(group) is not None:
        layers.append((zstore.IMAGES, work.missing_images))
    found = []
    for layer, missing in layers:
        done = zstore.done_shards(group, layer)
        mine = [k for k in range(rank, len(done), world) if done[k] and k not in missing]
        local = checksums.damaged_shards(group, mine, layer, desc=f"verifying {layer.what}" if rank == 0 else None)
        found.append(sorted(k for part in all_gather_object(local) for k in part))
    if not any(found):
        say(f"{path}: every stored shard reads back intact")
    return found[0], (found[1] if len(found) > 1 else [])


def _say_complete(path, count: int, images_size: int, verified: bool, rank: int, say) -> None:
    with_images = f", with their {images_size}x{images_size} images" if images_size else ""
    say(f"{path} is already complete ({count} images{with_images}); nothing to do"
        + ("" if verified else " (--verify checks that every stored chunk reads back intact)"))
    if rank == 0 and not zstore_has_stats(path):
        say(f"it has no per-channel latent statistics; add them with 'python preparation/latent_stats.py {path}'")


def _prepare_store(args, settings: dict, props: dict, work: Work, say) -> None:
    """Rank 0, alone: remove what killed runs left, create (or replace) the store, add the image layer, and mark
    the shards to redo (missing files, damaged chunks) not done."""
    path, count = args.zarr_path, settings["count"]
    zstore.remove_leftovers(path)  # of killed runs: creation folders, zarr's .partial files
    if work.state in ("absent", "replace"):
        zstore.create_store(path, settings, extra_attrs={
            "source": str(Path(args.data_path)), "downsample": props["downsample"],
            "latent_channels": props["latent_channels"],
            "hf_model_name": None if args.vae == "none" or args.hf_model_dir else args.hf_model_name,
            "hf_model_dir": (None if args.vae == "none" or not args.hf_model_dir
                             else str(Path(args.hf_model_dir).resolve()))}, images_size=work.images_size)
        say(f"--overwrite: deleted {path}, which was made with other settings, and created it anew"
            if work.state == "replace" else f"created {path}")
    if work.add_images:
        zstore.add_image_layer(zstore.open_store(path), work.images_size)
        say(f"{path}: adding {work.images_size}x{work.images_size} images; the latents are kept as they are")
    redo = (("the files of {} are missing; encoding them again", work.missing, zstore.LATENTS),
            ("the images files of {} are missing; storing them again", work.missing_images, zstore.IMAGES),
            ("the latents or labels of {} fail to read back (damaged); encoding them again", work.damaged,
             zstore.LATENTS),
            ("the images of {} fail to read back (damaged); storing them again", work.damaged_images, zstore.IMAGES))
    for text, shards, layer in redo:
        if shards:
            zstore.reset_shards(zstore.open_store(path), shards, layer)
            say(f"{path}: " + text.format(zstore.describe_shards(shards, count, args.shard_size)))


def _encode_shards(args, group, settings: dict, images_size: int, vae, samples, rank: int, world: int, say):
    """Encode (and/or store the images of) this rank's unfinished shards, shard k on rank k % world; returns
    (images encoded here, seconds), or (None, 0) after --debug-stop-after-shards."""
    count, shard_size, latent_shape = settings["count"], args.shard_size, tuple(settings["latent_shape"])
    done = zstore.done_shards(group)
    images_done = zstore.done_shards(group, zstore.IMAGES) if images_size else np.ones_like(done)
    finished = done & images_done
    n_shards = len(done)
    mine = [k for k in range(rank, n_shards, world) if not finished[k]]
    only_images = sum(1 for k in mine if done[k])  # their latents are done: read and resized, not encoded
    say(f"{int(finished.sum())}/{n_shards} shards already done; {len(mine)} to encode on rank 0"
        + (f" ({only_images} of them images only: their latents are done)" if only_images else ""))

    batches, owner = _plan_batches(mine, count, shard_size, args.per_proc_batch_size)
    loader = torch.utils.data.DataLoader(
        CroppedImages(samples, args.image_size, images_size), batch_sampler=batches,
        num_workers=worker_count(args.num_workers, say), collate_fn=_collate, pin_memory=vae.device.type == "cuda")

    total = sum(len(b) for b in batches)
    others = [k for k in range(n_shards) if not finished[k] and k % world != rank]  # shown in rank 0's bar too
    bar = progress(total=total + sum(_shard_len(k, count, shard_size) for k in others),
                   unit="img", desc=f"encoding (all {world} procs)", disable=rank != 0, dynamic_ncols=True)
    others_shown, polled = 0, time.time()
    buf: dict = {}
    written = 0
    t0 = time.time()
    for (images, labels, errors, small), k in zip(loader, owner):
        if errors:
            bar.close()
            print(file=sys.stderr)  # end the progress-bar line so the error stands on its own line
            raise UserError(errors[0] + "; replace or remove the file and rerun")
        start, end = zstore.shard_range(k, count, shard_size)
        if buf.get("k") != k:
            n = end - start
            # what shard k needs: its latents (not done yet) and/or its images (layer present, not done yet)
            buf = {"k": k, "filled": 0, "latents": not done[k], "images": bool(images_size) and not images_done[k]}
            if buf["latents"]:
                buf.update(mean=np.empty((n, 2, *latent_shape), np.float32),
                           std=np.empty((n, 2, *latent_shape), np.float32), labels=np.empty(n, np.int64))
            if buf["images"]:
                buf["small"] = np.empty((n, 3, images_size, images_size), np.uint8)
        b = images.shape[0]
        rows = slice(buf["filled"], buf["filled"] + b)
        if buf["latents"]:
            _encode_batch(vae, images, labels, buf, rows)
        if buf["images"]:
            buf["small"][rows] = small
        buf["filled"] += b
        bar.update(b)
        if others and rank == 0 and time.time() - polled > 2:  # other ranks' finished shards, from the store
            polled = time.time()
            others_shown = _add_finished(bar, group, others, others_shown, count, shard_size, bool(images_size))
        if buf["filled"] == end - start:
            if buf["latents"]:
                values = _shard_values(buf["mean"], buf["std"], args.store, settings["scaling_factor"], args.seed, k,
                                       settings["shift_factor"])
                zstore.write_shard(group, k, values, buf["labels"])
            if buf["images"]:
                zstore.write_image_shard(group, k, buf["small"])
            written += 1
            buf = {}
            if args.debug_stop_after_shards is not None and written >= args.debug_stop_after_shards:
                bar.close()
                print(f"rank {rank}: stopping after {written} shard(s) (debug); rerun to resume", flush=True)
                return None, 0.0
    bar.close()
    return total, time.time() - t0


def _encode_batch(vae, images: torch.Tensor, labels: torch.Tensor, buf: dict, rows: slice) -> None:
    """Posterior moments of a batch in both orientations into the shard buffer `buf` at `rows`."""
    b = images.shape[0]
    images = images.to(vae.device, non_blocking=True)
    both = torch.cat([images, images.flip(-1)])  # (2B, 3, S, S): original, then flipped
    mean, std = vae.encode_moments(both)  # each (2B, C, h, w), unscaled
    buf["mean"][rows] = torch.stack([mean[:b], mean[b:]], 1).cpu().numpy()  # (B, 2, C, h, w)
    buf["std"][rows] = torch.stack([std[:b], std[b:]], 1).cpu().numpy()
    buf["labels"][rows] = labels.numpy()


def _finish(args, group, settings: dict, images_size: int, rate: float, say) -> None:
    """Rank 0 after every rank's shards: mark the image layer and the store complete once every shard is done."""
    path = args.zarr_path
    if images_size and zstore.done_shards(group, zstore.IMAGES).all() and not group.attrs.get("images_complete"):
        zstore.mark_images_complete(group)
    if not zstore.done_shards(group).all():
        say(f"{path} is not complete yet; rerun the same command to resume")
        return
    if not group.attrs.get("complete"):  # (a store completed before only gained images)
        zstore.mark_complete(group)
    with_images = f", images {images_size}x{images_size}" if images_size else ""
    say(f"done: {path} holds {settings['count']} images x 2 orientations, latents {tuple(settings['latent_shape'])}, "
        f"store={args.store}{with_images} ({rate:.1f} img/s on rank 0)")


def stored_images(path) -> tuple[int, bool] | None:
    """(side, complete) of the image layer of the store at `path`, None when it has none."""
    group = zstore.open_store(path, "r")
    size = zstore.images_size_of(group)
    return None if size is None else (size, bool(group.attrs.get("images_complete")))


if __name__ == "__main__":
    run_main(main, resume_from="the finished shards")  # what the rerun keeps when another process died
