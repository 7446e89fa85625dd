"""What every speed benchmark shares: the device and its settings, timing, peak memory, and a record of the
machine (torch, CPU, GPU, load) that goes into each report."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from typing import Callable, Optional, Tuple

import torch

from fcdm_common.cli import UserError, positive_int
from fcdm_common.cpu import cpu_allocator_state, tune_cpu_allocator
from models import MODELS, create_model
from models.fcdm import FCDM

VAE_DOWNSAMPLE = 8  # 4-channel models work on SD-VAE latents: resolution / 8


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_allocator"] = cpu_allocator_state()
    return env


def setup_device(args) -> torch.device:
    """The device of the run, with its process-wide settings (applied to every variant alike)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda requested but torch.cuda.is_available() is False")
        # fp32 matmuls and convolutions in TF32 for every variant (the baseline's "fp32 (TF32 on GPU)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    elif args.cpu_allocator == "tuned":
        tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_latent(args, in_channels: int) -> int:
    if args.latent_size is not None:
        return args.latent_size
    down = VAE_DOWNSAMPLE if in_channels == 4 else 1
    if args.resolution % down:
        raise UserError(f"--resolution {args.resolution} is not a multiple of the VAE factor {down}")
    return args.resolution // down


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def peak_memory(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """CUDA: max_memory_allocated over one call (bytes). CPU: None (see the process ru_maxrss)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


# ---------------------------------------------------------------------------------- the fused block's benchmarks
def add_block_shape_args(p, batch_help: str) -> None:
    """--model, --model-kwargs, --latent-size, --batch-size: the FCDM whose blocks a kernel benchmark runs."""
    p.add_argument("--model", default="FCDM-XL", help="registered FCDM (its widths, levels, kernel size, expansion)")
    p.add_argument("--model-kwargs", default=None, help="JSON object of constructor overrides for --model")
    p.add_argument("--latent-size", type=positive_int, default=32, help="latent side (32: ImageNet 256 with SD-VAE)")
    p.add_argument("--batch-size", type=positive_int, default=256, help=batch_help)


def fcdm_on_meta(args) -> Tuple[FCDM, dict]:
    """The --model network on the meta device and its --model-kwargs; UserError for an unknown or non-FCDM
    network, bad --model-kwargs, or a --latent-size its levels do not divide."""
    if args.model not in MODELS:
        raise UserError(f"unknown model {args.model!r}; registered: {', '.join(sorted(MODELS))}")
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
        with torch.device("meta"):
            model = create_model(args.model, **kwargs)
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"cannot build --model {args.model}" + (f" with --model-kwargs {args.model_kwargs}"
                                                                 if args.model_kwargs else "") + f": {e}") from None
    if not isinstance(model, FCDM):
        raise UserError(f"{args.model} is not an FCDM: only FCDM's block has fused kernels")
    if args.latent_size % 2 ** (model.num_levels - 1):
        raise UserError(f"--latent-size {args.latent_size} is not divisible by {2 ** (model.num_levels - 1)} "
                        f"({model.num_levels} levels)")
    return model, kwargs
