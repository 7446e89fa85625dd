"""Flow-matching time schedules (logit-normal times, resolution shift) against closed forms, scipy and numpy."""
import argparse

import numpy as np
import pytest
import torch
from scipy import special, stats

import diffusion
from diffusion.flow_matching import create_flow
from diffusion.flow_schedules import (
    SCHEDULE_FLAGS,
    TIME_SHIFT_RANGE,
    add_time_schedule_args,
    draw_unit_times,
    schedule_objective_kwargs,
    shift_derivative,
    shift_time,
    time_grid,
)
from fcdm_common.cli import UserError
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFTS = (0.1, 1 / 3, 0.5, 2.0, 3.0, 10.0)
MU, SIG = 0.7, 0.3  # data ~ N(MU, SIG^2) per element; noise ~ N(0, 1)
N_KS = 20000


# ----------------------------------------------------------------------------- independent references
def np_shift(u, a):
    """The shift, written out in float64 numpy (independent of flow_schedules.shift_time)."""
    u = np.asarray(u, dtype=np.float64)
    return a * u / (1.0 + (a - 1.0) * u)


def np_unshift(t, a):
    """Inverse of the shift solved by hand: t (1 + (a - 1) u) = a u  <=>  u = t / (a - (a - 1) t)."""
    t = np.asarray(t, dtype=np.float64)
    return t / (a - (a - 1.0) * t)


def np_velocity(x, t):
    """Exact marginal velocity E[x1 - x0 | x_t = x] for x1 ~ N(MU, SIG^2), x0 ~ N(0, 1), float64."""
    return MU + (t * SIG ** 2 - (1.0 - t)) / (t ** 2 * SIG ** 2 + (1.0 - t) ** 2) * (x - t * MU)


def np_euler(x0, grid):
    x = np.array(x0, dtype=np.float64)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * np_velocity(x, t_cur)
    return x


def np_heun(x0, grid):
    x = np.array(x0, dtype=np.float64)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t_cur
        v = np_velocity(x, t_cur)
        v_next = np_velocity(x + dt * v, t_next)
        x = x + dt * 0.5 * (v + v_next)
    return x


def exact_endpoint(noise):
    """The exact ODE map x0 -> x(1) = MU + SIG x0 (the path stays Gaussian: x_t = t MU + s_t x0)."""
    return MU + SIG * noise.double().numpy()


class GaussianVelocity:
    """The exact velocity as a "model" (float64 inside, float64 out) that records every t it is called with."""

    def __init__(self):
        self.ts = []

    def __call__(self, x, t, y=None):
        assert t.shape == (x.shape[0],) and t.is_floating_point()
        assert bool((t == t[0]).all())  # one time for the whole batch
        self.ts.append(float(t[0]))
        tt = t.double().reshape(-1, *([1] * (x.ndim - 1)))
        xx = x.double()
        return MU + (tt * SIG ** 2 - (1.0 - tt)) / (tt ** 2 * SIG ** 2 + (1.0 - tt) ** 2) * (xx - tt * MU)


def make_noise(shape=(4, 1, 2, 2), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def shifted_grid(a, num_points=11, end=1.0):
    return np_shift(np.linspace(0.0, end, num_points), a)


# ----------------------------------------------------------------------------- 1. the shift itself
@pytest.mark.parametrize("a", SHIFTS)
def test_shift_endpoints_monotone_inverse_and_derivative(a):
    assert shift_time(0.0, a) == 0.0
    assert abs(shift_time(1.0, a) - 1.0) <= 1e-12
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    s = shift_time(t, a)
    assert s.dtype == torch.float64 and s.shape == t.shape
    assert bool((torch.diff(s) > 0).all())  # strictly increasing
    assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0 + 1e-12
    np.testing.assert_allclose(s.numpy(), np_shift(t.numpy(), a), rtol=0, atol=1e-15)
    # the shift by 1 / a undoes it, both ways round
    np.testing.assert_allclose(shift_time(s, 1.0 / a).numpy(), t.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(shift_time(shift_time(t, 1.0 / a), a).numpy(), t.numpy(), rtol=0, atol=1e-12)
    # a < 1 moves every interior time towards noise (t = 0), a > 1 towards data
    inner = s[1:-1] - t[1:-1]
    assert bool((inner < 0).all()) if a < 1 else bool((inner > 0).all())
    # derivative against a central finite difference
    h = 1e-5
    tc = torch.linspace(h, 1 - h, 201, dtype=torch.float64)
    fd = (shift_time(tc + h, a) - shift_time(tc - h, a)) / (2 * h)
    np.testing.assert_allclose(shift_derivative(tc, a).numpy(), fd.numpy(), rtol=1e-6, atol=0)
    assert abs(shift_derivative(0.0, a) - a) <= 1e-12 and abs(shift_derivative(1.0, a) - 1.0 / a) <= 1e-9


def test_shift_identity_and_known_value():
    t = torch.rand(5, generator=torch.Generator().manual_seed(0))
    assert shift_time(t, 1.0) is t
    assert shift_time(0.3, 1.0) == 0.3
    assert torch.equal(shift_derivative(t, 1.0), torch.ones(5))
    assert abs(shift_time(0.5, 1 / 3) - 0.25) <= 1e-15  # a < 1: towards noise
    assert abs(shift_time(0.5, 3.0) - 0.75) <= 1e-15  # a > 1: towards data
    assert shift_time(0.5, 1 / 3) < 0.5 < shift_time(0.5, 3.0)


@pytest.mark.parametrize("a", (1 / 3, 1.0, 3.0))
def test_time_grid(a):
    g = time_grid(0.0, 1.0, 11, a)
    assert isinstance(g, list) and len(g) == 11 and all(isinstance(v, float) for v in g)
    np.testing.assert_allclose(g, shifted_grid(a), rtol=0, atol=1e-15)
    g2 = time_grid(0.1, 0.9, 5, a)
    np.testing.assert_allclose(g2, np_shift(np.linspace(0.1, 0.9, 5), a), rtol=0, atol=1e-15)
    if a == 1.0:
        assert g == torch.linspace(0, 1, 11, dtype=torch.float64).tolist()


# ----------------------------------------------------------------------------- 2. training-time distributions
def draw(n=N_KS, seed=1234, **kwargs):
    t = create_flow(**kwargs).sample_timesteps(n, "cpu", torch.Generator().manual_seed(seed))
    assert t.shape == (n,) and t.dtype == torch.float32
    return t.double().numpy()


def logit_normal_cdf(m, s):
    return lambda t: stats.norm.cdf((special.logit(t) - m) / s)


def test_ks_uniform():
    t = draw()
    assert t.min() >= 0 and t.max() < 1
    assert stats.kstest(t, stats.uniform(0, 1).cdf).pvalue > 0.01
    t = draw(train_eps=0.1)
    assert t.min() >= 0.1 and t.max() <= 0.9
    assert stats.kstest(t, stats.uniform(loc=0.1, scale=0.8).cdf).pvalue > 0.01
    assert stats.kstest(t, stats.uniform(0, 1).cdf).pvalue < 1e-6  # negative control: the eps range matters


@pytest.mark.parametrize("m, s", [(0.0, 1.0), (0.5, 0.7), (-1.0, 1.5)])
def test_ks_logit_normal(m, s):
    t = draw(time_distribution="logit-normal", logit_mean=m, logit_std=s)
    assert t.min() > 0 and t.max() < 1
    assert stats.kstest(t, logit_normal_cdf(m, s)).pvalue > 0.01
    assert stats.kstest(t, stats.uniform(0, 1).cdf).pvalue < 1e-6  # negative control
    # the median is sigmoid(m): m > 0 leans towards data (t = 1)
    assert abs(np.median(t) - special.expit(m)) < 0.01


def test_ks_shifted_logit_normal():
    a = 1 / 3
    t = draw(time_distribution="logit-normal", time_shift=a)
    base = logit_normal_cdf(0.0, 1.0)
    assert stats.kstest(t, lambda x: base(np_unshift(x, a))).pvalue > 0.01
    assert stats.kstest(t, base).pvalue < 1e-6  # negative control: the shift is applied
    assert np.median(t) < 0.3  # median sigmoid(0) = 0.5 shifted to 0.25 (towards noise)


@pytest.mark.parametrize("a", (1 / 3, 3.0))
def test_ks_shifted_uniform_with_eps(a):
    t = draw(train_eps=0.1, time_shift=a)
    cdf = stats.uniform(loc=0.1, scale=0.8).cdf
    assert stats.kstest(t, lambda x: cdf(np_unshift(x, a))).pvalue > 0.01
    assert stats.kstest(t, cdf).pvalue < 1e-6  # negative control
    # the eps range is mapped first, then shifted: the support is [shift(0.1), shift(0.9)]
    lo, hi = np_shift([0.1, 0.9], a)
    assert lo - 1e-6 <= t.min() and t.max() <= hi + 1e-6


def test_draw_unit_times_rejects_unknown_distribution():
    with pytest.raises(ValueError):
        draw_unit_times(3, "beta")


# ----------------------------------------------------------------------------- 3. defaults are the old code
def test_default_training_times_are_bitwise_the_old_ones():
    t = create_flow().sample_timesteps(1000, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(t, torch.rand(1000, generator=torch.Generator().manual_seed(5)))
    t = create_flow(train_eps=0.05).sample_timesteps(1000, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(t, 0.05 + 0.9 * torch.rand(1000, generator=torch.Generator().manual_seed(5)))
    # logit-normal: one randn per time, as written in the docs
    t = create_flow(time_distribution="logit-normal", logit_mean=0.5, logit_std=0.7).sample_timesteps(
        1000, "cpu", torch.Generator().manual_seed(5))
    ref = torch.sigmoid(0.5 + 0.7 * torch.randn(1000, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(t, ref)
    # negative control: the draws depend on the seed
    other = create_flow().sample_timesteps(1000, "cpu", torch.Generator().manual_seed(6))
    assert not torch.equal(other, torch.rand(1000, generator=torch.Generator().manual_seed(5)))


def test_default_euler_is_bitwise_the_plain_loop():
    noise = make_noise()
    model = GaussianVelocity()
    out = create_flow().sample_ode(model, noise, 7)
    ts = torch.linspace(0, 1, 8, dtype=torch.float64).tolist()
    x, n = noise.float(), noise.shape[0]
    for i in range(7):
        v = GaussianVelocity()(x, torch.full((n,), ts[i])).float()
        x = x + (ts[i + 1] - ts[i]) * v
    assert out.dtype == torch.float32
    assert torch.equal(out, x)
    assert model.ts == [float(torch.tensor(t, dtype=torch.float32)) for t in ts[:-1]]


# ----------------------------------------------------------------------------- 4. samplers on the shifted grid
@pytest.mark.parametrize("method", ("euler", "heun"))
@pytest.mark.parametrize("a", (1 / 3, 3.0))
def test_fixed_step_samplers_follow_the_shifted_grid(method, a):
    noise = make_noise()
    grid = shifted_grid(a)
    model = GaussianVelocity()
    out = create_flow(time_shift=a).sample_ode(model, noise, 10, method=method)
    ref = (np_euler if method == "euler" else np_heun)(noise.double().numpy(), grid)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=1e-5)
    expected_ts = grid[:-1] if method == "euler" else np.repeat(grid, 2)[1:-1]  # Heun: t_i, t_i+1 per step
    np.testing.assert_allclose(model.ts, expected_ts, rtol=0, atol=1e-7)
    # negative control: the unshifted reference is far off
    plain = (np_euler if method == "euler" else np_heun)(noise.double().numpy(), np.linspace(0, 1, 11))
    assert np.abs(out.double().numpy() - plain).max() > 1e-3


@pytest.mark.parametrize("a", (1 / 3, 3.0))
def test_shift_from_objective_equals_override(a):
    noise = make_noise()
    for method in ("euler", "heun"):
        own = create_flow(time_shift=a).sample_ode(GaussianVelocity(), noise, 10, method=method)
        given = create_flow().sample_ode(GaussianVelocity(), noise, 10, method=method, time_shift=a)
        assert torch.equal(own, given)
        unshifted = create_flow(time_shift=a).sample_ode(GaussianVelocity(), noise, 10, method=method,
                                                         time_shift=1.0)
        plain = create_flow().sample_ode(GaussianVelocity(), noise, 10, method=method)
        assert torch.equal(unshifted, plain)
        assert not torch.allclose(own, plain, rtol=0, atol=1e-4)  # negative control
    sde = [f.sample_sde(GaussianVelocity(), noise, 20, generator=torch.Generator().manual_seed(3), time_shift=ts)
           for f, ts in ((create_flow(time_shift=a), None), (create_flow(), a), (create_flow(time_shift=a), 1.0),
                         (create_flow(), None))]
    assert torch.equal(sde[0], sde[1]) and torch.equal(sde[2], sde[3])
    assert not torch.allclose(sde[0], sde[3], rtol=0, atol=1e-4)


@pytest.mark.parametrize("a", (1 / 3, 3.0))
def test_euler_and_heun_converge_to_the_exact_map(a):
    """Euler is first order on the shifted grid (error / 4 per step count x 4), Heun second order. (With
    MU, SIG = 0.7, 0.3 and a = 1/3, 400 Euler steps are 1.1e-2 off in max norm: truncation error, which the
    float64 reference loop reproduces; 1600 steps are needed for < 3e-3.)"""
    noise = make_noise((16, 1, 2, 2))
    exact = exact_endpoint(noise)
    f = create_flow(time_shift=a)
    err = {n: np.abs(f.sample_ode(GaussianVelocity(), noise, n).double().numpy() - exact).max()
           for n in (100, 400, 1600)}
    assert err[1600] < 3e-3 and err[400] < 1.2e-2, err
    for n in (100, 400):
        assert 3.5 < err[n] / err[4 * n] < 4.5, err  # first order
        ref = np.abs(np_euler(noise.double().numpy(), shifted_grid(a, n + 1)) - exact).max()
        assert abs(err[n] - ref) < 1e-4, (n, err[n], ref)
    heun = {n: np.abs(f.sample_ode(GaussianVelocity(), noise, n, method="heun").double().numpy() - exact).max()
            for n in (50, 200)}
    assert heun[200] < 2e-4, heun
    assert 10 < heun[50] / heun[200] < 20, heun  # second order (16 asymptotically)
    coarse = np.abs(f.sample_ode(GaussianVelocity(), noise, 10).double().numpy() - exact).max()
    assert coarse > 3e-2  # negative control: the tolerances discriminate


@pytest.mark.parametrize("a", (1 / 3, 3.0))
def test_dopri5_with_shift_reaches_the_exact_map(a):
    noise = make_noise((16, 1, 2, 2))
    model, st = GaussianVelocity(), {}
    out = create_flow(time_shift=a).sample_dopri5(model, noise, atol=1e-7, rtol=1e-6, stats=st)
    assert out.dtype == torch.float32 and out.shape == noise.shape
    assert np.abs(out.double().numpy() - exact_endpoint(noise)).max() < 1e-4
    ts = np.array(model.ts)
    assert st["nfe"] == len(ts)
    assert ts.min() >= 0.0 and ts.max() <= 1.0, (ts.min(), ts.max())
    assert ts.min() == 0.0 and ts.max() > 0.99  # the whole interval is covered
    # override and objective's own shift agree
    again = create_flow().sample_dopri5(GaussianVelocity(), noise, atol=1e-7, rtol=1e-6, time_shift=a)
    assert torch.equal(out, again)


def np_sde(x0, zs, grid, t_last):
    """Euler-Maruyama in float64 with drift v + w s, w = 1 - t, s = (t v - x) / (1 - t), on `grid`
    (its last point excluded), then one deterministic step from t_last to 1."""
    x = np.array(x0, dtype=np.float64)

    def drift(x, t):
        v = np_velocity(x, t)
        w = 1.0 - t
        return v + w * (t * v - x) / (1.0 - t), w

    for (t_cur, t_next), z in zip(zip(grid[:-1], grid[1:]), zs):
        dt = t_next - t_cur
        f, w = drift(x, t_cur)
        x = x + f * dt + np.sqrt(2.0 * w) * z * np.sqrt(dt)
    f, _ = drift(x, t_last)
    return x + f * (1.0 - t_last)


@pytest.mark.parametrize("a", (1 / 3, 1.0))
def test_sde_sampler_steps_on_the_shifted_grid(a):
    noise = make_noise()
    model = GaussianVelocity()
    out = create_flow().sample_sde(model, noise, 20, generator=torch.Generator().manual_seed(7), time_shift=a)
    grid = np_shift(np.linspace(0.0, 0.96, 20), a)
    np.testing.assert_allclose(model.ts, grid, rtol=0, atol=1e-7)  # 19 stochastic steps + the last at shift(0.96)
    g = torch.Generator().manual_seed(7)
    zs = [torch.randn(noise.shape, generator=g).double().numpy() for _ in range(19)]
    ref = np_sde(noise.double().numpy(), zs, grid, grid[-1])
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=1e-4)
    if a != 1.0:  # negative control: the unshifted times are not what it used
        assert np.abs(np.array(model.ts) - np.linspace(0.0, 0.96, 20)).max() > 0.05


# ----------------------------------------------------------------------------- 5. diffusion.sample
@pytest.mark.parametrize("sampler", ("euler", "heun", "sde"))
def test_diffusion_sample_passes_the_shift(sampler):
    noise, y = make_noise(), torch.tensor([0, 1, 2, 3])
    n_steps = 10
    if sampler == "sde":
        grids = {a: np_shift(np.linspace(0.0, 0.96, n_steps), a) for a in (0.5, 1.0)}
    else:
        grids = {a: shifted_grid(a, n_steps + 1) for a in (0.5, 1.0)}
        if sampler == "euler":
            grids = {a: g[:-1] for a, g in grids.items()}
        else:
            grids = {a: np.repeat(g, 2)[1:-1] for a, g in grids.items()}
    for override, a in ((None, 0.5), (1.0, 1.0), (0.5, 0.5)):
        model = GaussianVelocity()
        objective = create_flow(time_shift=0.5) if override != 0.5 else create_flow()
        diffusion.sample(model, noise, y, objective=objective, sampler=sampler, num_steps=n_steps, null_label=10,
                         generators=torch.Generator().manual_seed(0), time_shift=override)
        np.testing.assert_allclose(model.ts, grids[a], rtol=0, atol=1e-7)


def test_diffusion_sample_dopri5_passes_the_shift():
    noise, y = make_noise(), torch.tensor([0, 1, 2, 3])
    out = diffusion.sample(GaussianVelocity(), noise, y, objective=create_flow(), sampler="dopri5", num_steps=1,
                           null_label=10, time_shift=3.0)
    direct = create_flow(time_shift=3.0).sample_dopri5(GaussianVelocity(), noise, model_kwargs={"y": y})
    plain = create_flow().sample_dopri5(GaussianVelocity(), noise, model_kwargs={"y": y})
    assert torch.equal(out, direct)
    assert not torch.equal(out, plain)


def test_diffusion_objective_refuses_a_time_shift():
    noise, y = make_noise(), torch.tensor([0, 1, 2, 3])
    calls = []

    def model(x, t, y):
        calls.append(t)
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])  # learned sigma: 2C channels

    objective = diffusion.create_diffusion()
    with pytest.raises(ValueError, match="time_shift"):
        diffusion.sample(model, noise, y, objective=objective, sampler="ddim", num_steps=2, null_label=10,
                         time_shift=0.5)
    assert not calls
    # control: the same call without the shift runs
    out = diffusion.sample(model, noise, y, objective=objective, sampler="ddim", num_steps=2, null_label=10)
    assert out.shape == noise.shape and bool(torch.isfinite(out).all()) and len(calls) == 2


# ----------------------------------------------------------------------------- 6. flags -> objective_kwargs
def parse(argv):
    parser = argparse.ArgumentParser()
    add_time_schedule_args(parser)
    return parser.parse_args(argv)


def test_schedule_flags_to_objective_kwargs():
    assert [flag for flag, _, _ in SCHEDULE_FLAGS] == ["--time-distribution", "--logit-mean", "--logit-std",
                                                       "--time-shift"]
    kw = {"train_eps": 0.1}
    assert schedule_objective_kwargs(parse([]), "flow", kw) == {"train_eps": 0.1}
    assert schedule_objective_kwargs(parse([]), "diffusion", {}) == {}
    args = parse("--time-distribution logit-normal --logit-mean 0.5 --time-shift 0.5".split())
    assert schedule_objective_kwargs(args, "flow", {}) == {"time_distribution": "logit-normal", "logit_mean": 0.5,
                                                            "time_shift": 0.5}
    out = schedule_objective_kwargs(args, "flow", kw)
    assert out == {"train_eps": 0.1, "time_distribution": "logit-normal", "logit_mean": 0.5, "time_shift": 0.5}
    assert kw == {"train_eps": 0.1}  # the input is not modified
    # the recorded kwargs build the objective they describe
    f = create_flow(**out)
    assert (f.time_distribution, f.logit_mean, f.logit_std, f.time_shift) == ("logit-normal", 0.5, 1.0, 0.5)
    # explicit defaults record nothing
    assert schedule_objective_kwargs(parse("--time-distribution uniform --time-shift 1".split()), "flow", {}) == {}
    assert schedule_objective_kwargs(parse("--time-distribution logit-normal --logit-mean 0 --logit-std 1".split()),
                                     "flow", {}) == {"time_distribution": "logit-normal"}
    # logit parameters are fine when --objective-kwargs already picks logit-normal; agreeing values are fine
    assert schedule_objective_kwargs(parse(["--logit-mean", "1"]), "flow", {"time_distribution": "logit-normal"}) \
        == {"time_distribution": "logit-normal", "logit_mean": 1.0}
    assert schedule_objective_kwargs(parse(["--time-shift", "2"]), "flow", {"time_shift": 2.0}) == {"time_shift": 2.0}


@pytest.mark.parametrize("argv, objective, kwargs", [
    ("--time-shift 0.5", "diffusion", {}),
    ("--time-distribution logit-normal", "diffusion", {}),
    ("--time-distribution uniform", "diffusion", {}),  # even a default value
    ("--logit-std 2 --time-distribution logit-normal", "diffusion", {}),
    ("--logit-mean 1", "flow", {}),
    ("--logit-std 0.5 --time-distribution uniform", "flow", {"time_distribution": "logit-normal"}),
    ("--time-shift 0.5", "flow", {"time_shift": 2.0}),
    ("--time-distribution uniform", "flow", {"time_distribution": "logit-normal"}),
])
def test_schedule_flags_user_errors(argv, objective, kwargs):
    with pytest.raises(UserError):
        schedule_objective_kwargs(parse(argv.split()), objective, kwargs)


@pytest.mark.parametrize("argv", ["--time-shift 0", "--time-shift nan", "--time-shift inf", "--time-shift 1001",
                                  "--logit-std 0", "--logit-std 11", "--logit-mean 10.5", "--logit-mean -inf",
                                  "--time-distribution beta"])
def test_schedule_flags_out_of_range(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv.split())
    assert e.value.code == 2
    assert argv.split()[0] in capsys.readouterr().err


def test_schedule_flags_range_ends_parse():
    lo, hi = TIME_SHIFT_RANGE
    for argv in (f"--time-shift {lo}", f"--time-shift {hi}", "--logit-std 10", "--logit-std 0.001",
                 "--logit-mean -10", "--logit-mean 10"):
        flag, value = argv.split()
        assert getattr(parse([flag, value]), flag[2:].replace("-", "_")) == float(value)


def test_create_flow_rejects_bad_schedules():
    for kwargs in ({"time_shift": 0}, {"time_shift": 0.0}, {"time_shift": float("nan")}, {"time_shift": -1.0},
                   {"time_shift": 2e3}, {"time_distribution": "beta"}, {"logit_std": 0.0}, {"logit_std": 11.0},
                   {"logit_mean": 11.0}, {"logit_mean": float("inf")}):
        with pytest.raises(ValueError):
            create_flow(**kwargs)
    lo, hi = TIME_SHIFT_RANGE
    for a in (lo, hi, 1.0):  # control: the range ends are accepted
        assert create_flow(time_shift=a).time_shift == a


# ----------------------------------------------------------------------------- train.py and the sampling programs
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from test_train import make_store

    return make_store(tmp_path_factory.mktemp("data") / "tiny.zarr")


def test_training_records_the_schedule_and_its_defaults_change_nothing(store, tmp_path):
    from diffusion.sampling import SamplerSettings, generate, load_setup
    from test_train import TINY, assert_same_state, run_train
    from train_gen import sample_ddp

    common = TINY + ["--zarr-path", store, "--objective", "flow", "--max-train-steps", 4, "--log-every", 2,
                     "--ckpt-every", 4, "--sample-every", 0]
    run_train(common + ["--results-dir", tmp_path / "a"])
    run_train(common + ["--results-dir", tmp_path / "b", "--time-distribution", "uniform", "--time-shift", 1])
    run_train(common + ["--results-dir", tmp_path / "c", "--time-distribution", "logit-normal", "--logit-std", 0.8,
                        "--time-shift", 0.5])
    (a,), (b,), (c,) = (list((tmp_path / k).iterdir()) for k in "abc")
    assert a.name == b.name and c.name != a.name  # the schedule is part of the run name's hash
    ca, cb, cc = (torch.load(d / "checkpoints" / "0000004.pt", weights_only=True) for d in (a, b, c))
    assert_same_state(ca, cb)  # explicit defaults: bit for bit the run without the flags
    assert ca["config"]["objective_kwargs"] == {} == cb["config"]["objective_kwargs"]
    assert cc["config"]["objective_kwargs"] == {"time_distribution": "logit-normal", "logit_std": 0.8,
                                                "time_shift": 0.5}
    assert any(not torch.equal(ca["model"][k], cc["model"][k]) for k in ca["model"])  # other times, other weights

    # sampling uses the checkpoint's shift unless told otherwise
    ckpt = c / "checkpoints" / "0000004.pt"
    setup = load_setup(ckpt)
    assert setup.objective.time_shift == 0.5 and setup.objective.time_distribution == "logit-normal"
    own = SamplerSettings("euler", 3)
    assert own.effective_time_shift(setup) == 0.5
    network, seen = setup.model, []

    class Recorder(torch.nn.Module):  # the network, recording the times it is asked for
        def forward(self, x, t, y):
            seen.append(sorted(set(t.tolist())))
            return network(x, t, y)

    setup.model = Recorder()
    x_own, _ = generate(setup, range(4), own, seed=0)
    own_times, seen[:] = list(seen), []
    x_plain, _ = generate(setup, range(4), SamplerSettings("euler", 3, time_shift=1.0), seed=0)
    plain_times = list(seen)
    grid = np.linspace(0, 1, 4)[:-1]
    np.testing.assert_allclose(np.ravel(own_times), np_shift(grid, 0.5), atol=1e-7)
    np.testing.assert_allclose(np.ravel(plain_times), grid, atol=1e-7)
    argv = ["--ckpt", ckpt, "--num-fid-samples", 4, "--sampler", "euler", "--num-sampling-steps", 3,
            "--forward-batch", 4, "--device", "cpu"]
    sample_ddp.main([str(v) for v in argv + ["--sample-dir", tmp_path / "s1"]])
    sample_ddp.main([str(v) for v in argv + ["--sample-dir", tmp_path / "s2", "--time-shift", 1]])
    (own_npz,), (over_npz,) = (tmp_path / "s1").glob("*.npz"), (tmp_path / "s2").glob("*.npz")
    assert "shift" not in own_npz.name and "-shift1-" in over_npz.name
    import json

    s1 = json.loads(own_npz.with_suffix(".json").read_text())["settings"]
    s2 = json.loads(over_npz.with_suffix(".json").read_text())["settings"]
    assert s1["objective_kwargs"]["time_shift"] == 0.5 and "time_shift" not in s1 and s2["time_shift"] == 1.0
    with np.load(own_npz) as z1, np.load(over_npz) as z2:
        assert np.array_equal(z1["arr_0"], x_own) and np.array_equal(z2["arr_0"], x_plain)
