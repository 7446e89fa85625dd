"""Suite-wide settings and checks. Without a CUDA device, Triton's CPU interpreter is switched on (TRITON_INTERPRET=1)
for the fused-kernel tests. Every process the tests start inherits FCDM_TEST_SESSION (set here, before any
test module builds its subprocess environment); at the end no process with this session's tag may
still run: a leftover (e.g. an orphaned torchrun worker) is killed and reported as an error."""
import os
import uuid

import pytest
import torch

from helpers import kill_processes_with_env

SESSION_KEY = "FCDM_TEST_SESSION"
os.environ[SESSION_KEY] = uuid.uuid4().hex  # always a new tag: a nested session never matches its parent
if not torch.cuda.is_available():
    # the fused Triton kernels (models/kernels) run on CPU tensors under Triton's interpreter, which must be on
    # before the kernels are defined; processes the tests start inherit it
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    yield
    import sys
    import time

    if "torch._inductor.async_compile" in sys.modules:  # torch.compile's worker pool belongs to this process
        # (it lives as long as the process that compiled, and would otherwise be counted as left behind)
        sys.modules["torch._inductor.async_compile"].shutdown_compile_workers()
    time.sleep(0.2)  # processes being killed right now get a moment to exit
    leftovers = kill_processes_with_env(SESSION_KEY, os.environ[SESSION_KEY])
    if leftovers:
        pytest.fail(f"processes started by the tests were still running at the end (killed now): {leftovers}")
