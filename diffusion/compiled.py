"""torch.compile of the network for sampling (`--compile`): one compiled module per network, reused.

Sampling calls the network at one fixed shape (`--forward-batch` rows, see `FixedBatchModel`), so the
network is compiled with `dynamic=False`: one graph, specialised to that shape, compiled on the first
call (a second shape, e.g. `--forward-batch 0` with a short last batch, compiles once more). On CUDA
the mode is "max-autotune-no-cudagraphs" (autotuned GEMM/conv kernels; no CUDA graphs, whose static
buffers would be overwritten between the conditional/guided calls of one step); on CPU the default
mode. bf16 comes from the caller's autocast (`--precision bf16`), which the compiled graph records.
"""
from __future__ import annotations

import weakref

import torch

_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def compile_mode(device_type: str) -> str:
    """torch.compile mode used for sampling on `device_type`."""
    return "max-autotune-no-cudagraphs" if device_type == "cuda" else "default"


def compiled_network(model: torch.nn.Module, device_type: str):
    """torch.compile(model) for sampling on `device_type`, built once per (model, device type)."""
    per_model = _CACHE.setdefault(model, {})
    if device_type not in per_model:
        per_model[device_type] = torch.compile(model, mode=compile_mode(device_type), dynamic=False)
    return per_model[device_type]
