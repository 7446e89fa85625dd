"""The latent store format and its writer (layout in docs/data.md; readers in preparation/readers.py).

One zarr v3 group. `latents` and `labels` are sharded along the image axis with one shard per
work unit of `shard_size` images, so the processes of a multi-GPU extraction never write the same
file. The bool array `done` (one chunk per shard) records finished shards: a rerun skips them and
a shard whose process died half-way is simply rewritten. The group attribute `complete` becomes
true only after every shard is done, so readers never mistake a half-written store for data.

Kills. zarr writes every file through a temp file (`<name>.<32 hex>.partial`, renamed into place), and
rewrites the root `zarr.json` many times while a store is created. So the empty store (every attribute and
array) is built under the sibling name `.<name>.creating-<pid>` and renamed into place in one step
(`create_store`); a store being replaced is first renamed to `.<name>.removing-<pid>` and deleted from
there (`remove_store`). A kill at any moment therefore leaves either no store (and a creation folder), or a
complete empty store, or a store with some shards done; `remove_leftovers` (called by the writers' rank 0
before anything is written) deletes the stale creation/removal folders beside the store and the stale
`.partial` files inside it, and the same command finishes the store.

Missing shard files. A complete store has one file per shard of `latents` and `labels` (shards are written
with zarr's `write_empty_chunks`, so an all-zero shard is a file too); `missing_shards` finds the absent or
empty ones with one stat per shard, readers refuse such a store (`check_shard_files`), and a rerun of the
command that made it re-encodes exactly those shards (`reset_shards`).

Images (optional, for representation alignment). `images` holds, per item, the clean image the latents were
encoded from (the center crop, resized to `images_size`), uint8 (N, 3, S, S), original orientation only (the
flipped orientation is its mirror); `images_done` (one chunk per shard) records finished shards like `done`,
and the attribute `images_complete` becomes true once all are. The layer is not a setting (SETTING_KEYS): a
store without it opens, resumes and compares as before, and it can be added to an existing store
(`add_image_layer`: both arrays first, then the attributes in one write, so a kill leaves either no layer or
an empty one). Its shards are checked, repaired and reset like the latents' (the same functions, given the
`IMAGES` layer instead of `LATENTS`), but only by the readers that ask for images.

Checksums. Every inner chunk of `latents`, `labels` and `images` carries a CRC-32C of its compressed bytes
(`data_compressors`), which zarr verifies on every read; preparation/checksums.py names the damaged shards and
the writers' `--verify` re-encodes them. Stores made before have none and keep working.

Test hook: every write through `open_store`/`create_store` passes `fcdm_common.io.fault_point` first, named
`store-meta/<key>` for metadata (`zarr.json`) and `store-data/<key>` for chunk files; a kill there leaves the
half-written `.partial` file zarr would leave. The steps of creation and removal are `store-meta/<step>`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import LocalStore

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
PARTIAL_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr LocalStore's temp file: <name>.<uuid4 hex>.partial
WORK_KINDS = ("creating", "removing")  # sibling folders .<name>.<kind>-<pid> of create_store / remove_store
LATENT_FILES = ("latents", "labels")  # arrays with one file per shard that every reader needs
IMAGE_FILES = ("images",)  # the image layer's array with one file per shard
MIN_IMAGES_SIZE = 8  # smallest side of stored images (--repa-image-size)
IMAGES_AXES = ("N, RGB, H, W: uint8 center crop resized to images_size, original orientation only "
               "(orientation 1 is its mirror along W)")
REBUILD = ("rerun the command that made it (preparation/extract_features.py, or preparation/save_zarr.py for a "
           "converted store) with the same arguments: it re-encodes the missing shards")


class HookedLocalStore(LocalStore):
    """zarr's LocalStore with the fault-injection hook of fcdm_common/io.py before every write, and the
    target's name (not zarr's `.partial` temp file) in the OSError of a failed write."""

    async def set(self, key: str, value) -> None:
        with self.hooked(key, value):
            await super().set(key, value)

    async def set_if_not_exists(self, key: str, value) -> None:  # zarr: the metadata of parent groups
        with self.hooked(key, value):
            await super().set_if_not_exists(key, value)

    @contextlib.contextmanager
    def hooked(self, key: str, value):
        target = self.root / key
        kind = "store-meta" if key.rsplit("/", 1)[-1] == "zarr.json" else "store-data"
        try:
            fault_point(f"{kind}/{key}", before_kill=lambda: leave_partial(target, value))
            yield
        except OSError as e:  # zarr's message names its temp file (or the hook's name): name the target
            if e.errno is None:
                raise
            raise OSError(e.errno, e.strerror, str(target)) from None


def leave_partial(target: Path, value) -> None:
    """What a kill in the middle of zarr's write of `target` leaves: half of the bytes in its temp file."""
    data = bytes(value.as_buffer_like())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(f".{uuid.uuid4().hex}.partial").write_bytes(data[:len(data) // 2])


def open_store(path: str | os.PathLike, mode: str = "r+"):
    """The zarr group at `path` for the writers ("r" or "r+"), through `HookedLocalStore`."""
    return zarr.open_group(store=HookedLocalStore(str(path), read_only=mode == "r"), mode=mode)


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


def only_partials(path: Path) -> bool:
    """True for a folder that holds nothing but zarr `.partial` files (a creation killed at its first write)."""
    return path.is_dir() and all(p.is_file() and PARTIAL_FILE.search(p.name) for p in path.iterdir())


def interrupted_creation(attrs: dict, arrays: set) -> bool:
    """A store whose creation was interrupted (by the writer before `create_store` became one rename, which
    set the attributes one by one, "complete" last, then created the arrays): nothing was encoded in it."""
    return ("complete" not in attrs or not {"latents", "labels", "done"} <= arrays
            or ("stat_sums" in arrays) != ("stat_done" in arrays))


@contextlib.contextmanager
def quiet_partials():
    """Listing a store's members: a killed write's .partial file (removed before writing) is no member, and zarr
    need not warn about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        yield


def check_existing(path: str | os.PathLike, settings: dict, what: str = "--zarr-path",
                   overwrite: bool | None = None) -> str:
    """'absent', 'incomplete' or 'complete' for a store at `path` made with `settings`; UserError otherwise.

    'absent' also stands for an empty folder and an interrupted creation (which `create_store` replaces).
    overwrite: None when the program has no --overwrite flag; False: the mismatch message offers it;
    True: a store made with other settings is reported as 'replace' (the caller replaces it with
    `create_store`) instead of refused."""
    path = Path(path)
    if not path.exists():
        return "absent"
    if not (path / "zarr.json").is_file():
        if path.is_dir() and only_partials(path):
            return "absent"
        raise UserError(f"{what} {path} exists but is not a zarr store; choose a new output path")
    try:
        with quiet_partials():
            group = zarr.open_group(str(path), mode="r")
            attrs = dict(group.attrs)
            arrays = set(group.array_keys())
    except Exception as e:
        raise UserError(f"{what} {path} is a damaged zarr store ({e}); delete it and rerun") from None
    if not attrs and not arrays:
        return "absent"  # a group whose creation was interrupted before anything was recorded
    if attrs.get("format") != STORE_FORMAT:
        raise UserError(f"{what} {path} is a zarr group but not an FCDM latent store; choose a new output path")
    if not attrs.get("complete") and interrupted_creation(attrs, arrays):
        return "absent"
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
    return "incomplete"


def store_attrs(path: Path) -> dict | None:
    """Attributes of the zarr group at `path` read from its zarr.json; None when there is none or it is unreadable."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("attributes", {}) if isinstance(meta, dict) else None


def replaceable(path: Path) -> bool:
    """Whether `path` may be deleted to make room for a store: an FCDM latent store, an empty zarr group,
    or a creation killed at its first write. Anything else is never deleted."""
    if only_partials(path):
        return True
    attrs = store_attrs(path)
    if attrs is None:
        return False
    if attrs.get("format") == STORE_FORMAT:
        return True
    return not attrs and not any(p.is_dir() for p in path.iterdir())  # a group with no attributes, no arrays


def work_folder(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Delete what killed writers of the store at `path` left: `.<name>.creating-<pid>` and
    `.<name>.removing-<pid>` folders beside it, and zarr's `.partial` files inside it. Returns them.

    Only the writers' rank 0 calls it, before any process writes (the command's other processes wait at a
    barrier), so none of these can belong to a live write of this store. A creation folder is only deleted
    when it is recognisably one (`replaceable`)."""
    path = Path(path)
    removed: list[Path] = []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.({'|'.join(WORK_KINDS)})-\d+$")
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = pattern.match(p.name)
            if not m or not p.is_dir() or p.is_symlink():
                continue
            if m.group(1) == "creating" and not (replaceable(p) or not any(p.iterdir())):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                if PARTIAL_FILE.search(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(root, name))
                        removed.append(Path(root) / name)
    return removed


def remove_store(path: str | os.PathLike) -> None:
    """Delete an FCDM latent store (refuses anything else, so a wrong path is never wiped). It is renamed to
    `.<name>.removing-<pid>` first, so a kill during the deletion leaves no half-deleted store under its name
    (`remove_leftovers` finishes the deletion)."""
    path = Path(path)
    if store_attrs(path) is None or store_attrs(path).get("format") != STORE_FORMAT:
        raise UserError(f"{path} is not an FCDM latent store; refusing to delete it")
    discard(path)


def discard(path: Path) -> None:
    """Rename `path` aside (one step), then delete it."""
    aside = work_folder(path, "removing")
    os.rename(path, aside)
    fault_point("store-meta/removing")
    shutil.rmtree(aside)


def create_store(path: str | os.PathLike, settings: dict, extra_attrs: dict | None = None, images_size: int = 0,
                 checksums: bool = True):
    """Create an empty store at `path` and return the zarr group (opened with `open_store`).

    It is built under `.<name>.creating-<pid>` and renamed into place in one step. Something already at
    `path` is replaced if it is an empty folder, an FCDM latent store or an interrupted creation
    (`replaceable`; the caller decides, e.g. with check_existing), and refused otherwise. `images_size` > 0
    adds the image layer (`images`, `images_done` and its attributes) in the same step. `checksums=False` makes
    the latents and labels as stores were made before checksums (benchmarks/bench_data.py compares the two)."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and not path.is_symlink()
                              and (not any(path.iterdir()) or replaceable(path))):
        raise UserError(f"{path} exists and is not an FCDM latent store; choose a new output path")
    work = work_folder(path, "creating")
    try:
        if work.exists():
            shutil.rmtree(work)
        build_empty_store(work, settings, extra_attrs, images_size, checksums)
        fault_point("store-meta/created")  # the whole empty store is in the creation folder
        if path.exists():
            if any(path.iterdir()):
                discard(path)
            else:
                path.rmdir()
        os.rename(work, path)
    except BaseException as e:  # an error or Ctrl-C (a kill leaves the folder to remove_leftovers)
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:  # a read-only folder, a full disk: name the store
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    fault_point("store-meta/renamed")
    return open_store(path)


def build_empty_store(work: Path, settings: dict, extra_attrs: dict | None, images_size: int = 0,
                      checksums: bool = True) -> None:
    """Every attribute (in one write) and array of an empty store, in the new folder `work`; with the image
    layer when `images_size` > 0; latents and labels without checksums when `checksums` is False."""
    count, shard, chunk = settings["count"], settings["shard_size"], settings["chunk_size"]
    shape = latent_array_shape(count, settings["store"], settings["orientations"], settings["latent_shape"])
    compressor = data_compressors() if checksums else data_compressors()[:1]
    attrs = {"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION, **settings,
             "latents_axes": ("N, orientation, moment(mean,std), C, H, W" if settings["store"] == "moments"
                              else "N, orientation, C, H, W"),
             **(extra_attrs or {}), **(image_layer_attrs(images_size) if images_size else {}), "complete": False}
    group = zarr.create_group(store=HookedLocalStore(str(work)), zarr_format=3, attributes=attrs)
    group.create_array("latents", shape=shape, dtype=latent_dtype(settings["store"]),
                       chunks=(min(chunk, shard), *shape[1:]), shards=(shard, *shape[1:]),
                       compressors=compressor, fill_value=0)
    group.create_array("labels", shape=(count,), dtype="int64", chunks=(shard,), compressors=compressor,
                       fill_value=-1)
    group.create_array("done", shape=(num_shards(count, shard),), dtype="bool", chunks=(1,), fill_value=False)
    ensure_stats_arrays(group, num_shards(count, shard), settings["latent_shape"][0])
    if images_size:
        create_image_arrays(group, count, shard, images_size)


def data_compressors() -> tuple:
    """The codecs after serialisation of every data array (latents, labels, images): blosc zstd with bitshuffle,
    then a CRC-32C of the compressed bytes that zarr verifies on every read (preparation/checksums.py)."""
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()  # = checksums.CHECKSUM


def image_layer_attrs(size: int) -> dict:
    """The group attributes of an (empty) image layer of side `size`."""
    return {"images_size": int(size), "images_axes": IMAGES_AXES, "images_complete": False}


def create_image_arrays(group, count: int, shard_size: int, size: int, overwrite: bool = False) -> None:
    """`images` (N, 3, S, S) uint8, one shard file per shard of the latents and one compressed chunk per
    image (a random read decompresses only that image), and `images_done` (one bool chunk per shard)."""
    # bitshuffle as the latents: measured on photos it compresses uint8 pixels a little better than byte
    # shuffle (which is a no-op for 1-byte items); see docs/data.md for the numbers
    compressor = data_compressors()
    group.create_array("images", shape=(count, 3, size, size), dtype="uint8", chunks=(1, 3, size, size),
                       shards=(shard_size, 3, size, size), compressors=compressor, fill_value=0, overwrite=overwrite)
    group.create_array("images_done", shape=(num_shards(count, shard_size),), dtype="bool", chunks=(1,),
                       fill_value=False, overwrite=overwrite)


def images_size_of(group) -> int | None:
    """Side of the store's images; None when it has no image layer: no `images_size` attribute (an addition
    interrupted before its attributes were written, whose arrays hold nothing, counts as none), or one of the
    layer's arrays is gone (`add_image_layer` makes it again)."""
    size = group.attrs.get("images_size")
    if not size:
        return None
    with quiet_partials():
        arrays = set(group.array_keys())
    return int(size) if {"images", "images_done"} <= arrays else None


def add_image_layer(group, size: int) -> None:
    """Add an empty image layer to an existing store that has none (complete or not; `images_size_of`).

    The arrays are created first (replacing the empty ones of an interrupted addition), then the attributes
    in one write of the group's zarr.json: a kill before that write leaves a store without the layer, whose
    stray arrays the next addition replaces; after it, an empty layer that the writers fill. The latents,
    labels, `done` and `complete` are not touched, so training without images goes on reading the store."""
    attrs = dict(group.attrs)
    with quiet_partials():
        stray = bool({"images", "images_done"} & set(group.array_keys()))
    create_image_arrays(group, int(attrs["count"]), int(attrs["shard_size"]), size, overwrite=stray)
    group.update_attributes(image_layer_attrs(size))


def num_shards(count: int, shard_size: int) -> int:
    return math.ceil(count / shard_size)


def shard_range(k: int, count: int, shard_size: int) -> tuple[int, int]:
    """[start, end) image indices of shard k."""
    return k * shard_size, min(count, (k + 1) * shard_size)


@dataclass(frozen=True)
class Layer:
    """The shard bookkeeping of one kind of stored data, which the latents and the images share: the arrays
    with one file per shard, the per-shard markers (`done` first), the attribute set once every shard is done,
    and what a damaged store's message says."""
    files: tuple  # arrays with one file per shard (`missing_shards`)
    markers: tuple  # bool arrays, one chunk per shard: the first says the shard is done; all are reset with it
    complete: str  # the group attribute set once every shard is done
    what: str  # names the files in a message
    harm: str  # what reading a lost file would do
    fix: str  # how to repair the store (formatted with the store's attributes)


LATENTS = Layer(LATENT_FILES, ("done", "stat_done"), "complete", "latents or labels", "would train on zeros", REBUILD)
IMAGES = Layer(IMAGE_FILES, ("images_done",), "images_complete", "images", "would align to black images",
               "rerun preparation/extract_features.py with the same arguments (and --repa-image-size "
               "{images_size}): it stores those images again without re-encoding the latents")


def done_shards(group, layer: Layer = LATENTS) -> np.ndarray:
    return np.asarray(group[layer.markers[0]][:], dtype=bool)


def missing_shards(path: str | os.PathLike, group, shards=None, names: tuple = LATENT_FILES) -> list[int]:
    """Shards (of `shards`, default all) whose file of any array in `names` (default `latents` and `labels`;
    IMAGE_FILES for the images) is missing or empty: one stat per file (ImageNet: 2 x 1252). Such a shard
    reads as zeros and -1 labels, since zarr returns the fill value for an absent file."""
    attrs = group.attrs
    n = num_shards(int(attrs["count"]), int(attrs["shard_size"]))
    found = []
    arrays = [group[name] for name in names]
    for k in range(n) if shards is None else shards:
        for array in arrays:
            coords = (k,) + (0,) * (len(array.shape) - 1)  # latents, images: one shard per k; labels: one chunk
            f = Path(path) / array.path / array.metadata.encode_chunk_key(coords)
            try:
                empty = f.stat().st_size == 0
            except FileNotFoundError:
                empty = True
            if empty:
                found.append(k)
                break
    return found


def shards_to_repair(path: str | os.PathLike, layer: Layer = LATENTS) -> list[int]:
    """Shards of the store at `path` recorded as done whose file of any of `layer`'s arrays is missing or empty
    (deleted, lost): the writers write them again (`reset_shards`). [] for a store without the image layer."""
    group = open_store(path, "r")
    if layer is IMAGES and images_size_of(group) is None:
        return []
    done = done_shards(group, layer)
    return missing_shards(path, group, [k for k in range(len(done)) if done[k]], layer.files)


def describe_shards(shards: list[int], count: int, shard_size: int, limit: int = 4) -> str:
    """'shard 3 (images 192..255), ...' for a message."""
    parts = []
    for k in shards[:limit]:
        start, end = shard_range(k, count, shard_size)
        parts.append(f"shard {k} (images {start}..{end - 1})")
    more = f" and {len(shards) - limit} more" if len(shards) > limit else ""
    return ", ".join(parts) + more


def check_shard_files(path: str | os.PathLike, group, layer: Layer = LATENTS) -> None:
    """UserError naming the store, the images whose shard files of `layer` are missing or empty, and the fix."""
    missing = missing_shards(path, group, names=layer.files)
    if missing:
        attrs = dict(group.attrs)
        what = describe_shards(missing, int(attrs["count"]), int(attrs["shard_size"]))
        raise UserError(f"zarr store {path} is damaged: the {layer.what} file of {len(missing)} shard(s) is missing "
                        f"or empty ({what}), which {layer.harm}; {layer.fix.format(**attrs)}")


def reset_shards(group, shards: list[int], layer: Layer = LATENTS) -> None:
    """Mark `shards` (whose files of `layer` are missing) not done, and the layer incomplete, so they are written
    again; nothing of another layer is touched."""
    if not shards:
        return
    group.update_attributes({layer.complete: False})  # first: readers refuse the layer while it is repaired
    markers = [m for m in layer.markers if m in set(group.array_keys())]
    for k in shards:
        for m in markers[::-1]:  # `done` last, as it was set last
            group[m][k] = False


def write_shard(group, k: int, latents: np.ndarray, labels: np.ndarray) -> None:
    """Write shard k's latents, labels and per-channel sums (preparation.statistics), then mark it done
    (the marker goes last). Every file is written even when it equals the fill value, so a complete store
    has every shard file (`missing_shards`)."""
    attrs = dict(group.attrs)
    count, shard = attrs["count"], attrs["shard_size"]
    start, end = shard_range(k, count, shard)
    if latents.shape[0] != end - start or labels.shape[0] != end - start:
        raise ValueError(f"shard {k} expects {end - start} items, got {latents.shape[0]} / {labels.shape[0]}")
    every = {"write_empty_chunks": True}
    values = latents.astype(group["latents"].dtype, copy=False)  # statistics of exactly what is stored
    if "stat_sums" in set(group.array_keys()):
        write_shard_sums(group, k, shard_sums(values, attrs["store"], attrs["scaling_factor"],
                                              attrs.get("shift_factor", 0.0)))
    group["latents"].with_config(every)[start:end] = values
    fault_point("store-shard")  # test hook (fcdm_common/io.py): a kill between the data and its marker
    group["labels"].with_config(every)[start:end] = labels.astype(np.int64, copy=False)
    group["done"][k] = True


def mark_complete(group) -> None:
    """Set the completion attribute (with the statistics, in one write) once every shard is done."""
    if not done_shards(group).all():
        raise RuntimeError("mark_complete called before every shard was written")
    attrs = {"complete": True}
    if "stat_sums" in set(group.array_keys()):
        attrs = {STATS_ATTR: store_stats_from_rows(group), **attrs}  # readers see both or neither
    group.update_attributes(attrs)


def write_image_shard(group, k: int, images: np.ndarray) -> None:
    """Write shard k's images (n, 3, S, S) uint8, then mark them done (the marker goes last). The file is
    written even when every image is black (the fill value), as `write_shard` does."""
    attrs = dict(group.attrs)
    start, end = shard_range(k, attrs["count"], attrs["shard_size"])
    size = attrs["images_size"]
    if images.shape != (end - start, 3, size, size) or images.dtype != np.uint8:
        raise ValueError(f"shard {k} expects uint8 images {(end - start, 3, size, size)}, "
                         f"got {images.dtype} {images.shape}")
    group["images"].with_config({"write_empty_chunks": True})[start:end] = images
    fault_point("store-image-shard")  # test hook (fcdm_common/io.py): a kill between the data and its marker
    group["images_done"][k] = True


def mark_images_complete(group) -> None:
    """Set `images_complete` once every shard's images are done."""
    if not done_shards(group, IMAGES).all():
        raise RuntimeError("mark_images_complete called before every shard's images were written")
    group.update_attributes({"images_complete": True})
