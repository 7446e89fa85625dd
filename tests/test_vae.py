"""VAE wrapper, image helpers, the digits demo data set, the distributed no-op and download_snapshot.

References: diffusers AutoencoderKL called directly, PIL resizes, closed-form rounding, scikit-learn's
load_digits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fcdm_common.cli import UserError
from fcdm_common.images import center_crop_arr, make_grid, pil_to_tensor, save_grid, to_uint8
from models.autoencoders import load_autoencoder, vae_id


def build_tiny_vae(folder):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                          latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16)
    model.save_pretrained(folder)
    return model.eval()


def test_sd_vae_moments_and_decode_match_diffusers(tmp_path):
    ref = build_tiny_vae(tmp_path / "vae")
    vae = load_autoencoder("sd", hf_model_dir=tmp_path / "vae", scaling_factor=0.3)
    assert vae.latent_channels == 4 and vae.downsample == 2 and vae.scaling_factor == 0.3
    assert vae.name == "sd:vae" == vae_id("sd", hf_model_dir=str(tmp_path / "vae"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = vae.encode_moments(x)
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        torch.testing.assert_close(mean, post.mean)
        torch.testing.assert_close(std, post.std)
        z = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(vae.decode(z), ref.decode(z / 0.3).sample)  # decode takes SCALED latents
    assert mean.shape == (2, 4, 8, 8) and vae.decode(z).shape == (2, 3, 16, 16)


def test_vae_folder_errors_and_identity(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json") as e:
        load_autoencoder("sd", hf_model_dir=tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        load_autoencoder("sd", hf_model_dir=tmp_path / "missing")
    ident = load_autoencoder("none")
    x = torch.rand(2, 3, 8, 8)
    mean, std = ident.encode_moments(x)
    assert torch.equal(mean, x) and torch.equal(std, torch.zeros_like(x)) and torch.equal(ident.decode(x), x)
    assert (ident.latent_channels, ident.downsample, ident.scaling_factor, ident.name) == (3, 1, 1.0, "none")
    assert vae_id("sd") == "sd:sd-vae-ft-ema" == vae_id("sd", hf_model_dir="/x/sd-vae-ft-ema/")


def test_center_crop_arr_matches_adm_steps():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    # 4x nearest upscale: two BOX halvings are exact, the final resize is identity
    big = Image.fromarray(base.repeat(4, 0).repeat(4, 1))
    np.testing.assert_array_equal(np.asarray(center_crop_arr(big, 16)), base)
    # non-square, no halving: BICUBIC resize of the short side to 16, then the central crop
    img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))  # H=20, W=30
    expect = np.asarray(img.resize((24, 16), resample=Image.BICUBIC))[:, 4:20]  # 30 * 16/20 = 24 wide
    np.testing.assert_array_equal(np.asarray(center_crop_arr(img, 16)), expect)
    # one BOX halving happens when the short side >= 2x (40x64 -> 20x32 box, then bicubic to 16)
    img = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
    half = img.resize((32, 20), resample=Image.BOX)
    expect = np.asarray(half.resize((round(32 * 0.8), 16), resample=Image.BICUBIC))
    left = (expect.shape[1] - 16) // 2
    np.testing.assert_array_equal(np.asarray(center_crop_arr(img, 16)), expect[:, left:left + 16])


def test_to_uint8_rounding_and_pil_round_trip(tmp_path):
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    got = to_uint8(x)[0, 0, :, 0]
    expect = np.floor(np.clip((np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0]) + 1) * 127.5 + 0.5, 0, 255))
    np.testing.assert_array_equal(got, expect.astype(np.uint8))
    img = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    back = to_uint8(pil_to_tensor(Image.fromarray(img))[None])[0]
    np.testing.assert_array_equal(back, img)  # uint8 -> [-1, 1] -> uint8 is exact


def test_save_grid_writes_png(tmp_path):
    imgs = np.stack([np.full((4, 5, 3), 10 * i, np.uint8) for i in range(5)])
    save_grid(imgs, tmp_path / "g.png", nrow=3, padding=1)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
    np.testing.assert_array_equal(grid[1:5, 1 + 6:6 + 6], imgs[1])  # row 0, column 1
    np.testing.assert_array_equal(grid, make_grid(imgs, 3, 1))
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temp file left


def test_make_demo_dataset_matches_sklearn_digits(tmp_path):
    from sklearn.datasets import load_digits
    from torchvision.datasets import ImageFolder

    from preparation.make_demo_dataset import make_demo_dataset

    out = make_demo_dataset(tmp_path / "digits", upscale=3)
    digits = load_digits()
    folder = ImageFolder(str(out))
    assert folder.classes == [str(d) for d in range(10)] and len(folder) == len(digits.target)
    np.testing.assert_array_equal(np.bincount(folder.targets), np.bincount(digits.target))
    first = np.asarray(Image.open(out / str(digits.target[0]) / "00000.png"))
    assert first.shape == (24, 24, 3) and first.dtype == np.uint8
    expect = np.rint(digits.images[0] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(first[::3, ::3, 0], expect)
    np.testing.assert_array_equal(first[2::3, 1::3, 1], expect)  # nearest neighbour: blocks are constant
    # a complete folder is reused; another upscale rewrites it
    stamp = (out / ".complete").stat().st_mtime_ns
    assert make_demo_dataset(out, upscale=3) == out and (out / ".complete").stat().st_mtime_ns == stamp
    make_demo_dataset(out, upscale=1)
    assert np.asarray(Image.open(out / str(digits.target[0]) / "00000.png")).shape == (8, 8, 3)


def test_distributed_noop_without_torchrun(monkeypatch):
    from fcdm_common import distributed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    distributed.barrier()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_gather_object(3) == [3]


def test_download_snapshot_checks_result(tmp_path, monkeypatch):
    import huggingface_hub

    from preparation import download_snapshot

    calls = {}

    def fake(repo_id, local_dir, revision, allow_patterns):
        calls.update(repo_id=repo_id, local_dir=local_dir, allow_patterns=allow_patterns)
        (tmp_path / "snap").mkdir(exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(UserError, match="config.json"):
        download_snapshot.download("org/repo", tmp_path / "snap")
    assert calls == {"repo_id": "org/repo", "local_dir": str(tmp_path / "snap"),
                     "allow_patterns": ["*.json", "*.safetensors"]}
    (tmp_path / "snap" / "config.json").write_text("{}")
    assert download_snapshot.download("org/repo", tmp_path / "snap") == tmp_path / "snap"
