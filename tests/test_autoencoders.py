"""Any diffusers autoencoder (models/autoencoders.py), per-channel latent statistics and
--latent-norm channel (preparation/statistics.py, models/latent_space.py, preparation/latent_stats.py), offline
VAE checks.

References: the diffusers models called directly (encode/decode), numpy float64 sums over the store,
the closed-form moments of z = (mean + std * eps - shift) * scale, bitwise equality across process
counts. Tiny autoencoders of each class are built and saved with save_pretrained here; 16x16 images.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcdm_common.cli import UserError
from helpers import one_thread, run_torchrun  # noqa: F401  (fixture, used through pytestmark)
from models.autoencoders import SUPPORTED_CLASSES, load_autoencoder
from preparation.statistics import NormalizedDataset, shard_sums

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def build_kl(folder, channels=4, shift=None, scale=0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(8, 16), latent_channels=channels, norm_num_groups=4, layers_per_block=1,
                          sample_size=16, scaling_factor=scale, shift_factor=shift,
                          use_quant_conv=shift is None, use_post_quant_conv=shift is None)  # SD3/FLUX: no quant convs
    model.save_pretrained(folder)
    return model.eval()


def build_dc(folder):
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    model = AutoencoderDC(latent_channels=8, attention_head_dim=4, encoder_block_types=blocks,
                          decoder_block_types=blocks, encoder_block_out_channels=(8, 8, 16),
                          decoder_block_out_channels=(8, 8, 16), encoder_layers_per_block=(1, 1, 1),
                          decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), (5,)),
                          decoder_qkv_multiscales=((), (), (5,)), scaling_factor=0.4)
    model.save_pretrained(folder)
    return model.eval()


# name -> (builder, class, channels, downsample, scale, shift, store mode)
CASES = {
    "kl4": (lambda f: build_kl(f), "AutoencoderKL", 4, 2, 0.18215, 0.0, "moments"),
    "kl16-shift": (lambda f: build_kl(f, channels=16, shift=0.1, scale=0.5), "AutoencoderKL", 16, 2, 0.5, 0.1,
                   "moments"),
    "dc": (build_dc, "AutoencoderDC", 8, 4, 0.4, 0.0, "sample"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "folder"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, images):
    """One store per autoencoder class, made by extract_features.py (shards of 4 images: 2 shards)."""
    from preparation import extract_features

    root = tmp_path_factory.mktemp("stores")
    out = {}
    for name, (build, *_rest) in CASES.items():
        vae_dir = root / f"vae-{name}"
        model = build(vae_dir)
        store = root / f"{name}.zarr"
        extract_features.main(["--data-path", str(images), "--features-path", str(store), "--image-size", "16",
                               "--hf-model-dir", str(vae_dir), "--batch-size", "2", "--num-workers", "0",
                               "--shard-size", "4", "--chunk-size", "2", "--device", "cpu"])
        out[name] = {"vae_dir": vae_dir, "store": store, "model": model}
    return out


def store_attrs(store) -> dict:
    import zarr

    return dict(zarr.open_group(str(store), mode="r").attrs)


def numpy_stats(store):
    """Reference statistics straight from the stored arrays, float64 numpy, closed-form moments."""
    import zarr

    g = zarr.open_group(str(store), mode="r")
    a = dict(g.attrs)
    v = np.asarray(g["latents"][:]).astype(np.float64)
    s, b = a["scaling_factor"], a["shift_factor"]
    if a["store"] == "moments":
        m, sd = v[:, :, 0] - b, v[:, :, 1]
        mean = s * m.mean(axis=(0, 1, 3, 4))
        second = s * s * (m ** 2 + sd ** 2).mean(axis=(0, 1, 3, 4))
    else:
        mean = v.mean(axis=(0, 1, 3, 4))
        second = (v ** 2).mean(axis=(0, 1, 3, 4))
    return mean, np.sqrt(second - mean ** 2)


# ----------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_matches_the_autoencoders_own(tmp_path, name):
    build, cls, C, down, scale, shift, _ = CASES[name]
    ref = build(tmp_path / "vae")
    vae = load_autoencoder("sd", hf_model_dir=tmp_path / "vae")
    assert (vae.vae_class, vae.latent_channels, vae.downsample, vae.scaling_factor, vae.shift_factor) == \
        (cls, C, down, scale, shift)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out = ref.encode(x)
        latent = out.latent if cls == "AutoencoderDC" else out.latent_dist.mean
        own = ref.decode(latent).sample  # the autoencoder's own decode(encode(x))
    z = vae.encode(x)
    torch.testing.assert_close(z, (latent - shift) * scale)  # z = (latent - shift) * scale
    assert z.shape == (2, C, 16 // down, 16 // down)
    torch.testing.assert_close(vae.decode(z), own, rtol=1e-5, atol=1e-5)
    mean, std = vae.encode_moments(x)
    torch.testing.assert_close(mean, latent)
    if cls == "AutoencoderDC":
        assert torch.equal(std, torch.zeros_like(mean))  # deterministic encoder
    else:
        torch.testing.assert_close(std, out.latent_dist.std)


def test_flags_override_config_and_bad_configs(tmp_path):
    build_kl(tmp_path / "vae")
    vae = load_autoencoder("sd", hf_model_dir=tmp_path / "vae", scaling_factor=0.25, shift_factor=-0.5)
    assert (vae.scaling_factor, vae.shift_factor) == (0.25, -0.5)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(vae.encode(x), (vae.encode_moments(x)[0] + 0.5) * 0.25)
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(UserError, match="not supported; supported autoencoder classes: AutoencoderKL, AutoencoderDC"):
        load_autoencoder("sd", hf_model_dir=tmp_path / "tiny")
    (tmp_path / "nolat").mkdir()
    (tmp_path / "nolat" / "config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if k != "latent_channels"}))
    with pytest.raises(UserError, match="latent channel count .*--vae-latent-channels"):
        load_autoencoder("sd", hf_model_dir=tmp_path / "nolat")
    with pytest.raises(UserError, match="encodes .* not .*fix or drop"):  # a wrong override is caught on encode
        load_autoencoder("sd", hf_model_dir=tmp_path / "vae", latent_channels=5).encode_moments(x)
    assert set(SUPPORTED_CLASSES) == {"AutoencoderKL", "AutoencoderDC"}


# ----------------------------------------------------------------------------- extraction -> train -> sample
@pytest.mark.parametrize("name,norm", [("kl4", "none"), ("kl16-shift", "channel"), ("dc", "channel")])
def test_extract_train_sample_each_class(extracted, tmp_path, name, norm):
    from train_gen import sample, train

    _, cls, C, down, scale, shift, mode = CASES[name]
    store, vae_dir = extracted[name]["store"], extracted[name]["vae_dir"]
    a = store_attrs(store)
    assert (a["vae_class"], a["latent_shape"], a["downsample"], a["scaling_factor"], a["shift_factor"], a["store"]) \
        == (cls, [C, 16 // down, 16 // down], down, scale, shift, mode)
    assert a["hf_model_dir"] == str(vae_dir.resolve()) and a["complete"]
    mean, std = numpy_stats(store)
    np.testing.assert_allclose(a["latent_stats"]["mean"], mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a["latent_stats"]["std"], std, rtol=1e-10, atol=1e-12)
    assert a["latent_stats"]["elements_per_channel"] == 6 * 2 * (16 // down) ** 2
    # train a few steps; no VAE flag: the grids decode with the VAE the store records
    res = tmp_path / "res"
    train.main(["--model", "FCDM-digits", "--hidden-size", "16", "--depths", "1,1,1", "--global-batch-size", "2",
                "--num-workers", "0", "--zarr-path", str(store), "--results-dir", str(res), "--max-train-steps", "2",
                "--log-every", "1", "--sample-every", "2", "--grid-steps", "2", "--grid-cols", "1",
                "--latent-norm", norm])
    rd = next(res.iterdir())
    config = json.loads((rd / "config.json").read_text())
    assert config["model_kwargs"]["in_channels"] == C and config["vae"]["hf_model_dir"] == str(vae_dir.resolve())
    assert config["vae"]["shift_factor"] == shift and config["data"]["vae_class"] == cls
    if norm == "channel":
        assert config["data"]["latent_norm"] == {"mode": "channel", "mean": a["latent_stats"]["mean"],
                                                 "std": a["latent_stats"]["std"]}
    else:
        assert config["data"]["latent_norm"] == {"mode": "none"}
    assert Image.open(rd / "samples" / "0000002.png").size == (20, 38)  # 2 classes x 1 column of 16x16 images
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", str(rd / "checkpoints" / "0000002.pt"), "--sampler", "ddim", "--num-sampling-steps", "2",
                 "--class-labels", "0", "1", "--out", str(out), "--save-individual", str(tmp_path / "ind")])
    imgs = sorted((tmp_path / "ind").iterdir())
    assert len(imgs) == 2 and all(Image.open(p).size == (16, 16) for p in imgs)


# ----------------------------------------------------------------------------- statistics
def test_latent_stats_exact_for_1_and_2_processes_and_resumable(extracted, tmp_path):
    import shutil

    from preparation import latent_stats

    for name in ("kl16-shift", "dc"):
        original = store_attrs(extracted[name]["store"])["latent_stats"]
        copy = tmp_path / f"{name}.zarr"
        shutil.copytree(extracted[name]["store"], copy)
        latent_stats.main([str(copy), "--recompute", "--debug-stop-after-shards", "1"])  # interrupted
        assert "latent_stats" not in store_attrs(copy)
        latent_stats.main([str(copy)])  # resumes: the remaining shard
        assert store_attrs(copy)["latent_stats"] == original  # bitwise the extraction's statistics
        if name == "kl16-shift":  # one torchrun launch keeps the test short
            run_torchrun(REPO / "preparation" / "latent_stats.py", [copy, "--recompute"], timeout=180)
            assert store_attrs(copy)["latent_stats"] == original  # 2 processes: the same bits
        mean, std = numpy_stats(copy)
        np.testing.assert_allclose(original["mean"], mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(original["std"], std, rtol=1e-10, atol=1e-12)


def test_shard_sums_of_moments_are_the_expected_z_moments():
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=(3, 2, 2, 4, 4)), rng.uniform(0.1, 1, size=(3, 2, 2, 4, 4))
    values = np.stack([mean, std], axis=2)  # (n, O, 2, C, H, W)
    sums = shard_sums(values, "moments", 0.5, 0.2)
    # Monte Carlo of the definition z = (mean + std * eps - shift) * scale, 20000 draws per element
    eps = rng.standard_normal((20000, *mean.shape))
    z = (mean + std * eps - 0.2) * 0.5
    n = 20000
    np.testing.assert_allclose(sums[0], z.sum(axis=(0, 1, 2, 4, 5)) / n, rtol=0.02, atol=0.05)
    np.testing.assert_allclose(sums[1], (z ** 2).sum(axis=(0, 1, 2, 4, 5)) / n, rtol=0.02)


def test_channel_norm_makes_inputs_zero_mean_unit_std(extracted):
    from preparation.readers import open_dataset
    from preparation.statistics import norm_for_training

    for name in ("dc", "kl16-shift"):
        store = extracted[name]["store"]
        ds = open_dataset(str(store), cache="memory")
        ds.prepare()
        norm = norm_for_training(ds, "channel", str(store))
        wrapped = NormalizedDataset(ds, norm)
        idx = np.arange(len(ds))
        if ds.mode == "sample":  # every item in both orientations: exactly the statistics' population
            x = torch.from_numpy(np.asarray(ds._memory, dtype=np.float32)).flatten(0, 1)  # (N*2, C, H, W)
            xn = norm.normalize(x)
            torch.testing.assert_close(xn.mean(dim=(0, 2, 3)), torch.zeros(x.shape[1]), atol=1e-5, rtol=0)
            torch.testing.assert_close(xn.std(dim=(0, 2, 3), correction=0), torch.ones(x.shape[1]), atol=1e-5, rtol=0)
        else:  # moments: fresh posterior noise each batch, so many batches, statistical tolerance
            xs = torch.cat([wrapped.get_batch(idx, np.random.default_rng(s))[0] for s in range(300)])
            torch.testing.assert_close(xs.mean(dim=(0, 2, 3)), torch.zeros(xs.shape[1]), atol=0.05, rtol=0)
            torch.testing.assert_close(xs.std(dim=(0, 2, 3)), torch.ones(xs.shape[1]), atol=0.05, rtol=0)
        # the training path: the wrapper's batch is the normalised batch of the same draw
        x0, y0 = ds.get_batch(idx, np.random.default_rng(7))
        x1, y1 = wrapped.get_batch(idx, np.random.default_rng(7))
        assert torch.equal(y0, y1) and torch.equal(x1, norm.normalize(x0))
        assert not torch.allclose(x0, x1)


def test_sampling_inverts_the_normalisation_exactly(extracted, tmp_path, monkeypatch):
    """generate() must decode x * std_c + mean_c: checked with the sampler replaced by a known tensor."""
    import diffusion
    from diffusion import sampling
    from fcdm_common.images import to_uint8
    from train_gen import train

    store, vae_dir = extracted["kl16-shift"]["store"], extracted["kl16-shift"]["vae_dir"]
    res = tmp_path / "res"
    train.main(["--model", "FCDM-digits", "--hidden-size", "16", "--depths", "1,1,1", "--global-batch-size", "2",
                "--num-workers", "0", "--zarr-path", str(store), "--results-dir", str(res), "--max-train-steps", "1",
                "--sample-every", "0", "--latent-norm", "channel"])
    ckpt = next(res.iterdir()) / "checkpoints" / "0000001.pt"
    setup = sampling.load_setup(ckpt)
    stats = store_attrs(store)["latent_stats"]
    known = torch.randn(2, *setup.latent_shape, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(diffusion, "sample", lambda *a, **k: known.clone())
    images, _ = sampling.generate(setup, [0, 1], sampling.SamplerSettings("ddim", 1), seed=0, labels=[0, 1])
    vae = load_autoencoder("sd", hf_model_dir=vae_dir, scaling_factor=0.5, shift_factor=0.1)
    z = known * torch.tensor(stats["std"]).view(1, -1, 1, 1) + torch.tensor(stats["mean"]).view(1, -1, 1, 1)
    np.testing.assert_array_equal(images, to_uint8(vae.decode(z)))
    assert not np.array_equal(images, to_uint8(vae.decode(known)))  # a forgotten inverse differs
    # the wrong VAE for a normalised checkpoint: one clear message
    build_kl(tmp_path / "other", channels=16, shift=0.1, scale=0.5)
    with pytest.raises(UserError, match="normalised with their per-channel statistics.*VAE given is sd:other"):
        sampling.load_setup(ckpt, hf_model_dir=str(tmp_path / "other"))


# ----------------------------------------------------------------------------- bad input and offline
def _run(script, args, env=None, timeout=120):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], env=e, capture_output=True,
                          text=True, timeout=timeout)


def test_latent_norm_channel_on_a_store_without_statistics(extracted, tmp_path, capsys):
    import shutil

    import zarr

    from fcdm_common.cli import run_main
    from train_gen import train

    old = tmp_path / "old.zarr"
    shutil.copytree(extracted["kl4"]["store"], old)
    g = zarr.open_group(str(old), mode="r+")
    del g.attrs["latent_stats"]
    res = tmp_path / "res"
    with pytest.raises(SystemExit) as e:
        run_main(train.main, ["--model", "FCDM-digits", "--zarr-path", str(old), "--results-dir", str(res),
                              "--latent-norm", "channel", "--sample-every", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"python preparation/latent_stats.py {old}" in err[0], err
    assert not res.exists()


def test_too_many_levels_for_the_latents_names_depths(extracted, tmp_path):
    from train_gen import train

    with pytest.raises(UserError, match=r"does not fit the data: latents of 4x4 .* 4-level .*2\^3 = 8; "
                                        r"use at most 3 level\(s\) via "
                                        r"--depths with 5 entries \(e.g. --depths 1,2,3,2,1\)"):
        train.main(["--model", "FCDM-digits", "--hidden-size", "16", "--depths", "1,1,2,3,2,1,1",
                    "--zarr-path", str(extracted["dc"]["store"]), "--results-dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_offline_without_vae_folder_is_one_fast_message(tmp_path, monkeypatch, capsys):
    """No network (HF_HUB_OFFLINE=1) and an empty hub cache: training (grids on), sampling and extraction
    stop at once with one message naming the fix, and write nothing."""
    import huggingface_hub.constants

    from fcdm_common.cli import run_main
    from preparation import extract_features
    from train_gen import sample, train

    feats, labels = tmp_path / "feats", tmp_path / "labels"
    feats.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # the original release's layout: SD-VAE latents, the hub VAE by default
        np.save(feats / f"{i}.npy", rng.standard_normal((2, 4, 4, 4)).astype(np.float32))
        np.save(labels / f"{i}.npy", np.array(i % 2))
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = tmp_path / "res"
    tiny = ["--model", "FCDM-digits", "--hidden-size", "16", "--depths", "1,1,1", "--feature-path", feats,
            "--label-path", labels, "--global-batch-size", "2", "--num-workers", "0"]
    t0 = time.time()
    proc = _run("train_gen/train.py", tiny + ["--results-dir", res], env=env)  # a real process: exit 2, one line
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for part in ("--hf-model-dir", "preparation/download_snapshot.py --repo-id stabilityai/sd-vae-ft-ema",
                 "--sample-every 0", "HF_HUB_OFFLINE"):
        assert part in err[0], err[0]
    assert not res.exists()  # nothing written
    assert time.time() - t0 < 40  # no 30 s of hub retries (one process start, under load)
    # the same in this process for sampling and extraction (offline, empty cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    train.main([str(a) for a in tiny + ["--results-dir", tmp_path / "ck", "--max-train-steps", "1",
                                        "--sample-every", "0"]])  # no grids: no VAE needed
    ckpt = next((tmp_path / "ck").iterdir()) / "checkpoints" / "0000001.pt"
    out = tmp_path / "s.png"
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    capsys.readouterr()
    for main, argv in ((sample.main, ["--ckpt", ckpt, "--out", out, "--num-sampling-steps", "2"]),
                       (extract_features.main, ["--data-path", tmp_path / "imgs", "--features-path",
                                                tmp_path / "f.zarr", "--image-size", "16", "--num-workers", "0"])):
        with pytest.raises(SystemExit) as e:
            run_main(main, [str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert "--hf-model-dir DIR" in err[0] and "download_snapshot.py" in err[0], err[0]
    assert not out.exists() and not (tmp_path / "f.zarr").exists()


def test_download_snapshot_subfolder(tmp_path, monkeypatch):
    import huggingface_hub

    from preparation import download_snapshot

    seen = {}

    def fake(repo_id, local_dir, revision, allow_patterns):  # what a pipeline repository's vae/ download leaves
        seen["patterns"] = allow_patterns
        (Path(local_dir) / "vae").mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "vae" / "config.json").write_text("{}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert download_snapshot.download("org/pipe", tmp_path / "p", subfolder="vae") == tmp_path / "p" / "vae"
    assert seen["patterns"] == ["vae/*.json", "vae/*.safetensors"]
    with pytest.raises(UserError, match="--subfolder vae"):
        download_snapshot.download("org/pipe", tmp_path / "q")


def test_summary_gflops_on_other_latent_shapes():
    from models.summary import latent_gflops, summarize

    # 4x32x32 is the SD-VAE table's 256 column; 32 channels at 8x8 costs 1/16 of the spatial work and more
    # at the stem/head, so it lies between 1/16 and 1/8 of it
    base = summarize("FCDM-S", (256,))["gflops"][256]
    assert latent_gflops("FCDM-S", (4, 32, 32)) == base
    assert base / 16 < latent_gflops("FCDM-S", (32, 8, 8)) < base / 8
    with pytest.raises(UserError, match="divisible by 4"):
        latent_gflops("FCDM-S", (32, 6, 6))


def test_grids_use_the_datas_vae_and_resume_refuses_changed_statistics(extracted, tmp_path, capsys):
    """No VAE flag -> the store's VAE (tested above); an override -> a warning; the
    store's folder gone and no flag -> one message. A normalised run resumed on changed statistics stops."""
    import shutil

    import zarr

    from train_gen import train

    store = tmp_path / "s.zarr"
    shutil.copytree(extracted["kl16-shift"]["store"], store)
    base = ["--model", "FCDM-digits", "--hidden-size", "16", "--depths", "1,1,1", "--global-batch-size", "2",
            "--num-workers", "0", "--zarr-path", str(store), "--grid-steps", "1", "--grid-cols", "1"]
    build_kl(tmp_path / "other", channels=16, shift=0.1, scale=0.5)
    train.main(base + ["--results-dir", str(tmp_path / "r1"), "--max-train-steps", "1", "--sample-every", "1",
                       "--hf-model-dir", str(tmp_path / "other")])
    out = capsys.readouterr().out
    assert "WARNING: sample grids: decoding with the VAE sd:other, but the data was made with sd:vae-kl16-shift" in out
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["hf_model_dir"] = str(tmp_path / "gone")
    with pytest.raises(UserError, match=r"made with the VAE sd:vae-kl16-shift from the folder .*gone, which does not "
                                        r"exist on this machine; pass its snapshot with --hf-model-dir "
                                        r".*--sample-every 0"):
        train.main(base + ["--results-dir", str(tmp_path / "r2"), "--max-train-steps", "1"])
    assert not (tmp_path / "r2").exists()
    # --latent-norm channel, then the store's statistics change: resuming the run is refused
    cmd = base + ["--results-dir", str(tmp_path / "r3"), "--sample-every", "0", "--latent-norm", "channel"]
    train.main(cmd + ["--max-train-steps", "1"])
    stats = dict(g.attrs["latent_stats"])
    g.attrs["latent_stats"] = {**stats, "mean": [v + 0.5 for v in stats["mean"]]}
    with pytest.raises(UserError, match="trained with latent normalisation .* but the data now gives"):
        train.main(cmd + ["--max-train-steps", "2"])


def test_shard_sums_in_groups_equal_numpy():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(150, 2, 3, 4, 4)).astype(np.float32)
    got = shard_sums(z, "sample", 1.0, 0.0, items_per_step=64)  # three groups: 64 + 64 + 22 items
    want = np.stack([z.astype(np.float64).sum(axis=(0, 1, 3, 4)), (z.astype(np.float64) ** 2).sum(axis=(0, 1, 3, 4))])
    np.testing.assert_allclose(got, want, rtol=1e-12)
