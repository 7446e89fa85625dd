"""Flow matching (SiT linear path) against closed forms for Gaussian data, where the exact velocity is known."""

import pytest
import torch

import diffusion
from diffusion.flow_matching import FlowMatching

MU, S = 1.5, 0.5  # data ~ N(MU, S^2 I)


def exact_velocity(x, t):
    """E[x_data - noise | x_t] for x_t = t x_data + (1 - t) noise, x_data ~ N(MU, S^2), noise ~ N(0, 1)."""
    t = t.double().reshape(-1, *([1] * (x.ndim - 1)))
    var = t ** 2 * S ** 2 + (1 - t) ** 2           # Var(x_t)
    cov = t * S ** 2 - (1 - t)                     # Cov(x_data - noise, x_t)
    return (MU + cov / var * (x.double() - t * MU)).float()


class CountingVelocity:
    def __init__(self):
        self.calls, self.ts = 0, []

    def __call__(self, x, t, y=None):
        self.calls += 1
        self.ts.append(t.clone())
        return exact_velocity(x, t)


def test_interpolant_and_loss():
    f = diffusion.create_flow()
    x1, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt, ut = f.interpolate(x1, t, x0)
    torch.testing.assert_close(xt[0], x0[0])          # t = 0 is noise
    torch.testing.assert_close(xt[2], x1[2])          # t = 1 is data
    torch.testing.assert_close(xt[1], 0.3 * x1[1] + 0.7 * x0[1])
    torch.testing.assert_close(ut, x1 - x0)
    seen = []
    def model(x, t, y=None):
        seen.append(t)
        return torch.zeros_like(x).bfloat16()

    losses = f.training_losses(model, x1, t, dict(y=None), noise=x0)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], t)
    assert losses["loss"].dtype == torch.float32 and losses["loss"].shape == (3,)
    torch.testing.assert_close(losses["mse"], ((x1 - x0) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="learn_sigma=False"):
        f.training_losses(lambda x, t: torch.cat([x, x], 1), x1, t)


def test_exact_velocity_minimises_loss():
    # the conditional expectation has lower loss than a perturbed field (sanity check of the reference itself)
    f = diffusion.create_flow()
    g = torch.Generator().manual_seed(0)
    x1 = MU + S * torch.randn(4096, 1, 2, 2, generator=g)
    t = f.sample_timesteps(4096, "cpu", g)
    noise = torch.randn(x1.shape, generator=g)
    best = f.training_losses(lambda x, t: exact_velocity(x, t), x1, t, noise=noise)["loss"].mean()
    worse = f.training_losses(lambda x, t: exact_velocity(x, t) + 0.2, x1, t, noise=noise)["loss"].mean()
    assert best < worse - 0.03


def test_score_from_velocity_matches_gaussian_score():
    f = diffusion.create_flow()
    x = torch.randn(5, 1, 3, 3)
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.96])
    te = t.reshape(-1, 1, 1, 1)
    ref = -(x - te * MU) / (te ** 2 * S ** 2 + (1 - te) ** 2)
    torch.testing.assert_close(f.score_from_velocity(exact_velocity(x, t), x, t), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,steps,calls", [("euler", 100, 100), ("heun", 10, 20)])
def test_ode_samplers_transport_noise_to_data(method, steps, calls):
    f = diffusion.create_flow()
    model = CountingVelocity()
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    x = f.sample_ode(model, noise, steps, method=method)
    assert model.calls == calls
    assert model.ts[0][0].item() == 0.0 and model.ts[-1][0].item() == pytest.approx(1.0 if method == "heun" else 0.99)
    tol = 0.03 if method == "euler" else 0.01
    assert abs(x.mean().item() - MU) < tol + 0.03
    assert abs(x.std().item() - S) < tol + 0.02


def test_sde_sampler_sits_defaults():
    f = diffusion.create_flow()
    model = CountingVelocity()
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    x = f.sample_sde(model, noise, num_steps=250, generator=torch.Generator().manual_seed(3))
    assert model.calls == 250                        # 249 Euler-Maruyama steps + the final mean step
    times = [t[0].item() for t in model.ts]
    assert times[0] == 0.0 and times[-1] == pytest.approx(0.96) and times[-2] == pytest.approx(0.96 * 248 / 249)
    assert abs(x.mean().item() - MU) < 0.04
    assert abs(x.std().item() - S) < 0.04
    assert f.last_step_size == 0.04


def test_sample_timesteps_and_validation():
    f = diffusion.create_objective("flow")
    assert isinstance(f, FlowMatching)
    t = f.sample_timesteps(10000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.02
    t = diffusion.create_flow(train_eps=0.1).sample_timesteps(1000, "cpu")
    assert t.min() >= 0.1 and t.max() <= 0.9
    with pytest.raises(ValueError):
        f.sample_ode(CountingVelocity(), torch.randn(1, 1, 2, 2), 5, method="rk4")
    with pytest.raises(ValueError):
        diffusion.create_flow(last_step_size=1.5)
