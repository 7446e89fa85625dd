"""Flow matching with the linear interpolant (the paper's Appendix E variant, in SiT's conventions).

SiT (Ma et al., "Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant
Transformers", arXiv 2401.08740) with its "Linear" path and velocity prediction:
- interpolant x_t = alpha_t x_1 + sigma_t x_0 with alpha_t = t, sigma_t = 1 - t, where x_1 is data,
  x_0 ~ N(0, I) noise and t in [0, 1] (t = 1 is data); the network gets t as a float in [0, 1];
- target velocity u_t = d/dt x_t = x_1 - x_0, loss = mean squared error (SiT Eq. 5-6);
- ODE samplers integrate dx/dt = v(x, t) from t = 0 to 1 (Euler, Heun);
- the SDE sampler integrates dx = [v + w_t s(x, t)] dt + sqrt(2 w_t) dW with SiT's default
  diffusion coefficient w_t = sigma_t = 1 - t and the score recovered from the velocity,
  s = (t v - x) / (1 - t) (SiT Eq. 8 for the linear path): Euler-Maruyama on
  linspace(0, 1 - last_step_size, num_steps), then a deterministic "Mean" step of size
  last_step_size (SiT's defaults: 250 steps, last step 0.04); num_steps model calls in all.
- the adaptive ODE sampler is Dormand-Prince 5(4) from torchdiffeq (Chen et al.), with SiT's
  tolerances (atol 1e-6, rtol 1e-3) as defaults; its step sizes are chosen from an error norm over
  the whole batch (as in SiT), so a sample depends on the batch it is integrated with.
- optional (diffusion/flow_schedules.py): training times from a logit-normal distribution and the
  resolution shift t' = a t / (1 + (a - 1) t), applied to the drawn training times and to every
  sampler's time grid (the fixed-step samplers step on the shifted grid; dopri5 integrates
  dx/du = v(x, t(u)) dt/du in the unshifted time u). The defaults (uniform, a = 1) are the paper's
  setting and run exactly the code without them.

Step counts: our fixed-step ODE takes num_steps steps on linspace(t0, t1, num_steps + 1); SiT's
`--num-sampling-steps N` is the number of grid points, i.e. N - 1 steps (our N - 1 matches SiT's N).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from fcdm_common.progress import progress as tqdm

from .flow_schedules import check_time_schedule, draw_unit_times, shift_derivative, shift_time, time_grid
from .gaussian_diffusion import mean_flat
from .noise import Generators, check_generators, randn_like


class FlowMatching:
    """Linear-interpolant velocity objective and its ODE/SDE samplers."""

    def __init__(self, *, train_eps: float = 0.0, sample_eps: float = 0.0, diffusion_norm: float = 1.0,
                 last_step_size: float = 0.04, time_distribution: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, time_shift: float = 1.0):
        self.train_eps = float(train_eps)            # training t ~ U[train_eps, 1 - train_eps] (SiT: 0 for velocity)
        self.sample_eps = float(sample_eps)          # ODE integrates t from sample_eps to 1 - sample_eps
        self.diffusion_norm = float(diffusion_norm)  # SDE diffusion coefficient w_t = norm * (1 - t)
        self.last_step_size = float(last_step_size)  # size of the final deterministic SDE step
        self.time_distribution = time_distribution   # training times: "uniform" or "logit-normal"
        self.logit_mean = float(logit_mean)          # logit-normal: t = sigmoid(logit_mean + logit_std * n)
        self.logit_std = float(logit_std)
        self.time_shift = float(time_shift)          # a of t' = a t / (1 + (a - 1) t), training and sampling
        if not 0.0 <= self.train_eps < 0.5 or not 0.0 <= self.sample_eps < 0.5:
            raise ValueError("train_eps and sample_eps must lie in [0, 0.5)")
        if not 0.0 <= self.last_step_size < 1.0:
            raise ValueError("last_step_size must lie in [0, 1)")
        check_time_schedule(self.time_distribution, self.logit_mean, self.logit_std, self.time_shift)

    # ------------------------------------------------------------------ path
    @staticmethod
    def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.float().reshape(-1, *([1] * (x.ndim - 1)))  # (N,) -> (N, 1, ..., 1)

    def interpolate(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """(x_t, u_t): x_t = t x_data + (1 - t) noise and the target velocity x_data - noise."""
        te = self._expand(t, x_start)
        return te * x_start + (1.0 - te) * noise, x_start - noise

    def sample_timesteps(self, n: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n float32 training times: u from the time distribution (default uniform), mapped to
        [train_eps, 1 - train_eps], then shifted by time_shift (a = 1: unshifted)."""
        u = draw_unit_times(n, self.time_distribution, self.logit_mean, self.logit_std, device, generator)
        return shift_time(self.train_eps + (1.0 - 2.0 * self.train_eps) * u, self.time_shift)

    def _shift(self, time_shift: Optional[float]) -> float:
        """The sampling shift: the objective's own (the checkpoint's) unless the caller gives one."""
        return self.time_shift if time_shift is None else float(time_shift)

    def _velocity(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs) -> torch.Tensor:
        out = model(x, t, **model_kwargs).float()
        if out.shape != x.shape:
            raise ValueError(f"flow matching expects a velocity of shape {tuple(x.shape)}, the model returned "
                             f"{tuple(out.shape)}; build the model with learn_sigma=False")
        return out

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> Dict[str, torch.Tensor]:
        """Per-sample float32 losses: "loss" = "mse" = mean over pixels of (v(x_t, t) - (x_data - noise))^2."""
        x_start = x_start.float()
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t, target = self.interpolate(x_start, t, noise)
        mse = mean_flat((self._velocity(model, x_t, t.float(), model_kwargs) - target) ** 2)
        return {"loss": mse, "mse": mse}

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) = (t v - x) / (1 - t) for the linear path (SiT Eq. 8 with alpha = t, sigma = 1 - t)."""
        te = self._expand(t, x)
        return (te * v - x) / (1.0 - te)

    # ------------------------------------------------------------------ ODE samplers
    def sample_ode(self, model, noise, num_steps: int = 50, method: str = "euler", model_kwargs=None,
                   progress: bool = False, time_shift: Optional[float] = None) -> torch.Tensor:
        """Integrate dx/dt = v(x, t) from t = sample_eps (noise) to 1 - sample_eps (data) in num_steps
        steps, equal before the shift; "euler" uses num_steps model calls, "heun" (trapezoidal
        predictor-corrector) 2 * num_steps. time_shift: None = the objective's."""
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        if method not in ("euler", "heun"):
            raise ValueError(f"unknown ODE method {method!r}; expected 'euler' or 'heun'")
        model_kwargs = {} if model_kwargs is None else model_kwargs
        x = noise.float()
        n = x.shape[0]
        ts = time_grid(self.sample_eps, 1.0 - self.sample_eps, num_steps + 1, self._shift(time_shift))
        for i in tqdm(range(num_steps), desc=f"ODE {method}", disable=not progress):
            t_cur, t_next = ts[i], ts[i + 1]
            dt = t_next - t_cur
            with torch.no_grad():
                v = self._velocity(model, x, torch.full((n,), t_cur, device=x.device), model_kwargs)
                x_euler = x + dt * v
                if method == "heun":
                    v_next = self._velocity(model, x_euler, torch.full((n,), t_next, device=x.device), model_kwargs)
                    x = x + dt * 0.5 * (v + v_next)
                else:
                    x = x_euler
        return x

    def sample_dopri5(self, model, noise, model_kwargs=None, atol: float = 1e-6, rtol: float = 1e-3,
                      stats: Optional[dict] = None, time_shift: Optional[float] = None) -> torch.Tensor:
        """Integrate dx/dt = v(x, t) from t = sample_eps to 1 - sample_eps with adaptive Dormand-Prince 5(4)
        (torchdiffeq.odeint, method "dopri5"); stats["nfe"] receives the number of model calls. With a
        shift a != 1 it integrates dx/du = v(x, t(u)) dt/du in the unshifted time u (t(u) = shift(u, a)),
        so the solver's steps are taken on the shifted scale."""
        # deferred: the dopri5 sampler only
        from torchdiffeq import odeint

        if not (atol > 0 and rtol > 0):
            raise ValueError(f"atol and rtol must be > 0, got {atol}, {rtol}")
        model_kwargs = {} if model_kwargs is None else model_kwargs
        a = self._shift(time_shift)
        x = noise.float()
        n = x.shape[0]
        nfe = 0

        t0, t1 = self.sample_eps, 1.0 - self.sample_eps

        def velocity(t, x_t):
            nonlocal nfe
            nfe += 1
            # the solver's initial-step probe may look past t1: the network only ever sees t in [t0, t1]
            u = t.float().clamp(t0, t1).reshape(1).expand(n).to(x_t.device)
            if a == 1.0:
                return self._velocity(model, x_t, u, model_kwargs)
            return self._velocity(model, x_t, shift_time(u, a), model_kwargs) * shift_derivative(u[0], a)

        ts = torch.tensor([t0, t1], dtype=torch.float32, device=x.device)
        with torch.no_grad():  # step_t: the last step lands on t1 instead of overshooting and interpolating
            out = odeint(velocity, x, ts, method="dopri5", atol=atol, rtol=rtol, options={"step_t": ts[1:]})[-1]
        if stats is not None:
            stats["nfe"] = stats.get("nfe", 0) + nfe
        return out

    # ------------------------------------------------------------------ SDE sampler
    def _sde_drift(self, model, x, t, model_kwargs):
        # f = v + w_t s(x, t), w_t = norm * sigma_t = norm * (1 - t) (SiT's default "sigma" form)
        v = self._velocity(model, x, t, model_kwargs)
        w = self.diffusion_norm * (1.0 - self._expand(t, x))
        return v + w * self.score_from_velocity(v, x, t), w

    def sample_sde(self, model, noise, num_steps: int = 250, model_kwargs=None, progress: bool = False,
                   generator: Generators = None, time_shift: Optional[float] = None) -> torch.Tensor:
        """Euler-Maruyama from t = 0 to 1 - last_step_size on num_steps grid points (num_steps - 1 stochastic
        steps), then one deterministic step to t = 1 along the SDE drift (SiT's "Mean" last step). With a
        shift a != 1 the grid points are shifted (the last step then runs from shift(1 - last_step_size) to 1)."""
        if num_steps < 2:
            raise ValueError("the SDE sampler needs num_steps >= 2")
        model_kwargs = {} if model_kwargs is None else model_kwargs
        a = self._shift(time_shift)
        x = noise.float()
        n = x.shape[0]
        check_generators(generator, n)
        t1 = 1.0 - self.last_step_size
        ts = time_grid(self.sample_eps, t1, num_steps, a)
        if a == 1.0:  # equal steps: one dt, as SiT
            dts, last_step = [ts[1] - ts[0]] * (num_steps - 1), self.last_step_size
        else:
            dts = [t_next - t_cur for t_cur, t_next in zip(ts[:-1], ts[1:])]
            t1 = shift_time(t1, a)
            last_step = 1.0 - t1
        for t_cur, dt in tqdm(list(zip(ts[:-1], dts)), desc="SDE", disable=not progress):
            with torch.no_grad():
                drift, w = self._sde_drift(model, x, torch.full((n,), t_cur, device=x.device), model_kwargs)
                dw = randn_like(x, generator) * dt ** 0.5
                x = x + drift * dt + torch.sqrt(2.0 * w) * dw
        if last_step > 0:
            with torch.no_grad():
                drift, _ = self._sde_drift(model, x, torch.full((n,), t1, device=x.device), model_kwargs)
                x = x + drift * last_step
        return x


def create_flow(train_eps: float = 0.0, sample_eps: float = 0.0, diffusion_norm: float = 1.0,
                last_step_size: float = 0.04, time_distribution: str = "uniform", logit_mean: float = 0.0,
                logit_std: float = 1.0, time_shift: float = 1.0) -> FlowMatching:
    """The paper's flow-matching objective (SiT Linear path, velocity prediction, SiT's sampler defaults);
    time_distribution/logit_mean/logit_std/time_shift: see diffusion/flow_schedules.py (defaults: the paper's)."""
    return FlowMatching(train_eps=train_eps, sample_eps=sample_eps, diffusion_norm=diffusion_norm,
                        last_step_size=last_step_size, time_distribution=time_distribution, logit_mean=logit_mean,
                        logit_std=logit_std, time_shift=time_shift)
