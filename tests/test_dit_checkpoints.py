"""DiT's released checkpoints (plain state dicts of EMA weights in facebookresearch/DiT's key names,
with the fixed pos_embed) load into our DiT and through sampling's load_setup (sample.py, sample_ddp.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.sampling import load_setup
from fcdm_common.cli import UserError
from helpers import randomize
from models import create_model

KW = dict(input_size=8, in_channels=3, num_classes=10)  # DiT-S/2 widths on a tiny 8x8, 3-channel input


def _dit_keys(depth: int) -> set:
    """DiT's state-dict keys (DiT models.py: PatchEmbed, TimestepEmbedder, LabelEmbedder, DiTBlock with
    timm Attention/Mlp, FinalLayer; affine-free LayerNorms hold no tensors), written out by hand."""
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    keys |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for b in range(depth):
        keys |= {f"blocks.{b}.{m}.{p}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
                 for p in ("weight", "bias")}
    return keys


def _mae_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT get_2d_sincos_pos_embed: first half from the column (x) index, second from the row."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)[None]


def _release_file(tmp_path, pos_embed=None):
    torch.manual_seed(0)
    model = randomize(create_model("DiT-S/2", **KW), std=0.05).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["pos_embed"] = torch.from_numpy(_mae_pos_embed(384, 4)).float() if pos_embed is None else pos_embed
    assert set(sd) == _dit_keys(12)
    path = tmp_path / "DiT-S-2-tiny.pt"
    torch.save(sd, path)  # plain state dict, as DiT's released files
    return model, path


def test_plain_dit_state_dict_loads_with_identical_outputs(tmp_path):
    model, path = _release_file(tmp_path)
    setup = load_setup(path, model_name="DiT-S/2", vae="none")
    assert setup.latent_shape == (3, 8, 8) and setup.num_classes == 10 and setup.objective_name == "diffusion"
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        assert torch.equal(setup.model(x, t, y), model(x, t, y))


def test_wrong_pos_embed_or_model_is_refused(tmp_path):
    _, path = _release_file(tmp_path, pos_embed=torch.zeros(1, 16, 384))
    with pytest.raises(UserError, match="pos_embed"):
        load_setup(path, model_name="DiT-S/2", vae="none")
    _, path = _release_file(tmp_path)
    with pytest.raises(UserError, match="pass --model"):
        load_setup(path, vae="none")
    with pytest.raises(UserError, match="not DiT-B/2"):
        load_setup(path, model_name="DiT-B/2", vae="none")
    with pytest.raises(UserError, match="'model' weights"):
        load_setup(path, model_name="DiT-S/2", vae="none", use_ema=False)


def test_sample_script_runs_on_a_plain_dit_file(tmp_path):
    from train_gen.sample import main

    _, path = _release_file(tmp_path)
    out = tmp_path / "grid.png"
    main(["--ckpt", str(path), "--model", "DiT-S/2", "--vae", "none", "--num-sampling-steps", "2",
          "--class-labels", "1", "2", "--out", str(out), "--device", "cpu"])
    assert out.is_file()


def test_our_older_dit_key_names_still_load():
    torch.manual_seed(0)
    model = randomize(create_model("DiT-S/2", **KW), std=0.05).eval()
    renames = {"x_embedder.proj.weight": "x_embedder.weight", "x_embedder.proj.bias": "x_embedder.bias",
               "y_embedder.embedding_table.weight": "y_embedder.weight"}
    old = {renames.get(k, k): v for k, v in model.state_dict().items()}
    fresh = create_model("DiT-S/2", **KW).eval()
    fresh.load_state_dict(old)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 900]), torch.tensor([2, 10])
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y), model(x, t, y))
