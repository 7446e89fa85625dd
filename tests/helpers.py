"""Helpers shared by the network tests (imported as `from helpers import ...`; pytest puts tests/ on the path)."""
import pytest
import torch


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
