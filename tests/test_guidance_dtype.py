"""GuidedModel combines its passes in float32 or the model output's dtype, whichever is wider: a float64 model is
guided in float64 (it used to be rounded to float32), bf16 outputs are still combined in float32."""
import pytest
import torch

from diffusion import GuidedModel

NULL = 10


class Net64:
    """Float64 'network' whose conditional and unconditional outputs differ in their last float64 bits, so a
    float32 combination cannot reproduce the float64 closed form. Returns `dtype` outputs."""

    def __init__(self, dtype=torch.float64):
        self.dtype = dtype

    def __call__(self, x, t, y):
        yy = y.to(torch.float64).reshape(-1, 1, 1, 1)
        tt = t.to(torch.float64).reshape(-1, 1, 1, 1)
        return (x.to(torch.float64) * (1.0 + 1e-9 * yy) + torch.pi * yy / 7.0 + 1e-3 * tt).to(self.dtype)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), torch.tensor([5, 6, 7]),
            torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("guide", [False, True])
def test_float64_model_is_guided_in_float64(guide):
    net, scale = Net64(), 4.0
    x, t, y = _inputs()
    cond = net(x, t, y)
    weak = net(x, t, y - 1) if guide else net(x, t, torch.full((3,), NULL))
    model = GuidedModel(net, scale, NULL, guide=(lambda x, t, y: net(x, t, y - 1)) if guide else None)
    out = model(x, t, y)
    ref = weak + scale * (cond - weak)  # the class's formula, all channels guided
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-15, atol=0)
    # what the float32 combination gave: off by far more than float64 rounding
    old = weak.float() + scale * (cond.float() - weak.float())
    assert ((old.double() - ref).abs() / ref.abs()).max() > 1e-9


def test_guidance_interval_and_channels_keep_float64():
    net = Net64()
    x, t, y = _inputs()
    level = {5: 0.1, 6: 0.5, 7: 0.9}
    model = GuidedModel(net, 3.0, NULL, cfg_channels=2, guidance_interval=(0.3, 1.0),
                        noise_level_fn=lambda t: torch.tensor([level[int(v)] for v in t]))
    out = model(x, t, y)
    cond, uncond = net(x, t, y), net(x, t, torch.full((3,), NULL))
    ref = cond.clone()
    ref[1:, :2] = uncond[1:, :2] + 3.0 * (cond[1:, :2] - uncond[1:, :2])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-15, atol=0)


def test_bf16_and_float32_outputs_still_combine_in_float32():
    x, t, y = _inputs()
    x = x.float()
    for dtype in (torch.bfloat16, torch.float32):
        net = Net64(dtype)
        out = GuidedModel(net, 4.0, NULL)(x, t, y)
        cond, uncond = net(x, t, y).float(), net(x, t, torch.full((3,), NULL)).float()
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond), rtol=0, atol=0)
