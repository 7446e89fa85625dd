"""The optional image layer of a latent store (`extract_features.py --repa-image-size S`, for representation
alignment) and its reader (`open_dataset(..., images=True)`).

References: PIL's bicubic resize of fcdm_common.images.center_crop_arr (what the images must be); the pixel
latents of `--vae none` (with S == --image-size the stored image of each orientation is the latent of that
orientation, an independent check of the mirroring); the digests of a store written by the code before the
image layer existed (a run without the flag must still write exactly that); an uninterrupted run into another
path (for kills, resumption, repair and adding images to an existing store), compared array by array.
Kills use the fault hook of fcdm_common/io.py through tests/test_store_faults.py's driver. Tiny ImageFolder
(6 images of 16..24 px in 2 classes, --image-size 16, 3 shards of 2), `--vae none`: no model download.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from fcdm_common.cli import UserError, run_main
from fcdm_common.images import center_crop_arr
from helpers import run_torchrun
from models.latent_space import LatentNorm
from preparation import extract_features
from preparation import store as zstore
from preparation.readers import open_dataset
from preparation.statistics import NormalizedDataset
from test_store_faults import EXTRACT, assert_same_store, contents, count_hook, exit_2_line, kill_each, leftovers

# Digests of the store that extract_features.py wrote for `plain` (below) before the image layer was added
# (fingerprint(): array metadata + values, attributes without the path-dependent `source`, and the bytes of
# every file but the root zarr.json). A run without --repa-image-size must reproduce them exactly. Updated once
# since, on purpose: the crc32c codec of the data arrays (checksums) changed `labels`, `latents` and the files.
BEFORE_IMAGES = {
    "arrays": {"done": "2dc3f9b80e06fa14", "labels": "a4db059608f43a25", "latents": "d53d73b9c0e09185",
               "stat_done": "2dc3f9b80e06fa14", "stat_sums": "d80adb380d26da20"},
    "attrs": ["chunk_size", "class_names", "complete", "count", "downsample", "format", "format_version",
              "hf_model_dir", "hf_model_name", "image_size", "latent_channels", "latent_shape", "latent_stats",
              "latents_axes", "orientations", "scaling_factor", "seed", "shard_size", "shift_factor", "store",
              "vae", "vae_class"],
    "attrs_digest": "695102f2616c4403",
    "files": "2995ac506b619518",
}
LATENT_ARRAYS = ("latents", "labels", "done", "stat_sums", "stat_done")


def make_images(root: Path) -> Path:
    """2 classes x 3 images of 16..24 px: gradients plus noise (the crop resizes non-square images)."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            h, w = (int(v) for v in rng.integers(16, 25, 2))
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
            img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def args(images, out, *extra):
    return ["--data-path", str(images), "--zarr-path", str(out), "--vae", "none", "--image-size", "16",
            "--batch-size", "2", "--shard-size", "2", "--chunk-size", "2", "--num-workers", "0", "--device", "cpu",
            *map(str, extra)]


def fingerprint(path: Path) -> dict:
    g = zarr.open_group(str(path), mode="r")
    out = {"attrs": sorted(k for k in g.attrs if k != "source"), "arrays": {}}
    for name in sorted(g.array_keys()):
        meta = json.loads((path / name / "zarr.json").read_text())
        values = np.ascontiguousarray(g[name][:])
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode() + values.tobytes())
        out["arrays"][name] = digest.hexdigest()[:16]
    attrs = {k: v for k, v in g.attrs.items() if k != "source"}
    out["attrs_digest"] = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for p in sorted(p for p in path.rglob("*") if p.is_file() and p != path / "zarr.json"):
        h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    out["files"] = h.hexdigest()[:16]
    return out


def file_bytes(path: Path, arrays=LATENT_ARRAYS) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for a in arrays for p in sorted((path / a).rglob("*"))
            if p.is_file()}


def image_file(store: Path, k: int) -> Path:
    (f,) = [p for p in (store / "images" / "c" / str(k)).rglob("*") if p.is_file()]
    return f


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The image folder and uninterrupted stores: without images, with 8x8 and with 16x16 images."""
    root = tmp_path_factory.mktemp("images")
    images = make_images(root / "imgs")
    stores = {"plain": root / "plain.zarr", 8: root / "ref8.zarr", 16: root / "ref16.zarr"}
    run_main(extract_features.main, args(images, stores["plain"]))
    run_main(extract_features.main, args(images, stores[8], "--repa-image-size", 8))
    run_main(extract_features.main, args(images, stores[16], "--repa-image-size", 16))
    return images, stores


@pytest.fixture
def no_encoding(monkeypatch):
    """Count the VAE encodes of extract_features (the identity VAE of --vae none, wrapped)."""
    calls = []
    original = extract_features.load_autoencoder

    def load(*a, **k):
        vae = original(*a, **k)
        encode = vae.encode_moments

        def counted(x):
            calls.append(int(x.shape[0]) // 2)  # both orientations of each image
            return encode(x)

        vae.encode_moments = counted
        return vae

    monkeypatch.setattr(extract_features, "load_autoencoder", load)
    return calls


# ------------------------------------------------------------------------------- flag and values
def test_flag_help_and_range(capsys):
    parser = extract_features.build_parser()
    text = " ".join(parser.format_help().split())
    assert "224 for DINOv2 at 256x256 images, 448 at 512x512" in text
    assert parser.parse_args(["--data-path", "d", "--zarr-path", "z"]).repa_image_size == 0
    assert parser.parse_args(["--data-path", "d", "--zarr-path", "z", "--repa-image-size", "8"]).repa_image_size == 8
    for bad in ("4", "1", "-1", "x", "nan"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--data-path", "d", "--zarr-path", "z", "--repa-image-size", bad])
        assert e.value.code == 2
        assert "argument --repa-image-size: expected 0 (no images) or an integer >= 8" in capsys.readouterr().err


@pytest.mark.parametrize("size", [8, 12, 16])
def test_images_are_the_bicubic_resize_of_the_center_crop(data, tmp_path, size):
    images, stores = data
    out = stores.get(size) or tmp_path / "o.zarr"
    if size not in stores:
        run_main(extract_features.main, args(images, out, "--repa-image-size", size))
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["images_size"] == size and g.attrs["images_complete"] is True
    assert g["images"].dtype == np.uint8 and g["images"].shape == (6, 3, size, size)
    assert g["images"].chunks == (1, 3, size, size) and g["images"].shards == (2, 3, size, size)
    assert g["images_done"].shape == (3,) and g["images_done"].chunks == (1,) and g["images_done"][:].all()
    _, samples = extract_features.scan_image_folder(images)
    for i, (path, _) in enumerate(samples):
        with Image.open(path) as im:
            crop = center_crop_arr(im.convert("RGB"), 16)
        want = np.asarray(crop if size == 16 else crop.resize((size, size), resample=Image.BICUBIC))
        np.testing.assert_array_equal(g["images"][i], want.transpose(2, 0, 1), err_msg=f"image {i} ({path})")


def test_with_pixel_latents_the_image_of_each_orientation_is_its_latent(data):
    """--vae none, S == --image-size: image = round((latent + 1) * 127.5) for the stored orientation 0 and 1, so
    the reader's mirror of the stored image is the image the flipped latent was encoded from."""
    _, stores = data
    raw = zarr.open_group(str(stores[16]), mode="r")["latents"][:]  # (N, O, 2 = mean/std, 3, 16, 16) float16
    ds = open_dataset(zarr_path=stores[16], cache="memory", images=True)
    ds.prepare()
    idx = np.arange(6)
    for o in (0, 1):
        x, y, img = ds.get_batch(idx, None, orient=np.full(6, o), noise_seeds=np.arange(6))
        from_latent = np.rint((raw[:, o, 0].astype(np.float64) + 1) * 127.5)
        np.testing.assert_array_equal(img.numpy(), from_latent, err_msg=f"orientation {o}")
        np.testing.assert_array_equal(np.rint((x.numpy().astype(np.float64) + 1) * 127.5), img.numpy())


def test_bicubic_resize_commutes_with_the_mirror():
    """resize(mirror(img)) vs mirror(resize(img)) with PIL's bicubic filter: the docs promise at most 1 grey
    level (the filter's kernel is symmetric); found: equal in every case tried (printed, -s)."""
    rng = np.random.default_rng(1)
    found = {}
    for src, dst in ((16, 8), (16, 12), (17, 9), (16, 24), (64, 63), (256, 224), (512, 448)):
        worst = 0
        for t in range(4):
            noise = rng.integers(0, 256, (src, src + t, 3))
            ramp = np.add.outer(np.arange(src), np.arange(src + t))[..., None] * (255 / (2 * src + t))
            img = Image.fromarray(np.clip(ramp + noise - 128 if t % 2 else noise, 0, 255).astype(np.uint8))
            a = np.asarray(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((dst, dst), Image.BICUBIC))
            b = np.asarray(img.resize((dst, dst), Image.BICUBIC))[:, ::-1]
            worst = max(worst, int(np.abs(a.astype(int) - b.astype(int)).max()))
        found[f"{src}->{dst}"] = worst
    print(f"largest |resize(mirror) - mirror(resize)| in grey levels: {found}")
    assert max(found.values()) <= 1, found


# ------------------------------------------------------------------------------- stores without images
def test_a_store_without_the_flag_is_what_it_was_before_the_image_layer(data):
    _, stores = data
    assert fingerprint(stores["plain"]) == BEFORE_IMAGES
    plain, with_images = contents(stores["plain"]), contents(stores[8])
    extra = {"images_size": 8, "images_complete": True, "images_axes": zstore.IMAGES_AXES}
    assert with_images["attrs"] == {**plain["attrs"], **extra, "source": with_images["attrs"]["source"]}
    assert set(with_images) - set(plain) == {"images", "images_done"}
    for name in LATENT_ARRAYS:
        np.testing.assert_array_equal(with_images[name], plain[name], err_msg=name)
    assert file_bytes(stores["plain"]) == file_bytes(stores[8])  # the latents' files, byte for byte


def test_adding_images_to_a_complete_store_keeps_the_latents_and_encodes_nothing(data, tmp_path, capsys,
                                                                                 no_encoding):
    images, stores = data
    out = tmp_path / "o.zarr"
    shutil.copytree(stores["plain"], out)
    before = file_bytes(out)
    run_main(extract_features.main, args(images, out, "--repa-image-size", 8))
    said = capsys.readouterr().out
    assert "adding 8x8 images; the latents are kept" in said and "3 of them images only" in said
    assert no_encoding == []
    assert file_bytes(out) == before
    assert_same_store(out, stores[8])
    run_main(extract_features.main, args(images, out))  # a store with images is complete without the flag too
    assert "nothing to do" in capsys.readouterr().out
    assert_same_store(out, stores[8])


def test_adding_images_to_an_incomplete_store_encodes_only_the_missing_latents(data, tmp_path, no_encoding):
    images, stores = data
    out = tmp_path / "o.zarr"
    run_main(extract_features.main, args(images, out, "--debug-stop-after-shards", 1))
    assert sum(no_encoding) == 2
    run_main(extract_features.main, args(images, out, "--repa-image-size", 8))
    assert sum(no_encoding) == 6  # shards 1 and 2 only
    assert_same_store(out, stores[8])


def test_two_processes_add_images_to_an_incomplete_store(data, tmp_path):
    """Shard k belongs to rank k % 2: rank 0 has shard 0 (images only) and shard 2, rank 1 has shard 1."""
    images, stores = data
    out = tmp_path / "o.zarr"
    run_main(extract_features.main, args(images, out, "--debug-stop-after-shards", 1))
    run_torchrun(EXTRACT, args(images, out, "--repa-image-size", 8), timeout=120)
    assert_same_store(out, stores[8])


def test_a_store_with_images_at_another_size_is_refused_and_overwrite_replaces_it(data, tmp_path, capsys):
    images, stores = data
    out = tmp_path / "o.zarr"
    shutil.copytree(stores[8], out)
    err = exit_2_line(extract_features.main, args(images, out, "--repa-image-size", 16), capsys)
    assert err.startswith("error: ") and "8x8" in err and "--repa-image-size 16" in err
    assert "--zarr-path" in err and "--overwrite" in err
    assert_same_store(out, stores[8])
    run_main(extract_features.main, args(images, out, "--repa-image-size", 16, "--overwrite"))
    assert "--overwrite: deleted" in capsys.readouterr().out
    assert_same_store(out, stores[16])


# ------------------------------------------------------------------------------- kills and damage
def test_kill_at_every_write_while_adding_images_then_rerun_finishes(data, tmp_path, monkeypatch):
    images, stores = data
    probe = tmp_path / "probe.zarr"
    shutil.copytree(stores["plain"], probe)
    names = count_hook(monkeypatch, "store-*")
    run_main(extract_features.main, args(images, probe, "--repa-image-size", 8))
    monkeypatch.undo()
    # each array's metadata (zarr also rewrites the group's zarr.json after each), the attributes, each shard's
    # data / hook / marker, the completion attribute
    assert names[:5] == ["store-meta/images/zarr.json", "store-meta/zarr.json", "store-meta/images_done/zarr.json",
                         "store-meta/zarr.json", "store-meta/zarr.json"], names
    assert names.count("store-image-shard") == 3 and names[-1] == "store-meta/zarr.json", names
    n = len(names)
    for i in range(1, n + 1):
        shutil.copytree(stores["plain"], tmp_path / f"k{i}.zarr")
    kill_each(EXTRACT, lambda spec: args(images, tmp_path / f"k{spec.rsplit(':', 1)[1]}.zarr", "--repa-image-size", 8),
              [f"store-*:{i}" for i in range(1, n + 1)])
    for i in range(1, n + 1):
        out = tmp_path / f"k{i}.zarr"
        assert len(open_dataset(zarr_path=out)) == 6, f"killed at {names[i - 1]}: not readable without images"
        with pytest.raises(UserError, match="has none|incomplete"):
            open_dataset(zarr_path=out, images=True)
        run_main(extract_features.main, args(images, out, "--repa-image-size", 8))
        assert_same_store(out, stores[8])
    assert leftovers(tmp_path) == []


def test_kill_while_writing_the_images_of_a_new_store_then_rerun_finishes(data, tmp_path, monkeypatch):
    images, stores = data
    names = count_hook(monkeypatch, "store-*/images*")
    run_main(extract_features.main, args(images, tmp_path / "probe.zarr", "--repa-image-size", 8))
    monkeypatch.undo()
    assert "store-meta/images/zarr.json" in names and "store-data/images/c/2/0/0/0" in names, names
    specs = [f"store-*/images*:{i}" for i in range(1, len(names) + 1)] + ["store-image-shard:2"]
    kill_each(EXTRACT, lambda spec: args(images, tmp_path / f"k{specs.index(spec)}.zarr", "--repa-image-size", 8),
              specs)
    for j in range(len(specs)):
        run_main(extract_features.main, args(images, tmp_path / f"k{j}.zarr", "--repa-image-size", 8))
        assert_same_store(tmp_path / f"k{j}.zarr", stores[8])
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_missing_image_shard_file_is_refused_by_image_readers_and_stored_again(data, tmp_path, capsys,
                                                                                 no_encoding, damage):
    images, stores = data
    out = tmp_path / "o.zarr"
    shutil.copytree(stores[8], out)
    f = image_file(out, 1)
    f.unlink() if damage == "deleted" else f.write_bytes(b"")
    assert zstore.shards_to_repair(out, zstore.IMAGES) == [1] and zstore.shards_to_repair(out) == []
    assert len(open_dataset(zarr_path=out)) == 6  # training without images is not affected
    with pytest.raises(UserError) as e:
        open_dataset(zarr_path=out, images=True)
    msg = str(e.value)
    assert str(out) in msg and "images file of 1 shard(s)" in msg and "shard 1 (images 2..3)" in msg
    assert "--repa-image-size 8" in msg
    before = file_bytes(out)
    run_main(extract_features.main, args(images, out))  # the same command (the store's size is kept)
    assert "images files of shard 1 (images 2..3) are missing; storing them again" in capsys.readouterr().out
    assert no_encoding == [] and file_bytes(out) == before
    assert_same_store(out, stores[8])


def test_an_image_layer_whose_arrays_are_gone_is_added_again(data, tmp_path, no_encoding):
    images, stores = data
    out = tmp_path / "o.zarr"
    shutil.copytree(stores[8], out)
    shutil.rmtree(out / "images_done")  # deleted by hand: nothing says which images are done
    run_main(extract_features.main, args(images, out, "--repa-image-size", 8))
    assert no_encoding == []
    assert_same_store(out, stores[8])


# ------------------------------------------------------------------------------- reader
def test_reader_refuses_stores_without_complete_images_and_the_npy_layout(data, tmp_path):
    images, stores = data
    plain = open_dataset(zarr_path=stores["plain"])
    assert plain.images_size is None and open_dataset(zarr_path=stores[8]).images_size == 8
    with pytest.raises(UserError) as e:
        open_dataset(zarr_path=stores["plain"], images=True)
    assert "has none" in str(e.value) and "--repa-image-size S" in str(e.value)
    assert "without re-encoding the latents" in str(e.value)
    half = tmp_path / "half.zarr"
    shutil.copytree(stores["plain"], half)
    run_main(extract_features.main, args(images, half, "--repa-image-size", 8, "--debug-stop-after-shards", 1))
    with pytest.raises(UserError, match="images of the store .* are incomplete.*--repa-image-size 8"):
        open_dataset(zarr_path=half, images=True)
    feats, labels = tmp_path / "f", tmp_path / "l"
    feats.mkdir()
    labels.mkdir()
    for i in range(2):
        np.save(feats / f"{i}.npy", np.zeros((2, 4, 2, 2), np.float32))
        np.save(labels / f"{i}.npy", np.array([i]))
    assert open_dataset(feature_path=feats, label_path=labels).images_size is None
    with pytest.raises(UserError, match="representation alignment needs a zarr store with images"):
        open_dataset(feature_path=feats, label_path=labels, images=True)


@pytest.mark.parametrize("cache", ["memory", "mmap", "none"])
def test_get_batch_returns_images_mirrored_like_the_latents(data, cache):
    _, stores = data
    ds = open_dataset(zarr_path=stores[8], cache=cache, images=True)
    ds.prepare()
    assert ds.images_in_memory == (cache == "memory")  # 6 tiny images: far below 10% of the memory
    stored = zarr.open_group(str(stores[8]), mode="r")["images"][:]
    idx, orient = np.array([4, 1, 1, 0, 5]), np.array([1, 0, 1, 0, 1])
    x, y, img = ds.get_batch(idx, None, orient=orient, noise_seeds=np.arange(5))
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert img.shape == (5, 3, 8, 8) and img.dtype == torch.uint8
    want = np.stack([stored[i][..., ::-1] if o else stored[i] for i, o in zip(idx, orient)])
    np.testing.assert_array_equal(img.numpy(), want)
    x2, y2 = open_dataset(zarr_path=stores[8], cache=cache).get_batch(idx, None, orient=orient,
                                                                      noise_seeds=np.arange(5))
    torch.testing.assert_close(x, x2, rtol=0, atol=0)
    assert torch.equal(y, y2)
    # orientations drawn from rng: the images follow the latents; hflip=False: orientation 0 for both
    for hflip in (True, False):
        ds = open_dataset(zarr_path=stores[16], cache=cache, images=True, hflip=hflip)
        x, _, img = ds.get_batch(np.arange(6), np.random.default_rng(3))
        np.testing.assert_array_equal(np.rint((x.numpy().astype(np.float64) + 1) * 127.5), img.numpy())
        if not hflip:
            np.testing.assert_array_equal(img.numpy(), zarr.open_group(str(stores[16]), mode="r")["images"][:])


@pytest.mark.parametrize("fast", [True, False])
def test_image_reads_without_zarrs_event_loop_runner_give_the_same_images(data, monkeypatch, fast):
    """The concurrent read uses zarr internals; without them (another zarr version) the plain selection runs."""
    import preparation.readers as readers

    _, stores = data
    if not fast:
        monkeypatch.setattr(readers, "zarr_sync", None)
    ds = open_dataset(zarr_path=stores[8], cache="none", images=True)
    idx, orient = np.array([5, 0, 3, 3]), np.array([0, 1, 0, 1])
    img = ds.get_batch(idx, None, orient=orient, noise_seeds=np.arange(4))[2]
    stored = zarr.open_group(str(stores[8]), mode="r")["images"][:]
    want = np.stack([stored[i][..., ::-1] if o else stored[i] for i, o in zip(idx, orient)])
    np.testing.assert_array_equal(img.numpy(), want)


def test_normalized_dataset_passes_the_images_through(data):
    _, stores = data
    ds = open_dataset(zarr_path=stores[8], cache="memory", images=True)
    norm = LatentNorm([0.1, -0.2, 0.3], [2.0, 0.5, 1.5])
    wrapped = NormalizedDataset(ds, norm)
    draws = {"orient": np.array([0, 1, 1]), "noise_seeds": np.arange(3)}
    x, y, img = ds.get_batch(np.arange(3), None, **draws)
    nx, ny, nimg = wrapped.get_batch(np.arange(3), None, **draws)
    torch.testing.assert_close(nx, norm.normalize(x))
    assert torch.equal(ny, y) and torch.equal(nimg, img) and nimg.dtype == torch.uint8
    assert len(NormalizedDataset(open_dataset(zarr_path=stores[8]), norm).get_batch(np.arange(3), None, **draws)) == 2
