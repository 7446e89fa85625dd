"""Frozen timm vision encoders for REPA (models/vision_encoders.py), all offline.

References: the timm model the weights came from (forward_features on the same normalised input, prefix
tokens dropped), timm's own `resample_abs_pos_embed` for other resolutions. Tiny ViTs (width 32, one
block) are built here and saved as .safetensors, .pth (plain, and nested like a DINOv2 training
checkpoint) and timm hub snapshot folders (`timm.models.save_for_hf`).
"""
from __future__ import annotations

import json
import socket
import time

import pytest
import torch
import torch.nn.functional as F

from fcdm_common.cli import UserError
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)
from models.vision_encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VisionEncoder,
    load_vision_encoder,
    patch_grid,
    resolution_for_grid,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=32, depth=1, num_heads=2)
# arch -> (constructor arguments, prefix tokens, patch size)
ARCHS = {
    "dinov2": ("vit_small_patch14_dinov2", dict(TINY, img_size=28), 1, 14),
    "reg4": ("vit_small_patch14_reg4_dinov2", dict(TINY, img_size=28), 5, 14),
    "p16": ("vit_tiny_patch16_224", dict(TINY, img_size=32), 1, 16),
}


def build(kind, seed=0):
    import timm

    from helpers import randomize

    arch, args, _, _ = ARCHS[kind]
    torch.manual_seed(seed)
    return randomize(timm.create_model(arch, pretrained=False, **args), std=0.1, seed=seed).eval()


def save_safetensors(model, path):
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def reference_tokens(model, images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.forward_features(x)[:, model.num_prefix_tokens:]


def images(side, n=2, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture
def offline(monkeypatch):
    """Every way to the network raises: sockets, huggingface_hub's and torch.hub's download functions."""
    import huggingface_hub
    import timm.models._hub as timm_hub
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for fn in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, fn, refuse)
        if hasattr(timm_hub, fn):
            monkeypatch.setattr(timm_hub, fn, refuse)
    for fn in ("load_state_dict_from_url", "download_url_to_file"):
        monkeypatch.setattr(torch.hub, fn, refuse)


@pytest.mark.parametrize("kind", ["dinov2", "reg4", "p16"])
def test_safetensors_file_gives_the_models_patch_tokens(kind, tmp_path, offline):
    model = build(kind)
    arch, args, prefix, patch = ARCHS[kind]
    file = save_safetensors(model, tmp_path / "w.safetensors")
    enc = load_vision_encoder(arch, file, model_args=args)
    side = args["img_size"]
    assert isinstance(enc, VisionEncoder)
    assert (enc.name, enc.patch_size, enc.resolution, enc.embed_dim, enc.num_prefix_tokens) == \
        (arch, patch, side, 32, prefix)
    assert enc.grid == (side // patch,) * 2
    assert enc.num_params == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    x = images(side)
    tokens = enc(x)
    assert tokens.shape == (2, enc.grid[0] * enc.grid[1], 32)  # class and register tokens dropped
    torch.testing.assert_close(tokens, reference_tokens(model, x, enc.mean, enc.std))
    if kind == "p16":  # vit_tiny's augreg cfg: mean/std 0.5, from the registered pretrained cfg
        assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)
    else:
        assert enc.mean == IMAGENET_MEAN and enc.std == IMAGENET_STD
    d = enc.describe()
    assert d == {"arch": arch, "resolution": side, "patch": patch, "grid": f"{side // patch}x{side // patch}",
                 "embed_dim": 32, "params_m": round(enc.num_params / 1e6, 2), "prefix_tokens": prefix}


@pytest.mark.parametrize("kind", ["dinov2", "reg4"])
def test_pth_plain_and_nested_dinov2_layout(kind, tmp_path, offline):
    """A plain state dict, and DINOv2's own layouts: mask_token, register_tokens, the class token's position
    in pos_embed, nested as a training checkpoint's teacher under backbone. (heads dropped)."""
    model = build(kind)
    arch, args, _, _ = ARCHS[kind]
    sd = model.state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    official = {k: v for k, v in sd.items() if k not in ("reg_token",)}
    official["mask_token"] = torch.zeros(1, 32)
    if kind == "reg4":  # official: registers apart, pos_embed with a class slot, cls_token without its position
        cls_pos = torch.randn(1, 1, 32)
        official["register_tokens"] = sd["reg_token"]
        official["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], 1)
        official["cls_token"] = sd["cls_token"] - cls_pos
    nested = {"teacher": {**{"backbone." + k: v for k, v in official.items()},
                          "dino_head.mlp.0.weight": torch.zeros(4, 32)},
              "student": {"backbone.pos_embed": torch.zeros(1)}, "iteration": 7}
    torch.save(nested, tmp_path / "nested.pt")
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ddp.bin")
    x = images(28)
    ref = reference_tokens(model, x)
    for name in ("plain.pth", "nested.pt", "ddp.bin"):
        enc = load_vision_encoder(arch, tmp_path / name, model_args=args)
        torch.testing.assert_close(enc(x), ref, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("safe", [True, False])
def test_snapshot_folder_from_save_for_hf(safe, tmp_path, offline):
    from timm.models import save_for_hf

    model = build("reg4")
    arch, args, _, _ = ARCHS["reg4"]
    save_for_hf(model, tmp_path / "snap", model_args=args, safe_serialization=safe)
    assert (tmp_path / "snap" / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    x = images(28)
    ref = reference_tokens(model, x)
    for name in (None, arch, arch + ".lvd142m"):  # the folder's config names the architecture
        enc = load_vision_encoder(name, tmp_path / "snap")
        assert enc.name == arch + ".lvd142m" and enc.resolution == 28 and enc.num_prefix_tokens == 5
        torch.testing.assert_close(enc(x), ref)
    with pytest.raises(UserError, match="differs from"):
        load_vision_encoder("vit_small_patch14_dinov2", tmp_path / "snap")
    # mean/std come from the snapshot's pretrained_cfg
    config = json.loads((tmp_path / "snap" / "config.json").read_text())
    config["pretrained_cfg"].update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    (tmp_path / "snap" / "config.json").write_text(json.dumps(config))
    enc = load_vision_encoder(None, tmp_path / "snap")
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.25, 0.25, 0.25)
    torch.testing.assert_close(enc(x), reference_tokens(model, x, enc.mean, enc.std))


@pytest.mark.parametrize("kind", ["dinov2", "reg4", "p16"])
def test_other_resolution_resamples_the_position_embedding(kind, tmp_path):
    import timm
    from timm.layers import resample_abs_pos_embed

    model = build(kind)
    arch, args, _, patch = ARCHS[kind]
    file = save_safetensors(model, tmp_path / "w.safetensors")
    side = args["img_size"] + patch  # one more patch per side
    enc = load_vision_encoder(arch, file, resolution=side, model_args=args)
    grid = side // patch
    assert enc.resolution == side and enc.grid == (grid, grid)
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    expected = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[grid, grid], num_prefix_tokens=prefix)
    assert enc.model.pos_embed.shape == expected.shape != model.pos_embed.shape
    torch.testing.assert_close(enc.model.pos_embed, expected)
    # the tokens: timm's model at the new size with the resampled embedding, on the upscaled image
    ref_model = timm.create_model(arch, pretrained=False, **dict(args, img_size=side)).eval()
    sd = model.state_dict()
    sd["pos_embed"] = expected
    ref_model.load_state_dict(sd)
    x = images(args["img_size"])
    up = F.interpolate(x.float() / 255, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)
    tokens = enc(x)
    assert tokens.shape == (2, grid * grid, 32)
    torch.testing.assert_close(tokens, reference_tokens(ref_model, up, enc.mean, enc.std))
    # a larger input is downscaled (antialiased) to the encoder's resolution
    big = images(2 * side)
    down = F.interpolate(big.float() / 255, size=(side, side), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(enc(big), reference_tokens(ref_model, down, enc.mean, enc.std))


def test_frozen_eval_uint8_float_and_autocast(tmp_path):
    model = build("reg4")
    arch, args, _, _ = ARCHS["reg4"]
    # dropout that would change the output if the encoder ever ran in train mode
    enc = load_vision_encoder(arch, save_safetensors(model, tmp_path / "w.safetensors"),
                              model_args=dict(args, proj_drop_rate=0.5, drop_path_rate=0.5))
    assert all(not p.requires_grad for p in enc.parameters())
    assert enc.train() is enc and not enc.training and not any(m.training for m in enc.modules())
    enc.train(True)
    assert not any(m.training for m in enc.modules())
    x = images(28)
    xf = (x.float() / 255).requires_grad_(True)
    out = enc(xf)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(enc(x), out)  # uint8 and float [0, 1] agree
    torch.testing.assert_close(enc(x), enc(x))  # deterministic: eval mode
    # a projection trained on the tokens: no gradient reaches the encoder
    proj = torch.nn.Linear(32, 8)
    proj(enc(x)).square().mean().backward()
    assert proj.weight.grad is not None and all(p.grad is None for p in enc.parameters())
    # bf16 autocast is followed (not forced back to float32): finite, close to but not equal to float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = enc(x)
    assert torch.isfinite(low).all()
    assert not torch.equal(low.float(), out)
    torch.testing.assert_close(low.float(), out, atol=0.1, rtol=0.1)
    with pytest.raises(ValueError):
        enc(x[:, :1])


def test_dinov2_b14_grid_arithmetic():
    """REPA's DINOv2-B/14: 224 -> 16x16 tokens, 448 -> 32x32 (the real architecture, on the meta device)."""
    import timm

    assert patch_grid(224, 14) == (16, 16) and patch_grid(448, 14) == (32, 32) and patch_grid(518, 14) == (37, 37)
    assert resolution_for_grid(16, 14) == 224 and resolution_for_grid(32, 14) == 448
    assert resolution_for_grid(16, 16) == 256
    for side, grid in ((224, 16), (448, 32)):
        with torch.device("meta"):
            m = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=side)
        assert m.patch_embed.grid_size == (grid, grid) and m.pos_embed.shape == (1, 1 + grid * grid, 768)
        assert m.num_prefix_tokens == 1 and m.embed_dim == 768
    with pytest.raises(UserError, match="224 or 238"):
        patch_grid(230, 14)
    with pytest.raises(UserError, match="14 or 28"):
        patch_grid(13, 14)


def test_errors(tmp_path):
    model = build("dinov2")
    arch, args, _, _ = ARCHS["dinov2"]
    file = save_safetensors(model, tmp_path / "w.safetensors")

    def fails(match, *a, **kw):
        with pytest.raises(UserError, match=match) as e:
            load_vision_encoder(*a, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = fails("do not exist", arch, tmp_path / "nope.safetensors")
    assert "download_snapshot.py" in msg and "nope.safetensors" in msg
    fails("no vision encoder weights", arch, None)
    for name in ("bad.safetensors", "bad.pth"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
        assert name in fails("cannot read", arch, tmp_path / name, model_args=args)
    (tmp_path / "w.txt").write_text("x")
    fails("unknown file type", arch, tmp_path / "w.txt")
    torch.save([1, 2], tmp_path / "list.pth")
    fails("not a state dict", arch, tmp_path / "list.pth", model_args=args)
    fails("bare file", None, file)
    fails("unknown timm architecture", "vit_nonexistent_patch14", file)
    fails("no pretrained tag", arch + ".nope", file, model_args=args)
    fails("not a hub id", "hf-hub:timm/vit_small_patch14_dinov2.lvd142m", file)
    fails("not a ViT with patch tokens", "resnet18", file)  # a CNN: timm refuses img_size
    import timm

    with pytest.MonkeyPatch.context() as mp:  # a model that takes img_size but has no patch tokens
        mp.setattr(timm, "create_model", lambda *a, **kw: torch.nn.Linear(2, 2))
        assert "no patch_embed / num_prefix_tokens" in fails("not a ViT", arch, file, model_args=args)
    fails("not a multiple of its patch size 14; use 28 or 42", arch, file, resolution=30, model_args=args)
    fails("positive integer", arch, file, resolution=0, model_args=args)
    # weights that do not fit
    assert "missing blocks.1" in fails("do not fit", arch, file, model_args=dict(args, depth=2))
    wider_mlp = dict(args, mlp_ratio=2)
    assert "shapes (file vs model) blocks.0.mlp.fc1" in fails("do not fit", arch, file, model_args=wider_mlp)
    assert "do not fit" in fails("w.safetensors", arch, file)  # the default ViT-S width
    sd = dict(model.state_dict(), **{"extra.weight": torch.zeros(2)})
    torch.save(sd, tmp_path / "extra.pth")
    assert "unexpected extra.weight" in fails("do not fit", arch, tmp_path / "extra.pth", model_args=args)
    p16 = build("p16")
    save_safetensors(p16, tmp_path / "p16.safetensors")
    assert "patch_embed.proj.weight" in fails("do not fit", arch, tmp_path / "p16.safetensors",
                                              model_args=args)
    # a classifier head in the file is fine (vit_tiny's saved 1000-class head above is one too)
    torch.save(dict(model.state_dict(), **{"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}),
               tmp_path / "head.pth")
    load_vision_encoder(arch, tmp_path / "head.pth", model_args=args)
    # folders
    (tmp_path / "empty").mkdir()
    fails("no config.json", None, tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    fails("does not name a timm", None, tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"architecture": "vit_small_patch14_dinov2"}')
    fails("no model.safetensors or pytorch_model.bin", None, tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{oops")
    fails("cannot read", None, tmp_path / "empty")


def test_offline_with_registered_tag_and_load_time(tmp_path, offline, capsys):
    """A tagged name whose registered cfg has a download url and hub id: still nothing is fetched."""
    import timm

    assert timm.models.get_pretrained_cfg("vit_small_patch14_dinov2.lvd142m").hf_hub_id
    with pytest.raises(AssertionError, match="network access attempted"):  # the fixture does block timm
        timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=True, **TINY)
    model = build("dinov2")
    arch, args, _, _ = ARCHS["dinov2"]
    file = save_safetensors(model, tmp_path / "w.safetensors")
    t0 = time.perf_counter()
    enc = load_vision_encoder(arch + ".lvd142m", file, resolution=224, model_args=args)
    elapsed = time.perf_counter() - t0
    assert enc.grid == (16, 16) and enc(images(32, n=1)).shape == (1, 256, 32)
    with capsys.disabled():
        print(f"\n[tiny encoder load: {elapsed * 1000:.0f} ms]")
    assert elapsed < 5


def test_download_snapshot_fetches_timm_encoders(tmp_path, monkeypatch, capsys):
    """A timm repository (config.json with "architecture" + model.safetensors) is checked as such and loads
    as an encoder; one without its weights is refused; VAE folders keep their check."""
    import huggingface_hub
    from timm.models import save_for_hf

    from preparation import download_snapshot

    model = build("dinov2")
    arch, args, _, _ = ARCHS["dinov2"]
    calls = []

    def fake(repo_id, local_dir, revision, allow_patterns):  # what the hub's timm/... repository holds
        calls.append((repo_id, allow_patterns))
        save_for_hf(model, local_dir, model_args=args, safe_serialization=True)
        if repo_id.endswith("noweights"):
            (tmp_path / "bare" / "model.safetensors").unlink()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    download_snapshot.main(["--repo-id", "timm/" + arch, "--local-dir", str(tmp_path / "enc")])
    assert calls == [("timm/" + arch, ["*.json", "*.safetensors"])]
    assert "--repa-encoder-path " + str(tmp_path / "enc") in capsys.readouterr().out
    assert download_snapshot.snapshot_kind(tmp_path / "enc") == "timm"
    x = images(28)
    torch.testing.assert_close(load_vision_encoder(None, tmp_path / "enc")(x), reference_tokens(model, x))
    with pytest.raises(UserError, match="timm model .* has no model.safetensors or pytorch_model.bin"):
        download_snapshot.download("timm/noweights", tmp_path / "bare")
    # a diffusers VAE folder: config.json is enough, and the message names --hf-model-dir
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, local_dir, revision, allow_patterns: (
                            tmp_path.joinpath("vae").mkdir(), tmp_path.joinpath("vae", "config.json").write_text(
                                '{"_class_name": "AutoencoderKL"}')))
    download_snapshot.main(["--repo-id", "org/vae", "--local-dir", str(tmp_path / "vae")])
    assert "--hf-model-dir " + str(tmp_path / "vae") in capsys.readouterr().out
    assert download_snapshot.snapshot_kind(tmp_path / "vae") == "diffusers"
    with pytest.raises(SystemExit):
        download_snapshot.main(["--help"])
    assert "timm/vit_base_patch14_dinov2.lvd142m" in capsys.readouterr().out
