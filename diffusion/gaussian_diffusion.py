"""Gaussian diffusion with learned variances: the improved-DDPM objective and its DDPM/DDIM samplers.

Equation numbers refer to Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models"
(iDDPM, arXiv 2102.09672); DDIM is Song et al. (arXiv 2010.02502). The interface (names, arguments,
returned dictionaries) follows DiT's `diffusion/` package so code written for DiT ports over; the
code is our own.

- Forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)                       (Eq. 8-9)
- Posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)                                    (Eq. 10-12)
- Learned variance Sigma = exp(v log beta_t + (1 - v) log beta~_t), v = (out + 1) / 2      (Eq. 15)
- Hybrid loss L = L_simple + lambda L_vlb, lambda = 0.001, the mean detached in L_vlb      (Eq. 16)
- Linear (DDPM) and cosine (Eq. 17) beta schedules.

Schedules are computed once in float64 (numpy) and handed out as float32 tensors on the device of
the timesteps; model outputs (possibly bf16 under autocast) are cast to float32 before any
posterior or loss arithmetic.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Dict, Optional

import numpy as np
import torch

from fcdm_common.progress import progress as tqdm

from .noise import Generators, check_generators, randn_like


class ModelMeanType(enum.Enum):
    """What the network predicts for the mean."""
    EPSILON = enum.auto()  # the noise epsilon (DDPM, iDDPM, DiT, FCDM)
    START_X = enum.auto()  # x_0 directly


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""
    LEARNED_RANGE = enum.auto()  # network outputs v in [-1, 1], Eq. 15
    FIXED_SMALL = enum.auto()    # beta~_t (posterior variance, Eq. 11)
    FIXED_LARGE = enum.auto()    # beta_t (with beta~_1 at t = 0, as in iDDPM)


class LossType(enum.Enum):
    """Training objective."""
    MSE = enum.auto()           # L_simple (+ L_vlb for learned variances, DiT's default scaling)
    RESCALED_MSE = enum.auto()  # same, the vb term scaled by num_timesteps / 1000 (iDDPM's lambda)
    KL = enum.auto()            # the variational bound L_t alone
    RESCALED_KL = enum.auto()   # L_t * num_timesteps, an estimate of the full L_vlb

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """float64 betas of a named schedule: "linear" (DDPM, 1e-4 -> 2e-2 at T = 1000) or "cosine" (Eq. 17)."""
    if schedule_name == "linear":
        # DDPM's range, stretched so that any T gives the same total noise as T = 1000.
        scale = 1000.0 / num_diffusion_timesteps
        return np.linspace(scale * 1e-4, scale * 2e-2, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        # Eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi / 2), s = 0.008;
        # beta_t = 1 - abar(t) / abar(t-1) clipped at 0.999 to avoid the singularity at t = T.
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_diffusion_timesteps, dtype=np.float64)
        betas = [min(1 - abar((i + 1) / num_diffusion_timesteps) / abar(i / num_diffusion_timesteps), 0.999)
                 for i in steps]
        return np.asarray(betas, dtype=np.float64)
    raise ValueError(f"unknown noise schedule {schedule_name!r}; expected 'linear' or 'cosine'")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that ADM/iDDPM use (max error ~3e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2), elementwise.

    The decoder term L_0 of DDPM (Ho et al. Eq. 13): the Gaussian mass of the bin [x - 1/255, x + 1/255],
    with the two edge bins extended to -inf / +inf.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Diffusion process, objective and samplers for a given beta schedule (DiT's `GaussianDiffusion`)."""

    def __init__(self, *, betas: np.ndarray, model_mean_type: ModelMeanType,
                 model_var_type: ModelVarType, loss_type: LossType):
        # betas: float64 array (T,) of per-step noise variances beta_t, all in (0, 1].
        self.model_mean_type = model_mean_type  # what the network predicts (epsilon or x_0)
        self.model_var_type = model_var_type    # learned-range or fixed variances
        self.loss_type = loss_type              # MSE / RESCALED_MSE (hybrid) or (RESCALED_)KL
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)                                  # abar_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])       # abar_{t-1}
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)        # abar_{t+1}
        # q(x_t | x_0), Eq. 9
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0): beta~_t (Eq. 11) and the mean coefficients of mu~_t (Eq. 11)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0, so its log is replaced by log beta~_1 (as iDDPM does) to stay finite.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1 else np.log(np.maximum(self.posterior_variance, 1e-20)))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._tables: Dict[tuple, torch.Tensor] = {}  # (name, device) -> float32 tensor cache

    # ------------------------------------------------------------------ helpers
    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """float32 schedule value `name` at integer timesteps t (N,), shaped (N, 1, ..., 1) for broadcasting."""
        key = (name, t.device)
        table = self._tables.get(key)
        if table is None:
            table = torch.from_numpy(np.asarray(getattr(self, name))).to(device=t.device, dtype=torch.float32)
            self._tables[key] = table
        return table[t.long()].reshape(t.shape[0], *([1] * (ndim - 1)))

    def _wrap_model(self, model: Callable) -> Callable:
        """Hook for respaced diffusions (map their timestep indices back to the original scale)."""
        return model

    def sample_timesteps(self, n: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n timesteps drawn uniformly from {0, ..., T-1} (int64), as DiT's training loop does."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0) (Eq. 8-9)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
        variance = 1.0 - self._extract("alphas_cumprod", t, x_start.ndim)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.ndim)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 9)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Eq. 10-12)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t.ndim) * x_start
                + self._extract("posterior_mean_coef2", t, x_t.ndim) * x_t)
        variance = self._extract("posterior_variance", t, x_t.ndim)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.ndim)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process
    def _predict_xstart_from_eps(self, x_t, t, eps):
        # x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), from Eq. 9
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim))

    def _split_output(self, model_output: torch.Tensor, x: torch.Tensor):
        """(mean part, variance part or None) of a raw model output, both float32."""
        model_output = model_output.float()
        c = x.shape[1]
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"learned-sigma diffusion expects {2 * c} output channels "
                                 f"(epsilon and v), got {model_output.shape[1]}")
            return model_output[:, :c], model_output[:, c:]
        if model_output.shape[1] != c:
            raise ValueError(f"fixed-variance diffusion expects {c} output channels, got {model_output.shape[1]}; "
                             "build the model with learn_sigma=False or use learn_sigma=True here")
        return model_output, None

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised=False, denoised_fn=None):
        """p(x_{t-1} | x_t) from an already computed model output (used by the vb term with a detached mean)."""
        x = x.float()
        mean_out, var_out = self._split_output(model_output, x)
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            # Eq. 15: log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2
            min_log = self._extract("posterior_log_variance_clipped", t, x.ndim)
            max_log = self._extract("log_betas", t, x.ndim)
            frac = (var_out + 1.0) / 2.0
            model_log_variance = frac * max_log + (1.0 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            model_variance = self._extract("large_variance", t, x.ndim).expand_as(x)
            model_log_variance = self._extract("large_log_variance", t, x.ndim).expand_as(x)
        else:
            model_variance = self._extract("posterior_variance", t, x.ndim).expand_as(x)
            model_log_variance = self._extract("posterior_log_variance_clipped", t, x.ndim).expand_as(x)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, mean_out))
        else:
            pred_xstart = process_xstart(mean_out)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)  # Eq. 13 via Eq. 11
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "model_output": mean_out}

    @property
    def log_betas(self) -> np.ndarray:
        return np.log(self.betas)

    @property
    def large_variance(self) -> np.ndarray:
        # FIXED_LARGE uses beta_t, with beta~_1 at t = 0 so that the decoder term is well defined.
        return np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas

    @property
    def large_log_variance(self) -> np.ndarray:
        return np.log(self.large_variance)

    def p_mean_variance(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None):
        """Apply the model to x_t and return p(x_{t-1} | x_t).

        Returns a dict with "mean", "variance", "log_variance", "pred_xstart".
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        model_output = self._wrap_model(model)(x, t, **model_kwargs)
        out = self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        out.pop("model_output")
        return out

    # ------------------------------------------------------------------ training
    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=False):
        """L_t in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, -log p(x_0|x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> Dict[str, torch.Tensor]:
        """Per-sample float32 losses for timesteps t: dict "loss", "mse", "vb" (each (N,)).

        MSE losses: loss = mse + vb, where vb is the L_t term computed with the network's mean frozen
        (stop-gradient), so it only trains the variance (iDDPM Sec. 3.1). Eq. 16's lambda = 0.001 on
        L_vlb = T * E_t[L_t] is lambda * T = T / 1000 times L_t: 1 at the paper's T = 1000 (DiT's
        MSE), and scaled explicitly by T / 1000 with RESCALED_MSE (improved-diffusion's behaviour).
        """
        x_start = x_start.float()
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._wrap_model(model)(x_t, t, **model_kwargs).float()
        mean_out, var_out = self._split_output(model_output, x_t)
        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x_start
        mse = mean_flat((target - mean_out) ** 2)
        zeros = torch.zeros_like(mse)

        if self.loss_type.is_vb():
            vb = self._vb_terms_bpd(model_output, x_start, x_t, t)
            scale = self.num_timesteps if self.loss_type == LossType.RESCALED_KL else 1.0
            return {"loss": vb * scale, "mse": mse.detach(), "vb": vb}

        if var_out is not None:
            frozen = torch.cat([mean_out.detach(), var_out], dim=1)  # the vb term must not move the mean
            vb = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                vb = vb * (self.num_timesteps / 1000.0)
        else:
            vb = zeros
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------ DDPM sampling
    def p_sample(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                 generator: Generators = None):
        """One ancestral step x_t -> x_{t-1} ~ N(mean, Sigma); no noise is added at t = 0.

        Returns a dict with "sample", "pred_xstart".
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = randn_like(x.float(), generator)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _initial(self, shape, noise, device, generator):
        if device is None:
            device = noise.device if noise is not None else "cpu"
        check_generators(generator, shape[0])
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            return noise.to(device=device, dtype=torch.float32), device
        return randn_like(torch.empty(shape, device=device), generator), device

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False, generator: Generators = None):
        """Yield the p_sample output of every step, from t = T-1 down to 0."""
        x, device = self._initial(shape, noise, device, generator)
        indices = list(range(self.num_timesteps))[::-1]
        for i in tqdm(indices, desc="DDPM", disable=not progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, generator)
            yield out
            x = out["sample"]

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, generator: Generators = None) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (or `noise`) to x_0; returns float32 samples of `shape`."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn,
                                                    model_kwargs, device, progress, generator):
            pass
        return final["sample"]

    # ------------------------------------------------------------------ DDIM sampling
    def ddim_sample(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None, eta=0.0,
                    generator: Generators = None):
        """One DDIM step (Song et al. Eq. 12).

        sigma_t = eta sqrt((1-abar_{t-1})/(1-abar_t)) sqrt(1-abar_t/abar_{t-1}).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        x = x.float()
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract("alphas_cumprod", t, x.ndim)
        abar_prev = self._extract("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        sample = mean_pred
        if eta > 0:
            nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
            sample = mean_pred + nonzero * sigma * randn_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0,
                                     generator: Generators = None):
        """Yield the ddim_sample output of every step, from t = T-1 down to 0."""
        x, device = self._initial(shape, noise, device, generator)
        indices = list(range(self.num_timesteps))[::-1]
        for i in tqdm(indices, desc="DDIM", disable=not progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta, generator)
            yield out
            x = out["sample"]

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0, generator: Generators = None) -> torch.Tensor:
        """DDIM sampling (deterministic for eta = 0); returns float32 samples of `shape`."""
        final = None
        for final in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn,
                                                       model_kwargs, device, progress, eta, generator):
            pass
        return final["sample"]
