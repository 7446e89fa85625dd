"""The GPU suite's steps, one module per stage; benchmarks/gpu_suite.py is the entry point (its flags and main).

`core.py` is the runner (`Suite`: budget, records, commands with time limits, the summary line), the helpers the
steps share (`bench_step`, `batch_attempts`, `halving_batches`, ...) and the registry; `sizes.py` holds the problem
sizes of the GPU run and of the dry run. Every other module is a stage: it registers its step(s) with
`@stage(name, min_s=...)` and the code it runs in a process of its own with `@worker(name)`.

Importing this package imports every module in it, so a module registers itself by being here; STEP_ORDER below is
the one list that orders the steps (the default order of a run). A step registered but left out of it, or named in
it but registered nowhere, stops the import, so the two cannot drift apart.

To add a measurement: a module here with its step function under `@stage`, the sizes it needs as fields of
`sizes.Sizes` (the GPU value, and a tiny one for the dry run), and its name in STEP_ORDER. tests/test_gpu_suite.py's
dry run then runs it on the CPU through the same code.
"""
from __future__ import annotations

import importlib
import pkgutil

from benchmarks.gpu_stages.core import STAGES, WORKERS, Stage

# the default order: cheap and most wanted first (a budget that runs out skips the last), compilation late
STEP_ORDER = ("env", "cuda_tests", "fused", "train256", "profile256", "train512", "forward", "repa", "flow_times",
              "e2e", "compile256", "sampling", "latents")

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # a stage module registers its steps and workers

_unordered = sorted(set(STAGES) - set(STEP_ORDER))
_unregistered = [name for name in STEP_ORDER if name not in STAGES]
if _unordered or _unregistered or len(set(STEP_ORDER)) != len(STEP_ORDER):
    raise RuntimeError(f"benchmarks/gpu_stages: steps registered but not in STEP_ORDER: {_unordered}; in STEP_ORDER "
                       f"but registered nowhere: {_unregistered}; STEP_ORDER: {STEP_ORDER}")

STEPS: dict[str, Stage] = {name: STAGES[name] for name in STEP_ORDER}  # what main dispatches to, in order
MIN_SECONDS = {name: st.min_s for name, st in STEPS.items()}  # a step starts only with this much budget left

__all__ = ["MIN_SECONDS", "STEPS", "STEP_ORDER", "WORKERS"]
