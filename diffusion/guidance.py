"""Guidance: classifier-free guidance, autoguidance and the guidance interval, as a model wrapper every
sampler uses; the guidance flags' types; and the check that an autoguidance guide fits its model.

Both modes move the prediction D (epsilon for diffusion, velocity for flow matching) away from a
weaker prediction D_weak, D = D_weak + w (D_main - D_weak), on the guided channels; every other
output channel, the learned variance included, is the main model's conditional one.
- Classifier-free guidance (Ho & Salimans, arXiv 2207.12598): D_weak is the same network without its
  class (the null label), evaluated in the SAME forward call as the conditional batch.
- Autoguidance (Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS 2024):
  D_weak is a weaker model (smaller and/or trained for less long) with the same conditioning, latent
  space and objective, evaluated conditionally in its own forward call.
w = 1 is the main model alone (one pass), w = 0 the weak prediction.
`cfg_channels="all"` guides every prediction channel (our default); `cfg_channels=3` guides only the
first three, which is what DiT's `forward_with_cfg` and the original FCDM code do on 4-channel latents.

Guidance interval (Kynkaanniemi et al., "Applying guidance in a limited interval", arXiv 2404.07724):
guidance is applied only where the noise level lies in [lo, hi] (0 = clean data, 1 = pure noise).
Outside it only the main conditional pass runs; inside it the weak prediction is computed for the
in-interval rows only.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch

from fcdm_common.cli import UserError, float_in
from models.latent_space import same_norm, spec_for_checkpoint

GUIDANCE_MODES = ("cfg", "autoguidance")  # classifier-free guidance, guidance by a weaker model

# guided = weak + s * (main - weak). s = 1 is the main model, s = 0 the weak one (CFG: the unconditional
# model), 0 < s < 1 between them, s > 1 guidance; s < 0 would push every sample away from its own class,
# which no sampler here is meant for, and s in the hundreds only saturates the images (float32 overflow to a
# black grid beyond that), so the scale is a finite number in [0, CFG_SCALE_MAX].
CFG_SCALE_MAX = 100.0
CFG_SCALE_HELP = (f"in [0, {CFG_SCALE_MAX:g}]: 1 = no guidance (one conditional pass), 0 = the unconditional model "
                  "(autoguidance: the guide), > 1 = guidance")
cfg_scale_arg = float_in(0.0, CFG_SCALE_MAX)  # argparse `type=` of every guidance-scale flag
guidance_level_arg = float_in(0.0, 1.0)  # one end of --guidance-interval: a noise level (0 = data, 1 = noise)


class OrderedInterval(argparse.Action):
    """argparse action of a `nargs=2` (LO, HI) flag whose values its `type` checked one by one: also LO <= HI
    (else argparse's usage line and exit status 2). Stores a tuple."""

    def __call__(self, parser, namespace, values, option_string=None):
        lo, hi = values
        if lo > hi:
            raise argparse.ArgumentError(self, f"LO {lo:g} is above HI {hi:g}; give the lower noise level first "
                                               "(0 = data, 1 = noise)")
        setattr(namespace, self.dest, (lo, hi))


def parse_cfg_channels(value: Union[str, int], in_channels: int) -> Union[str, int]:
    """'all' or an int K in [1, in_channels]."""
    if value == "all":
        return "all"
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--cfg-channels must be 'all' or a channel count, got {value!r}") from None
    if not 1 <= k <= in_channels:
        raise UserError(f"--cfg-channels {k} is out of range for a model with {in_channels} latent channels; "
                        f"use 'all' or 1..{in_channels}")
    return k


class GuidedModel:
    """Callable like the raw network, model(x, t, y) -> output, with guidance applied: classifier-free when
    `guide` is None, else autoguidance by `guide` (a network called like the model)."""

    def __init__(self, model: Callable, cfg_scale: float, null_label: int, cfg_channels: Union[str, int] = "all",
                 guidance_interval: Optional[Tuple[float, float]] = None,
                 noise_level_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 guide: Optional[Callable] = None):
        self.model = model                          # raw network model(x, t, y), NCHW in and out
        self.cfg_scale = float(cfg_scale)           # w; 1 = no guidance (main conditional pass only)
        self.null_label = int(null_label)           # the "drop the class" label (num_classes for FCDM/DiT)
        self.cfg_channels = cfg_channels            # "all" or k: guide the first k prediction channels
        self.guidance_interval = guidance_interval  # (lo, hi) in noise-level fraction, None = everywhere
        self.noise_level_fn = noise_level_fn        # t (as the model sees it) -> noise level in [0, 1]
        self.guide = guide                          # autoguidance: the weaker network; None = classifier-free
        if not math.isfinite(self.cfg_scale):  # nan/inf would turn every image into NaN (a black grid)
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
        if not (cfg_channels == "all" or (isinstance(cfg_channels, int) and cfg_channels > 0)):
            raise ValueError(f"cfg_channels must be 'all' or a positive int, got {cfg_channels!r}")
        if guidance_interval is not None:
            lo, hi = guidance_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {guidance_interval!r}")
            if noise_level_fn is None:
                raise ValueError("a guidance interval needs noise_level_fn")

    def _guided_rows(self, t: torch.Tensor, n: int) -> Optional[torch.Tensor]:
        """Bool mask (N,) of rows to guide, or None for all rows."""
        if self.guidance_interval is None:
            return None
        lo, hi = self.guidance_interval
        level = self.noise_level_fn(t).float().reshape(-1).expand(n)
        return (level >= lo) & (level <= hi)

    def _main_and_weak(self, x, t, y, idx, kwargs):
        """(main conditional output of every row (N, ...), weak prediction of the guided rows), in the combining
        dtype: float32, or the outputs' own dtype where it is wider (a float64 run stays float64 throughout;
        bf16/fp16 outputs are combined in float32, so the guided difference is not rounded to their precision)."""
        xw, tw, yw = (x, t, y) if idx is None else (x[idx], t[idx], y[idx])
        if self.guide is not None:  # autoguidance: the guide, conditionally, in its own call
            main, weak = self.model(x, t, y, **kwargs), self.guide(xw, tw, yw, **kwargs)
            dtype = torch.promote_types(torch.promote_types(torch.float32, main.dtype), weak.dtype)
            return main.to(dtype), weak.to(dtype)
        null = torch.full((xw.shape[0],), self.null_label, dtype=y.dtype, device=y.device)
        out = self.model(torch.cat([x, xw]), torch.cat([t, tw]), torch.cat([y, null]), **kwargs)  # one call
        out = out.to(torch.promote_types(torch.float32, out.dtype))
        return out[:x.shape[0]], out[x.shape[0]:]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.cfg_scale == 1.0:
            return self.model(x, t, y, **kwargs)
        n = x.shape[0]
        rows = self._guided_rows(t, n)
        if rows is None:
            idx = None
        else:
            if not bool(rows.any()):  # host sync once per step; saves the whole weak pass
                return self.model(x, t, y, **kwargs)
            idx = None if bool(rows.all()) else rows.nonzero(as_tuple=True)[0]
        main, weak = self._main_and_weak(x, t, y, idx, kwargs)
        k = x.shape[1] if self.cfg_channels == "all" else min(int(self.cfg_channels), x.shape[1])
        main_k = main[:, :k] if idx is None else main[idx, :k]
        guided = weak[:, :k] + self.cfg_scale * (main_k - weak[:, :k])
        result = main.clone()
        if idx is None:
            result[:, :k] = guided
        else:
            result[idx, :k] = guided
        return result


# ----------------------------------------------------------------------------- does a guide fit its model?
@dataclass(frozen=True)
class GuidanceSpace:
    """What a guide must share with the model it guides: what the prediction means, the latent space, the
    classes and the sample shape. Built from a checkpoint's run config and its network (`guidance_space`)."""
    objective: str  # "diffusion" (+ its noise schedule and parameterisation) or "flow"
    latent_space: str  # the autoencoder's id, scale and shift
    latent_norm: dict  # the data's per-channel normalisation ({"mode": "none"} or mean/std)
    num_classes: int  # class labels 0..num_classes-1
    latent_shape: tuple  # (C, H, W) sampled


def _objective_text(config: dict) -> str:
    name = config.get("objective", "diffusion")
    if name != "diffusion":
        return str(name)  # flow: one path (linear) and one prediction (velocity); its time schedule is training's
    kw = config.get("objective_kwargs") or {}
    steps = int(kw.get("diffusion_steps", 1000))
    what = "x0" if kw.get("predict_xstart") else "eps"
    return f"diffusion ({kw.get('noise_schedule', 'linear')} schedule, {steps} steps, {what} prediction)"


def guidance_space(config: dict, num_classes: int, latent_shape) -> GuidanceSpace:
    """The GuidanceSpace of a checkpoint from its run config, its network's class count and its sample shape.
    The latent space is the one sampling decodes with (`spec_for_checkpoint`: configs that record no VAE, such
    as converted release checkpoints, hold SD-VAE latents), named by the data's VAE id when it is recorded."""
    data = config.get("data") or {}
    spec = spec_for_checkpoint(config)
    if spec.vae == "none":
        space = "pixel space"
    else:
        space = f"{data.get('vae') or spec.id} latents x{spec.scaling_factor:g}"
        space += f" - {spec.shift_factor:g}" if spec.shift_factor else ""
    norm = data.get("latent_norm") or {"mode": "none"}
    return GuidanceSpace(objective=_objective_text(config), latent_space=space, latent_norm=norm,
                         num_classes=int(num_classes), latent_shape=tuple(int(v) for v in latent_shape))


def check_guide_fits(main: GuidanceSpace, guide: GuidanceSpace, main_name: str, guide_path) -> None:
    """UserError naming both (main_name: "the model checkpoint X", "the run Y") and every difference when the
    guide cannot guide the model."""
    diffs = []
    for label, a, b in (("objective", main.objective, guide.objective),
                        ("latent space", main.latent_space, guide.latent_space),
                        ("classes", main.num_classes, guide.num_classes),
                        ("sample shape", list(main.latent_shape), list(guide.latent_shape))):
        if a != b:
            diffs.append(f"{label} {a} vs {b}")
    if not same_norm(main.latent_norm, guide.latent_norm):
        diffs.append(f"latent normalisation {main.latent_norm.get('mode', 'none')} vs "
                     f"{guide.latent_norm.get('mode', 'none')} (or other statistics)")
    if diffs:
        raise UserError(f"the guide checkpoint {guide_path} cannot guide {main_name}: "
                        f"{'; '.join(diffs)} (model vs guide); autoguidance needs a guide trained on the same "
                        "latents, objective and classes, e.g. an earlier or smaller run on the same data")


@dataclass
class Guide:
    """An autoguidance guide in memory: its network (eval mode) and where it came from."""
    model: torch.nn.Module  # the guide network, on the sampling device
    path: Path  # its checkpoint
    model_name: str  # registry name
    use_ema: bool  # EMA (True) or raw weights
    step: Optional[int]  # training step of the checkpoint, if recorded

    def record(self, sha256: Optional[str] = None) -> dict:
        """What sample settings and logs record about the guide."""
        out = {"model": self.model_name, "use_ema": self.use_ema, "step": self.step}
        if sha256 is not None:
            out["checkpoint_sha256"] = sha256
        return out


def resolve_guidance(mode: Optional[str], guide_ckpt, mode_flag: str = "--guidance",
                     guide_flag: str = "--guide-ckpt") -> str:
    """The guidance mode from its flag and the guide flag: autoguidance when a guide is given and no mode is;
    UserError when the two contradict each other."""
    if mode is None:
        return "autoguidance" if guide_ckpt else "cfg"
    if mode not in GUIDANCE_MODES:
        raise UserError(f"{mode_flag} must be one of {', '.join(GUIDANCE_MODES)}, got {mode!r}")
    if mode == "autoguidance" and not guide_ckpt:
        raise UserError(f"{mode_flag} autoguidance needs {guide_flag} PATH, the weaker model that guides "
                        "(e.g. an early checkpoint of the same run)")
    if mode == "cfg" and guide_ckpt:
        raise UserError(f"{guide_flag} is the guide of autoguidance, but {mode_flag} is cfg; pass {mode_flag} "
                        f"autoguidance or leave {guide_flag} out")
    return mode
