"""Initialisation = the authors' release rule (DiT's recipe applied module by module).

Every weight group's empirical standard deviation must equal the closed-form value for its shape:
xavier_uniform_ on U(-a, a), a = sqrt(6 / (fan_in + fan_out)), has std sqrt(2 / (fan_in + fan_out)),
with torch's fans of the tensor as it is (a 4-D conv weight's fans include its kernel) except the stem
(flattened matrix); normal(0, 0.02) tables and timestep MLPs; zero groups exactly zero.
"""
from __future__ import annotations

import math

import torch

from models import create_model


def _xavier_std(fan_in: int, fan_out: int) -> float:
    return math.sqrt(2.0 / (fan_in + fan_out))


def _expected(name: str, w: torch.Tensor):
    """Closed-form std of parameter `name` (None: must be exactly zero)."""
    zero = ("adaLN_modulation", "grn.", "head.out.")
    if name.endswith("bias") or any(z in name for z in zero):
        return None
    if name.startswith("y_embedders") or name.startswith("t_embedders"):
        return 0.02
    if name == "stem.weight":  # flattened (out, in*kh*kw) matrix
        return _xavier_std(w[0].numel(), w.shape[0])
    rf = w[0, 0].numel() if w.ndim == 4 else 1  # receptive field kh*kw of a conv weight
    return _xavier_std(w.shape[1] * rf, w.shape[0] * rf)


def test_fcdm_s_init_std_matches_release_rule():
    torch.manual_seed(0)
    model = create_model("FCDM-S")
    groups: dict = {}  # (expected std, kind) -> list of tensors
    for name, p in model.named_parameters():
        exp = _expected(name, p)
        if exp is None:
            assert torch.count_nonzero(p) == 0, f"{name} must start at zero"
            continue
        kind = ".".join(part for part in name.split(".") if not part.isdigit())  # e.g. encoder.dwconv.weight
        groups.setdefault((round(exp, 12), kind, tuple(p.shape)), []).append(p.detach().flatten())
    ratios = {}
    for (exp, kind, shape), ts in groups.items():
        std = torch.cat(ts).double().std().item()
        ratios[(kind, shape)] = std / exp
        assert abs(std / exp - 1) < 0.03, f"{kind} {shape}: std {std:.5g} vs formula {exp:.5g}"
    kinds = {k for k, _ in ratios}
    # every kind of weight is checked, including those a flattened xavier gets wrong (4-D convs)
    assert {"stem.weight", "encoder.dwconv.weight", "middle.dwconv.weight", "downsamples.conv.weight",
            "upsamples.conv.weight", "head.conv.weight", "encoder.pwconv1.weight", "fuse.weight",
            "y_embedders.weight", "t_embedders.mlp.weight"} <= kinds, kinds
