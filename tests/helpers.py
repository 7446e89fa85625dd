"""Helpers shared by the network tests (imported as `from helpers import ...`; pytest puts tests/ on the path)."""
import pytest
import torch

from fcdm_common.processes import kill_processes_with_env, processes_with_env  # noqa: F401  (re-exported)


def torchrun_workers(tag: str, script: str) -> dict:
    """{RANK: pid} of the torchrun workers running `script` whose environment carries FCDM_TEST_TORCHRUN=tag (the
    launcher itself has no LOCAL_RANK)."""
    found = {}
    for pid in processes_with_env("FCDM_TEST_TORCHRUN", tag):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if "LOCAL_RANK" in env and script in cmdline:
            found[int(env["RANK"])] = pid
    return found


def randomize(model, std=0.2, seed=0):
    """Move every parameter off its (partly zero) initialisation, so comparisons are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def assert_checkpointing_preserves_outputs_and_grads(model, inputs, mode):
    """Output and every parameter gradient are the same with checkpoint `mode` as without; a bad mode
    raises ValueError. The model must have label dropout off."""
    ref_out = model(*inputs)
    ref_out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(mode)
    out = model(*inputs)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref_out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=lambda m: f"{n}: {m}")
    with pytest.raises(ValueError):
        model.set_grad_checkpointing("sometimes")


@pytest.fixture
def one_thread():
    """One intra-op thread, torchrun's per-process default (and fast on a shared 2-core machine).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")` after importing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parameters_without_gradient(model, inputs, target, steps=3, lr=1e-2):
    """Train `steps` AdamW steps on an MSE to `target`; names of parameters that never got a non-zero
    gradient. Zero-initialised gates open one layer per step, hence several steps."""
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    touched = {n: False for n, _ in model.named_parameters()}
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(*inputs), target).backward()
        for n, p in model.named_parameters():
            touched[n] |= bool(p.grad is not None and torch.count_nonzero(p.grad) > 0)
        opt.step()
    return [n for n, ok in touched.items() if not ok]


def run_torchrun(script, args, timeout, nproc=2):
    """Run `script` under torchrun (standalone, one thread per process) and return its stderr; the run
    must succeed (see `torchrun_result`)."""
    returncode, _, stderr = torchrun_result(script, args, timeout, nproc)
    assert returncode == 0, stderr[-3000:]
    return stderr


def torchrun_result(script, args, timeout, nproc=2):
    """Run `script` under torchrun and return (returncode, stdout, stderr), nothing asserted. Every
    process of the run carries a unique environment tag; a run that times out (or fails) has all of
    them killed, torchrun's workers included (they live in their own sessions), so none is left behind."""
    import os
    import subprocess
    import sys
    import uuid

    tag = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FCDM_TEST_TORCHRUN": tag}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        kill_processes_with_env("FCDM_TEST_TORCHRUN", tag)
        proc.wait()
    return proc.returncode, stdout, stderr
