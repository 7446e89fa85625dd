"""Every fast path of models.fcdm.FCDM against the paper-mode reference (models.fcdm_reference):
channels-last + matmul pointwise convs, kernel crop, fast GRN, the hand-written backward passes
(GRN; depthwise conv on CPU) and the library/autograd ones they replace, checkpoint modes, 2/3/4
levels, bf16 autocast, the optimized training step (foreach AdamW + foreach EMA), torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import randomize
from models.fcdm import FCDM
from models.fcdm_reference import (
    FCDMReference,
    GRNReference,
    fcdm_to_reference_state_dict,
    reference_to_fcdm_state_dict,
)
from models.layers import GRN, DepthwiseConv
from train_gen.ema import create_ema, update_ema, update_ema_reference


def tiny(**kw):
    args = dict(in_channels=4, hidden_size=16, depths=(1, 1, 2, 1, 1), num_classes=10, class_dropout_prob=0.0)
    args.update(kw)
    return FCDM(**args)


def batch(n=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 4, size, size, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )


def grads_in_fcdm_shapes(ref: FCDMReference, like: FCDM) -> dict:
    g = {n: p.grad for n, p in ref.named_parameters()}
    return reference_to_fcdm_state_dict(g, dict(like.named_parameters()))


def assert_same_forward_backward(model: FCDM, ref: FCDMReference, x, t, y, tol=2e-4):
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    out = model(xa, t, y)
    ref_out = ref(xb, t, y)
    assert out.shape == ref_out.shape and out.abs().max() > 1e-2  # not the zero output of the init
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=tol, atol=tol)
    ref_grads = grads_in_fcdm_shapes(ref, model)
    for n, p in model.named_parameters():
        scale = max(1.0, ref_grads[n].abs().max().item())  # sums over many terms: relative to the grad's size
        torch.testing.assert_close(p.grad / scale, ref_grads[n] / scale, rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


# -- conversion ----------------------------------------------------------------------------------


def test_state_dict_round_trip():
    model = randomize(tiny())
    ref = FCDMReference.from_fcdm(model)
    sd = model.state_dict()
    ref_sd = ref.state_dict()
    assert ref_sd["encoder.0.0.pwconv1.weight"].shape == (48, 16, 1, 1)
    assert sd["encoder.0.0.pwconv1.weight"].shape == (48, 16)
    back = reference_to_fcdm_state_dict(ref_sd, sd)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    with pytest.raises(KeyError):
        fcdm_to_reference_state_dict({k: v for k, v in sd.items() if "fuse" not in k}, ref_sd)


# -- the whole network: outputs and gradients ----------------------------------------------------


@pytest.mark.parametrize(
    "depths,size",
    [
        ((1, 1, 2, 1, 1), 16),  # 3 levels, 16/8/4 maps: no crop (a 4x4 map still uses all 7 taps)
        ((1, 1, 2, 1, 1), 8),  # 3 levels, 8/4/2 maps: crop at 2x2 (and 4x4 keeps r=3)
        ((1, 2, 1), 16),  # 2 levels
        ((1, 1, 1, 2, 1, 1, 1), 16),  # 4 levels, 16/8/4/2: crop at 2x2
        ((1, 1, 1, 2, 1, 1, 1), 8),  # 4 levels down to 1x1: crop to a single tap
    ],
)
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_optimized_matches_reference(depths, size, mode):
    model = randomize(tiny(depths=depths))
    model.set_grad_checkpointing(mode)
    ref = FCDMReference.from_fcdm(model, grad_checkpointing=True)
    assert_same_forward_backward(model, ref, *batch(size=size))


@pytest.mark.parametrize("mode", ["none", "selective"])
@pytest.mark.parametrize("depthwise,grn", [(False, False), (False, True), (True, False)])
def test_library_and_autograd_backward_paths_match_reference(depthwise, grn, mode):
    """The paths that replace a hand-written backward (the library's depthwise backward is what CUDA
    runs) give the reference's outputs and gradients too, down to cropped 2x2 and 1x1 maps."""
    model = randomize(tiny(depths=(1, 1, 1, 2, 1, 1, 1)))
    model.set_handwritten_backward(depthwise=depthwise, grn=grn)
    model.set_grad_checkpointing(mode)
    ref = FCDMReference.from_fcdm(model, grad_checkpointing=True)
    assert_same_forward_backward(model, ref, *batch(size=8))


def test_kernel_sizes_and_reference_checkpointing_switch():
    model = randomize(tiny(kernel_size=5, depths=(1, 1, 1)))
    ref = FCDMReference.from_fcdm(model, grad_checkpointing=False)
    assert_same_forward_backward(model, ref, *batch(size=4))  # 4x4 -> 2x2: crop 5 -> 3 taps


def test_label_dropout_draws_the_same_labels():
    model = randomize(tiny(class_dropout_prob=0.5))
    ref = FCDMReference.from_fcdm(model)
    x, t, y = batch(n=8)
    torch.manual_seed(3)
    a = model(x, t, y)
    torch.manual_seed(3)
    b = ref(x, t, y)
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


# -- layers --------------------------------------------------------------------------------------


def test_grn_fast_path_matches_torch_norm_reference_with_gradients():
    fast, ref = GRN(12), GRNReference(12)
    randomize(fast)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 5, 6, 12)  # NHWC for the fast path
    xa = x.clone().requires_grad_(True)
    xb = x.permute(0, 3, 1, 2).clone().requires_grad_(True)  # NCHW for the reference
    a = fast(xa)
    b = ref(xb)
    torch.testing.assert_close(a, b.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    w = torch.randn(a.shape)
    (a * w).sum().backward()
    (b * w.permute(0, 3, 1, 2)).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)


def graph_node_names(t: torch.Tensor) -> set:
    """Names of the autograd nodes that produced t."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return {node.name() for node in seen}


def test_grn_handwritten_backward_passes_gradcheck():
    """Against finite differences in float64, incl. an all-zero channel (zero subgradient of its norm)."""
    grn = GRN(6).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64, generator=g)
    x[1, ..., 2] = 0
    w, b = (torch.randn(6, dtype=torch.float64, generator=g) for _ in range(2))

    def f(x, w, b):
        return functional_call(grn, {"weight": w, "bias": b}, (x,))

    assert "_GRNFunctionBackward" in graph_node_names(f(x, w.requires_grad_(), b))  # the path checked
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("size,kernel", [((5, 6), 3), ((6, 6), 5), ((2, 3), 7), ((1, 1), 5)])
def test_depthwise_handwritten_cpu_backward_passes_gradcheck(size, kernel):
    """Input, weight and bias gradients of the CPU backward against finite differences in float64,
    with the kernel cropped where the map is smaller than it."""
    conv = DepthwiseConv(3, kernel).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *size, 3, dtype=torch.float64, generator=g)
    w = torch.randn(3, 1, kernel, kernel, dtype=torch.float64, generator=g)
    b = torch.randn(3, dtype=torch.float64, generator=g)

    def f(x, w, b):
        return functional_call(conv, {"weight": w, "bias": b}, (x,))

    assert "_DepthwiseConvCPUBackward" in graph_node_names(f(x, w, b.requires_grad_()))  # the path checked
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_(), b))


def test_handwritten_backward_under_bf16_autocast():
    """bf16 autocast through both hand-written backward passes: bf16 activations, float32 parameter
    gradients, close to the library/autograd paths under the same autocast."""
    model = randomize(tiny(), std=0.1)
    x, t, y = batch()
    grads = {}
    for handwritten in (True, False):
        model.zero_grad(set_to_none=True)
        model.set_handwritten_backward(depthwise=handwritten, grn=handwritten)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        grads[handwritten] = {n: p.grad for n, p in model.named_parameters()}
    for n, g in grads[True].items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n
        ref = grads[False][n]
        assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-6, n


def test_bf16_autocast_keeps_float32_statistics():
    grn = randomize(GRN(8))
    x = torch.randn(2, 4, 4, 8) * 50  # large values: bf16 sums of squares would lose digits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grn(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), grn(x.bfloat16().float()), rtol=2e-2, atol=0.5)
    model = randomize(tiny(), std=0.1)
    x, t, y = batch()
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 5e-2, rel


# -- the optimized training step against the baseline training step --------------------------------


def test_training_step_foreach_adamw_and_ema_match_baseline():
    """Two training steps: the networks give the same gradients (allclose), and on identical gradients
    the foreach AdamW + foreach EMA of the optimized loop equal the baseline's default AdamW +
    per-parameter EMA loop. (Feeding each optimizer its own network's gradients would compare Adam's
    first steps, lr * g / |g|, on near-zero gradients whose sign is float noise.)"""
    model = randomize(tiny(), std=0.1)
    ref = FCDMReference.from_fcdm(model)  # checkpoints every block
    model.set_grad_checkpointing("selective")
    ema, ref_ema = create_ema(model), create_ema(ref)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, foreach=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0, foreach=False)
    x, t, y = batch(n=4)
    target = torch.randn(4, 8, 16, 16)
    for step in range(2):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # both networks drop the same labels (class dropout uses the global RNG)
            F.mse_loss(m(x, t, y), target).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        ref_grads = dict(ref.named_parameters())
        for n, g in reference_to_fcdm_state_dict({n: p.grad for n, p in ref_grads.items()}, grads).items():
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"grad {n}: {m}")
        for n, g in fcdm_to_reference_state_dict(grads, {n: p.grad for n, p in ref_grads.items()}).items():
            ref_grads[n].grad = g.clone()  # identical gradients for both optimizers
        for m, o, e, upd in ((model, opt, ema, update_ema), (ref, ref_opt, ref_ema, update_ema_reference)):
            o.step()
            upd(e, m, 0.9)
    for a, b in ((model, ref), (ema, ref_ema)):
        conv = reference_to_fcdm_state_dict(b.state_dict(), a.state_dict())
        for k, v in a.state_dict().items():
            torch.testing.assert_close(v, conv[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


# -- torch.compile -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "full"])
def test_compiled_blocks_match_eager_with_checkpointing(mode):
    """compile_blocks composes with checkpointing and gives the eager result (aot_eager backend: the
    traced graph, without paying for C++ code generation in a unit test)."""
    torch._dynamo.reset()
    model = randomize(tiny(depths=(1, 1, 1)))
    ref = FCDMReference.from_fcdm(model, grad_checkpointing=False)
    model.set_grad_checkpointing(mode)
    model.compile_blocks(backend="aot_eager", fullgraph=True)  # default dynamic=False: levels differ in shape
    assert_same_forward_backward(model, ref, *batch(size=8))
