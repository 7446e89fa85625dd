"""The model registry: `create_model(name, **overrides)` builds any registered network by name.

Each architecture registers its presets at the end of its own file (`@register("FCDM-XL")`), as small
factory functions whose keyword arguments override the preset's constructor arguments.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch.nn as nn

MODELS: Dict[str, Callable[..., nn.Module]] = {}  # name -> factory(**overrides)
INPUT_SIZE_ARGS: Dict[str, str] = {}  # name -> the constructor argument that takes the latent side (DiT: input_size)


def register(name: str, input_size_arg: Optional[str] = None):
    """Decorator: register a factory under `name` (each name once). Models built for one input size (DiT's
    position embedding) name the argument that takes the latent side; fully convolutional ones name none."""
    def deco(fn):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = fn
        if input_size_arg is not None:
            INPUT_SIZE_ARGS[name] = input_size_arg
        return fn

    return deco


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword arguments override the preset's constructor arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**overrides)
