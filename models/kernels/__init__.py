"""Fused Triton kernels of the FCDM block (`--kernels triton`); the torch path (models/fcdm.py, models/layers.py)
stays the readable reference, and the default.

    launch.py        tile shapes, warps and reduction splits (a GPU profile and a CPU-interpreter profile)
    dwconv_norm.py   depthwise conv + LayerNorm + adaLN modulation: forward and its three backward kernels
    grn.py           GELU + GRN: statistics and apply, forward and backward
    gate.py          the gated residual, forward and backward
    block.py         the block's forward built from them (the custom ops) and the two matmuls

Triton is imported only when the fused path is chosen (`load()`): it is optional (CPU-only installs may lack
it) and costs ~0.2 s of start-up. On CPU tensors the kernels run under Triton's interpreter, which must be
switched on before the kernels are defined: `TRITON_INTERPRET=1` in the environment (slow; for tests).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

KERNELS = ("torch", "triton")  # the block implementations `--kernels` chooses between


def interpreter() -> bool:
    """Whether Triton's CPU interpreter is on (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(kernels: str, device_type: str) -> str:
    """Why `kernels` cannot run on `device_type` ("" when it can)."""
    if kernels not in KERNELS:
        return f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}"
    if kernels == "torch":
        return ""
    if importlib.util.find_spec("triton") is None:
        return "the triton kernels need the triton package (pip install triton; it comes with CUDA builds of torch)"
    if device_type == "cuda" or (device_type == "cpu" and interpreter()):
        return ""
    if device_type == "cpu":
        return ("the triton kernels run on CUDA GPUs; on a CPU only under Triton's interpreter (set TRITON_INTERPRET=1 "
                "in the environment; very slow, meant for tests)")
    return f"the triton kernels run on CUDA GPUs, not on {device_type!r}"


def kernels_problem(model, kernels: str, device_type: str) -> str:
    """Why `model` cannot run with `kernels` on `device_type` ("" when it can): only FCDM has a fused path;
    "torch" suits every model."""
    if kernels != "torch" and not hasattr(model, "set_kernels"):
        return f"{type(model).__name__} has no fused kernels (the triton kernels are FCDM's block)"
    return unavailable_reason(kernels, device_type)


def use_kernels(model, kernels: str, device_type: str) -> None:
    """Set `model`'s block implementation (FCDM.set_kernels); ValueError saying why when it cannot run."""
    problem = kernels_problem(model, kernels, device_type)
    if problem:
        raise ValueError(problem)
    if hasattr(model, "set_kernels"):
        model.set_kernels(kernels)


KERNELS_HELP = ("block implementation: torch (the reference) or triton (fused kernels of models/kernels; CUDA, or a "
                "CPU under TRITON_INTERPRET=1); the same function, other rounding")


def load(kernels: str) -> Callable:
    """The fused block forward for `kernels` == "triton" (imports triton and registers the custom ops)."""
    if kernels != "triton":
        raise ValueError(f"no fused block for kernels {kernels!r}")
    from models.kernels.block import fused_block_forward  # deferred: triton is optional and costs ~0.2 s to import

    return fused_block_forward
