"""Training-time distributions and the resolution shift for flow matching (SD3, LightningDiT, RAE).

Our time runs from t = 0 (pure noise) to t = 1 (data); x_t = t x_data + (1 - t) noise.

- Time distribution of training (Esser et al., "Scaling Rectified Flow Transformers", SD3, Sec. 3.1):
  "uniform" draws t ~ U[0, 1] (the paper's setting); "logit-normal" draws t = sigmoid(m + s n) with
  n ~ N(0, 1), which concentrates training on the middle times (SD3's best: m = 0, s = 1). The
  distribution is symmetric under t -> 1 - t when m = 0; m > 0 leans towards data in our direction
  (SD3's m leans towards noise in theirs).
- Resolution shift (SD3 Sec. 5.3.2): t' = a t / (1 + (a - 1) t), a monotone map of [0, 1] onto itself
  with 0 -> 0 and 1 -> 1; a = 1 is the identity, a < 1 moves times towards noise (what higher resolutions
  want: more signal survives a given noise level in a larger image), a > 1 towards data. The inverse
  is the shift by 1 / a. Training applies it to the drawn times; samplers apply it to their time grid.

Converting from SD3's convention: SD3 writes t_SD3 = 1 - t (t_SD3 = 1 is noise) and shifts the noise
level, t'_SD3 = s t_SD3 / (1 + (s - 1) t_SD3). Rewritten in our t this is our shift with a = 1 / s, so
SD3's shift s = 3 (its 1024px setting) is `--time-shift 0.3333`; SD3's logit-normal (m, s) is ours
with (-m, s).
"""
from __future__ import annotations

import argparse
import math
from typing import Optional, Union

import torch

from fcdm_common.cli import UserError, float_in

TIME_DISTRIBUTIONS = ("uniform", "logit-normal")
TIME_SHIFT_RANGE = (1e-3, 1e3)  # a is a ratio of signal-to-noise scales; beyond these it maps all times to an end
LOGIT_MEAN_MAX = 10.0  # |m|: sigmoid(10) = 0.99995, every time at one end beyond it
LOGIT_STD_RANGE = (1e-3, 10.0)  # s > 0; s = 10 is already nearly all mass at 0 and 1

Number = Union[float, torch.Tensor]
time_shift_arg = float_in(*TIME_SHIFT_RANGE)  # argparse `type=` of --time-shift (training and sampling)
# (flag, objective_kwargs key, default): the training flags of the schedule, recorded in objective_kwargs
SCHEDULE_FLAGS = (("--time-distribution", "time_distribution", "uniform"), ("--logit-mean", "logit_mean", 0.0),
                  ("--logit-std", "logit_std", 1.0), ("--time-shift", "time_shift", 1.0))


def shift_time(t: Number, a: float) -> Number:
    """t' = a t / (1 + (a - 1) t): the resolution shift in our direction (t = 1 is data); t unchanged for a = 1."""
    if a == 1.0:
        return t
    return a * t / (1.0 + (a - 1.0) * t)


def shift_derivative(t: Number, a: float) -> Number:
    """dt'/dt = a / (1 + (a - 1) t)^2, the factor a sampler that integrates in the unshifted time needs."""
    return a / (1.0 + (a - 1.0) * t) ** 2


def time_grid(t0: float, t1: float, num_points: int, a: float = 1.0) -> list:
    """num_points times from t0 to t1, equally spaced before the shift, as Python floats (float64 math)."""
    ts = torch.linspace(t0, t1, num_points, dtype=torch.float64).tolist()
    return ts if a == 1.0 else [shift_time(t, a) for t in ts]


def check_time_schedule(distribution: str, logit_mean: float, logit_std: float, time_shift: float) -> None:
    """ValueError naming the bad parameter (values the flags' types also check, for callers of create_flow)."""
    if distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(f"time_distribution must be one of {', '.join(TIME_DISTRIBUTIONS)}, got {distribution!r}")
    if not (math.isfinite(logit_mean) and abs(logit_mean) <= LOGIT_MEAN_MAX):
        raise ValueError(f"logit_mean must lie in [-{LOGIT_MEAN_MAX:g}, {LOGIT_MEAN_MAX:g}], got {logit_mean!r}")
    lo, hi = LOGIT_STD_RANGE
    if not (math.isfinite(logit_std) and lo <= logit_std <= hi):
        raise ValueError(f"logit_std must lie in [{lo:g}, {hi:g}], got {logit_std!r}")
    check_time_shift(time_shift)


def check_time_shift(a: float) -> None:
    lo, hi = TIME_SHIFT_RANGE
    if not (isinstance(a, (int, float)) and math.isfinite(a) and lo <= a <= hi):
        raise ValueError(f"time_shift must lie in [{lo:g}, {hi:g}] (1 = no shift), got {a!r}")


def draw_unit_times(n: int, distribution: str, logit_mean: float = 0.0, logit_std: float = 1.0, device=None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n float32 times in [0, 1] from the training distribution (one draw of `generator` per time)."""
    if distribution == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if distribution == "logit-normal":
        z = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(logit_mean + logit_std * z)
    raise ValueError(f"unknown time distribution {distribution!r}; expected one of {', '.join(TIME_DISTRIBUTIONS)}")


# ----------------------------------------------------------------------------- train.py's flags
def add_time_schedule_args(parser: argparse.ArgumentParser) -> None:
    """--time-distribution, --logit-mean, --logit-std and --time-shift (flow matching only)."""
    g = parser.add_argument_group("flow-matching time schedule (--objective flow; default: the paper's uniform times, "
                                  "no shift)")
    g.add_argument("--time-distribution", choices=TIME_DISTRIBUTIONS, default=None,
                   help="training times: uniform on [0, 1] (default, the paper) or logit-normal, t = sigmoid(m + s n) "
                        "with n ~ N(0, 1) (SD3)")
    g.add_argument("--logit-mean", type=float_in(-LOGIT_MEAN_MAX, LOGIT_MEAN_MAX), default=None, metavar="M",
                   help=f"logit-normal m in [-{LOGIT_MEAN_MAX:g}, {LOGIT_MEAN_MAX:g}] (default 0; > 0 leans towards "
                        "data, t = 1; SD3's m is our -m)")
    g.add_argument("--logit-std", type=float_in(*LOGIT_STD_RANGE), default=None, metavar="S",
                   help=f"logit-normal s in [{LOGIT_STD_RANGE[0]:g}, {LOGIT_STD_RANGE[1]:g}] (default 1)")
    g.add_argument("--time-shift", type=time_shift_arg, default=None, metavar="A",
                   help="resolution shift of the training times, t' = A t / (1 + (A - 1) t) (t = 1 is data; A < 1 "
                        "trains more near noise; SD3's shift s is A = 1/s), A in "
                        f"[{TIME_SHIFT_RANGE[0]:g}, {TIME_SHIFT_RANGE[1]:g}] (default 1 = none); recorded in the "
                        "checkpoint, and the samplers use it unless told otherwise")


def schedule_objective_kwargs(args, objective: str, objective_kwargs: dict) -> dict:
    """objective_kwargs with the schedule flags that differ from the defaults added (so a run without them
    records, is named and trains exactly as before); UserError for a diffusion objective, logit-normal
    parameters with uniform times, or a flag that contradicts --objective-kwargs."""
    given = {key: getattr(args, key) for _, key, _ in SCHEDULE_FLAGS if getattr(args, key, None) is not None}
    if not given:
        return dict(objective_kwargs)
    flags = ", ".join(flag for flag, key, _ in SCHEDULE_FLAGS if key in given)
    if objective != "flow":
        raise UserError(f"{flags} appl{'ies' if len(given) == 1 else 'y'} to flow matching (--objective flow); "
                        f"this run trains --objective {objective}")
    distribution = given.get("time_distribution", objective_kwargs.get("time_distribution", "uniform"))
    if distribution == "uniform" and ({"logit_mean", "logit_std"} & set(given)):
        raise UserError("--logit-mean/--logit-std set the logit-normal distribution; add --time-distribution "
                        "logit-normal")
    out = dict(objective_kwargs)
    for flag, key, default in SCHEDULE_FLAGS:
        if key not in given:
            continue
        if key in out and out[key] != given[key]:
            raise UserError(f"{flag} {given[key]} contradicts --objective-kwargs {key}={out[key]!r}; pass one of them")
        if given[key] != default:
            out[key] = given[key]
    return out
