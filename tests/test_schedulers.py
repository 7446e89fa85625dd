"""diffusers schedulers through diffusion/schedulers.py, checked against our own loops and closed forms.

References: our DDIM and DDPM loops (diffusion/gaussian_diffusion.py) with the same noise, and the exact
probability-flow ODE solution for Gaussian data (where the optimal epsilon predictor is closed form).
"""
import pytest
import torch

import diffusion
from diffusion import schedulers as S
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)
from test_guidance import NULL, ToyNet

pytestmark = pytest.mark.usefixtures("one_thread")


def gens(n, offset=0):
    return [torch.Generator().manual_seed(100 + offset + i) for i in range(n)]


class GaussianEps:
    """The exact epsilon predictor for data x0 ~ N(mu_y, s^2 I) under abar_t: E[eps | x_t] =
    sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar). Variance channels (learned sigma) are
    var_value + 0.2 tanh(x_t), which every ODE solver must ignore."""

    def __init__(self, alphas_cumprod, s=0.5, var_value=0.0, learn_sigma=True):
        self.abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.s, self.var_value, self.learn_sigma = s, var_value, learn_sigma

    def mu(self, y, c):
        return (0.1 * (y.double() + 1).reshape(-1, 1, 1, 1)
                * torch.linspace(-1, 1, c, dtype=torch.float64).reshape(1, -1, 1, 1))

    def abar_at(self, t):  # fractional timesteps (Euler/Heun) interpolate log abar linearly
        t = t.double()
        lo = t.floor().long().clamp(0, len(self.abar) - 1)
        hi = (lo + 1).clamp(max=len(self.abar) - 1)
        w = t - lo
        return torch.exp((1 - w) * self.abar[lo].log() + w * self.abar[hi].log()).reshape(-1, 1, 1, 1)

    def __call__(self, x, t, y):
        a = self.abar_at(t)
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * self.mu(y, x.shape[1])) / (a * self.s ** 2 + 1 - a)
        eps = eps.float()
        if self.learn_sigma:
            return torch.cat([eps, (self.var_value + 0.2 * torch.tanh(x)).clamp(-1, 1)], 1)
        return eps

    def ode_solution(self, noise, y, t_start):
        """x0 of the probability-flow ODE from x = noise at timestep t_start: the standardised value is constant."""
        a = self.abar[t_start]
        mu = self.mu(y, noise.shape[1])
        z = (noise.double() - a.sqrt() * mu) / (a * self.s ** 2 + 1 - a).sqrt()
        return (mu + self.s * z).float()


def test_ddim_scheduler_equals_our_ddim_loop_with_guidance():
    d = diffusion.create_diffusion()
    model = GaussianEps(d.alphas_cumprod)
    noise, y = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 7])
    kw = dict(objective=d, num_steps=20, cfg_scale=3.0, null_label=NULL, guidance_interval=(0.2, 0.9))
    for eta in (0.0, 0.7):
        ours = diffusion.sample(model, noise, y, sampler="ddim", ddim_eta=eta, generators=gens(3), **kw)
        theirs = diffusion.sample(model, noise, y, sampler="diffusers:DDIMScheduler", ddim_eta=eta,
                                  generators=gens(3), **kw)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # and a different eta really changes the result (the eta path is exercised)
    assert not torch.allclose(ours, diffusion.sample(model, noise, y, sampler="ddim", **kw), atol=1e-3)


def test_ddpm_learned_range_scheduler_equals_our_ddpm_loop():
    d = diffusion.create_diffusion()  # learned sigma: the model's second half is v in [-1, 1]
    model = GaussianEps(d.alphas_cumprod, var_value=0.4)
    noise, y = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 2, 3, 4])
    kw = dict(objective=d, num_steps=25, cfg_scale=2.0, null_label=NULL)
    ours = diffusion.sample(model, noise, y, sampler="ddpm", generators=gens(4), **kw)
    sched = S.build_scheduler("diffusers:DDPMScheduler", d)
    assert sched.config.variance_type == "learned_range" and S.uses_learned_variance(sched)
    theirs = diffusion.sample(model, noise, y, sampler="diffusers:DDPMScheduler", generators=gens(4), **kw)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # it is stochastic: other per-sample streams, other samples
    other = diffusion.sample(model, noise, y, sampler="ddpm", generators=gens(4, offset=50), **kw)
    assert not torch.allclose(other, ours, atol=1e-3)
    # the grids agree: diffusers' linspace spacing is our "N" respacing
    sched.set_timesteps(25)
    assert sorted(sched.timesteps.tolist()) == sorted(d.respace("25").timestep_map.tolist())


def test_dpm_solver_converges_to_the_exact_ode_solution():
    d = diffusion.create_diffusion()
    model = GaussianEps(d.alphas_cumprod, var_value=0.7)
    noise, y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([2, 9])
    exact = model.ode_solution(noise, y, t_start=999)

    def err(sampler, steps):
        out = diffusion.sample(model, noise, y, objective=d, sampler=sampler, num_steps=steps, null_label=NULL)
        return float((out - exact).abs().max())

    e = {n: err("dpm++2m", n) for n in (5, 10, 20, 50)}  # measured: 0.78, 0.33, 0.079, 0.0008
    assert e[50] < 2e-3 and e[50] < e[20] < e[10] < e[5], e
    assert err("ddim", 1000) < 1e-2  # our DDIM with every step: the same ODE, first order (measured 0.0052)
    assert e[50] < err("ddim", 50) / 20  # second order beats first order at equal cost (0.094)
    for sampler in ("unipc", "dpm++2m-karras", "heun"):  # measured 0.0063, 0.012, 0.0048
        assert err(sampler, 50) < 2e-2, sampler
    # the variance channels are dropped: a different v gives the same ODE samples
    model.var_value = -0.3
    assert err("dpm++2m", 50) == pytest.approx(e[50], abs=1e-7)


@pytest.mark.parametrize("sampler", ["diffusers:DDPMScheduler", "diffusers:EulerAncestralDiscreteScheduler"])
def test_stochastic_schedulers_draw_per_sample_noise(sampler):
    d = diffusion.create_diffusion()
    noise, y = torch.randn(3, 3, 4, 4), torch.tensor([1, 5, 8])
    kw = dict(objective=d, sampler=sampler, num_steps=8, cfg_scale=1.5, null_label=NULL)
    together = diffusion.sample(ToyNet(), noise, y, generators=gens(3), **kw)
    for i in range(3):  # each sample alone, with its own generator: the same row
        alone = diffusion.sample(ToyNet(), noise[i:i + 1], y[i:i + 1], generators=gens(3)[i:i + 1], **kw)
        torch.testing.assert_close(alone[0], together[i], rtol=1e-6, atol=1e-6)
    again = diffusion.sample(ToyNet(), noise, y, generators=gens(3, offset=7), **kw)
    assert not torch.allclose(again, together, atol=1e-3)  # it is random


def test_scheduler_is_configured_from_our_objective_and_recorded():
    d = diffusion.create_diffusion(noise_schedule="cosine", learn_sigma=False)
    sched = S.build_scheduler("dpm++2m", d)
    torch.testing.assert_close(sched.betas.double(), torch.from_numpy(d.betas), rtol=1e-6, atol=0)
    assert sched.config.prediction_type == "epsilon" and sched.config.algorithm_type == "dpmsolver++"
    assert S.build_scheduler("dpm++2m-karras", d).config.use_karras_sigmas
    rec = S.scheduler_record(sched)
    assert rec["class"] == "DPMSolverMultistepScheduler" and len(rec["config"]["trained_betas"]) == 1000
    import json
    json.dumps(rec)  # plain JSON
    stats = {}
    diffusion.sample(ToyNet(learn_sigma=False), torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), objective=d,
                     sampler="heun", num_steps=6, null_label=NULL, stats=stats)
    assert stats["nfe"] == 2 * 6 - 1  # Heun: one Euler step, then predictor-corrector pairs


def test_bad_sampler_names():
    with pytest.raises(ValueError, match="unknown diffusers scheduler 'NoSuchScheduler'"):
        diffusion.check_sampler("diffusion", "diffusers:NoSuchScheduler")
    with pytest.raises(ValueError, match="unknown diffusers scheduler"):
        diffusion.check_sampler("diffusion", "diffusers:AutoencoderKL")  # a diffusers class, not a scheduler
    with pytest.raises(ValueError, match="does not apply to a flow"):
        diffusion.check_sampler("flow", "dpm++2m")
    with pytest.raises(ValueError, match="does not apply to a diffusion"):
        diffusion.check_sampler("diffusion", "dopri5")
    with pytest.raises(ValueError, match="takes no config key"):
        S.build_scheduler("euler", diffusion.create_diffusion(), {"solver_order": 3})
