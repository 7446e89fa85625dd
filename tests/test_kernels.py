"""The fused Triton block kernels (models/kernels, `--kernels triton`) against the torch path.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); with one, the "cuda" cases run the compiled kernels (`pytest -m cuda`, the GPU suite).
Each fused stage is checked in float64 against the torch layers it replaces (outputs and every gradient, to
rounding), under three launch profiles: the GPU's tiles, the interpreter's whole-problem tiles, and tiles of a
few elements that force every loop, split, channel block and mask a large problem takes. Then the whole block
and the network: float32 tight, bf16 autocast no less accurate than the torch path against a float64 truth,
every checkpointing mode, label dropout, torch.compile without graph breaks, the torch path under
forward-mode autodiff, and a clear refusal where the kernels cannot run.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from PIL import Image

from fcdm_common.cli import UserError
from helpers import randomize
from models import create_model
from models.fcdm import FCDMBlock
from models.kernels import (
    dwconv_norm,
    gate,
    grn,
    interpreter,
    kernels_problem,
    launch,
    load,
    unavailable_reason,
    use_kernels,
)
from models.kernels.launch import round_to
from models.layers import CHECKPOINT_MODES, GRN, DepthwiseConv, modulate
from train_gen.step_draws import RNG_SCHEME

NO_CUDA = "needs a CUDA GPU (run on one by benchmarks/gpu_suite.sh: pytest -m cuda)"
NO_INTERPRETER = "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1; tests/conftest.py sets it without a GPU)"
CPU = pytest.param("cpu", marks=pytest.mark.skipif(not interpreter(), reason=NO_INTERPRETER), id="cpu")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)],
                    id="cuda")
DEVICES = [CPU, CUDA]


def profiles():
    tiny = launch.Profile("tiny", tile=8, gather=64, channels=4, programs=64)  # many tiles, splits and blocks
    return {"gpu": launch.PROFILES["gpu"], "interpreter": launch.PROFILES["interpreter"], "tiny": tiny}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_close_f64(got, want, what, tol=1e-12):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape}/{got.dtype} vs {want.shape}"
    assert want.abs().max() > 0, f"{what}: the reference is zero (the check would be vacuous)"
    err = rel_err(got, want)
    assert err < tol, f"{what}: relative error {err:.3g}"


def grads(out, inputs, weight):
    return torch.autograd.grad(out, inputs, weight)


def assert_stage_matches(stage, inputs, want, names, profile):
    """The fused `stage` against `want`, the torch layers' result for the same float64 inputs, under the tiles of
    `profile`: the output and the gradient of every input."""
    with launch.use_profile(profiles()[profile]):
        got = stage(*inputs)
        dy = torch.randn_like(want)
        got_grads = grads(got, inputs, dy)
    assert_close_f64(got, want, "output")
    for name, a, b in zip(names, got_grads, grads(want, inputs, dy)):
        assert_close_f64(a, b, f"d{name}")


# ------------------------------------------------------------------------------ stages against torch, float64
def dwconv_stage_inputs(n, h, w, c, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, c, generator=g, dtype=torch.float64)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    shift = torch.randn(n, c, generator=g, dtype=torch.float64)
    scale = torch.randn(n, c, generator=g, dtype=torch.float64) * 0.5
    return [t.to(device).requires_grad_(True) for t in (x, weight, bias, shift, scale)]


def torch_dwconv_stage(x, weight, bias, shift, scale, eps=1e-6):
    conv = DepthwiseConv(x.shape[-1], weight.shape[-1])
    conv.handwritten_backward = False
    del conv.weight, conv.bias
    conv.weight, conv.bias = weight, bias
    return modulate(F.layer_norm(conv(x), (x.shape[-1],), eps=eps), shift, scale)


# (N, H, W, C, kernel): odd sides, maps smaller than the kernel (1 x 1, 2 x 1), channels that are no power of two;
# the tiny tiles (one program per pixel or two) on shapes small enough for the interpreter
SHAPES = [(2, 5, 6, 8, 7), (3, 9, 3, 12, 5), (2, 2, 1, 6, 3), (1, 1, 1, 5, 7), (2, 8, 8, 16, 7)]
CASES = ([(s, p) for s in SHAPES for p in ("gpu", "interpreter")]
         + [((2, 4, 5, 6, 3), "tiny"), ((1, 3, 2, 5, 5), "tiny"), ((2, 2, 3, 4, 7), "tiny")])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,profile", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_dwconv_norm_modulate_matches_torch(device, shape, profile):
    n, h, w, c, k = shape
    inputs = dwconv_stage_inputs(n, h, w, c, k, device)
    assert_stage_matches(lambda *t: dwconv_norm.dwconv_norm_modulate(*t, 1e-6), inputs, torch_dwconv_stage(*inputs),
                         ("x", "weight", "bias", "shift", "scale"), profile)


def grn_stage_inputs(n, h, w, c, device, seed=0, zero_channel=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, h, w, c, generator=g, dtype=torch.float64)
    if zero_channel:  # GELU(-40) = 0 exactly in float64: a channel of zeros (zero subgradient, as torch.norm)
        a[0, ..., 1] = -40.0
    gamma = torch.randn(c, generator=g, dtype=torch.float64)
    beta = torch.randn(c, generator=g, dtype=torch.float64)
    return [t.to(device).requires_grad_(True) for t in (a, gamma, beta)]


def torch_grn_stage(a, gamma, beta):
    grn = GRN(a.shape[-1])
    del grn.weight, grn.bias
    grn.weight, grn.bias = gamma, beta
    return grn(F.gelu(a))


GRN_CASES = ([(s, p) for s in ((2, 5, 6, 24), (3, 1, 3, 18), (1, 8, 8, 48)) for p in ("gpu", "interpreter")]
             + [((2, 3, 4, 12), "tiny"), ((3, 1, 3, 6), "tiny")])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,profile", GRN_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_gelu_grn_matches_torch(device, shape, profile):
    inputs = grn_stage_inputs(*shape, device, zero_channel=shape[0] > 1)
    assert_stage_matches(lambda *t: grn.gelu_grn(*t, 1e-6), inputs, torch_grn_stage(*inputs), ("a", "gamma", "beta"),
                         profile)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("profile", ["gpu", "tiny"])
def test_gated_residual_matches_torch(device, profile):
    g = torch.Generator().manual_seed(3)
    x, o = (torch.randn(3, 5, 7, 10, generator=g, dtype=torch.float64) for _ in range(2))
    gt = torch.randn(3, 10, generator=g, dtype=torch.float64)
    inputs = [t.to(device).requires_grad_(True) for t in (x, gt, o)]
    want = torch.addcmul(inputs[0], inputs[1][:, None, None, :], inputs[2])
    assert_stage_matches(gate.gated_residual, inputs, want, ("x", "gate", "o"), profile)


@pytest.mark.parametrize("device", DEVICES)
def test_stages_pass_gradcheck(device):
    """Gradients against central differences of the kernels themselves (float64, gradcheck's fast mode)."""
    inputs = dwconv_stage_inputs(2, 3, 4, 5, 3, device, seed=1)
    assert torch.autograd.gradcheck(lambda *t: dwconv_norm.dwconv_norm_modulate(*t, 1e-6), inputs, fast_mode=True)
    inputs = grn_stage_inputs(2, 3, 2, 6, device, seed=2)
    assert torch.autograd.gradcheck(lambda *t: grn.gelu_grn(*t, 1e-6), inputs, fast_mode=True)
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(s, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
              for s in ((2, 3, 2, 4), (2, 4), (2, 3, 2, 4))]
    assert torch.autograd.gradcheck(gate.gated_residual, inputs, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device):
    """torch.library's own checks of each op: schema, fake (meta) implementation, autograd registration and
    tracing by AOTAutograd with dynamic shapes (what torch.compile relies on)."""
    x, w, b, shift, scale = dwconv_stage_inputs(2, 3, 4, 6, 3, device)
    a, gamma, beta = grn_stage_inputs(2, 3, 4, 6, device)
    o = torch.randn_like(x).requires_grad_(True)
    cases = [(dwconv_norm.dwconv_norm_modulate_op, (x, w, b, shift, scale, 1e-6, True)),
             (grn.gelu_grn_op, (a, gamma, beta, 1e-6)),
             (gate.gated_residual_op, (x, shift, o))]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_inference_keeps_nothing_for_backward():
    """Under no_grad the first stage writes only h (no conv output, no statistics for a backward pass)."""
    inputs = dwconv_stage_inputs(2, 4, 4, 6, 3, "cpu")
    with torch.no_grad():
        h, d, mean, rstd = dwconv_norm.dwconv_norm_modulate_op(*inputs, 1e-6, False)
        want = torch_dwconv_stage(*inputs)
    assert d.numel() == mean.numel() == rstd.numel() == 0
    assert_close_f64(h, want, "h")


# ------------------------------------------------------------------------------ the block and the network
def block_pair(dim, kernel_size=7, dtype=torch.float32, device="cpu", seed=0):
    torch_blk = randomize(FCDMBlock(dim, kernel_size=kernel_size), std=0.3, seed=seed).to(device, dtype)
    fused_blk = copy.deepcopy(torch_blk)
    fused_blk.fused = load("triton")
    return torch_blk, fused_blk


def run_block(blk, x, c, dy, autocast=None):
    blk.zero_grad()
    xr, cr = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = blk(xr, cr)
    out.backward(dy.to(out.dtype))
    return [out, xr.grad, cr.grad] + [p.grad for p in blk.parameters()]


def block_inputs(n, h, w, dim, device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, dim, generator=g, dtype=torch.float64)
    c = torch.randn(n, dim, generator=g, dtype=torch.float64)
    dy = torch.randn(n, h, w, dim, generator=g, dtype=torch.float64)
    return [t.to(device, dtype) for t in (x, c, dy)]


BLOCK_NAMES = ["out", "dx", "dc"] + [n for n, _ in FCDMBlock(8).named_parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel_size,side", [(7, 6), (5, 3), (3, 1)])
def test_block_float32_matches_torch_path(device, kernel_size, side):
    torch_blk, fused_blk = block_pair(12, kernel_size, device=device)
    x, c, dy = block_inputs(2, side, side + 1, 12, device)
    for name, a, b in zip(BLOCK_NAMES, run_block(fused_blk, x, c, dy), run_block(torch_blk, x, c, dy)):
        assert a.dtype == b.dtype and rel_err(a, b) < 2e-5, f"{name}: {rel_err(a, b):.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_block_autocast_no_less_accurate_than_torch_path(device, dtype):
    """Under bf16 (fp16) autocast both paths round differently; against the float64 block each must be as close as
    the format allows (relative error < 2e-2) and the fused path no further than 1.5x the torch path's error."""
    torch_blk, fused_blk = block_pair(16, device=device)
    truth = copy.deepcopy(torch_blk).double()
    x, c, dy = block_inputs(2, 6, 5, 16, device)
    x = x.to(dtype)  # the residual stream of a network under autocast (the stem's 16-bit output)
    want = run_block(truth, x.double(), c.double(), dy.double())
    via_torch = run_block(torch_blk, x, c, dy, autocast=dtype)
    via_fused = run_block(fused_blk, x, c, dy, autocast=dtype)
    assert via_fused[0].dtype == via_torch[0].dtype == dtype
    for name, f, t, w in zip(BLOCK_NAMES, via_fused, via_torch, want):
        ef, et = rel_err(f, w), rel_err(t, w)
        assert ef < 2e-2 and ef <= 1.5 * et + 1e-3, f"{name}: fused {ef:.3g}, torch {et:.3g}"


def tiny_fcdm(device, **kw):
    args = dict(in_channels=3, hidden_size=8, depths=(1, 1, 1), num_classes=5, kernel_size=5, class_dropout_prob=0.0)
    args.update(kw)
    return randomize(create_model("FCDM-S", **args), std=0.2).to(device)


def net_inputs(device, n=2, size=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g).to(device), torch.randint(0, 1000, (n,), generator=g).to(device),
            torch.randint(0, 6, (n,), generator=g).to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_network_every_checkpointing_mode_and_label_dropout(device):
    """The whole network with --kernels triton: the torch path's output and gradients (float32), in train mode
    with label dropout (the same drop mask), and the same numbers in every checkpointing mode."""
    model = tiny_fcdm(device, class_dropout_prob=0.5)
    fused = copy.deepcopy(model)
    fused.set_kernels("triton")
    assert fused.kernels == "triton" and all(b.fused is not None for b in fused.blocks())
    x, t, y = net_inputs(device)
    drop = torch.tensor([True, False], device=device)

    def run(m):
        m.zero_grad()
        out = m(x, t, y, drop_mask=drop)
        out.square().mean().backward()
        return [out] + [p.grad.clone() for p in m.parameters()]

    want = run(model)
    first = run(fused)
    for a, b in zip(first, want):
        assert rel_err(a, b) < 2e-5
    for mode in CHECKPOINT_MODES[1:]:
        fused.set_grad_checkpointing(mode)
        for a, b in zip(run(fused), first):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    fused.set_kernels("torch")
    assert all(b.fused is None for b in fused.blocks())
    with pytest.raises(ValueError, match="kernels must be one of"):
        fused.set_kernels("cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_block_traces_the_custom_ops_without_graph_breaks(device):
    """torch.compile(fullgraph=True) through the fused block (aot_eager on CPU: AOTAutograd traces the ops'
    fake implementations and registered backward; inductor on CUDA) gives the eager fused numbers."""
    _, fused_blk = block_pair(8, device=device)
    compiled = copy.deepcopy(fused_blk)
    compiled.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor", dynamic=False)
    x, c, dy = block_inputs(2, 4, 4, 8, device)
    for name, a, b in zip(BLOCK_NAMES, run_block(compiled, x, c, dy), run_block(fused_blk, x, c, dy)):
        assert rel_err(a, b) < 1e-6, f"{name}: {rel_err(a, b):.3g}"
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_autodiff_takes_the_torch_path(device):
    """The kernels have no forward-mode rule: under torch.func.jvp the blocks run the torch path, so the jvp of
    a network set to triton kernels is the torch network's."""
    model = tiny_fcdm(device)
    model.set_handwritten_backward(depthwise=False, grn=False)  # the torch path's autograd-only form
    fused = copy.deepcopy(model)
    fused.set_kernels("triton")
    x, t, y = net_inputs(device)
    v = torch.randn_like(x)
    out, tangent = torch.func.jvp(lambda z: fused(z, t, y), (x,), (v,))
    want_out, want_tangent = torch.func.jvp(lambda z: model(z, t, y), (x,), (v,))
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(tangent, want_tangent, rtol=0, atol=0)


def test_only_fcdm_has_fused_kernels():
    dit = create_model("DiT-S/2", input_size=8, in_channels=3, num_classes=4)
    assert "DiT has no fused kernels" in kernels_problem(dit, "triton", "cuda")
    assert kernels_problem(dit, "torch", "cuda") == ""
    with pytest.raises(ValueError, match="no fused kernels"):
        use_kernels(dit, "triton", "cuda")


def test_unavailable_reasons(monkeypatch):
    assert unavailable_reason("torch", "cpu") == "" and unavailable_reason("torch", "mps") == ""
    assert "unknown kernels" in unavailable_reason("cudnn", "cuda")
    assert unavailable_reason("triton", "cuda") == ""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert unavailable_reason("triton", "cpu") == ""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in unavailable_reason("triton", "cpu")
    assert "CUDA" in unavailable_reason("triton", "mps")


@triton.jit
def _convert(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, round_to(tl.load(x_ptr + i, mask=i < n), y_ptr.dtype.element_ty), mask=i < n)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_stores_round_to_nearest_even(device):
    """The kernels' float32 -> bfloat16 conversion rounds as torch's does (to nearest, ties to even; NaN stays NaN),
    also under the interpreter, whose own conversion truncates."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**16, (4096,), generator=g, dtype=torch.int32)
    ties = (torch.randint(-2**15, 2**15, (1024,), generator=g, dtype=torch.int32) << 16) | 0x8000  # exact halves
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.3895314e38])
    x = torch.cat([torch.randn(4096, generator=g) * 100, (bits << 16 | 0x7FFF).view(torch.float32),
                   ties.view(torch.float32), special]).to(device)
    y = torch.empty_like(x, dtype=torch.bfloat16)
    _convert[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = x.bfloat16()
    same = (y.view(torch.int16) == want.view(torch.int16)) | (y.isnan() & want.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {x.numel()} conversions differ"


# ------------------------------------------------------------------------------ the programs
def test_train_py_with_triton_kernels_follows_the_torch_run(tmp_path):
    """train.py --kernels triton (under the interpreter without a GPU): the torch run's losses step by step, the
    same run name, the choice in config.json and the log, a grid drawn through the fused EMA (no grad)."""
    from test_train import TINY, make_store, metrics, run, run_dir

    store = make_store(tmp_path / "tiny.zarr")
    common = TINY + ["--zarr-path", store, "--model-kwargs", '{"kernel_size": 3}', "--global-batch-size", 8,
                     "--max-train-steps", 3, "--log-every", 1, "--ckpt-every", 3, "--sample-every", 3,
                     "--grid-steps", 2, "--grid-cols", 1]
    run(common + ["--results-dir", tmp_path / "torch"])
    run(common + ["--results-dir", tmp_path / "triton", "--kernels", "triton"])
    rt, rf = run_dir(tmp_path / "torch"), run_dir(tmp_path / "triton")
    assert rt.name == rf.name  # rounding, not the method: not in the run name
    lt, lf = ([r["loss"] for r in metrics(rd)] for rd in (rt, rf))
    assert len(lt) == len(lf) == 3
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(lf, lt)), (lf, lt)
    assert json.loads((rf / "config.json").read_text())["train"]["kernels"] == "triton"
    assert "triton kernels" in (rf / "log.txt").read_text()
    grids = [np.asarray(Image.open(rd / "samples" / "0000003.png"), dtype=np.float64) for rd in (rt, rf)]
    assert grids[0].std() > 0 and np.abs(grids[0] - grids[1]).mean() < 1.0


def test_resume_warns_when_the_kernels_change():
    from train_gen.train import check_resume_compatible

    config = {"model": "FCDM-S", "model_kwargs": {}, "objective": "flow", "objective_kwargs": {},
              "data": {"latent_norm": {"mode": "none"}}, "train": {"kernels": "torch"}}
    ckpt = {"config": dict(config, train={"kernels": "triton"}), "rng_scheme": RNG_SCHEME}
    said = []
    check_resume_compatible(ckpt, "ckpt.pt", config, False, said.append)
    assert said == ["WARNING: kernels changed from triton to torch on resume"]
    said.clear()
    check_resume_compatible(dict(ckpt, config=dict(config, train={})), "old.pt", config, False, said.append)
    assert said == []  # checkpoints from before the option: nothing to say


def test_sample_and_sample_ddp_with_triton_kernels(tmp_path):
    """sample.py and sample_ddp.py --kernels triton: the torch path's images (to a grey level), the choice in the
    sampling folder's settings, and a folder sampled with the other kernels is not silently mixed."""
    from test_sample_ddp import make_checkpoint
    from train_gen import sample, sample_ddp

    ckpt = str(make_checkpoint(tmp_path / "flow.pt", "flow"))
    grid = ["--ckpt", ckpt, "--class-labels", "1", "--sampler", "euler", "--num-sampling-steps", "1",
            "--cfg-scale", "2.0"]
    for kernels in ("torch", "triton"):
        sample.main(grid + ["--kernels", kernels, "--out", str(tmp_path / f"{kernels}.png")])
    a, b = (np.asarray(Image.open(tmp_path / f"{k}.png"), dtype=np.float64) for k in ("torch", "triton"))
    assert a.std() > 0 and np.abs(a - b).mean() < 1.0
    ddp = ["--ckpt", ckpt, "--num-fid-samples", "2", "--sampler", "euler", "--num-sampling-steps", "1",
           "--per-proc-batch-size", "2"]
    sample_ddp.main(ddp + ["--sample-dir", str(tmp_path / "torch")])
    sample_ddp.main(ddp + ["--sample-dir", str(tmp_path / "triton"), "--kernels", "triton"])
    (za,), (zb,) = (list((tmp_path / k).glob("*.npz")) for k in ("torch", "triton"))
    xa, xb = (np.load(z)["arr_0"].astype(np.float64) for z in (za, zb))
    assert np.abs(xa - xb).mean() < 1.0
    settings = next((tmp_path / "triton").glob("*/" + sample_ddp.SETTINGS_FILE))
    assert json.loads(settings.read_text())["kernels"] == "triton"
    with pytest.raises(UserError, match="kernels"):
        sample_ddp.main(ddp + ["--sample-dir", str(tmp_path / "triton")])
