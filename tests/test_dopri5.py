"""Adaptive dopri5 for flow checkpoints (torchdiffeq), against the closed-form solution of a linear ODE."""
import math

import pytest
import torch

import diffusion
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearVelocity:
    """v(x, t, y) = a x + b (y + 1): dx/dt = a x + b', so x(1) = e^a x(0) + b' (e^a - 1) / a. Counts calls."""

    def __init__(self, a=-0.7, b=0.3):
        self.a, self.b, self.calls = a, b, 0

    def __call__(self, x, t, y):
        self.calls += 1
        assert t.shape == (x.shape[0],) and float(t.min()) >= 0 and float(t.max()) <= 1
        return self.a * x + self.b * (y.float() + 1).reshape(-1, 1, 1, 1)

    def exact(self, x0, y):
        ea = math.exp(self.a)
        return ea * x0 + self.b * (y.float() + 1).reshape(-1, 1, 1, 1) * (ea - 1) / self.a


def test_dopri5_matches_the_closed_form_and_counts_evaluations():
    f = diffusion.create_flow()
    noise, y = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 4, 9])
    nfe = {}
    for atol, rtol in ((1e-6, 1e-3), (1e-9, 1e-8)):
        model, stats = LinearVelocity(), {}
        out = diffusion.sample(model, noise, y, objective=f, sampler="dopri5", num_steps=1, null_label=10,
                               atol=atol, rtol=rtol, stats=stats)
        err = float((out - model.exact(noise, y)).abs().max())
        assert err < max(10 * rtol, 1e-5), (atol, rtol, err)
        assert stats["nfe"] == model.calls  # every evaluation is counted
        nfe[rtol] = stats["nfe"]
    assert nfe[1e-8] > nfe[1e-3]  # tighter tolerances take more steps
    # our fixed-step Euler with few steps is visibly worse than dopri5's adaptive answer
    euler = diffusion.sample(LinearVelocity(), noise, y, objective=f, sampler="euler", num_steps=4, null_label=10)
    assert float((euler - LinearVelocity().exact(noise, y)).abs().max()) > 1e-2


def test_dopri5_with_guidance_equals_guided_velocity_field():
    # guidance acts inside the ODE right-hand side: with v = a x + b (y + 1), the guided field
    # v_null + s (v_y - v_null) is again linear, a x + b (y_eff + 1), whose solution is closed form.
    f = diffusion.create_flow()
    noise, y = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 3])
    s, null = 2.0, 10
    model = LinearVelocity()
    out = diffusion.sample(model, noise, y, objective=f, sampler="dopri5", num_steps=1, null_label=null,
                           cfg_scale=s, atol=1e-9, rtol=1e-8)
    y_eff = (null + 1) + s * ((y.float() + 1) - (null + 1)) - 1
    torch.testing.assert_close(out, LinearVelocity().exact(noise, y_eff), rtol=1e-5, atol=1e-5)


def test_bad_tolerances():
    with pytest.raises(ValueError, match="atol and rtol"):
        diffusion.create_flow().sample_dopri5(LinearVelocity(), torch.zeros(1, 1, 1, 1), dict(y=torch.zeros(1)),
                                              atol=0.0)
