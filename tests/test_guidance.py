"""Classifier-free guidance, the guidance interval, per-sample generators and the `sample` entry point."""
import pytest
import torch

import diffusion
from diffusion import GuidedModel

NULL = 10


class ToyNet:
    """Deterministic, batch-independent 'network': output depends on x, t and y row by row.

    Records the batch size of every call. out_channels = 2C (learned sigma) or C.
    """

    def __init__(self, learn_sigma=True, t_scale=1000.0):
        self.learn_sigma, self.t_scale, self.batches = learn_sigma, t_scale, []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        n, c = x.shape[:2]
        tt = (t.float() / self.t_scale).reshape(-1, 1, 1, 1)
        yy = y.float().reshape(-1, 1, 1, 1)
        ch = torch.arange(c, dtype=torch.float32).reshape(1, -1, 1, 1)
        pred = 0.3 * x + 0.05 * (yy + 1) * (ch + 1) + 0.1 * tt
        if not self.learn_sigma:
            return pred
        return torch.cat([pred, torch.tanh(0.1 * x + 0.01 * yy - 0.2)], 1)


def test_guided_model_formula():
    net = ToyNet()
    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([5, 5, 5]), torch.tensor([1, 2, 3])
    cond, uncond = net(x, t, y), net(x, t, torch.full((3,), NULL))
    for k, guided_ch in (("all", 4), (3, 3)):
        out = GuidedModel(net, 4.0, NULL, k)(x, t, y)
        ref = cond.clone()
        ref[:, :guided_ch] = uncond[:, :guided_ch] + 4.0 * (cond[:, :guided_ch] - uncond[:, :guided_ch])
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(out[:, 4:], cond[:, 4:])  # learned variance stays conditional
    assert not torch.allclose(GuidedModel(net, 4.0, NULL, "all")(x, t, y)[:, 3], cond[:, 3])
    with pytest.raises(ValueError):
        GuidedModel(net, 2.0, NULL, cfg_channels="some")
    with pytest.raises(ValueError):
        GuidedModel(net, 2.0, NULL, guidance_interval=(0.8, 0.2), noise_level_fn=lambda t: t)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_scale_one_equals_unguided_diffusion(sampler):
    d = diffusion.create_diffusion()
    net = ToyNet()
    noise, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 3])
    out = diffusion.sample(net, noise, y, objective=d, sampler=sampler, num_steps=10, cfg_scale=1.0, null_label=NULL,
                           guidance_interval=(0.0, 1.0), generators=torch.Generator().manual_seed(0))
    assert net.batches == [2] * 10  # conditional pass only
    spaced = d.respace("10" if sampler == "ddpm" else "ddim10")
    loop = spaced.p_sample_loop if sampler == "ddpm" else spaced.ddim_sample_loop
    ref = loop(ToyNet(), noise.shape, noise=noise, model_kwargs=dict(y=y), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_scale_one_equals_unguided_flow(sampler):
    f = diffusion.create_flow()
    net = ToyNet(learn_sigma=False, t_scale=1.0)
    noise, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 3])
    out = diffusion.sample(net, noise, y, objective=f, sampler=sampler, num_steps=6, null_label=NULL,
                           generators=torch.Generator().manual_seed(0))
    assert set(net.batches) == {2}
    kw = dict(y=y)
    if sampler == "sde":
        ref = f.sample_sde(ToyNet(False, 1.0), noise, 6, model_kwargs=kw, generator=torch.Generator().manual_seed(0))
    else:
        ref = f.sample_ode(ToyNet(False, 1.0), noise, 6, method=sampler, model_kwargs=kw)
    torch.testing.assert_close(out, ref)


def test_dit_style_three_channel_guidance_reproduced():
    # Second implementation: DiT's recipe, a doubled batch [cond; null] carried through the whole DDIM loop with
    # forward_with_cfg guiding the first 3 channels; the first half is the result.
    d = diffusion.create_diffusion()
    net = ToyNet()
    noise, y = torch.randn(3, 4, 4, 4), torch.tensor([1, 2, 3])

    def forward_with_cfg(x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = net(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        c, u = eps.chunk(2)
        h = u + cfg_scale * (c - u)
        return torch.cat([torch.cat([h, h]), rest], 1)

    spaced = d.respace("ddim10")
    ref = spaced.ddim_sample_loop(forward_with_cfg, (6, 4, 4, 4), noise=torch.cat([noise, noise]),
                                  model_kwargs=dict(y=torch.cat([y, torch.full((3,), NULL)]), cfg_scale=1.5))[:3]
    ours = diffusion.sample(ToyNet(), noise, y, objective=d, sampler="ddim", num_steps=10, cfg_scale=1.5,
                            cfg_channels=3, null_label=NULL)
    torch.testing.assert_close(ours, ref)
    all_ch = diffusion.sample(ToyNet(), noise, y, objective=d, sampler="ddim", num_steps=10, cfg_scale=1.5,
                              null_label=NULL)
    assert not torch.allclose(all_ch, ref)


def test_guidance_interval_counts_calls_diffusion():
    d = diffusion.create_diffusion()
    net = ToyNet()
    noise, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 1])
    diffusion.sample(net, noise, y, objective=d, sampler="ddpm", num_steps=10, cfg_scale=3.0, null_label=NULL,
                     guidance_interval=(0.3, 0.7))
    kept = d.respace("10").timestep_map.flip(0).tolist()  # original timesteps, sampling order
    expected = [4 if 0.3 <= k / 1000 <= 0.7 else 2 for k in kept]
    assert net.batches == expected  # one forward per step; doubled only inside the interval
    assert 2 < sum(expected) < 40
    net = ToyNet()
    diffusion.sample(net, noise, y, objective=d, sampler="ddpm", num_steps=10, cfg_scale=3.0, null_label=NULL)
    assert net.batches == [4] * 10


def test_guidance_interval_counts_calls_flow():
    f = diffusion.create_flow()
    net = ToyNet(learn_sigma=False, t_scale=1.0)
    noise, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 1])
    diffusion.sample(net, noise, y, objective=f, sampler="euler", num_steps=10, cfg_scale=3.0, null_label=NULL,
                     guidance_interval=(0.0, 0.45))
    # flow times 0, 0.1, ..., 0.9 have noise levels 1 - t; guided where 1 - t <= 0.45, i.e. t >= 0.6 (4 steps)
    assert net.batches == [2] * 6 + [4] * 4


def test_interval_guides_only_rows_inside():
    net = ToyNet()
    g = GuidedModel(net, 2.0, NULL, "all", (0.0, 0.5), noise_level_fn=lambda t: t.float() / 1000)
    x, y = torch.randn(3, 4, 2, 2), torch.tensor([1, 2, 3])
    t = torch.tensor([100, 900, 400])
    out = g(x, t, y)
    assert net.batches[-1] == 5  # 3 conditional + 2 unconditional rows in one forward
    for i in range(3):
        ref = GuidedModel(ToyNet(), 2.0 if i != 1 else 1.0, NULL)(x[i:i + 1], t[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], ref)


@pytest.mark.parametrize("objective,sampler,extra", [("diffusion", "ddpm", {}),
                                                     ("diffusion", "ddim", {"ddim_eta": 1.0}),
                                                     ("flow", "sde", {})])
def test_per_sample_generators_make_samples_batch_independent(objective, sampler, extra):
    obj = diffusion.create_objective(objective)
    net = ToyNet(learn_sigma=objective == "diffusion", t_scale=1000.0 if objective == "diffusion" else 1.0)
    seeds = [11, 12, 13, 14]
    noise = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s + 100)) for s in seeds])
    y = torch.tensor([0, 1, 2, 3])
    def run(idx):
        return diffusion.sample(net, noise[idx], y[idx], objective=obj, sampler=sampler, num_steps=8,
                                cfg_scale=2.0, null_label=NULL,
                                generators=[torch.Generator().manual_seed(seeds[i]) for i in idx], **extra)

    full = run([0, 1, 2, 3])
    torch.testing.assert_close(run([2, 0]), full[[2, 0]])
    torch.testing.assert_close(run([3]), full[[3]])
    single_stream = diffusion.sample(net, noise, y, objective=obj, sampler=sampler, num_steps=8, cfg_scale=2.0,
                                     null_label=NULL, generators=torch.Generator().manual_seed(0), **extra)
    assert not torch.allclose(single_stream, full)  # the random draws really are used
    with pytest.raises(ValueError, match="generators"):
        diffusion.sample(net, noise, y, objective=obj, sampler=sampler, num_steps=8, null_label=NULL,
                         generators=[torch.Generator()] * 3)


def test_sample_rejects_bad_arguments():
    d, f = diffusion.create_diffusion(), diffusion.create_flow()
    noise, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample(ToyNet(), noise, y, objective=d, sampler="sde", num_steps=5, null_label=NULL)
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample(ToyNet(False), noise, y, objective=f, sampler="ddpm", num_steps=5, null_label=NULL)
    with pytest.raises(TypeError):
        diffusion.sample(ToyNet(), noise, y, objective=object(), sampler="ddpm", num_steps=5, null_label=NULL)
    with pytest.raises(ValueError):
        diffusion.sample(ToyNet(), noise, y[:1], objective=d, sampler="ddpm", num_steps=5, null_label=NULL)
    with pytest.warns(UserWarning, match="DDIM"):
        diffusion.sample(ToyNet(), noise, y, objective=d, sampler="ddim", num_steps=300, null_label=NULL)
