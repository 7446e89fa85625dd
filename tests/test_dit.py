"""DiT baseline: the DiT paper's sizes and FLOPs, adaLN-Zero init, attention, patchify order, CFG."""
import math

import numpy as np
import pytest
import torch

from diffusion.guidance import GuidedModel
from helpers import assert_checkpointing_preserves_outputs_and_grads, parameters_without_gradient, randomize
from models import MODELS, create_model
from models.dit import DiT, sincos_2d
from models.summary import PAPER_TABLE1, count_params, forward_gmacs

# DiT paper, Table 1 / Table 4: params (M) of the /2 models; DiT-XL/2: 118.6 GFLOPs at 256
DIT_PARAMS_M = {"DiT-S/2": 33.0, "DiT-B/2": 130.5, "DiT-L/2": 458.1, "DiT-XL/2": 675.0}
DIT_SIZES = {"DiT-S/2": (12, 384, 6), "DiT-B/2": (12, 768, 12), "DiT-L/2": (24, 1024, 16), "DiT-XL/2": (28, 1152, 16)}


def tiny(**kw):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    args.update(kw)
    return DiT(**args)


def batch(n=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 4, size, size, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )


@pytest.mark.parametrize("name", sorted(DIT_PARAMS_M))
def test_param_counts_match_dit_paper(name):
    with torch.device("meta"):
        model = create_model(name)
    depth, width, heads = DIT_SIZES[name]
    assert (len(model.blocks), model.hidden_size, model.num_heads) == (depth, width, heads)
    # DiT's code stores the fixed position embedding as a frozen parameter, so its counts include it
    n = count_params(model) + model.pos_embed.numel()
    assert abs(n / 1e6 / DIT_PARAMS_M[name] - 1) < 0.005, n


def test_dit_xl_flops_and_attention_counted():
    with torch.device("meta"):
        model = create_model("DiT-XL/2")
    assert abs(PAPER_TABLE1["DiT-XL/2"]["params_m"] - 675.0) < 1e-9
    gmacs = forward_gmacs(model, 32)
    assert abs(gmacs / PAPER_TABLE1["DiT-XL/2"]["gflops"][256] - 1) < 0.015, gmacs
    # independent count: per block 12 T D^2 (qkv, proj, mlp) + 2 T^2 D (QK^T and AV) + 6 D^2 (adaLN)
    T, D, L = 256, 1152, 28
    blocks = L * (12 * T * D**2 + 2 * T**2 * D + 6 * D**2)
    head = 2 * D**2 + T * D * 2 * 2 * 8 + 4 * 4 * D * T  # adaLN, final linear, patchify conv (p*p*C*D per token)
    temb = 256 * D + D * D
    assert abs(gmacs * 1e9 / (blocks + head + temb) - 1) < 1e-3
    # the attention matmuls are in the count (on the meta device SDPA runs its math decomposition)
    assert gmacs * 1e9 - (blocks - L * 2 * T**2 * D + head + temb) > 0.99 * L * 2 * T**2 * D


def test_registered_and_buildable():
    for name in DIT_PARAMS_M:
        assert name in MODELS
    with torch.device("meta"):
        m = create_model("DiT-XL/2", input_size=64, learn_sigma=False)
    assert m.pos_embed.shape == (1, 1024, 1152) and m.out_channels == 4


def test_zero_output_at_init_and_shapes():
    model = tiny()
    x, t, y = batch()
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8) and torch.count_nonzero(out) == 0
    model = randomize(tiny(learn_sigma=False))
    out = model(x, t.float() / 1000, y)
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()


def test_sincos_2d_formula():
    emb = sincos_2d(8, 3)  # (9, 8): token k = (row i, col j) with k = 3 i + j
    w = 1.0 / 10000 ** (np.arange(2) / 2)
    for i in range(3):
        for j in range(3):
            col = np.concatenate([np.sin(j * w), np.cos(j * w)])
            row = np.concatenate([np.sin(i * w), np.cos(i * w)])
            np.testing.assert_allclose(emb[3 * i + j], np.concatenate([col, row]), rtol=1e-12)


def test_attention_matches_explicit_softmax():
    model = randomize(tiny())
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_unpatchify_inverts_token_order():
    """A final linear that copies each token's patch back must reproduce the input image."""
    model = tiny(learn_sigma=False)
    x = torch.randn(2, 4, 8, 8)
    p, g = 2, 4
    tokens = x.reshape(2, 4, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 4)  # (p, p, C)
    assert torch.equal(model.unpatchify(tokens), x)


@pytest.mark.parametrize("mode", ["full", "selective", True])
def test_checkpointing_same_output_and_grads(mode):
    model = randomize(tiny(class_dropout_prob=0.0), std=0.1)
    assert_checkpointing_preserves_outputs_and_grads(model, batch(), mode)


def test_every_parameter_trains():
    torch.manual_seed(0)
    model = tiny(class_dropout_prob=0.5)
    x, t, y = batch(n=8)
    target = torch.randn(8, 8, 8, 8)
    missing = parameters_without_gradient(model, (x, t, y), target)
    assert not missing, missing


def test_guidance_on_dit():
    """diffusion.guidance.GuidedModel on a real DiT, guiding the first 3 channels as DiT's forward_with_cfg does."""
    model = randomize(tiny(), std=0.1).eval()
    x, t, y = batch()
    null = torch.full_like(y, 10)
    cond, uncond = model(x, t, y), model(x, t, null)
    out = GuidedModel(model, 3.0, 10, cfg_channels=3)(x, t, y)
    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    close(out[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
    close(out[:, 3:], cond[:, 3:])


def test_bad_inputs():
    model = tiny()
    x, t, y = batch()
    with pytest.raises(ValueError, match=r"\(N, 4, 8, 8\)"):
        model(x[:, :, :6, :6], t, y)
    with pytest.raises(ValueError, match="integers"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="divisible"):
        tiny(num_heads=5)
