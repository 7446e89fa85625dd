"""Representation alignment (train_gen/repa.py): the loss, the sites and grids, where gradients go, bf16.

The end-to-end runs (train.py with a stored-image latent store and a tiny timm encoder: resume, accumulation,
processes, weight 0) are in tests/test_repa_training.py.
"""
import math

import pytest
import torch
import torch.nn as nn

from models import create_model
from train_gen.config import RepaConfig
from train_gen.repa import Projector, Repa, alignment_loss, to_grid


def test_identical_features_give_minus_one_and_orthogonal_give_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 16, 8, generator=g)
    torch.testing.assert_close(alignment_loss(a, a), torch.full((3,), -1.0))
    torch.testing.assert_close(alignment_loss(a, 5.0 * a), torch.full((3,), -1.0))  # scale-free
    torch.testing.assert_close(alignment_loss(a, -a), torch.full((3,), 1.0))
    # orthogonal per position: disjoint supports
    b = torch.zeros(2, 4, 6)
    c = torch.zeros(2, 4, 6)
    b[..., :3] = torch.randn(2, 4, 3, generator=g)
    c[..., 3:] = torch.randn(2, 4, 3, generator=g)
    torch.testing.assert_close(alignment_loss(b, c), torch.zeros(2))


def test_loss_is_the_mean_cosine_of_an_independent_formula():
    g = torch.Generator().manual_seed(1)
    p, y = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    want = [-sum(float(torch.dot(p[i, k], y[i, k]) / (p[i, k].norm() * y[i, k].norm())) for k in range(5)) / 5
            for i in range(2)]
    torch.testing.assert_close(alignment_loss(p, y), torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_to_grid_keeps_matching_grids_and_averages_when_it_shrinks():
    p = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    assert torch.equal(to_grid(p, (4, 4)), p.reshape(2, 16, 3))  # row-major, no resize
    small = to_grid(p, (2, 2))  # halving = the mean of each 2x2 block
    want = p.reshape(2, 2, 2, 2, 2, 3).mean(dim=(2, 4)).reshape(2, 4, 3)
    torch.testing.assert_close(small, want)
    big = to_grid(p, (8, 8))  # doubling, bilinear with half-pixel centres: corners copy, the rest interpolates
    assert big.shape == (2, 64, 3)
    torch.testing.assert_close(big.reshape(2, 8, 8, 3)[:, 0, 0], p[:, 0, 0])
    torch.testing.assert_close(big.reshape(2, 8, 8, 3)[:, 0, 1], 0.75 * p[:, 0, 0] + 0.25 * p[:, 0, 1])


class FrozenEncoder(nn.Module):
    """A stand-in encoder: a fixed patch embedding of uint8 images to a 2x2 grid of 6-dim tokens."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 6, 4, stride=4)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images):
        x = self.proj(images.float() / 255)  # (B, 6, 2, 2)
        return x.flatten(2).transpose(1, 2)  # (B, 4, 6)


def tiny_repa(site="enc1", weight=0.5):
    torch.manual_seed(0)
    model = create_model("FCDM-digits")  # 8x8 -> 4x4 -> 2x2; enc1 is 4x4 with 64 channels
    for p in model.parameters():  # leave the identity init: every block must reach the output
        p.data.add_(0.05 * torch.randn_like(p))
    c, h, w = model.site_shape(site, 8, 8)
    config = RepaConfig(encoder="stand-in", encoder_path="-", encoder_resolution=8, encoder_grid=(2, 2), encoder_dim=6,
                        site=site, site_shape=(c, h, w), weight=weight, projector_width=16, images_size=8)
    return model, Repa(config, model, Projector(c, 6, 16), FrozenEncoder())


def align_grads(model, repa):
    """Gradients of the alignment term alone."""
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([3, 50, 400, 999]), torch.tensor([0, 1, 2, 3])
    images = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    repa.module(x, t, y)
    repa.loss(images).mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradient_reaches_the_projector_and_the_blocks_up_to_the_site_only():
    model, repa = tiny_repa("enc1")
    grads = align_grads(model, repa)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    assert all(p.grad is None for p in repa.encoder.parameters())
    before = [n for n in grads if n.startswith(("stem", "encoder.", "downsamples.0"))
              or n.startswith(("t_embedders.0", "y_embedders.0", "t_embedders.1", "y_embedders.1"))]
    after = [n for n in grads if n.startswith(("middle", "decoder", "upsamples", "fuse", "head", "downsamples.1",
                                                "t_embedders.2", "y_embedders.2"))]
    assert before and after and len(before) + len(after) == len(grads)
    for n in before:
        if n.startswith(("y_embedders",)):
            continue  # only the rows of the batch's labels: checked below
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    assert grads["y_embedders.1.weight"][[0, 1, 2, 3]].abs().sum() > 0
    for n in after:
        assert grads[n] is None or grads[n].abs().sum() == 0, n


def test_a_site_in_the_decoder_reaches_everything_before_it():
    model, repa = tiny_repa("dec1")
    grads = align_grads(model, repa)
    assert grads["middle.1.pwconv2.weight"].abs().sum() > 0
    assert grads["fuse.1.weight"].abs().sum() > 0
    for n in ("decoder.0.0.pwconv2.weight", "head.out.weight", "fuse.0.weight"):
        assert grads[n] is None or grads[n].abs().sum() == 0, n


def test_forward_output_is_the_network_output():
    model, repa = tiny_repa()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2])
    model.eval()
    assert torch.equal(repa.module(x, t, y), model(x, t, y))
    assert repa.module.projected.shape == (2, 4, 6)


def test_bf16_autocast_keeps_the_loss_and_gradients_finite_with_large_features():
    projector = Projector(8, 32, 64)
    h = (1e4 * torch.randn(2, 4, 4, 8)).requires_grad_(True)
    target = 3e4 * torch.randn(2, 16, 32)  # |x|^2 ~ 1e12 overflows fp16 and loses bf16's precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = to_grid(projector(h), (4, 4))
        loss = alignment_loss(p, target.bfloat16())
    assert p.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.mean().backward()
    assert torch.isfinite(loss).all() and loss.abs().max() <= 1 + 1e-5
    assert torch.isfinite(h.grad).all() and all(torch.isfinite(q.grad).all() for q in projector.parameters())
    # and in float16 storage too: the normalisation runs in float32
    loss16 = alignment_loss(p.detach().half(), (1e4 * torch.randn(2, 16, 32)).half())  # squares overflow fp16
    assert torch.isfinite(loss16).all()


@pytest.mark.parametrize("image_side,latent_side,encoder_side", [(256, 32, 224), (512, 64, 448)])
def test_the_default_site_matches_dinov2_b14_grids(image_side, latent_side, encoder_side):
    """FCDM-XL's enc1 (the end of encoder level 1) is 16x16 at 256x256 and 32x32 at 512x512 (SD-VAE, 8x down);
    DINOv2-B/14 at the resolution the default picks (site side x 14) has that grid: REPA's 224 and 448."""
    with torch.device("meta"):
        xl = create_model("FCDM-XL")
    c, h, w = xl.site_shape("enc1", latent_side, latent_side)
    assert (c, h, w) == (1024, image_side // 16, image_side // 16)
    assert h * 14 == encoder_side and encoder_side // 14 == h
    # and the real network's features at the site have that shape (a small FCDM with XL's level structure)
    small = create_model("FCDM-XL", hidden_size=8, depths=(1, 1, 1, 1, 1))
    x = torch.randn(1, 4, latent_side, latent_side)
    with torch.no_grad():
        _, f = small.eval()(x, torch.tensor([5]), torch.tensor([3]), features_at="enc1")
    assert tuple(f.shape) == (1, h, w, 16)
    assert math.prod(f.shape[1:3]) == (encoder_side // 14) ** 2
