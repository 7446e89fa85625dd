"""diffusers' scheduler classes (DPM-Solver++, UniPC, Euler, Heun, DDIM, DDPM, ...) driving our eps models.

A scheduler is configured from OUR objective, never from its own defaults: `trained_betas` = the
original (unrespaced) float64 beta schedule of the checkpoint, `num_train_timesteps` = T,
`prediction_type` = "epsilon" (or "sample" for x_0 models), no clipping or thresholding; the
sampling step count is `set_timesteps(num_steps)`, each class choosing its own grid over [0, T).
The network always sees ORIGINAL timesteps (possibly fractional for the sigma-space Euler/Heun
classes), exactly as with our own respaced loops.

Named presets (`--sampler`):
  dpm++2m         DPMSolverMultistepScheduler, algorithm_type "dpmsolver++", solver_order 2
                  (Lu et al., "DPM-Solver++", arXiv 2211.01095; multistep, lower order at the end)
  dpm++2m-karras  the same on Karras et al.'s sigma grid (arXiv 2206.00364, Eq. 5, rho = 7)
  unipc           UniPCMultistepScheduler (Zhao et al., arXiv 2302.04867; bh2, order 2)
  euler           EulerDiscreteScheduler (Karras et al. Algorithm 1 in sigma space)
  heun            HeunDiscreteScheduler (Karras et al. Algorithm 1, 2nd order: 2N - 1 model calls)
  diffusers:<SchedulerClassName>  any other diffusers scheduler class, e.g. diffusers:DDIMScheduler.

Learned variance: the iDDPM variance channels of a learned-sigma model are dropped for every
scheduler except those configured with variance_type "learned"/"learned_range" (DDPMScheduler is
configured with our model's variance type, so `diffusers:DDPMScheduler` samples like our DDPM).

DDIMScheduler computes the previous step as t - T // N, which is only its own "leading" grid; it is
configured with that spacing (== our "ddimN" respacing whenever N divides T). DDPMScheduler uses our
"N" respacing grid ("linspace": N evenly spaced steps, both ends included, rounded).

Randomness: stochastic steps (DDPM, DDIM eta > 0, SDE variants) get the per-sample generator list
through `step(..., generator=[g_0, ..., g_{N-1}])`; diffusers then draws row i from g_i only, so a
sample does not depend on its batch neighbours or on the number of processes.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import gaussian_diffusion as gd

DIFFUSERS_PREFIX = "diffusers:"
# preset name -> (diffusers class name, config overrides); the class defaults do the rest
SCHEDULER_PRESETS = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
_VAR_TYPES = {gd.ModelVarType.LEARNED_RANGE: "learned_range", gd.ModelVarType.FIXED_SMALL: "fixed_small",
              gd.ModelVarType.FIXED_LARGE: "fixed_large"}

__all__ = ["DIFFUSERS_PREFIX", "SCHEDULER_PRESETS", "is_scheduler_sampler", "scheduler_class", "scheduler_config",
           "build_scheduler", "uses_learned_variance", "scheduler_record", "scheduler_sample_loop"]


def is_scheduler_sampler(name: str) -> bool:
    """True for the names this module handles (presets and diffusers:<Class>)."""
    return name in SCHEDULER_PRESETS or (isinstance(name, str) and name.startswith(DIFFUSERS_PREFIX))


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class of a preset or of "diffusers:<ClassName>" (ValueError if unknown)."""
    # deferred: diffusers is heavy; only its schedulers need it
    import diffusers
    from diffusers import SchedulerMixin

    if name in SCHEDULER_PRESETS:
        class_name = SCHEDULER_PRESETS[name][0]
    elif isinstance(name, str) and name.startswith(DIFFUSERS_PREFIX):
        class_name = name[len(DIFFUSERS_PREFIX):]
    else:
        raise ValueError(f"{name!r} is not a diffusers sampler; use one of {', '.join(SCHEDULER_PRESETS)} "
                         f"or {DIFFUSERS_PREFIX}<SchedulerClassName>")
    cls = getattr(diffusers, class_name, None) if class_name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and n[0].isupper())
        raise ValueError(f"unknown diffusers scheduler {class_name!r} (diffusers {diffusers.__version__}); "
                         f"known: {', '.join(known)}")
    return cls


def _init_params(cls: type) -> set:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def scheduler_config(objective, cls: type, overrides: Optional[dict] = None) -> dict:
    """The config of `cls` that reproduces `objective` (a SpacedDiffusion): our betas, T, prediction type,
    no clipping; keys `cls` does not take are left out. `overrides` win (and must be keys `cls` takes)."""
    params = _init_params(cls)
    betas = np.asarray(getattr(objective, "original_betas", objective.betas), dtype=np.float64)
    if objective.model_mean_type == gd.ModelMeanType.EPSILON:
        prediction = "epsilon"
    else:
        prediction = "sample"
    cfg = {"num_train_timesteps": int(betas.shape[0]), "trained_betas": betas.tolist(), "prediction_type": prediction}
    for key, value in (("clip_sample", False), ("thresholding", False), ("steps_offset", 0),
                       ("set_alpha_to_one", True), ("rescale_betas_zero_snr", False)):
        if key in params:
            cfg[key] = value
    name = cls.__name__
    if name == "DDPMScheduler":
        cfg.update(variance_type=_VAR_TYPES[objective.model_var_type], timestep_spacing="linspace")
    elif name == "DDIMScheduler":
        cfg.update(timestep_spacing="leading")  # its step uses prev = t - T // N: only right on this grid
    for key, value in (overrides or {}).items():
        if key not in params:
            raise ValueError(f"{name} takes no config key {key!r}")
        cfg[key] = value
    return {k: v for k, v in cfg.items() if k in params}


def build_scheduler(sampler: str, objective, overrides: Optional[dict] = None):
    """A fresh diffusers scheduler for `sampler` (a preset or diffusers:<Class>) configured from `objective`."""
    cls = scheduler_class(sampler)
    preset = dict(SCHEDULER_PRESETS[sampler][1]) if sampler in SCHEDULER_PRESETS else {}
    preset.update(overrides or {})
    return cls.from_config(scheduler_config(objective, cls, preset))


_VARIANCE_CONSUMERS = ("DDPMScheduler", "DDPMParallelScheduler")  # step() splits off and uses the v channels


def uses_learned_variance(scheduler) -> bool:
    """Whether the scheduler consumes the iDDPM variance channels: a DDPM scheduler with variance_type
    learned / learned_range. Any other class configured with such a variance_type is refused (ValueError):
    DPMSolverMultistepScheduler, e.g., would slice the first 3 channels off whatever it is given."""
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    if learned and type(scheduler).__name__ not in _VARIANCE_CONSUMERS:
        raise ValueError(f"{type(scheduler).__name__} is configured with variance_type "
                         f"{scheduler.config.variance_type!r}; the variance channels are dropped for it, so build "
                         "it with variance_type=None (e.g. from_config(config, variance_type=None))")
    return learned


def _jsonable(value):
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return np.asarray(value).tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def scheduler_record(scheduler) -> dict:
    """{"class": name, "config": the scheduler's config as plain JSON values} for reproducibility files."""
    config = {k: _jsonable(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": config}


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def scheduler_sample_loop(model: Callable, scheduler, noise: torch.Tensor, num_steps: int, model_kwargs=None, *,
                          learned_sigma: bool, generators=None, eta: float = 0.0, progress: bool = False,
                          stats: Optional[dict] = None, timesteps: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Sample with a diffusers scheduler: x_T = noise * init_noise_sigma, then for each scheduler timestep
    out = model(scale_model_input(x, t), t, **model_kwargs) and x = scheduler.step(out, t, x).

    model: the (guided) network, original-timestep input, float32 output with 2C channels when
    `learned_sigma` (the variance channels are dropped unless the scheduler uses them). generators:
    None, one generator or one per sample, for stochastic steps. eta: DDIM's eta (schedulers that take
    it). `timesteps`: custom timesteps for the schedulers whose set_timesteps takes them. stats["nfe"]
    receives the number of model calls. Returns float32 (N, C, H, W)."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    model_kwargs = {} if model_kwargs is None else model_kwargs
    x = noise.float()
    n, c = x.shape[:2]
    device = x.device
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps), device=device)
    else:
        scheduler.set_timesteps(num_steps, device=device)
    step_kwargs = {}
    if generators is not None and _accepts(scheduler.step, "generator"):
        step_kwargs["generator"] = generators if isinstance(generators, torch.Generator) else list(generators)
    if eta and _accepts(scheduler.step, "eta"):
        step_kwargs["eta"] = float(eta)
    keep_variance = uses_learned_variance(scheduler) and learned_sigma
    x = x * scheduler.init_noise_sigma
    nfe = 0
    for t in tqdm(scheduler.timesteps, desc=type(scheduler).__name__, disable=not progress):
        x_in = scheduler.scale_model_input(x, t)
        t_batch = t.reshape(1).to(device).expand(n)
        with torch.no_grad():
            out = model(x_in, t_batch, **model_kwargs).float()
        nfe += 1
        if learned_sigma and not keep_variance:
            out = out[:, :c]
        x = scheduler.step(out, t, x, return_dict=False, **step_kwargs)[0].float()
    if stats is not None:
        stats["nfe"] = stats.get("nfe", 0) + nfe
    return x
