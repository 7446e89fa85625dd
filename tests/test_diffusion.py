"""iDDPM Gaussian diffusion against independent references: diffusers' schedulers, closed-form Gaussian math, scipy."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from scipy import stats

import diffusion
from diffusion import gaussian_diffusion as gd
from diffusion.respace import space_timesteps


def _ddpm_scheduler(**kw):
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear",
                         variance_type="learned_range", clip_sample=False, prediction_type="epsilon", **kw)


class FixedOutput:
    """A 'model' returning a fixed output and recording the timesteps it was called with."""

    def __init__(self, out):
        self.out, self.seen_t = out, []

    def __call__(self, x, t, **kwargs):
        self.seen_t.append(t.clone())
        return self.out


def test_linear_schedule_is_the_papers():
    d = diffusion.create_diffusion()
    assert d.num_timesteps == 1000
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(2e-2)
    assert d.betas.dtype == np.float64
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear")
    np.testing.assert_allclose(d.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-5)


def test_cosine_schedule_closed_form():
    d = diffusion.create_diffusion(noise_schedule="cosine")
    def f(u):  # iDDPM Eq. 17
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 10, 500, 900):
        assert d.alphas_cumprod[t] == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert d.betas.max() <= 0.999
    with pytest.raises(ValueError):
        diffusion.create_diffusion(noise_schedule="quadratic")


def test_q_sample_matches_diffusers_add_noise():
    d = diffusion.create_diffusion()
    sched = _ddpm_scheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    ours = d.q_sample(x0, t, noise)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, sched.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_posterior_matches_bayes_rule():
    # q(x_{t-1} | x_t, x_0) by Bayes' rule for Gaussians, computed independently of Eq. 11's coefficients.
    d = diffusion.create_diffusion()
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([1, 250, 999])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        beta, abar_prev = d.betas[ti], d.alphas_cumprod[ti - 1]
        prec = (1 - beta) / beta + 1 / (1 - abar_prev)
        ref_var = 1 / prec
        ref_mean = ref_var * (math.sqrt(1 - beta) / beta * xt[i].double()
                              + math.sqrt(abar_prev) / (1 - abar_prev) * x0[i].double())
        assert var[i].item() == pytest.approx(ref_var, rel=1e-5)
        assert logvar[i].item() == pytest.approx(math.log(ref_var), rel=1e-5)
        torch.testing.assert_close(mean[i].double(), ref_mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,stride", [("", 1), ("ddim250", 4)])
def test_p_sample_matches_diffusers_ddpm_learned_range(spec, stride):
    base = diffusion.create_diffusion()
    d = base.respace(spec)
    sched = _ddpm_scheduler()
    if stride > 1:
        sched.set_timesteps(1000 // stride)  # "leading" spacing: 0, stride, 2 stride, ...
    g = torch.Generator().manual_seed(2)
    for k in (1, 2, 40, d.num_timesteps - 1):
        orig = k * stride
        x = torch.randn(3, 4, 8, 8, generator=g)
        out = torch.cat([torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, 4, 8, 8, generator=g) * 2 - 1], 1)
        model = FixedOutput(out)
        t = torch.full((3,), k, dtype=torch.long)
        pmv = d.p_mean_variance(model, x, t)
        assert model.seen_t[-1].tolist() == [orig] * 3  # respaced diffusions call the model at original timesteps
        ref_logvar = sched._get_variance(orig, predicted_variance=out[:, 4:])
        torch.testing.assert_close(pmv["log_variance"], ref_logvar, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pmv["variance"], ref_logvar.exp(), rtol=1e-4, atol=1e-8)
        ours = d.p_sample(model, x, t, generator=torch.Generator().manual_seed(k))
        ref = sched.step(out, orig, x, generator=torch.Generator().manual_seed(k))
        torch.testing.assert_close(ours["pred_xstart"], ref.pred_original_sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours["sample"], ref.prev_sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_diffusers(eta):
    d = diffusion.create_diffusion("ddim50")
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear",
                          clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon")
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == list(range(980, -1, -20))
    g = torch.Generator().manual_seed(3)
    for k in (49, 30, 1, 0):
        x = torch.randn(2, 4, 8, 8, generator=g)
        eps = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.cat([eps, torch.zeros_like(eps)], 1)
        t = torch.full((2,), k, dtype=torch.long)
        ours = d.ddim_sample(FixedOutput(out), x, t, eta=eta, generator=torch.Generator().manual_seed(k))
        ref = sched.step(eps, 20 * k, x, eta=eta, generator=torch.Generator().manual_seed(k))
        torch.testing.assert_close(ours["sample"], ref.prev_sample, rtol=1e-4, atol=1e-4)


def test_normal_kl_closed_form():
    g = torch.Generator().manual_seed(4)
    m1, m2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    lv1, lv2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(gd.normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-5, atol=1e-6)


def test_discretized_gaussian_log_likelihood_matches_scipy():
    rng = np.random.default_rng(5)
    x = np.concatenate([[-1.0, 1.0], rng.integers(0, 256, 60) / 127.5 - 1.0])
    means = rng.normal(0, 0.5, x.shape)
    log_scales = rng.uniform(np.log(0.05), np.log(1.0), x.shape)
    sd = np.exp(log_scales)
    hi = np.where(x > 0.999, 1.0, stats.norm.cdf((x + 1 / 255 - means) / sd))
    lo = np.where(x < -0.999, 0.0, stats.norm.cdf((x - 1 / 255 - means) / sd))
    ref_prob = hi - lo
    ours = gd.discretized_gaussian_log_likelihood(torch.tensor(x), means=torch.tensor(means),
                                                  log_scales=torch.tensor(log_scales)).exp().numpy()
    # ADM's tanh CDF approximation is accurate to ~3e-4 per CDF evaluation
    np.testing.assert_allclose(ours, ref_prob, atol=1e-3)
    assert ours[0] == pytest.approx(ref_prob[0], rel=1e-2) and ours[1] == pytest.approx(ref_prob[1], rel=1e-2)


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250") == set(range(0, 1000, 4))
    s = space_timesteps(1000, "250")
    assert len(s) == 250 and min(s) == 0 and max(s) == 999
    s = space_timesteps(300, "10,15,20")  # iDDPM's documented example: three sections of 100 steps
    assert len(s) == 45
    assert sorted(s)[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert {100, 199, 200, 299} <= s
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, [10]) == space_timesteps(1000, "10")
    for bad in ("ddim300", "abc", "0", "600,600"):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)


@pytest.mark.parametrize("spec", ["250", "ddim50", "10,20,30", "1000"])
def test_respaced_alphas_cumprod_equal_original_at_kept_steps(spec):
    base = diffusion.create_diffusion()
    d = diffusion.create_diffusion(spec)
    kept = sorted(space_timesteps(1000, spec))
    assert d.timestep_map.tolist() == kept and d.num_timesteps == len(kept)
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    # forward marginals agree, and the model sees original timesteps
    x0, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    k = torch.tensor([0, len(kept) - 1])
    torch.testing.assert_close(d.q_sample(x0, k, noise), base.q_sample(x0, torch.tensor([kept[0], kept[-1]]), noise))


def test_respace_from_respaced_uses_the_original_schedule():
    d = diffusion.create_diffusion("100").respace("ddim50")
    np.testing.assert_allclose(d.alphas_cumprod, diffusion.create_diffusion("ddim50").alphas_cumprod)


def test_training_losses_hybrid():
    d = diffusion.create_diffusion()
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    param = torch.randn(4, 4, 4, 4, generator=g).requires_grad_()
    def model(x, t, y=None):  # bf16 output as under autocast
        return param.to(torch.bfloat16)

    losses = d.training_losses(model, x0, t, noise=noise)
    for key in ("loss", "mse", "vb"):
        assert losses[key].shape == (4,) and losses[key].dtype == torch.float32
    eps_pred = param.detach().to(torch.bfloat16).float()[:, :2]
    torch.testing.assert_close(losses["mse"], ((eps_pred - noise) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    # the vb term trains only the variance channels (mean detached), the mse only the epsilon channels
    losses["vb"].sum().backward()
    assert param.grad[:, :2].abs().max() == 0 and param.grad[:, 2:].abs().max() > 0
    param.grad = None
    d.training_losses(model, x0, t, noise=noise)["mse"].sum().backward()
    assert param.grad[:, 2:].abs().max() == 0 and param.grad[:, :2].abs().max() > 0


def test_vb_is_zero_for_the_true_posterior():
    # With eps = the true noise and v = -1 (Sigma = beta~_t), p(x_{t-1}|x_t) equals q(x_{t-1}|x_t,x_0): KL = 0.
    d = diffusion.create_diffusion()
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([1, 300, 999])
    def model(x, t):
        return torch.cat([noise, -torch.ones_like(noise)], 1)

    losses = d.training_losses(model, x0, t, noise=noise)
    assert losses["mse"].abs().max() < 1e-10
    assert losses["vb"].abs().max() < 1e-4


def test_rescaled_and_kl_losses():
    x0, noise = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    def model(x, t):
        return torch.cat([0.5 * x, torch.zeros_like(x)], 1)

    t = torch.tensor([3, 5])
    plain = diffusion.create_diffusion("100").training_losses(model, x0, t, noise=noise)
    resc = diffusion.create_diffusion("100", rescale_learned_sigmas=True).training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(resc["vb"], plain["vb"] * 0.1)  # lambda T = 0.001 * 100
    kl = diffusion.create_diffusion("100", use_kl=True).training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(kl["loss"], plain["vb"] * 100)


def test_fixed_variances():
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([5, 700])
    model = FixedOutput(torch.zeros(2, 3, 4, 4))
    small = diffusion.create_diffusion(learn_sigma=False, sigma_small=True)
    large = diffusion.create_diffusion(learn_sigma=False)
    for d, ref in ((small, small.posterior_variance), (large, large.betas)):
        out = d.p_mean_variance(model, x, t)
        torch.testing.assert_close(out["variance"][:, 0, 0, 0], torch.tensor(ref[[5, 700]], dtype=torch.float32))
        assert d.training_losses(model, x, t)["vb"].abs().max() == 0
    with pytest.raises(ValueError, match="output channels"):
        large.p_mean_variance(FixedOutput(torch.zeros(2, 6, 4, 4)), x, t)


def test_predict_xstart_mode():
    d = diffusion.create_diffusion(predict_xstart=True, learn_sigma=False)
    x0 = torch.randn(2, 1, 4, 4)
    t = torch.tensor([10, 900])
    xt = d.q_sample(x0, t)
    out = d.p_mean_variance(lambda x, t: x0, xt, t)
    torch.testing.assert_close(out["pred_xstart"], x0)
    assert d.training_losses(lambda x, t: x0, x0, t)["mse"].abs().max() == 0


def test_sample_loops_shapes_and_noise_argument():
    d = diffusion.create_diffusion("10")
    def model(x, t, y):
        return torch.cat([0.1 * x, torch.zeros_like(x)], 1)

    noise = torch.randn(2, 4, 4, 4)
    kw = dict(y=torch.zeros(2, dtype=torch.long))
    a = d.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs=kw)
    b = d.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs=kw, progress=True)
    torch.testing.assert_close(a, b)  # deterministic given the noise
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    c = d.p_sample_loop(model, noise.shape, noise=noise, model_kwargs=kw, generator=g1)
    e = d.p_sample_loop(model, noise.shape, noise=noise, model_kwargs=kw, generator=g2)
    torch.testing.assert_close(c, e)
    assert c.shape == noise.shape and torch.isfinite(c).all()
    with pytest.raises(ValueError):
        d.p_sample_loop(model, (3, 4, 4, 4), noise=noise, model_kwargs=kw)


def test_sample_timesteps_uniform():
    d = diffusion.create_diffusion()
    t = d.sample_timesteps(20000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert abs(t.float().mean().item() - 499.5) < 10
    assert diffusion.create_objective("diffusion", timestep_respacing="50").num_timesteps == 50
    with pytest.raises(ValueError):
        diffusion.create_objective("score")
