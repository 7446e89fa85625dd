"""CPU runtime settings for the programs that run networks on the CPU (train, sample, benchmarks).

glibc's malloc serves large blocks (a 16x32x32x192 float32 activation is 12.6 MB) with fresh `mmap`
pages and hands freed memory back to the kernel, so every training step page-faults its
activations in again: on the 2-core benchmark machine, about 30,000-50,000 minor faults and
80-140 ms of kernel time per step of the benchmark configuration (docs/benchmarks.md). Keeping large
blocks on the heap and not trimming it lets the process reuse its own memory, as a caching
allocator does on GPUs. The price: the process keeps its peak heap size until it exits.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30  # blocks up to this size come from the heap; up to this much free memory stays in it
_FALLBACK_MMAP_BYTES = 32 << 20  # the largest M_MMAP_THRESHOLD that every 64-bit glibc accepts

_state = {"tuned": None}  # None: not tried yet; True/False: the outcome of the first call


def tune_cpu_allocator() -> bool:
    """Make glibc malloc keep freed memory for reuse (see the module docstring). Idempotent; returns
    whether the settings are in effect. A no-op returning False on other C libraries, and when
    FCDM_CPU_ALLOCATOR=default is set (to measure or rule out the setting)."""
    if _state["tuned"] is not None:
        return _state["tuned"]
    _state["tuned"] = False
    if os.environ.get("FCDM_CPU_ALLOCATOR", "tuned") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) or mallopt(_M_MMAP_THRESHOLD, _FALLBACK_MMAP_BYTES)
    trim_ok = mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
    _state["tuned"] = bool(mmap_ok and trim_ok)
    return _state["tuned"]


def cpu_allocator_state() -> str:
    """'tuned' once tune_cpu_allocator() has taken effect in this process, else 'default'."""
    return "tuned" if _state["tuned"] else "default"
