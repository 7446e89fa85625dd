"""What has to hold on a CUDA device, written once for every device: each test is parametrized over
"cpu" (runs everywhere, in CI) and "cuda" (marked `cuda`, skipped with a reason where no GPU is
visible; `pytest -m cuda tests/test_cuda.py` is step 2 of benchmarks/gpu_suite.sh).

- the fast paths of models/fcdm.py against models/fcdm_reference.py (fp32 with TF32 off as the truth)
  in fp32, TF32 and bf16 autocast, forward and every gradient, in every checkpointing mode
- compiled blocks (inductor on CUDA, aot_eager on CPU) against the reference
- fused AdamW's on-device skip of a non-finite step (found_inf), with the foreach EMA weighted by the
  same flag: nothing moves, and on CUDA the step makes no host synchronisation
- the label range check: ValueError on CPU, an asynchronous device-side assertion on CUDA (no sync
  for valid labels; a bad label fails the process)
- train.py for 20 steps in bf16 on a zarr store, killed with SIGKILL and resumed
- sample_ddp.py writing the same archive with per-process batch 16 and 32
"""
from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import one_thread, randomize  # noqa: F401  (one_thread: fixture)
from models.fcdm_reference import FCDMReference
from models.layers import CHECKPOINT_MODES
from test_fast_paths import batch, grads_in_fcdm_shapes, tiny
from train_gen.ema import create_ema, update_ema

NO_CUDA = "needs a CUDA GPU (run on one by benchmarks/gpu_suite.sh: pytest -m cuda tests/test_cuda.py)"
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)],
                    id="cuda")
DEVICES = ["cpu", CUDA]


def on(device, *tensors):
    return [t.to(device) for t in tensors]


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls/convolutions on or off (CUDA; no effect on CPU), restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def forward_backward(model, x, t, y, bf16: bool):
    """Output and input gradient for the fixed weighting w of the output (same for every network)."""
    x = x.clone().requires_grad_(True)
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        out = model(x, t, y)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(x.device)
    (out.float() * w).sum().backward()
    return out.float(), x.grad


# relative-norm tolerances against the fp32 reference (TF32 off): output/input grad, parameter grads
TOLERANCE = {"fp32": (1e-4, 1e-4), "tf32": (1e-2, 2e-2), "bf16": (5e-2, 1e-1)}
PRECISION_CASES = [pytest.param("cpu", "fp32", id="cpu-fp32"), pytest.param("cpu", "bf16", id="cpu-bf16")] + [
    pytest.param("cuda", p, id=f"cuda-{p}", marks=CUDA.marks) for p in ("fp32", "tf32", "bf16")]


def assert_matches_reference(model, ref, x, t, y, precision: str, tol=None):
    with tf32(False):
        ref_out, ref_dx = forward_backward(ref, x, t, y, bf16=False)
    with tf32(precision == "tf32"):
        out, dx = forward_backward(model, x, t, y, bf16=precision == "bf16")
    assert ref_out.abs().max() > 1e-2  # not the zero output of the initialisation
    out_tol, grad_tol = tol or TOLERANCE[precision]
    assert rel_err(out, ref_out) < out_tol, rel_err(out, ref_out)
    assert rel_err(dx, ref_dx) < out_tol * 2, rel_err(dx, ref_dx)
    ref_grads = grads_in_fcdm_shapes(ref, model)
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert rel_err(p.grad, ref_grads[n]) < grad_tol, (n, rel_err(p.grad, ref_grads[n]))


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
@pytest.mark.parametrize("device,precision", PRECISION_CASES)
def test_fast_paths_match_reference(device, precision, mode):
    """Channels-last network, matmul pointwise convs, kernel crop (8x8 input: 2x2 maps at level 3),
    hand-written GRN backward: same output and gradients as the paper-mode NCHW reference."""
    model = randomize(tiny(), std=0.1).to(device)
    model.set_grad_checkpointing(mode)
    ref = FCDMReference.from_fcdm(model, grad_checkpointing=True)
    assert_matches_reference(model, ref, *on(device, *batch(n=3, size=8)), precision)


@pytest.mark.parametrize("device,mode", [("cpu", "full"), pytest.param("cuda", "none", marks=CUDA.marks)])
def test_compiled_blocks_match_reference(device, mode):
    """compile_blocks: real code generation on CUDA (inductor, Triton kernels), the traced graph on CPU
    (aot_eager: no C++ build in a unit test); fp32 against the reference."""
    torch._dynamo.reset()
    model = randomize(tiny(depths=(1, 1, 1)), std=0.1).to(device)
    ref = FCDMReference.from_fcdm(model, grad_checkpointing=False)
    model.set_grad_checkpointing(mode)
    model.compile_blocks(backend="inductor" if device == "cuda" else "aot_eager", fullgraph=True)
    assert_matches_reference(model, ref, *on(device, *batch(size=8)), "fp32", tol=(1e-3, 2e-3))


def sync_free(device):
    """On CUDA: any host synchronisation inside raises (torch.cuda.set_sync_debug_mode)."""
    if device != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def ctx():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return ctx()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_skips_a_nonfinite_step_on_the_device(device):
    """train.py's step: grad norm and the bad flag stay on the device, fused AdamW gets found_inf, the EMA
    weight is (1 - bad). A step with an inf gradient changes no weight, moment, step count or EMA, and
    (CUDA) needs no host synchronisation; the next good step equals foreach AdamW on the same gradients."""
    model = randomize(tiny(), std=0.1).to(device)
    ema = create_ema(model)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
    x, t, y = on(device, *batch(n=2, size=8))
    overflow = torch.full((), float("inf"), device=device)  # made here: a Python scalar written into a CUDA
    # tensor is a host-to-device copy, which the sync check counts (torch 2.11 on an H200 did)

    def backward(poison: bool):
        loss = model(x, t, y).float().square().mean()
        loss.backward()
        if poison:
            params[3].grad[0].copy_(overflow)  # an overflowed gradient, found on the device
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True).float()
        return ~(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))

    def step(bad):
        opt.found_inf = bad.float()
        opt.step()
        del opt.found_inf
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9, weight=(~bad).float())

    step(backward(False))  # moments and step counts exist from here on
    before = copy.deepcopy((model.state_dict(), ema.state_dict(), opt.state_dict()["state"]))
    with sync_free(device):
        bad = backward(True)
        step(bad)
    assert bool(bad)
    after = (model.state_dict(), ema.state_dict(), opt.state_dict()["state"])
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v), f"weight {k} moved on a skipped step"
    for k, v in before[1].items():
        assert torch.equal(after[1][k], v), f"EMA {k} moved on a skipped step"
    for i, st in before[2].items():
        for k, v in st.items():
            assert torch.equal(after[2][i][k], v), f"AdamW state {i}.{k} moved on a skipped step"

    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.0, foreach=True)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own moments (a plain load shares them)
    bad = backward(False)
    assert not bool(bad)
    for p, q in zip(params, twin.parameters()):
        q.grad = p.grad.clone()
    step(bad)
    twin_opt.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
    assert int(opt.state_dict()["state"][0]["step"]) == 2  # the skipped step was not counted


LABEL_SCRIPT = """
import torch
from models.fcdm import FCDM
m = FCDM(in_channels=4, hidden_size=16, depths=(1, 1, 1), num_classes=10).cuda().eval()
x, t = torch.randn(2, 4, 8, 8, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda")
with torch.no_grad():
    m(x, t, torch.tensor([3, 11], device="cuda"))  # 11 > the null label 10
torch.cuda.synchronize()
print("NO ERROR")
"""


@pytest.mark.parametrize("device", DEVICES)
def test_label_range_check(device):
    """Valid labels (0..num_classes, the null label included) pass without a host synchronisation;
    a label outside fails: ValueError on CPU, a device-side assertion that ends the process on CUDA."""
    model = tiny().to(device).eval()
    x, t, _ = on(device, *batch(n=2, size=8))
    y = torch.tensor([0, 10], device=device)  # (a host-to-device copy synchronises: made outside)
    with torch.no_grad(), sync_free(device):
        model(x, t, y)
    if device == "cpu":
        with pytest.raises(ValueError, match="labels must lie in"):
            model(x, t, torch.tensor([3, 11]))
        return
    proc = subprocess.run([sys.executable, "-c", LABEL_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "assert" in proc.stderr.lower(), proc.stderr[-2000:]


@pytest.mark.parametrize("device", DEVICES)
def test_train_bf16_kill_and_resume(device, tmp_path):
    """train.py, bf16 autocast, 20 steps (CPU: 8, to stay quick) with a checkpoint after every step:
    SIGKILL once step 3 is saved, rerun the same command, and the run ends at the last step with one
    metrics record per logging window."""
    from models.checkpoints import load_checkpoint
    from test_train import ENV, TINY, TRAIN, make_store, metrics, run_dir

    steps, every = (20, 5) if device == "cuda" else (8, 4)
    store = make_store(tmp_path / "tiny.zarr")
    env = dict(ENV, PYTHONPATH=os.pathsep.join(sys.path))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # train.py takes the GPU whenever one is visible
    cmd = [sys.executable, TRAIN, *map(str, TINY), "--zarr-path", str(store), "--results-dir", str(tmp_path / "res"),
           "--max-train-steps", str(steps), "--log-every", str(every), "--ckpt-every", "1", "--sample-every", "0",
           "--mixed-precision", "bf16"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    try:
        while not list((tmp_path / "res").glob("*/checkpoints/0000003.pt")):
            assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rd = run_dir(tmp_path / "res")
    done = max(int(p.stem) for p in (rd / "checkpoints").glob("*.pt"))
    assert 3 <= done < steps
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-3000:]
    assert f"at step {done}" in text and f"done: {steps} steps" in text
    recs = metrics(rd)
    assert [r["step"] for r in recs] == list(range(every, steps + 1, every))
    assert all(np.isfinite(r["loss"]) for r in recs)
    ckpt = load_checkpoint(rd / "checkpoints" / f"{steps:07d}.pt")
    assert ckpt["step"] == steps and ckpt["config"]["train"]["mixed_precision"] == "bf16"
    assert ckpt["config"]["run"]["device"] == device


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("device", DEVICES)
def test_sample_ddp_same_archive_for_batch_16_and_32(device, tmp_path):
    """Guided DDPM in bf16 with a forward batch (24) that does not line up with either sampling batch:
    every image must not depend on which other samples share its network call."""
    from test_sample_ddp import make_checkpoint, the_archive
    from train_gen import sample_ddp

    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    archives = []
    for per_proc in (16, 32):
        sample_ddp.main([str(a) for a in (
            "--ckpt", ckpt, "--sample-dir", tmp_path / f"b{per_proc}", "--num-fid-samples", 40,
            "--per-proc-batch-size", per_proc, "--num-sampling-steps", 4, "--ddpm", "true", "--cfg-scale", 2.0,
            "--forward-batch", 24, "--precision", "bf16", "--device", device, "--global-seed", 1)])
        archives.append(np.load(the_archive(tmp_path / f"b{per_proc}")))
    a, b = archives
    assert a["arr_0"].shape == (40, 16, 16, 3) and a["arr_0"].std() > 10
    assert a["arr_0"].tobytes() == b["arr_0"].tobytes()
    assert a["arr_1"].tobytes() == b["arr_1"].tobytes()
