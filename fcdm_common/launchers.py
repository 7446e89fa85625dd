"""What the launcher asked for versus what we got: `accelerate launch --num_processes N` on CPU.

Without `--multi_gpu`, `accelerate launch` on a machine without GPUs starts ONE plain process and
sets none of RANK/WORLD_SIZE (checked with accelerate 1.x: it exports only ACCELERATE_USE_CPU,
ACCELERATE_MIXED_PRECISION, ACCELERATE_DYNAMO_*, MASTER_ADDR/PORT), so a run asked for N processes
silently trains with one. The request is still visible on the launcher's own command line (the
parent process of the script), which is where `requested_processes` reads it (Linux /proc).
`accelerate launch --multi_gpu --num_processes N` starts N processes, which use gloo on CPU.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

ACCELERATE_ENV_MARKERS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND")


def _parent_cmdline() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _flag_value(argv: Sequence[str], names: Sequence[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def requested_processes(environ: Mapping[str, str] = os.environ,
                        parent_argv: Optional[Sequence[str]] = None) -> Optional[int]:
    """Processes `accelerate launch` was asked for (its --num_processes), or None when unknown or not
    launched by accelerate. `parent_argv` defaults to the parent process's command line."""
    if not any(k in environ for k in ACCELERATE_ENV_MARKERS):
        return None
    argv = list(_parent_cmdline() if parent_argv is None else parent_argv)
    if "launch" not in argv:
        return None
    tail = argv[argv.index("launch") + 1:]  # the launcher's own flags come before the script
    script = next((i for i, a in enumerate(tail) if a.endswith(".py") or a == "-m"), len(tail))
    value = _flag_value(tail[:script], ("--num_processes", "--num-processes"))
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def process_count_warning(world_size: int, environ: Mapping[str, str] = os.environ,
                          parent_argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """A warning when the launcher asked for more processes than this run has, else None."""
    wanted = requested_processes(environ, parent_argv)
    if wanted is None or wanted <= world_size:
        return None
    return (f"WARNING: accelerate launch asked for {wanted} processes but this run has {world_size}: without "
            f"GPUs accelerate starts one process unless told otherwise. For {wanted} processes on CPU use "
            f"`accelerate launch --multi_gpu --num_processes {wanted} ...` (they communicate with gloo); see "
            "docs/training.md")
