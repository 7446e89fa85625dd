"""Latent extraction end to end with a tiny AutoencoderKL loaded through --hf-model-dir.

References: torchvision ImageFolder (class/label order), diffusers AutoencoderKL called directly
(moments of the original and flipped crops), a 1-process run (for 2-process torchrun and resumed
runs), and the closed form of the posterior sample z = (mean + std * eps) * s.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from fcdm_common.cli import UserError, run_main
from fcdm_common.images import center_crop_arr, pil_to_tensor
from helpers import run_torchrun
from preparation import extract_features
from preparation.readers import open_dataset

SCRIPT = Path(extract_features.__file__)
CLASSES = ("cat", "dog", "eel")


def build_tiny_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                          latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    vae_dir = build_tiny_vae(root / "vae")
    images = root / "imgs"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (images / name).mkdir(parents=True)
        for i in range(7 - c):  # 7 + 6 + 5 = 18 images, varied sizes (some need BOX halving)
            h, w = rng.integers(16, 40, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name / f"im{i}.png")
    (images / "dog" / ".DS_Store").write_bytes(b"\0")  # hidden non-image files are ignored
    return root, vae_dir, images


def common_args(images, vae_dir, out, *extra):
    return ["--data-path", str(images), "--features-path", str(out), "--hf-model-dir", str(vae_dir),
            "--image-size", "16", "--batch-size", "3", "--shard-size", "4", "--chunk-size", "2",
            "--num-workers", "0", *extra]


def run_inprocess(argv):
    """extract_features.main with one intra-op thread (torchrun's per-process default), so results
    are bitwise comparable with the torchrun runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_features.main(argv)
    finally:
        torch.set_num_threads(threads)


def read_store(path):
    g = zarr.open_group(str(path), mode="r")
    return g["latents"][:], g["labels"][:], dict(g.attrs)


@pytest.fixture(scope="module")
def reference(assets):
    root, vae_dir, images = assets
    out = root / "ref.zarr"
    run_inprocess(common_args(images, vae_dir, out))
    return out


def test_store_layout_labels_and_imagefolder_order(assets, reference):
    from torchvision.datasets import ImageFolder

    _, _, images = assets
    lat, labels, attrs = read_store(reference)
    folder = ImageFolder(str(images))
    assert attrs["class_names"] == folder.classes == list(CLASSES)
    np.testing.assert_array_equal(labels, np.array(folder.targets))
    assert attrs["count"] == len(folder) == 18 and attrs["complete"] is True
    assert lat.shape == (18, 2, 2, 4, 8, 8) and lat.dtype == np.float16  # (N, O, mean/std, C, 16/2, 16/2)
    assert attrs["store"] == "moments" and attrs["image_size"] == 16 and attrs["vae"] == "sd:vae"
    assert attrs["scaling_factor"] == pytest.approx(0.18215)
    ds = open_dataset(zarr_path=reference)
    assert len(ds) == 18 and ds.num_classes == 3 and ds.latent_shape == (4, 8, 8)


def test_moments_match_diffusers_on_original_and_flipped_crops(assets, reference):
    from diffusers import AutoencoderKL
    from torchvision.datasets import ImageFolder

    _, vae_dir, images = assets
    lat, _, _ = read_store(reference)
    model = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()
    folder = ImageFolder(str(images))
    idx = [0, 9, 17]
    x = torch.stack([pil_to_tensor(center_crop_arr(Image.open(folder.samples[i][0]).convert("RGB"), 16)) for i in idx])
    with torch.no_grad():
        for o, xo in enumerate((x, torch.flip(x, dims=[-1]))):
            post = model.encode(xo).latent_dist
            np.testing.assert_allclose(lat[idx, o, 0].astype(np.float32), post.mean.numpy(), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(lat[idx, o, 1].astype(np.float32), post.std.numpy(), atol=2e-3, rtol=2e-3)
        # stored (scaled) moments decode back to images of the cropped size
        z = torch.from_numpy(lat[idx, 0, 0].astype(np.float32))
        assert model.decode(z).sample.shape == (3, 3, 16, 16)
    assert not np.allclose(lat[:, 0, 0], lat[:, 1, 0])  # the two orientations really differ


def test_identity_vae_flipped_latents_are_flipped_pixels(assets, tmp_path):
    _, _, images = assets
    out = tmp_path / "px.zarr"
    extract_features.main(["--data-path", str(images), "--features-path", str(out), "--vae", "none",
                           "--image-size", "16", "--num-workers", "0", "--shard-size", "8", "--chunk-size", "4"])
    lat, _, attrs = read_store(out)
    assert lat.shape == (18, 2, 2, 3, 16, 16) and attrs["scaling_factor"] == 1.0 and attrs["vae"] == "none"
    np.testing.assert_array_equal(lat[:, 1, 0], lat[:, 0, 0][..., ::-1])  # flip of width axis
    assert (lat[:, :, 1] == 0).all()  # identity posterior has std 0
    first = sorted((images / "cat").iterdir())[0]
    pix = pil_to_tensor(center_crop_arr(Image.open(first).convert("RGB"), 16)).numpy()
    np.testing.assert_allclose(lat[0, 0, 0].astype(np.float32), pix, atol=1e-3)


def test_torchrun_two_processes_equal_one_process(assets, reference, tmp_path):
    root, vae_dir, images = assets
    out = tmp_path / "two.zarr"
    run_torchrun(SCRIPT, common_args(images, vae_dir, out), timeout=120)
    a, b = read_store(reference), read_store(out)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert {k: v for k, v in a[2].items() if k != "source"} == {k: v for k, v in b[2].items() if k != "source"}


def test_interrupted_run_is_incomplete_then_resumes_to_same_store(assets, reference, tmp_path, capsys):
    _, vae_dir, images = assets
    out = tmp_path / "resume.zarr"
    run_inprocess(common_args(images, vae_dir, out, "--debug-stop-after-shards", "2"))
    g = zarr.open_group(str(out), mode="r")
    assert g["done"][:].tolist() == [True, True, False, False, False] and g.attrs["complete"] is False
    with pytest.raises(UserError, match="incomplete"):
        open_dataset(zarr_path=out)  # a half-written store is never presented as data
    # simulate a process killed while writing shard 2: garbage in it, marker not set
    zarr.open_group(str(out), mode="r+")["latents"][8:12] = np.float16(7.0)
    run_inprocess(common_args(images, vae_dir, out))
    assert "2/5 shards already done" in capsys.readouterr().out
    a, b = read_store(reference), read_store(out)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert b[2]["complete"] is True


def test_sample_mode_is_scaled_posterior_sample(assets, reference, tmp_path):
    _, vae_dir, images = assets
    out = tmp_path / "sample.zarr"
    run_inprocess(common_args(images, vae_dir, out, "--store", "sample", "--seed", "3"))
    sample, labels, attrs = read_store(out)
    mom, _, _ = read_store(reference)
    assert attrs["store"] == "sample" and sample.shape == (18, 2, 4, 8, 8) and sample.dtype == np.float32
    mean, std = mom[:, :, 0].astype(np.float64), mom[:, :, 1].astype(np.float64)
    eps = (sample / 0.18215 - mean) / std  # should be N(0, 1) draws (up to float16 storage of mean/std)
    assert abs(eps.mean()) < 0.15 and 0.8 < eps.std() < 1.2
    ds = open_dataset(zarr_path=out)
    from train_gen.loader import TrainLoader
    from train_gen.step_draws import BatchPlan

    x, y = TrainLoader(ds, BatchPlan(4), seed=0, num_workers=0).batch(0)
    assert x.shape == (4, 4, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def _exit2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(extract_features.main, argv)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ")  # one readable line (after any progress bar)
    assert not any("Traceback" in ln for ln in lines)
    return lines[-1]


def test_bad_inputs_exit_2_with_one_line(assets, reference, tmp_path, capsys):
    _, vae_dir, images = assets
    assert "does not exist" in _exit2(common_args(tmp_path / "missing", vae_dir, tmp_path / "o.zarr"), capsys)
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in _exit2(common_args(tmp_path / "empty", vae_dir, tmp_path / "o.zarr"), capsys)
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(bad / "a" / "ok.png")
    (bad / "a" / "notes.txt").write_text("hello")
    err = _exit2(common_args(bad, vae_dir, tmp_path / "o.zarr"), capsys)
    assert "notes.txt" in err and "not an image" in err
    (bad / "a" / "notes.txt").unlink()
    (bad / "a" / "broken.png").write_bytes(b"not really a png")
    err = _exit2(common_args(bad, vae_dir, tmp_path / "o2.zarr"), capsys)
    assert "broken.png" in err
    assert not open_ok(tmp_path / "o2.zarr")  # nothing presented as complete
    novae = tmp_path / "novae"
    novae.mkdir()
    err = _exit2(common_args(images, novae, tmp_path / "o3.zarr"), capsys)
    assert str(novae) in err and "config.json" in err
    # an existing store with other settings
    err = _exit2(common_args(images, vae_dir, reference)[:-6] + ["--image-size", "24", "--batch-size", "3",
                                                                "--shard-size", "4", "--chunk-size", "2"], capsys)
    assert "other settings" in err and "image_size" in err
    err = _exit2(common_args(images, vae_dir, reference, "--store", "sample"), capsys)
    assert "other settings" in err


def open_ok(path) -> bool:
    try:
        open_dataset(zarr_path=path)
        return True
    except UserError:
        return False


def test_cli_exit_status_and_help(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--data-path", str(tmp_path / "nope"), "--features-path",
                          str(tmp_path / "o.zarr"), "--vae", "none"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "nope" in res.stderr and "Traceback" not in res.stderr
