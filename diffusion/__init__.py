"""Training objectives and samplers: iDDPM Gaussian diffusion and linear-interpolant flow matching.

- `create_diffusion(...)`: DiT's constructor and signature (iDDPM objective, respacing, DDPM/DDIM).
- `create_flow(...)`: the flow-matching objective of the paper's Appendix E (SiT conventions).
- `create_objective("diffusion" | "flow", **kwargs)`: pick either by name (`--objective`).
- `sample(model, noise, y, ...)`: one entry point for every sampler, with classifier-free guidance or
  autoguidance, a guidance interval, the flow time shift and per-sample random generators.

Both objective objects share the training interface
`t = obj.sample_timesteps(B, device, generator); losses = obj.training_losses(model, x, t, dict(y=y))`.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple, Union

import torch

from . import gaussian_diffusion as gd
from .flow_matching import FlowMatching, create_flow
from .guidance import GuidedModel
from .noise import Generators, check_generators, randn, randn_like
from .respace import SpacedDiffusion, space_timesteps
from .schedulers import (
    DIFFUSERS_PREFIX,
    SCHEDULER_PRESETS,
    build_scheduler,
    is_scheduler_sampler,
    scheduler_class,
    scheduler_sample_loop,
)

__all__ = ["create_diffusion", "create_flow", "create_objective", "sample", "GuidedModel", "SpacedDiffusion",
           "FlowMatching", "space_timesteps", "randn", "randn_like", "DIFFUSION_SAMPLERS", "FLOW_SAMPLERS",
           "check_sampler", "DIFFUSERS_PREFIX"]

# our own loops first, then the diffusers-driven presets (diffusion/schedulers.py); plus diffusers:<Class>
DIFFUSION_SAMPLERS = ("ddpm", "ddim") + tuple(SCHEDULER_PRESETS)
FLOW_SAMPLERS = ("euler", "heun", "sde", "dopri5")


def check_sampler(objective_name: str, sampler: str) -> None:
    """ValueError unless `sampler` applies to the objective ("diffusion" | "flow"); diffusers:<Class> is
    checked to name a diffusers scheduler class."""
    if objective_name == "diffusion":
        if sampler in DIFFUSION_SAMPLERS[:2]:
            return
        if is_scheduler_sampler(sampler):
            scheduler_class(sampler)  # raises for unknown class names
            return
        valid = DIFFUSION_SAMPLERS
    elif objective_name == "flow":
        if sampler in FLOW_SAMPLERS:
            return
        valid = FLOW_SAMPLERS
    else:
        raise ValueError(f"unknown objective {objective_name!r}; expected 'diffusion' or 'flow'")
    extra = f" or {DIFFUSERS_PREFIX}<SchedulerClassName>" if objective_name == "diffusion" else ""
    raise ValueError(f"sampler {sampler!r} does not apply to a {objective_name} checkpoint; "
                     f"use one of {', '.join(valid)}{extra}")


def create_diffusion(timestep_respacing="", noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                     diffusion_steps=1000) -> SpacedDiffusion:
    """The iDDPM diffusion with DiT's arguments; the paper's setting is the default (linear, T = 1000,
    learned sigma, hybrid loss). `timestep_respacing` "" keeps all steps; "250", "ddim50" or "10,20,30"
    respace it (see `space_timesteps`)."""
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing), betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type, loss_type=loss_type)


def create_objective(name: str, **kwargs) -> Union[SpacedDiffusion, FlowMatching]:
    """`create_diffusion(**kwargs)` for "diffusion", `create_flow(**kwargs)` for "flow"."""
    if name == "diffusion":
        return create_diffusion(**kwargs)
    if name == "flow":
        return create_flow(**kwargs)
    raise ValueError(f"unknown objective {name!r}; expected 'diffusion' or 'flow'")


def _respaced_for_sampler(objective: SpacedDiffusion, sampler: str, num_steps: int) -> SpacedDiffusion:
    if sampler == "ddim":
        try:
            return objective.respace(f"ddim{num_steps}")
        except ValueError:
            warnings.warn(f"{num_steps} DDIM steps cannot be equally strided over {objective.original_num_steps}; "
                          f"using evenly spaced (rounded) steps instead")
    return objective.respace(str(num_steps))


def sample(model: Callable, noise: torch.Tensor, y: torch.Tensor, *, objective, sampler: str, num_steps: int,
           cfg_scale: float = 1.0, cfg_channels: Union[str, int] = "all",
           guidance_interval: Optional[Tuple[float, float]] = None, null_label: int, ddim_eta: float = 0.0,
           progress: bool = False, generators: Generators = None, atol: float = 1e-6, rtol: float = 1e-3,
           stats: Optional[dict] = None, guide: Optional[Callable] = None,
           time_shift: Optional[float] = None) -> torch.Tensor:
    """Draw samples from noise (N, C, H, W) for labels y (N,) and return float32 (N, C, H, W).

    model(x, t, y) is the raw network; objective comes from create_diffusion (samplers "ddpm", "ddim",
    respaced to num_steps; "dpm++2m", "unipc", ... and "diffusers:<Class>": a diffusers scheduler with
    num_steps inference steps, see diffusion/schedulers.py) or create_flow ("euler", "heun": num_steps ODE
    steps; "sde": num_steps model calls, SiT's Euler-Maruyama; "dopri5": adaptive, atol/rtol, num_steps
    unused). stats (a dict) receives "nfe", the number of (guided) model calls. Guidance: see `GuidedModel`
    (classifier-free, or autoguidance when `guide`, a weaker network called like the model, is given);
    guidance_interval=(lo, hi) is in noise-level fraction (diffusion: t / T, flow: 1 - t). time_shift: flow
    only, the shift a of the sampler's time grid (None: the objective's own). generators: None, one
    torch.Generator, or one per sample.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if noise.ndim < 2 or y.shape[0] != noise.shape[0]:
        raise ValueError(f"noise (N, C, ...) and labels (N,) disagree: {tuple(noise.shape)} vs {tuple(y.shape)}")
    check_generators(generators, noise.shape[0])
    kwargs = {"y": y}
    if isinstance(objective, SpacedDiffusion):
        check_sampler("diffusion", sampler)
        total = objective.original_num_steps
        if time_shift is not None:
            raise ValueError("time_shift applies to flow matching, not to a diffusion objective")
        guided = GuidedModel(model, cfg_scale, null_label, cfg_channels, guidance_interval,
                             noise_level_fn=lambda t: t.float() / total, guide=guide)  # t is the ORIGINAL timestep
        if is_scheduler_sampler(sampler):
            learned = objective.model_var_type == gd.ModelVarType.LEARNED_RANGE
            return scheduler_sample_loop(guided, build_scheduler(sampler, objective), noise, num_steps, kwargs,
                                         learned_sigma=learned, generators=generators, eta=ddim_eta,
                                         progress=progress, stats=stats)
        if stats is not None:
            stats["nfe"] = stats.get("nfe", 0) + num_steps
        spaced = _respaced_for_sampler(objective, sampler, num_steps)
        if sampler == "ddpm":
            return spaced.p_sample_loop(guided, tuple(noise.shape), noise=noise, model_kwargs=kwargs,
                                        device=noise.device, progress=progress, generator=generators)
        return spaced.ddim_sample_loop(guided, tuple(noise.shape), noise=noise, model_kwargs=kwargs,
                                       device=noise.device, progress=progress, eta=ddim_eta, generator=generators)
    if isinstance(objective, FlowMatching):
        check_sampler("flow", sampler)
        guided = GuidedModel(model, cfg_scale, null_label, cfg_channels, guidance_interval,
                             noise_level_fn=lambda t: 1.0 - t.float(), guide=guide)  # t = 1 is data
        if sampler == "dopri5":
            return objective.sample_dopri5(guided, noise, model_kwargs=kwargs, atol=atol, rtol=rtol, stats=stats,
                                           time_shift=time_shift)
        if stats is not None:
            stats["nfe"] = stats.get("nfe", 0) + num_steps * (2 if sampler == "heun" else 1)
        if sampler == "sde":
            return objective.sample_sde(guided, noise, num_steps, model_kwargs=kwargs, progress=progress,
                                        generator=generators, time_shift=time_shift)
        return objective.sample_ode(guided, noise, num_steps, method=sampler, model_kwargs=kwargs, progress=progress,
                                    time_shift=time_shift)
    raise TypeError(f"objective must come from create_diffusion or create_flow, got {type(objective).__name__}")
