"""FCDM network: Table 1 of the paper, initialisation, checkpointing, guidance, shapes, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from diffusion.guidance import GuidedModel
from helpers import assert_checkpointing_preserves_outputs_and_grads, parameters_without_gradient, randomize
from models import MODELS, create_model
from models.fcdm import FCDM
from models.layers import GRN, DepthwiseConv, pixel_shuffle_nhwc, pixel_unshuffle_nhwc
from models.summary import PAPER_TABLE1, count_params, forward_gmacs


def tiny(**kw):
    args = dict(in_channels=4, hidden_size=16, depths=(1, 1, 2, 1, 1), num_classes=10)
    args.update(kw)
    return FCDM(**args)


def batch(n=3, c=4, size=16, num_classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, t, y


# -- Table 1 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["FCDM-S", "FCDM-B", "FCDM-L", "FCDM-XL"])
def test_table1_params_and_flops(name):
    with torch.device("meta"):
        model = create_model(name)
    paper = PAPER_TABLE1[name]
    assert abs(count_params(model) / 1e6 - paper["params_m"]) < 0.05
    gmacs = forward_gmacs(model, 32)  # 256x256 images -> 32x32x4 latents
    assert abs(gmacs / paper["gflops"][256] - 1) < 0.015, gmacs
    if name == "FCDM-XL":
        assert abs(forward_gmacs(model, 64) / 257.7 - 1) < 0.015  # 512x512 -> 64x64 latents


def test_table1_depths_and_widths():
    with torch.device("meta"):
        xl = create_model("FCDM-XL")
        s = create_model("FCDM-S")
    assert xl.depths == (3, 6, 12, 6, 3) and xl.widths == (512, 1024, 2048)
    assert s.depths == (2, 4, 8, 4, 2) and s.widths == (128, 256, 512)
    assert [len(st) for st in xl.encoder] == [3, 6] and len(xl.middle) == 12
    assert [len(st) for st in xl.decoder] == [3, 6]


# -- layers against straightforward references ----------------------------------------------------


def test_pixel_shuffle_matches_torch():
    x = torch.randn(2, 6, 4, 12)  # NHWC with 12 = 4 * 3 channels
    ref = F.pixel_shuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert torch.equal(pixel_shuffle_nhwc(x), ref)
    ref_un = F.pixel_unshuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert torch.equal(pixel_unshuffle_nhwc(x), ref_un)
    assert torch.equal(pixel_shuffle_nhwc(pixel_unshuffle_nhwc(x)), x)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 5), (4, 4), (8, 8)])
def test_depthwise_kernel_crop_is_exact(size):
    conv = DepthwiseConv(5, 7)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, *size, 5)
    ref = F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=3, groups=5).permute(0, 2, 3, 1)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


def test_grn_gradient_is_finite_on_an_all_zero_channel():
    grn = GRN(3)
    x = torch.randn(1, 4, 4, 3)
    x[..., 1] = 0
    x.requires_grad_(True)
    grn(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_grn_matches_convnextv2_formula():
    grn = GRN(6)
    torch.nn.init.normal_(grn.weight)
    torch.nn.init.normal_(grn.bias)
    x = torch.randn(2, 5, 4, 6)
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    ref = grn.weight * (x * nx) + grn.bias + x
    torch.testing.assert_close(grn(x), ref, rtol=1e-5, atol=1e-6)


# -- initialisation and gradients ----------------------------------------------------------------


def test_initial_output_is_zero_and_blocks_are_identity():
    model = tiny()
    x, t, y = batch()
    out = model(x, t, y)
    assert out.shape == (3, 8, 16, 16)
    assert torch.count_nonzero(out) == 0
    for blk in model.blocks():
        w = blk.pwconv1.in_features
        h = torch.randn(2, 4, 4, w)
        assert torch.equal(blk(h, torch.randn(2, w)), h)


def test_every_parameter_gets_gradient_after_training_steps():
    torch.manual_seed(0)
    model = tiny(class_dropout_prob=0.5)
    x, t, y = batch(n=8)
    target = torch.randn(8, 8, 16, 16)
    missing = parameters_without_gradient(model, (x, t, y), target)
    assert not missing, missing


@pytest.mark.parametrize("mode", ["full", "selective", True])
def test_checkpointing_gives_same_output_and_gradients(mode):
    assert_checkpointing_preserves_outputs_and_grads(randomize(tiny(class_dropout_prob=0.0)), batch(), mode)


# -- classifier-free guidance --------------------------------------------------------------------


def test_guidance_on_fcdm():
    """diffusion.guidance.GuidedModel (the one guidance implementation) on a real FCDM with learned sigma."""
    model = randomize(tiny()).eval()
    x, t, y = batch()
    null = torch.full_like(y, model.num_classes)
    cond, uncond = model(x, t, y), model(x, t, null)
    def close(a, b):  # batch size changes fp sums
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    close(GuidedModel(model, 1.0, model.num_classes)(x, t, y), cond)
    s = 4.0
    out = GuidedModel(model, s, model.num_classes)(x, t, y)
    assert out.shape == (3, 8, 16, 16)
    close(out[:, :4], uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4]))
    close(out[:, 4:], cond[:, 4:])  # learned variance: conditional
    dit = GuidedModel(model, s, model.num_classes, cfg_channels=3)(x, t, y)  # DiT / original FCDM behaviour
    torch.testing.assert_close(dit[:, :3], out[:, :3])
    close(dit[:, 3:], cond[:, 3:])


def test_label_dropout_only_in_training():
    model = tiny(class_dropout_prob=1.0)
    y = torch.arange(10)
    assert all(torch.equal(yl, torch.full_like(y, 10)) for yl in model.level_labels(y))
    model.eval()
    assert all(torch.equal(yl, y) for yl in model.level_labels(y))


def test_label_dropout_mask_from_the_caller():
    """A caller-drawn mask replaces the model's own draw (shared: one (N,) mask; per-level: (levels, N))."""
    y = torch.arange(6)
    shared = tiny(class_dropout_prob=0.1)
    mask = torch.tensor([True, False, True, False, False, True])
    assert shared.label_drop_shape(6) == (6,)
    for yl in shared.level_labels(y, mask):
        assert torch.equal(yl, torch.where(mask, 10, y))
    per = tiny(class_dropout_prob=0.1, label_dropout="per-level")
    assert per.label_drop_shape(6) == (per.num_levels, 6)
    masks = torch.rand(per.num_levels, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    for i, yl in enumerate(per.level_labels(y, masks)):
        assert torch.equal(yl, torch.where(masks[i], 10, y))
    with pytest.raises(ValueError, match="drop_mask"):
        per.level_labels(y, mask)
    with pytest.raises(ValueError, match="label_dropout"):
        tiny(label_dropout="sometimes")


# -- shapes and variants -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_shapes(size, learn_sigma):
    model = tiny(learn_sigma=learn_sigma)
    x, t, y = batch(n=2, size=size)
    assert model(x, t.float() / 1000, y).shape == (2, 8 if learn_sigma else 4, size, size)


@pytest.mark.parametrize("depths,levels", [((1, 2, 1), 2), ((1, 1, 1, 2, 1, 1, 1), 4), ((2, 2, 2, 2, 2), 3),
                                           ((1, 2, 3, 1, 1), 3)])
def test_level_and_allocation_variants(depths, levels):
    model = randomize(tiny(depths=depths, kernel_size=5))
    assert model.num_levels == levels and len(model.widths) == levels
    x, t, y = batch(n=2, size=16)
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_models_build_on_meta(name):
    with torch.device("meta"):
        model = create_model(name)
    assert count_params(model) > 0


def test_overrides_and_unknown_name():
    with torch.device("meta"):
        m = create_model("FCDM-S", kernel_size=3, learn_sigma=False)
    assert m.kernel_size == 3 and m.out_channels == 4
    with pytest.raises(ValueError, match="unknown model"):
        create_model("FCDM-XXL")


# -- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    x, t, y = batch()
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        model(x[:, :3], t, y)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(x[:, :, :14, :14], t, y)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, torch.tensor([0, 11, 2]))
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, torch.tensor([0, -1, 2]))
    model(x, t, torch.tensor([0, 10, 2]))  # the null label is valid
    with pytest.raises(ValueError, match="odd length"):
        tiny(depths=(1, 1))


def test_summary_table_includes_fixed_size_models_at_512(capsys):
    from models.summary import main

    main(["--models", "FCDM-XL", "DiT-XL/2", "--resolutions", "256", "512"])
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "257.52" in rows["FCDM-XL"] and "118.62" in rows["DiT-XL/2"]
    dit512 = float(rows["DiT-XL/2"].split("|")[5])
    assert 4.0 < dit512 / 118.62 < 4.6  # DiT rebuilt for 64x64 latents: 4x the tokens, attention grows faster
