"""Exponential moving average (EMA) of network weights, as in DiT's `update_ema` (Polyak averaging).

    ema <- decay * ema + (1 - decay) * param        (decay 0.9999 in the paper, Table 6)

`update_ema` does this for every floating-point parameter with a handful of `torch._foreach_*`
kernels (one launch per op for the whole list instead of two per parameter) and copies buffers.
`weight` may be a 0-dim tensor that scales the step (1 - decay) on the device: the training loop
passes 0 for a skipped (non-finite) step so the EMA is not moved, without a host synchronisation.

`update_ema_reference` is the plain per-parameter loop (DiT's formulation) kept as the baseline
for benchmarks and as the independent reference in tests.

Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
CVPR 2024, Section 3): `PowerEMA` keeps power-function averages, each updated at step t (t = 1, 2,
...) with beta_t = (1 - 1/t)^(gamma + 1). Unrolled, the average after step T weighs the weights
theta_tau after step tau by (tau^(gamma+1) - (tau-1)^(gamma+1)) / T^(gamma+1): the integral over
(tau-1, tau] of the profile p_T(s) = (gamma + 1) s^gamma / T^(gamma+1) on [0, T], whose relative
width (standard deviation / T) is sigma_rel = (gamma+1)^(1/2) / ((gamma+2) (gamma+3)^(1/2)).
Snapshots of the averages saved during training are combined afterwards into the average of any
other (sigma_rel, T): `posthoc_coefficients` solves the least-squares fit of the target profile by
the snapshots' profiles from their closed-form inner products (`profile_dot`), constrained to
coefficients summing to one (a weight average; `weight_average_fit`), over the steps up to the newest
snapshot at or before T (`_fit_system`: a T between snapshots gives the average as of that snapshot).

The classic EMA (`update_ema`, started as a copy of theta_0) after T steps weighs theta_tau by
(1 - beta) beta^(T - tau) for tau >= 1 and theta_0 by beta^T. In the same continuous convention its
profile is q(s) = lam beta^(T - s) on [0, T], lam = -ln beta: the integral of q over (tau-1, tau] is
exactly the weight of theta_tau, as for the power profiles. theta_0 (weight beta^T) is in no
power average (beta_1 = 0), so only the part q is fitted, normalised (its integral is 1 - beta^T):
`classic_ema_coefficients` uses the inner products of q with the power profiles (`exp_profile_dot`,
one 1-D quadrature each, no closed form), and the reconstruction is faithful only once beta^T is
negligible (`classic_ema_initial_weight`).
"""
from __future__ import annotations

import copy
import math
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from scipy.integrate import quad

from fcdm_common.cli import error_summary
from fcdm_common.digests import DamagedCheckpoint, NoDigestWarning, check_safetensors, stamp_metadata
from fcdm_common.io import remove_stale_temps, save_safetensors


def _pairs(ema: nn.Module, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ema_params = dict(ema.named_parameters())
    e_list, m_list = [], []
    for name, p in model.named_parameters():
        if name not in ema_params:
            raise KeyError(f"EMA model has no parameter {name!r}; it must be a copy of the trained model")
        e = ema_params[name]
        if e.dtype.is_floating_point:
            e_list.append(e.data)
            m_list.append(p.data)
    return e_list, m_list


def _copy_buffers(ema: nn.Module, model: nn.Module) -> None:
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        if name in ema_buffers:
            ema_buffers[name].copy_(b)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999,
               weight: Optional[torch.Tensor] = None) -> None:
    """ema <- ema + w * (1 - decay) * (param - ema) with foreach kernels; w = `weight` (0-dim tensor
    on the parameters' device) or 1. decay=0 copies the model (the start of training)."""
    e_list, m_list = _pairs(ema, model)
    if not e_list:
        return
    if weight is None and decay == 0:
        torch._foreach_copy_(e_list, m_list)  # exact copy (lerp by 1 may round)
    elif weight is None:
        torch._foreach_lerp_(e_list, m_list, 1.0 - decay)  # e + (1 - decay) * (m - e)
    else:
        delta = torch._foreach_sub(m_list, e_list)  # (m - e)
        torch._foreach_mul_(delta, weight * (1.0 - decay))  # tensor scalar: stays on the device
        torch._foreach_add_(e_list, delta)
    _copy_buffers(ema, model)


@torch.no_grad()
def update_ema_reference(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """The per-parameter loop of DiT's train.py: ema = decay * ema + (1 - decay) * param."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.data, alpha=1.0 - decay)
    _copy_buffers(ema, model)


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy of `model` (eval mode, no gradients) to hold the EMA weights."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


# ---------------------------------------------------------------------------------- post-hoc EMA
def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile with exponent gamma (EDM2, Eq. 3)."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width sigma_rel (0 < sigma_rel <= 1/sqrt(12)).

    sigma_rel^-2 = (gamma+2)^2 (gamma+3) / (gamma+1) is the cubic gamma^3 + 7 gamma^2 + (16 - r) gamma
    + (12 - r) = 0 with r = sigma_rel^-2; its largest real root is the answer."""
    if not 0 < sigma_rel <= gamma_to_sigma_rel(0.0):
        raise ValueError(f"sigma_rel must lie in (0, {gamma_to_sigma_rel(0.0):.4f}] (gamma >= 0), got {sigma_rel}")
    r = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - r, 12.0 - r])
    gamma = float(max(z.real for z in roots if abs(z.imag) < 1e-9))
    return max(gamma, 0.0)


def profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """Integral over s of p_a(s) p_b(s) for power profiles p(s) = (g+1) s^g / t^(g+1) on [0, t]:
    (g_a+1)(g_b+1) m^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)), m = min(t_a, t_b) (in logs)."""
    m = min(t_a, t_b)
    g = gamma_a + gamma_b + 1
    log = (math.log(gamma_a + 1) + math.log(gamma_b + 1) - math.log(g) + g * math.log(m)
           - (gamma_a + 1) * math.log(t_a) - (gamma_b + 1) * math.log(t_b))
    return math.exp(log)


def decay_power_integral(gamma: float, a: float) -> float:
    """J(gamma, a) = integral over u in [0, 1] of (1 - u)^gamma e^(-a u), gamma >= 0, a >= 0 (float64
    adaptive quadrature, relative error ~1e-12). The integrand is <= e^(-(a + gamma) u): for a fast
    decay the range is cut where the rest is below e^-60 of the integral."""
    c = a + gamma
    if c <= 60.0:  # the whole range; QAWS handles the endpoint factor (1 - u)^gamma exactly
        val = quad(lambda u: math.exp(-a * u), 0.0, 1.0, weight="alg", wvar=(0.0, gamma),
                   epsabs=0.0, epsrel=1e-12, limit=200)[0]
    else:
        val = quad(lambda u: math.exp(gamma * math.log1p(-u) - a * u), 0.0, 60.0 / c,
                   epsabs=0.0, epsrel=1e-12, limit=200)[0]
    return float(val)


def exp_profile_dot(t_a: float, gamma_a: float, t_b: float, decay: float) -> float:
    """Integral over s of p_a(s) q_b(s): the power profile p_a = (g+1) s^g / t_a^(g+1) on [0, t_a] and the
    classic EMA profile q_b = lam decay^(t_b - s) on [0, t_b], lam = -ln decay. With m = min(t_a, t_b),
    s = m v: (g+1) (m/t_a)^(g+1) lam e^(-lam (t_b - m)) J(g, lam m) (`decay_power_integral`)."""
    if not 0 < decay < 1:
        raise ValueError(f"the EMA decay must lie in (0, 1), got {decay}")
    lam = -math.log(decay)
    m = min(t_a, t_b)
    log = (math.log(gamma_a + 1) + (gamma_a + 1) * (math.log(m) - math.log(t_a)) + math.log(lam)
           - lam * (t_b - m))
    return math.exp(log) * decay_power_integral(gamma_a, lam * m)


def classic_ema_initial_weight(step: int, decay: float) -> float:
    """Weight decay^step of theta_0 in the classic EMA after `step` steps: no snapshot holds it."""
    return float(decay) ** int(step)


def _gram(ts: Sequence[float], gammas: Sequence[float]) -> np.ndarray:
    n = len(ts)
    if n == 0 or len(gammas) != n:
        raise ValueError("need at least one snapshot, with one gamma per step")
    return np.array([[profile_dot(ts[i], gammas[i], ts[j], gammas[j]) for j in range(n)] for i in range(n)])


def weight_average_fit(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The x minimising ||sum_i x_i p_i - p||^2 = x^T A x - 2 b^T x + <p, p> subject to sum_i x_i = 1
    (A_ij = <p_i, p_j>, b_i = <p_i, p>, p a density: see `_fit_system`).

    The constraint: every profile integrates to one, so sum_i x_i is the integral of the fitted profile,
    and the reconstruction sum_i x_i snapshot_i multiplies every weight of the network by it: a weight
    average needs exactly 1. The unconstrained least-squares minimiser A^+ b does not preserve the
    integral (an untracked width: 1 +- 1e-4). Lagrange (KKT): A x + mu 1 = b, 1^T x = 1, so
    x = A^+ b - mu A^+ 1 with mu = (1^T A^+ b - 1) / (1^T A^+ 1) (A^+: the least-squares pseudo-inverse,
    as EDM2's lstsq). A is positive semi-definite and a null vector v has sum_i v_i p_i = 0, hence
    1^T v = 0: the constraint holds to rounding even when A is near-singular, and 1^T A^+ 1 > 0."""
    n = len(b)
    sol = np.linalg.lstsq(A, np.column_stack([b, np.ones(n)]), rcond=None)[0]
    free, ones = sol[:, 0], sol[:, 1]
    return free - (free.sum() - 1.0) / ones.sum() * ones


def _fit_system(snap_steps: Sequence[float], snap_gammas: Sequence[float], target) -> tuple:
    """(A, b, <p, p>) of the fit of `target` (EMATarget) by the snapshots, all at steps <= target.step.

    The fit runs over [0, T'], T' = the newest snapshot step (<= T = target.step): every snapshot profile
    is zero after T', so the target's part on (T', T] (the weights after T', in no snapshot) is out of
    reach whatever the coefficients. Fitting the whole target there fits only its part on [0, T'], whose
    integral is its mass there - (T'/T)^(gamma+1) for a power target, 0.378 for T' = 9216, T = 9728,
    sigma_rel 0.05: the coefficients summed to that and scaled the network by it. The target is a weight
    average, so its part on [0, T'] is taken normalised (the target's average of the weights up to T',
    those the snapshots hold): for a power profile p_T restricted to [0, T'] that is exactly p_T' of the
    same gamma, for the classic profile q_T (memoryless) q_T' / (1 - decay^T'), its share decay^T' of
    theta_0 (in no snapshot: beta_1 = 0) left out. A target between snapshots is therefore the average
    as of the newest snapshot before it. Units of T' (profiles are scale-free: A, b, <p, p> ~ 1/T')."""
    target = EMATarget(*target)
    if (target.gamma is None) == (target.decay is None):
        raise ValueError(f"an EMA target needs exactly one of gamma and decay, got {target}")
    if not len(snap_steps) or any(float(t) > float(target.step) for t in snap_steps):
        raise ValueError(f"need snapshots at or before the target step {target.step} (later ones average later "
                         "weights and cannot be used)")
    scale = max(float(t) for t in snap_steps)  # T'
    ts = [float(t) / scale for t in snap_steps]
    A = _gram(ts, snap_gammas)
    if target.decay is None:
        b = np.array([profile_dot(t, g, 1.0, target.gamma) for t, g in zip(ts, snap_gammas)])
        pp = profile_dot(1.0, target.gamma, 1.0, target.gamma)
    else:  # q_T' / (1 - decay^T') in units of T': rate r = lam T' on [0, 1]
        rate = -math.log(target.decay) * scale
        mass = -math.expm1(-rate)  # 1 - decay^T'
        b = np.array([exp_profile_dot(float(t), g, scale, target.decay) * scale / mass
                      for t, g in zip(snap_steps, snap_gammas)])
        pp = (rate / 2) / math.tanh(rate / 2)  # (r/2) (1 - e^(-2r)) / (1 - e^(-r))^2
    return A, b, pp


def posthoc_coefficients(snap_steps: Sequence[float], snap_gammas: Sequence[float], target_step: float,
                         target_gamma: float) -> np.ndarray:
    """Weights x of the snapshots (all at steps <= target_step), summing to one, whose combined profile
    sum_i x_i p_i is the closest in L2 to the power profile of `target_gamma` at `target_step`
    (`_fit_system`: up to the newest snapshot step; `weight_average_fit`; float64)."""
    A, b, _ = _fit_system(snap_steps, snap_gammas, EMATarget(target_step, gamma=target_gamma))
    return weight_average_fit(A, b)


def classic_ema_coefficients(snap_steps: Sequence[float], snap_gammas: Sequence[float], target_step: int,
                             decay: float) -> np.ndarray:
    """As `posthoc_coefficients` for the classic EMA with `decay` after `target_step` steps: the fit of its
    profile normalised over the snapshots' steps (its share decay^T of theta_0, in no snapshot, is left
    out, the rest scaled by 1 / (1 - decay^T); see `classic_ema_initial_weight`)."""
    A, b, _ = _fit_system(snap_steps, snap_gammas, EMATarget(target_step, decay=decay))
    return weight_average_fit(A, b)


class EMATarget(NamedTuple):
    """An average to reconstruct after `step` steps: the power EMA with exponent `gamma`, or the classic
    EMA with `decay` (exactly one of the two). A plain (step, gamma) pair is a power target."""
    step: int
    gamma: Optional[float] = None
    decay: Optional[float] = None


def target_coefficients(snap_steps: Sequence[float], snap_gammas: Sequence[float], target) -> np.ndarray:
    """Snapshot weights (summing to one) for an `EMATarget` (or a (step, gamma) pair)."""
    A, b, _ = _fit_system(snap_steps, snap_gammas, target)
    return weight_average_fit(A, b)


def fit_error(snap_steps: Sequence[float], snap_gammas: Sequence[float], target, coefs: Sequence[float]) -> float:
    """Relative L2 error ||sum_i x_i p_i - p|| / ||p|| of the combination `coefs` for `target` (p as fitted
by `_fit_system`; 0: exact, e.g. a tracked profile; large for a width far outside the tracked ones)."""
    A, b, pp = _fit_system(snap_steps, snap_gammas, target)
    x = np.asarray(coefs, dtype=np.float64)
    return math.sqrt(max(float(x @ A @ x - 2 * x @ b + pp), 0.0) / pp)


def power_weights(step: int, gamma: float) -> np.ndarray:
    """Weights (step,) of theta_1..theta_step in the power EMA after `step` updates (closed form)."""
    tau = np.arange(1, step + 1, dtype=np.float64)
    return (tau / step) ** (gamma + 1) - ((tau - 1) / step) ** (gamma + 1)


class PowerEMA:
    """Power-function EMAs of every floating-point state_dict entry of a model, one per sigma_rel.

    `update(model, t)` after optimizer step t (>= 1) applies beta_t = (1 - 1/t)^(gamma+1) with foreach
    lerps (no host synchronisation); a skipped step leaves the weights unchanged, which the profile
    already accounts for. `state_dict()` holds the exact float32 averages for bitwise resume."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]  # relative widths tracked
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]  # their exponents
        state = model.state_dict()
        self.names = [k for k, v in state.items() if v.dtype.is_floating_point]  # averaged entries
        self.averages = [{k: state[k].detach().clone() for k in self.names} for _ in self.sigma_rels]
        self.t = 0  # updates so far

    @torch.no_grad()
    def update(self, model: nn.Module, t: int) -> None:
        state = model.state_dict()
        current = [state[k] for k in self.names]
        for gamma, avg in zip(self.gammas, self.averages):
            beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
            torch._foreach_lerp_([avg[k] for k in self.names], current, 1.0 - beta)
        self.t = int(t)

    def full_state(self, i: int, model: nn.Module) -> dict:
        """Average i as a complete state_dict of `model` (non-float entries from the model)."""
        state = model.state_dict()
        return {k: self.averages[i].get(k, v) for k, v in state.items()}

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas), "t": self.t,
                "averages": [dict(a) for a in self.averages]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"the checkpoint tracks sigma_rel {state['sigma_rels']}, this run {self.sigma_rels}")
        for avg, saved in zip(self.averages, state["averages"]):
            for k in self.names:
                avg[k].copy_(saved[k])
        self.t = int(state["t"])


# ---------------------------------------------------------------------------------- snapshots
POSTHOC_DIR = "posthoc_ema"  # snapshot folder inside the run folder
SNAPSHOT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SNAPSHOT_RE = re.compile(r"^(?P<step>\d{7,})-sigma(?P<sigma>\d+\.\d+)\.safetensors$")  # snapshot_path's names
DAMAGED_SUFFIX = ".damaged"  # an unreadable snapshot is renamed <name>.damaged (set aside, never deleted)


def snapshot_path(run_dir, step: int, sigma_rel: float):
    return Path(run_dir) / POSTHOC_DIR / f"{step:07d}-sigma{sigma_rel:.4f}.safetensors"


def save_posthoc_snapshots(power_ema: PowerEMA, model: nn.Module, run_dir, step: int, dtype: str = "fp16",
                           metadata: Optional[dict] = None, missing_only: bool = False) -> list:
    """Write every tracked average as <run>/posthoc_ema/<step>-sigma<s>.safetensors in `dtype`
    (float entries; the rest as they are), atomically (`missing_only`: only those without a file), with
    the content digest of tensors and metadata (fcdm_common/digests.py) that the readers check.
    Returns the paths written."""
    paths = []
    for i, (sigma, gamma) in enumerate(zip(power_ema.sigma_rels, power_ema.gammas)):
        path = snapshot_path(run_dir, step, sigma)
        if missing_only and path.exists():
            continue
        state = {k: (v.to(SNAPSHOT_DTYPES[dtype]) if v.dtype.is_floating_point else v)
                 for k, v in power_ema.full_state(i, model).items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**(metadata or {}), "step": step, "sigma_rel": repr(sigma), "gamma": repr(gamma), "dtype": dtype}
        save_safetensors(state, path, metadata=stamp_metadata(state, meta))
        paths.append(path)
    return paths


def read_snapshot_info(path: Path) -> Optional[dict]:
    """{path, step, gamma, sigma_rel} of a snapshot from its header; None for a readable safetensors file
    that is no snapshot (no such metadata). A damaged file (empty, truncated - safetensors checks that the
    header covers the whole file -, not safetensors, bad metadata, metadata that differs from its digest)
    raises ValueError with the reason. The tensors are not read (`load_snapshot` checks them)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - a damaged file raises anything (SafetensorError, OSError, ...)
        raise ValueError(error_summary(e)) from None
    try:
        check_safetensors(None, meta, path, "post-hoc EMA snapshot", fix="")
    except DamagedCheckpoint as e:
        raise ValueError(e.detail) from None
    if not {"step", "gamma", "sigma_rel"} <= set(meta):
        if SNAPSHOT_RE.match(path.name):
            raise ValueError("no step/gamma/sigma_rel metadata")
        return None
    try:
        info = {"path": path, "step": int(meta["step"]), "gamma": float(meta["gamma"]),
                "sigma_rel": float(meta["sigma_rel"])}
    except ValueError:
        raise ValueError(f"unreadable metadata step={meta['step']!r} gamma={meta['gamma']!r}") from None
    if not (info["step"] > 0 and math.isfinite(info["gamma"]) and info["gamma"] >= 0):
        raise ValueError(f"impossible metadata step={meta['step']!r} gamma={meta['gamma']!r}")
    return info


def scan_posthoc_snapshots(run_dir) -> tuple[list[dict], list[dict]]:
    """(snapshots, damaged) of a run folder. snapshots: dicts with path, step, sigma_rel, gamma (from the
    file metadata), oldest first; damaged: dicts with path, reason and step (from the file name; None if
    the name is not a snapshot's) of the *.safetensors files that cannot be read."""
    found, damaged = [], []
    folder = Path(run_dir) / POSTHOC_DIR
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            info = read_snapshot_info(path)
        except ValueError as e:
            m = SNAPSHOT_RE.match(path.name)
            damaged.append({"path": path, "reason": str(e), "step": int(m.group("step")) if m else None})
            continue
        if info is not None:
            found.append(info)
    return sorted(found, key=lambda s: (s["step"], s["sigma_rel"])), damaged


def load_snapshot(path: Path, fix: str = "") -> tuple[dict, bool]:
    """(tensors, checked) of a snapshot file, its tensors and metadata checked against its digest:
    DamagedCheckpoint (ending with `fix`) when they differ; checked is False for a file without a digest
    (written before digests). ValueError naming the file when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - damaged, or removed since it was listed
        raise ValueError(f"cannot read the post-hoc EMA snapshot {path} ({error_summary(e)})") from None
    return state, check_safetensors(state, meta, path, "post-hoc EMA snapshot", fix) is None


def list_posthoc_snapshots(run_dir) -> list[dict]:
    """The readable snapshots of a run, oldest first (`scan_posthoc_snapshots` also names the damaged ones)."""
    return scan_posthoc_snapshots(run_dir)[0]


def remove_snapshots_after(run_dir, step: int, log=print) -> list:
    """Start of training (resuming at `step`, rank 0, under the run lock): delete the temp files of killed
    snapshot writes (a whole snapshot each), set every damaged snapshot aside as <name>.damaged with a
    warning (it is redone when training passes its step again; one of the resume step itself by
    `redo_resume_snapshots`), and delete the snapshots newer than `step` (work lost by a kill, redone
    after resume). Headers are read for all; the tensors (checked against their digest) only for the
    snapshots of `step`, the only damaged ones a resume can redo (reading every snapshot of a long run at
    each start would cost more than the rest of the start). Returns the deleted snapshots."""
    folder = Path(run_dir) / POSTHOC_DIR
    remove_stale_temps(folder)
    snapshots, damaged = scan_posthoc_snapshots(run_dir)
    for snap in [s for s in snapshots if s["step"] == step]:
        try:
            load_snapshot(snap["path"])
        except (DamagedCheckpoint, ValueError) as e:
            reason = e.detail if isinstance(e, DamagedCheckpoint) else str(e)
            damaged.append({"path": snap["path"], "reason": reason, "step": step})
            snapshots.remove(snap)
    for d in damaged:
        aside = d["path"].with_name(d["path"].name + DAMAGED_SUFFIX)
        os.replace(d["path"], aside)
        if d["step"] is None or d["step"] > step:
            redo = "it is redone when training passes its step again"
        elif d["step"] == step:
            redo = f"it is rewritten from the checkpoint of step {step}"
        else:
            redo = (f"its step {d['step']} is before the resume step {step}, so it is not redone (only a resume "
                    f"from a checkpoint at or before step {d['step']} would); reconstruct_ema.py uses the others")
        log(f"WARNING: post-hoc EMA snapshot {d['path']} is damaged ({d['reason']}); set aside as {aside.name}: "
            f"{redo}")
    removed = [s["path"] for s in snapshots if s["step"] > step]
    for p in removed:
        p.unlink()
    return removed


def redo_resume_snapshots(power_ema: Optional[PowerEMA], model: nn.Module, run_dir, step: int, every: int,
                          dtype: str = "fp16", metadata: Optional[dict] = None, log=print) -> list:
    """Resuming at `step` with `power_ema` restored from the checkpoint of `step`: write the snapshots of
    `step` that are missing (set aside as damaged by `remove_snapshots_after`, or deleted) when `step` is
    a snapshot step (a multiple of `every`) or one was set aside. The same averages, hence the same
    bytes as the uninterrupted run's. Returns the paths written."""
    if power_ema is None or step <= 0 or power_ema.t != step or every <= 0:
        return []
    paths = [snapshot_path(run_dir, step, s) for s in power_ema.sigma_rels]
    set_aside = any(p.with_name(p.name + DAMAGED_SUFFIX).exists() for p in paths)
    if all(p.exists() for p in paths) or not (step % every == 0 or set_aside):
        return []
    written = save_posthoc_snapshots(power_ema, model, run_dir, step, dtype, metadata, missing_only=True)
    for p in written:
        log(f"rewrote the missing post-hoc EMA snapshot {p} from the checkpoint of step {step}")
    return written


@torch.no_grad()
def reconstruct_from_snapshots(snapshots: Sequence[dict], targets: Sequence[tuple], log=lambda m: None) -> list:
    """float32 state_dicts of the EMAs `targets` (power: (step, gamma) or EMATarget(step, gamma=g); classic:
    EMATarget(step, decay=beta)) combined from `snapshots` (list_posthoc_snapshots entries; those after a
    target's step are not used for it), reading each file once. Returns one (state_dict, coefficients)
    per target, the coefficients (one per snapshot, summing to one) as `target_coefficients`. A file
    that cannot be read raises ValueError naming it; one whose contents differ from its digest
    DamagedCheckpoint (a UserError: one line naming the file and the tensor). Files without a digest are
    combined unchecked, with one warning for all of them."""
    coefs = []
    for target in targets:
        t_step = EMATarget(*target).step
        use = [s["step"] <= t_step for s in snapshots]
        x = np.zeros(len(snapshots))
        idx = [i for i, u in enumerate(use) if u]
        if not idx:
            raise ValueError(f"no snapshot at or before step {t_step}")
        x[idx] = target_coefficients([snapshots[i]["step"] for i in idx], [snapshots[i]["gamma"] for i in idx],
                                     target)
        coefs.append(x)
    outs: list = [None] * len(targets)
    unchecked = []
    for i, snap in enumerate(snapshots):
        if not any(c[i] != 0 for c in coefs):
            continue
        log(f"reading snapshot {snap['path'].name} ({i + 1}/{len(snapshots)})")
        fix = (f"rename it to {snap['path'].name}{DAMAGED_SUFFIX} and rerun: the reconstruction then uses the "
               "other snapshots")
        state, checked = load_snapshot(snap["path"], fix)
        if not checked:
            unchecked.append(snap["path"].name)
        for j, c in enumerate(coefs):
            if c[i] == 0:
                continue
            if outs[j] is None:
                outs[j] = {k: (torch.zeros_like(v, dtype=torch.float32) if v.dtype.is_floating_point else v.clone())
                           for k, v in state.items()}
            if state.keys() != outs[j].keys() or any(v.shape != outs[j][k].shape for k, v in state.items()):
                raise ValueError(f"the post-hoc EMA snapshot {snap['path']} holds other tensors than the snapshots "
                                 "before it (another model?)")
            for k, v in state.items():
                if v.dtype.is_floating_point:
                    outs[j][k].add_(v.float(), alpha=float(c[i]))
                else:
                    outs[j][k] = v.clone()
    if unchecked:  # one line for a run written before digests, not one per snapshot
        warnings.warn(f"{len(unchecked)} post-hoc EMA snapshot(s) have no content digest (written before snapshots "
                      f"carried one), so they were combined without a check for damage: {', '.join(unchecked[:3])}"
                      + (f" and {len(unchecked) - 3} more" if len(unchecked) > 3 else ""), NoDigestWarning)
    return list(zip(outs, coefs))
