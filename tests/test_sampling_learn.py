"""A real learning check: train a tiny network with each objective on a toy data set with known statistics,
then check that every sampler reproduces those statistics.

Data: 4x4x1 "images" from a two-mode mixture, mode A (weight 0.7) = +0.8 + 0.25 N(0, I), mode B (0.3) =
-0.8 + 0.25 N(0, I). Known: pixel mean 0.32, per-pixel variance 0.25^2 + 4 * 0.7 * 0.3 * 0.8^2 = 0.6, mode-A
fraction 0.7 and within-mode std 0.25. A sample is assigned to mode A when its pixel average is > 0.

Tolerances (stated, measured with 2000 samples after a few hundred CPU training steps; a mis-scaled
posterior, a wrong DDIM coefficient, a reversed time axis or a wrong SDE drift breaks them by far):
|mean - 0.32| < 0.1, |var - 0.6| < 0.15, |fraction A - 0.7| < 0.1, within-mode std in [0.15, 0.45].
"""
import math

import pytest
import torch
import torch.nn as nn

import diffusion

WEIGHT_A, MU, SD = 0.7, 0.8, 0.25
DATA_MEAN = (2 * WEIGHT_A - 1) * MU
DATA_VAR = SD ** 2 + 4 * WEIGHT_A * (1 - WEIGHT_A) * MU ** 2


def toy_data(n, g):
    sign = (torch.rand(n, generator=g) < WEIGHT_A).float() * 2 - 1
    return sign.reshape(-1, 1, 1, 1) * MU + SD * torch.randn(n, 1, 4, 4, generator=g)  # (N, 1, 4, 4)


class TinyNet(nn.Module):
    """MLP on the flattened 4x4 image plus sinusoidal features of t / t_scale; NCHW in and out."""

    def __init__(self, out_channels, t_scale, width=128):
        super().__init__()
        self.out_channels, self.t_scale = out_channels, t_scale  # 2 with learned sigma; 1000 for diffusion t
        self.register_buffer("freqs", torch.arange(1, 9).float() * math.pi)
        self.net = nn.Sequential(nn.Linear(32, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 16 * out_channels))

    def forward(self, x, t, y=None):
        angles = (t.float() / self.t_scale).reshape(-1, 1) * self.freqs  # (N, 8)
        h = torch.cat([x.reshape(len(x), -1), torch.sin(angles), torch.cos(angles)], 1)  # (N, 32)
        return self.net(h).reshape(len(x), self.out_channels, 4, 4)


def train(objective, net, steps, batch=256, lr=3e-3):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    y = torch.zeros(batch, dtype=torch.long)
    for _ in range(steps):
        x = toy_data(batch, g)
        t = objective.sample_timesteps(batch, "cpu", g)  # the training loop of train_gen/train.py
        loss = objective.training_losses(net, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny tensors: one thread is faster and fair to other processes sharing the CPU
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def trained_diffusion():
    # ~7-15 s on a shared 2-core CPU: iDDPM hybrid loss, learned sigma, T = 1000, linear schedule
    torch.manual_seed(0)
    gauss = diffusion.create_diffusion()
    return gauss, train(gauss, TinyNet(2, 1000.0), steps=700)


@pytest.fixture(scope="module")
def trained_flow():
    # ~5 s: linear-interpolant velocity objective
    torch.manual_seed(0)
    flow = diffusion.create_flow()
    return flow, train(flow, TinyNet(1, 1.0), steps=600)


def check_statistics(x):
    assert torch.isfinite(x).all()
    is_a = x.reshape(len(x), -1).mean(1) > 0
    stats = {"mean": x.mean().item(), "var": x.var(0).mean().item(), "frac_a": is_a.float().mean().item(),
             "sd_a": (x[is_a] - MU).std().item(), "sd_b": (x[~is_a] + MU).std().item()}
    assert abs(stats["mean"] - DATA_MEAN) < 0.1, stats
    assert abs(stats["var"] - DATA_VAR) < 0.15, stats
    assert abs(stats["frac_a"] - WEIGHT_A) < 0.1, stats
    assert 0.15 < stats["sd_a"] < 0.45 and 0.15 < stats["sd_b"] < 0.45, stats
    return stats


def test_data_statistics_are_as_stated():
    check_statistics(toy_data(20000, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("objective,sampler,num_steps", [
    ("diffusion", "ddpm", 50), ("diffusion", "ddim", 25),
    # the fast samplers at few steps (the reduced form of docs/sampling.md's quality table)
    ("diffusion", "dpm++2m", 10), ("diffusion", "unipc", 10), ("diffusion", "diffusers:DDPMScheduler", 50),
    ("flow", "euler", 25), ("flow", "heun", 10), ("flow", "sde", 100), ("flow", "dopri5", 1)])
def test_samples_match_data(request, objective, sampler, num_steps):
    obj, net = request.getfixturevalue(f"trained_{objective}")
    noise = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = diffusion.sample(net, noise, torch.zeros(2000, dtype=torch.long), objective=obj, sampler=sampler,
                             num_steps=num_steps, null_label=1, generators=torch.Generator().manual_seed(6))
    print(objective, sampler, num_steps, check_statistics(x))


def test_untrained_network_fails_the_check():
    # the statistics check is not vacuous: the same pipeline with an untrained network is rejected
    obj = diffusion.create_flow()
    noise = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = diffusion.sample(TinyNet(1, 1.0), noise, torch.zeros(2000, dtype=torch.long), objective=obj,
                             sampler="euler", num_steps=10, null_label=1)
    with pytest.raises(AssertionError):
        check_statistics(x)
