"""Process-group setup for scripts that run under `torchrun` or as a plain `python` process.

torchrun exports RANK, WORLD_SIZE and LOCAL_RANK; when they are present (and WORLD_SIZE > 1) we
initialise torch.distributed with NCCL when CUDA is available and gloo otherwise (CPU runs and
tests). Without them everything is a no-op with rank 0 of a world of 1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fcdm_common.cli import UserError


@dataclass
class DistInfo:
    rank: int = 0  # global rank of this process
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this node (picks the GPU)
    device: torch.device = torch.device("cpu")  # device this process computes on
    backend: str | None = None  # "nccl", "gloo" or None when not distributed

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True when the environment says we run under torchrun (or another env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise the process group from the environment; no-op when not launched distributed.

    device: "cuda", "cpu" or None (cuda when available).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {device} was requested but CUDA is not available; use --device cpu")
    if not launched_distributed():
        dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistInfo(device=dev)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if use_cuda:
            dist.init_process_group(backend=backend, device_id=dev)
        else:
            dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def barrier() -> None:
    """Wait for every process; no-op when not distributed."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank; returns it unchanged when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """List of `obj` from every rank (rank order); [obj] when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


