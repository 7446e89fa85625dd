"""models.convert_official: a checkpoint in the authors' release format -> ours, same network outputs.

The release-format file is written here from the NCHW paper-mode network (models/fcdm_reference.py)
by renaming its tensors to the release's names and shapes (the mapping below is written out in the
test from the release's module layout, independently of the converter's)."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from fcdm_common.cli import UserError
from models.checkpoints import build_model, load_checkpoint
from models.convert_official import main as convert_main
from models.fcdm_reference import FCDMReference

KW = dict(in_channels=4, hidden_size=8, depths=(1, 2, 1, 1, 2), num_classes=5, learn_sigma=True)
NAME = "FCDM-S"  # the test overrides the preset check below by using FCDM-S's width/depths


def _stage(name: str) -> str:
    """Our stage path -> the release's (level 1 = full resolution)."""
    return {"encoder.0": "encoder_level_1", "encoder.1": "encoder_level_2", "middle": "latent",
            "decoder.1": "decoder_level_2", "decoder.0": "decoder_level_1"}[name]


def _to_release(sd: dict, drop_null_row: bool = False) -> dict:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "stem":
            nk = f"x_embedder.{parts[1]}"
        elif parts[0] == "t_embedders":
            nk = f"t_embedder_{int(parts[1]) + 1}." + ".".join(parts[2:])
        elif parts[0] == "y_embedders":
            nk = f"y_embedder_{int(parts[1]) + 1}.embedding_table.weight"
            if drop_null_row:
                v = v[:-1]
        elif parts[0] in ("encoder", "decoder", "middle"):
            stage = ".".join(parts[:2]) if parts[0] != "middle" else "middle"
            rest = parts[2:] if parts[0] != "middle" else parts[1:]
            idx, param = rest[0], ".".join(rest[1:])
            if param.startswith("grn."):
                param = {"grn.weight": "grn.gamma", "grn.bias": "grn.beta"}[param]
                v = v.reshape(1, -1, 1, 1)
            nk = f"{_stage(stage)}.{idx}.{param}"
        elif parts[0] == "downsamples":
            nk = {"0": "down1_2", "1": "down2_3"}[parts[1]] + ".conv.0.weight"
        elif parts[0] == "upsamples":
            nk = {"0": "up2_1", "1": "up3_2"}[parts[1]] + ".conv.0.weight"
        elif parts[0] == "fuse":
            nk = {"0": "reduce_chans_1", "1": "reduce_chans_2"}[parts[1]] + "." + parts[2]
        elif parts[0] == "head":
            nk = {"conv": "output_layer", "adaLN_modulation": "final_layer.adaLN_modulation",
                  "out": "final_layer.conv"}[parts[1]] + "." + ".".join(parts[2:])
        else:
            raise AssertionError(k)
        out[nk] = v.clone()
    return out


def _reference(seed: int) -> FCDMReference:
    torch.manual_seed(seed)
    ref = FCDMReference(**KW, grad_checkpointing=False).double().eval()
    with torch.no_grad():
        for p in ref.parameters():  # random everywhere, incl. the zero-initialised GRN/adaLN/head
            p.normal_(0, 0.3)
    return ref


def _write_release(path, ref, ema_ref, drop_null_row=False, edit=None):
    model_sd, ema_sd = _to_release(ref.state_dict(), drop_null_row), _to_release(ema_ref.state_dict(), drop_null_row)
    if edit:
        edit(ema_sd)
    args = argparse.Namespace(model="FCDM-tiny", image_size=64, num_classes=KW["num_classes"], global_seed=0)
    torch.save({"model": model_sd, "ema": ema_sd, "opt": {"state": {}, "param_groups": []}, "args": args}, path)


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    """Register the test's tiny width/depths under NAME for the converter's preset check."""
    import models

    monkeypatch.setitem(models.MODELS, NAME, lambda **kw: __import__("models.fcdm", fromlist=["FCDM"]).FCDM(
        **{**dict(hidden_size=KW["hidden_size"], depths=KW["depths"]), **kw}))


def _ours(ckpt: dict, key: str):
    """Our network from the converted checkpoint, in float64 (the converter keeps the tensors' dtype)."""
    model = build_model(ckpt["config"]).double().eval()
    model.load_state_dict(ckpt[key])
    return model


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.tensor([0, 500, 999]), torch.tensor([0, 4, 5])


def test_converted_release_checkpoint_gives_the_reference_outputs(tmp_path):
    ref, ema = _reference(0), _reference(1)
    _write_release(tmp_path / "release.pt", ref, ema)
    convert_main(["--ckpt", str(tmp_path / "release.pt"), "--model", NAME, "--out", str(tmp_path / "ours.pt")])
    ckpt = load_checkpoint(tmp_path / "ours.pt")
    cfg = ckpt["config"]
    assert cfg["data"]["latent_shape"] == [4, 8, 8] and cfg["model_kwargs"]["class_dropout_prob"] == 0.1
    x, t, y = _inputs()
    for key, net in (("ema", ema), ("model", ref)):
        ours = _ours(ckpt, key)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, t, y), net(x, t, y), rtol=0, atol=1e-10)


def test_no_label_dropout_gets_a_zero_null_row(tmp_path):
    ref = _reference(0)
    _write_release(tmp_path / "release.pt", ref, ref, drop_null_row=True)
    with pytest.warns(UserWarning, match="null-label row"):
        convert_main(["--ckpt", str(tmp_path / "release.pt"), "--model", NAME, "--out", str(tmp_path / "ours.pt")])
    ckpt = load_checkpoint(tmp_path / "ours.pt")
    assert ckpt["config"]["model_kwargs"]["class_dropout_prob"] == 0.0
    assert torch.count_nonzero(ckpt["ema"]["y_embedders.2.weight"][-1]) == 0
    x, t, y = _inputs()
    y = y.clamp_max(4)
    with torch.no_grad():
        torch.testing.assert_close(_ours(ckpt, "ema")(x, t, y), ref(x, t, y), rtol=0, atol=1e-10)


def test_bad_keys_are_one_error_naming_them(tmp_path):
    ref = _reference(0)

    def edit(sd):
        sd["encoder_level_1.0.extra.weight"] = torch.zeros(1)  # unknown
        del sd["latent.0.pwconv2.bias"]  # missing
        sd["reduce_chans_1.weight"] = torch.zeros(3, 3, 1, 1)  # mis-shaped

    _write_release(tmp_path / "release.pt", ref, ref, edit=edit)
    with pytest.raises(UserError) as e:
        convert_main(["--ckpt", str(tmp_path / "release.pt"), "--model", NAME, "--out", str(tmp_path / "o.pt")])
    msg = str(e.value)
    assert "encoder_level_1.0.extra.weight" in msg and "middle.0.pwconv2.bias" in msg and "reduce_chans_1.weight" in msg
    assert not (tmp_path / "o.pt").exists()


def test_cli_exit_status_2(tmp_path):
    torch.save({"model": {}, "ema": {}}, tmp_path / "bad.pt")
    r = subprocess.run([sys.executable, "-m", "models.convert_official", "--ckpt", str(tmp_path / "bad.pt"),
                        "--model", "FCDM-XL", "--out", str(tmp_path / "o.pt")], capture_output=True, text=True)
    assert r.returncode == 2 and "x_embedder.weight" in r.stderr and r.stderr.count("\n") <= 2, r.stderr
    from models.convert_official import build_parser

    assert all(f in build_parser().format_help()
               for f in ("--ckpt", "--model", "--out", "--num-classes", "--image-size"))
