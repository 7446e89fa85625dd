"""Readers of the training data: precomputed VAE latents read in whole batches.

Two on-disk layouts are supported (docs/data.md describes both):

* the zarr v3 store written by preparation/extract_features.py (or save_zarr.py): one group with
  `latents` (both horizontal orientations of every image), `labels` (int64) and attributes;
* the original release's layout: a folder of per-image latent `.npy` files (`--feature-path`) and
  a folder of per-image label `.npy` files with the same names (`--label-path`).

In "moments" stores each item is the posterior N(mean, std^2) of the autoencoder (Kingma &
Welling, 2014), so every step draws a fresh latent z = (mean + std * eps) * scaling_factor, eps ~
N(0, I), as latent diffusion does with `latent_dist.sample()`; "sample" stores hold one such
scaled draw per image and orientation, the DiT/FCDM paper pipeline. Horizontal flips (the only
augmentation of DiT and the paper) pick the stored flipped orientation instead of flipping the
latent, which is not equivariant. Which items, orientations and noise seeds a step reads is decided
by the training loader (train_gen/loader.py).

For representation alignment a zarr store may also hold the clean images the latents were encoded from
(`--repa-image-size` of extract_features.py; docs/data.md): with `images=True`, `get_batch` returns them too,
mirrored where the batch uses the flipped orientation, so the image matches its latent.
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
import zarr

from fcdm_common.cli import UserError
from fcdm_common.io import fault_point
from fcdm_common.progress import progress as tqdm
from preparation.checks import check_label_gaps, damaged_store, load_label_file, load_latent_file
from preparation.checksums import locate_damage, no_checksums_note
from preparation.store import IMAGES, LATENTS, STORE_FORMAT, check_shard_files

try:  # zarr's event-loop runner (not public API): many chunks fetched concurrently in one call
    from zarr.core.sync import sync as zarr_sync
except ImportError:  # another zarr version: the plain (slower) selection in _read_image_rows
    zarr_sync = None

_GRAIN = 32768  # elements per op slice (torch's at::internal::GRAIN_SIZE)
IMAGES_MEMORY_FRACTION = 0.1  # images are kept in RAM only below this share of the available memory
ADD_IMAGES = ("rerun preparation/extract_features.py with the arguments that made the store plus --repa-image-size S "
              "(224 for DINOv2 at 256x256 images, 448 at 512x512): it adds the images to the store without "
              "re-encoding the latents")


def _available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _num_classes(labels: np.ndarray, class_names, source: str) -> int:
    """Number of classes from class_names (preferred) or max label + 1; labels are validated."""
    if labels.size == 0:
        raise UserError(f"{source} holds no items; extract features first")
    lo, hi = int(labels.min()), int(labels.max())
    n = len(class_names) if class_names else hi + 1
    if lo < 0 or hi >= n:
        raise UserError(f"{source}: labels must lie in [0, {n - 1}] but range over [{lo}, {hi}]; "
                        "the labels do not match the class list - re-extract the data")
    return n


def remove_stale_cache_temps(store: Path, held: Path | None = None) -> list[Path]:
    """Delete the half-written mmap caches (`.<store>.cache-<id>.npy.<pid>.tmp`, each as big as the data set)
    that killed processes left beside `store`; returns them.

    A cache is written only by the process holding the flock of its `<cache>.lock`, and the kernel drops that
    lock when the process dies. The caller holds the lock of the cache `held`, so a temp of it is stale; the
    lock of any other is tried without waiting, and a temp whose lock is taken by a live writer (a training
    run of the same store on this node) is kept. Process ids are not used: ranks on other nodes of a shared
    file system, and a restarted container, reuse them."""
    pattern = re.compile(rf"^\.(?P<cache>{re.escape(store.name)}\.cache-[0-9a-f]+\.npy)\.\d+\.tmp$")
    removed = []
    for p in sorted(store.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or not p.is_file():
            continue
        if held is not None and m.group("cache") == held.name:
            p.unlink(missing_ok=True)
            removed.append(p)
            continue
        with open(store.parent / f"{m.group('cache')}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            p.unlink(missing_ok=True)
            removed.append(p)
            fcntl.flock(lock, fcntl.LOCK_UN)
    return removed


class ZarrLatentDataset:
    """Reader of a complete latent store; `get_batch` reads one batch with one selection.

    images=True also returns each item's clean image (the store's image layer, which must be complete and have
    every shard file). Where they are read from: RAM when the latents' cache resolved to "memory" (by choice or
    by "auto") and the images of all local processes (size x LOCAL_WORLD_SIZE) take less than 10% of the memory
    available after the latents were loaded; otherwise one zarr call per batch, which reads the batch's images
    concurrently and decompresses one chunk per image (each image is its own chunk). They are never copied to
    an mmap cache: at ImageNet scale they are hundreds of GB (docs/data.md)."""

    def __init__(self, path: str | os.PathLike, cache: str = "auto", hflip: bool = True, images: bool = False):
        self.path = Path(path)  # store folder
        if cache not in ("auto", "memory", "mmap", "none"):
            raise UserError(f"cache must be auto, memory, mmap or none, got {cache!r}")
        # "memory": decompress once into RAM; "mmap": decompress once into a raw .npy beside the
        # store, memory-mapped (the page cache is shared by all ranks of a node); "none": one zarr
        # selection per batch (slow for random access); "auto": memory when it fits, else mmap.
        self.cache = cache
        if not (self.path / "zarr.json").is_file():
            raise UserError(f"{self.path} is not a zarr latent store (no zarr.json); "
                            "create one with preparation/extract_features.py or preparation/save_zarr.py")
        try:
            group = zarr.open_group(str(self.path), mode="r")
        except Exception as e:  # zarr raises many kinds for a broken store
            raise UserError(f"cannot open zarr store {self.path}: {e}") from None
        info = dict(group.attrs)
        if info.get("format") != STORE_FORMAT:
            raise UserError(f"{self.path} is not an FCDM latent store (attribute format={info.get('format')!r})")
        if not info.get("complete", False):
            raise UserError(f"{self.path} is incomplete (extraction was interrupted); rerun the same "
                            "preparation/extract_features.py command to finish it")
        self.info = info  # the store attributes
        self.mode = info["store"]  # "moments" or "sample"
        self.scaling_factor = float(info["scaling_factor"])
        self.shift_factor = float(info.get("shift_factor") or 0.0)  # z = (latent - shift) * scale
        self.orientations = int(info.get("orientations", 2))  # stored orientations
        self.hflip = bool(hflip)  # False: always the original orientation (data whose mirror is invalid)
        self.latent_shape = tuple(int(v) for v in info["latent_shape"])  # (C, H, W)
        count = int(info["count"])
        with damaged_store(self.path, self._damage()):
            latents = group["latents"]
            check_shard_files(self.path, group)  # zarr reads a missing or empty shard file as zeros
            labels = np.asarray(group["labels"][:], dtype=np.int64)
        if latents.shape[0] != count or labels.shape[0] != count:
            raise UserError(f"{self.path}: {latents.shape[0]} latents and {labels.shape[0]} labels but "
                            f"count={count}; the store is damaged - re-extract it")
        self.labels = labels  # (N,) int64
        # one line for the programs to show: a store made before checksums (reads cannot find bit rot)
        self.checksum_note = no_checksums_note(self.path, group)
        self.num_classes = _num_classes(labels, info.get("class_names"), str(self.path))
        self.nbytes = int(np.prod(latents.shape)) * latents.dtype.itemsize
        self._memory: np.ndarray | None = None
        self._array = None
        self._array_pid = None
        size = info.get("images_size")
        self.images_size = int(size) if size else None  # side of the stored images; None: the store has none
        self.return_images = bool(images)  # get_batch returns (x, y, images)
        self.images_nbytes = 0  # size of the decompressed images (when returned)
        self._images_memory: np.ndarray | None = None
        self._images = None
        self._images_pid = None
        if self.return_images:
            self._check_images(group, count)

    def _check_images(self, group, count: int) -> None:
        """UserError unless the store holds a complete image layer with every shard file."""
        if self.images_size is None:
            raise UserError(f"representation alignment needs the images of the store {self.path}, which has none; "
                            f"{ADD_IMAGES}")
        if not self.info.get("images_complete", False):
            raise UserError(f"the images of the store {self.path} are incomplete (their extraction was interrupted); "
                            f"rerun the same preparation/extract_features.py command (with --repa-image-size "
                            f"{self.images_size}) to finish them")
        with damaged_store(self.path, self._damage(layer=IMAGES)):
            images = group["images"]
            check_shard_files(self.path, group, IMAGES)  # zarr reads a missing or empty shard file as black
        want = (count, 3, self.images_size, self.images_size)
        if tuple(images.shape) != want or images.dtype != np.uint8:
            raise UserError(f"{self.path}: the images array is {images.dtype} {tuple(images.shape)}, not uint8 "
                            f"{want}; the store is damaged - re-extract it")
        self.images_nbytes = int(np.prod(want))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _damage(self, items: np.ndarray | None = None, layer=LATENTS):
        """`locate` of `damaged_store`: after a failed read, the message naming the damaged shards of `layer` among
        those holding `items` (default: every shard)."""
        shards = None
        if items is not None:
            shards = sorted({int(i) // int(self.info["shard_size"]) for i in np.asarray(items).reshape(-1)})
        return locate_damage(self.path, shards, layer)

    def prepare(self, local_world_size: int | None = None) -> None:
        """Load the latents into RAM when cache is "memory" (or "auto" and they fit); reads are
        then a numpy gather. Otherwise every batch is one zarr selection. The images (images=True) join
        them in RAM when the cache is "memory" and they are small (class docstring)."""
        if self._memory is not None or self.cache == "none":
            return
        mode = self.cache
        local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if mode == "auto":
            mode = "memory" if self.nbytes * local <= 0.6 * _available_memory_bytes() else "mmap"
        with damaged_store(self.path, self._damage()):
            if mode == "memory":
                self._memory = np.asarray(self._zarr_array()[:])
            else:
                self._memory = self._mmap_cache()
        if (self.return_images and mode == "memory"
                and self.images_nbytes * local < IMAGES_MEMORY_FRACTION * _available_memory_bytes()):
            with damaged_store(self.path, self._damage(layer=IMAGES)):
                self._images_memory = np.asarray(self._images_array()[:])

    @property
    def images_in_memory(self) -> bool:
        return self._images_memory is not None

    def cache_file(self) -> Path:
        """Raw decompressed copy used by cache="mmap": <store>.cache-<id>.npy, id from the store's metadata."""
        meta = (self.path / "zarr.json").stat()
        key = f"{self.path.resolve()}|{meta.st_mtime_ns}|{meta.st_size}|{self.info.get('count')}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return self.path.parent / f"{self.path.name}.cache-{digest}.npy"

    def _mmap_cache(self) -> np.ndarray:
        target = self.cache_file()
        array = self._zarr_array()
        with open(str(target) + ".lock", "w") as lock:  # one writer per node; the others wait
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_stale_cache_temps(self.path, held=target)
            if not target.exists():
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                try:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=array.shape)
                    step = int(self.info.get("shard_size", 1024))
                    for start in tqdm(range(0, array.shape[0], step), desc=f"decompressing to {target.name}",
                                      unit="shard", disable=array.shape[0] <= 16 * step):
                        out[start:start + step] = array[start:start + step]
                    out.flush()
                    del out
                    fault_point(target.name)  # test hook (fcdm_common/io.py): a kill before the rename
                    os.replace(tmp, target)
                except BaseException:
                    tmp.unlink(missing_ok=True)  # a full disk or Ctrl-C leaves no copy of the whole data set
                    raise
            fcntl.flock(lock, fcntl.LOCK_UN)
        memory = np.load(target, mmap_mode="r")
        if memory.shape != tuple(array.shape):
            raise UserError(f"cache file {target} does not match {self.path}; delete it and rerun")
        return memory

    @property
    def cached(self) -> bool:
        return self._memory is not None

    def _zarr_array(self):
        # zarr runs an event-loop thread; a handle is never reused across fork, reopen per process
        if self._array is None or self._array_pid != os.getpid():
            self._array = zarr.open_group(str(self.path), mode="r")["latents"]
            self._array_pid = os.getpid()
        return self._array

    def _images_array(self):
        # as _zarr_array: one handle per process
        if self._images is None or self._images_pid != os.getpid():
            self._images = zarr.open_group(str(self.path), mode="r")["images"]
            self._images_pid = os.getpid()
        return self._images

    def _read_image_rows(self, rows: np.ndarray) -> np.ndarray:
        """Images `rows` (sorted, unique) as (n, 3, S, S) uint8, in one call on zarr's event loop that reads
        them concurrently, each a basic selection of one image (= one inner chunk of its shard).

        Not `oindex[rows]`: on a sharded array zarr 3.1 turns an integer selection into per-element
        coordinates inside each shard (an index array as large as the images), about 30-60 images/s at 224
        against about 1,250/s this way (2-core machine, docs/data.md)."""
        handle = self._images_array()
        array = getattr(handle, "_async_array", None)
        if zarr_sync is None or array is None:
            return np.asarray(handle.oindex[rows])

        async def gather():
            return await asyncio.gather(*(array.getitem(slice(int(r), int(r) + 1)) for r in rows))

        return np.concatenate([np.asarray(part) for part in zarr_sync(gather())])

    def read_images(self, indices: np.ndarray, orient: np.ndarray) -> torch.Tensor:
        """Images of items `indices` (B, 3, S, S) uint8, mirrored along the width where `orient` is 1 (the
        store keeps the original orientation only; the bicubic resize is symmetric, so the mirror of the stored
        image is the resized flipped crop up to rounding, at most 1 grey level)."""
        if self._images_memory is not None:
            block = self._images_memory[indices]
        else:
            uniq, inverse = np.unique(indices, return_inverse=True)
            with damaged_store(self.path, self._damage(uniq, IMAGES)):
                block = self._read_image_rows(uniq)  # one zarr call for the whole batch
            block = block[inverse.reshape(-1)]
        out = torch.from_numpy(np.ascontiguousarray(block))
        flip = torch.from_numpy(np.asarray(orient) == 1)
        if flip.any():
            out[flip] = out[flip].flip(-1)
        return out

    def read(self, indices: np.ndarray, orient: np.ndarray) -> np.ndarray:
        """Stored values of items `indices` in orientation `orient`: (B, 2, C, H, W) moments or (B, C, H, W)."""
        if self._memory is not None:
            return self._memory[indices, orient]
        order = np.argsort(indices, kind="stable")
        uniq, inverse = np.unique(indices[order], return_inverse=True)
        with damaged_store(self.path, self._damage(uniq)):
            block = self._zarr_array().oindex[uniq]  # one selection for the whole batch
        rows = np.empty_like(order)
        rows[order] = inverse
        return block[rows, orient]

    def get_batch(self, indices: np.ndarray, rng: np.random.Generator | None, orient: np.ndarray | None = None,
                  noise_seeds: np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
        """Model-ready scaled latents (B, C, H, W) float32 and labels (B,) int64, and with images=True the
        clean images (B, 3, S, S) uint8 in the orientation of each latent. `orient` (B,) and `noise_seeds`
        (B,) (one posterior-noise seed per item) are drawn from `rng` when not given."""
        if orient is None:
            orient = rng.integers(0, self.orientations if self.hflip else 1, size=len(indices))
        x, y = self._latents_and_labels(indices, orient, rng, noise_seeds)
        if self.return_images:
            return x, y, self.read_images(indices, orient)
        return x, y

    def _latents_and_labels(self, indices, orient, rng, noise_seeds) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.from_numpy(np.ascontiguousarray(self.read(indices, orient)))
        if self.mode != "moments":
            return values.float(), torch.from_numpy(self.labels[indices])  # scaled samples (B, C, H, W)
        if noise_seeds is None:
            noise_seeds = rng.integers(0, 2 ** 63 - 1, size=len(indices))
        # values: (B, 2, C, H, W) = (mean, std). Each item's eps comes from its own seed. Work in
        # slices below torch's parallel grain size (32768 elements) so no op fans out to the
        # intra-op pool: on a busy machine a parallel region waits for its slowest thread, and the
        # reader threads already run in parallel.
        gen = torch.Generator()
        b = values.shape[0]
        x = torch.empty((b, *values.shape[2:]), dtype=torch.float32)  # (B, C, H, W)
        eps = torch.empty_like(x)
        for i in range(b):
            torch.randn(x.shape[1:], generator=gen.manual_seed(int(noise_seeds[i])), out=eps[i])
        step = max(1, _GRAIN // values[0].numel())
        for s in range(0, b, step):
            v = values[s:s + step].float()  # (g, 2, C, H, W)
            out = x[s:s + step]
            torch.addcmul(v[:, 0], v[:, 1], eps[s:s + step], out=out)  # mean + std * eps
            if self.shift_factor:
                out.sub_(self.shift_factor)
            out.mul_(self.scaling_factor)  # z = (mean + std * eps - shift) * s
        return x, torch.from_numpy(self.labels[indices])


class LegacyNpyDataset:
    """The original release's layout: per-image latent and label `.npy` files with matching names.

    Latent files hold scaled samples of shape (1, C, H, W), (C, H, W) or (2, C, H, W) (both
    orientations); label files hold one integer.
    """

    def __init__(self, feature_path: str | os.PathLike, label_path: str | os.PathLike, hflip: bool = True):
        self.feature_path = Path(feature_path)  # folder of per-image latent .npy files
        self.label_path = Path(label_path)  # folder of per-image label .npy files
        for folder, flag in ((self.feature_path, "--feature-path"), (self.label_path, "--label-path")):
            if not folder.is_dir():
                raise UserError(f"{flag} {folder} is not a folder")
        self.files = sorted(p.name for p in self.feature_path.iterdir() if p.suffix == ".npy")
        if not self.files:
            raise UserError(f"--feature-path {self.feature_path} holds no .npy files")
        n_labels = sum(1 for p in self.label_path.iterdir() if p.suffix == ".npy")
        if n_labels != len(self.files):
            raise UserError(f"{len(self.files)} latent files in {self.feature_path} but {n_labels} label files "
                            f"in {self.label_path}; every latent needs a label file with the same name")
        labels = np.empty(len(self.files), dtype=np.int64)
        for i, name in enumerate(tqdm(self.files, desc="reading labels", disable=len(self.files) < 10000)):
            label_file = self.label_path / name
            if not label_file.is_file():
                raise UserError(f"label file {label_file} is missing for latent {self.feature_path / name}")
            labels[i] = load_label_file(label_file)
        check_label_gaps(labels, self.files, f"--label-path {self.label_path}")
        self.labels = labels
        first = self._load(0)
        self.orientations = first.shape[0]
        self.hflip = bool(hflip)  # False: always the first stored orientation
        self.latent_shape = tuple(first.shape[1:])
        self.num_classes = _num_classes(labels, None, str(self.label_path))
        self.mode = "sample"
        self.images_size = None  # this layout cannot hold images
        self.info = {"format": "legacy-npy", "store": "sample", "count": len(self.files),
                     "latent_shape": list(self.latent_shape), "orientations": self.orientations,
                     "class_names": None, "feature_path": str(self.feature_path), "label_path": str(self.label_path)}

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> np.ndarray:
        return load_latent_file(self.feature_path / self.files[i])

    def prepare(self, local_world_size: int | None = None) -> None:
        pass

    def get_batch(self, indices: np.ndarray, rng: np.random.Generator | None,
                  orient: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if orient is None:
            orient = rng.integers(0, self.orientations if self.hflip else 1, size=len(indices))
        x = np.stack([self._load(int(i))[o] for i, o in zip(indices, orient)]).astype(np.float32)
        if tuple(x.shape[1:]) != self.latent_shape:
            raise UserError(f"latent files in {self.feature_path} have different shapes; re-extract them")
        return torch.from_numpy(x), torch.from_numpy(self.labels[indices])


def open_dataset(zarr_path=None, feature_path=None, label_path=None, cache: str = "auto", hflip: bool = True,
                 images: bool = False):
    """Open the training data: a zarr store (`zarr_path`) or the legacy .npy folders.

    cache: "auto" | "memory" | "mmap" | "none" (zarr stores only, see ZarrLatentDataset).
    `hflip=False` trains on the original orientation only (data where a mirror image is not a valid
    sample, such as digits); by default each item picks one of its stored orientations at random.
    `images=True` (representation alignment): batches are (x, y, images) from a zarr store with images.
    """
    if zarr_path is not None:
        if feature_path is not None or label_path is not None:
            raise UserError("give either --zarr-path or --feature-path/--label-path, not both")
        return ZarrLatentDataset(zarr_path, cache=cache, hflip=hflip, images=images)
    if feature_path is None or label_path is None:
        raise UserError("no training data: give --zarr-path STORE, or --feature-path DIR and --label-path DIR")
    if images:
        raise UserError(f"representation alignment needs a zarr store with images, and --feature-path {feature_path} "
                        "is the .npy layout, which holds none; extract a store from the image folder with "
                        "'python preparation/extract_features.py --data-path IMAGEFOLDER --zarr-path STORE "
                        "--repa-image-size S' (224 for DINOv2 at 256x256 images, 448 at 512x512) and train on it "
                        "with --zarr-path STORE")
    return LegacyNpyDataset(feature_path, label_path, hflip=hflip)


