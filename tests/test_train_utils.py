"""train_gen/ema.py, train_gen/run_folder.py and fcdm_common/rng.py against plain references."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn

from fcdm_common.rng import capture_rng, restore_rng
from train_gen.ema import create_ema, update_ema, update_ema_reference
from train_gen.run_folder import (
    experiment_name,
    list_checkpoints,
    prune_checkpoints,
    truncate_metrics,
)


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))


def test_foreach_ema_matches_reference_loop():
    model, ema_a = _net(0), _net(1)
    ema_b = _net(1)
    model[1].running_mean.fill_(0.25)
    for decay in (0.9, 0.5):
        update_ema(ema_a, model, decay)
        update_ema_reference(ema_b, model, decay)
    for (n, a), b in zip(ema_a.state_dict().items(), ema_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    # the formula itself, on one tensor: e2 = d2 * (d1 * e0 + (1 - d1) p) + (1 - d2) p
    e0, p = _net(1)[0].weight, model[0].weight
    want = 0.5 * (0.9 * e0 + 0.1 * p) + 0.5 * p
    torch.testing.assert_close(ema_a[0].weight, want)
    assert torch.equal(ema_a[1].running_mean, model[1].running_mean)  # buffers copied


def test_ema_weight_zero_and_decay_zero():
    model, ema = _net(0), _net(1)
    before = {k: v.clone() for k, v in ema.state_dict().items() if "running" not in k and "num_batches" not in k}
    update_ema(ema, model, 0.9999, weight=torch.zeros(()))  # a skipped step does not move the EMA
    for k, v in before.items():
        assert torch.equal(ema.state_dict()[k], v)
    update_ema(ema, model, 0.5, weight=torch.ones(()))  # weight 1: the plain update
    update_ema_reference(before_ref := _net(1), model, 0.5)
    torch.testing.assert_close(ema[0].weight, before_ref[0].weight)
    update_ema(ema, model, 0.0)  # decay 0 copies exactly (DiT's start of training)
    for k, v in model.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v)
    copy = create_ema(model)
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())


def test_rng_capture_restore_roundtrip():
    g = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    random.random(), np.random.normal(), torch.rand(1), torch.rand(1, generator=g)  # mid-stream (numpy gauss cache)
    state = capture_rng({"t": g})
    want = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3), torch.rand(3, generator=g))
    torch.save(state, "/dev/null")  # plain values only
    random.seed(9), np.random.seed(9), torch.manual_seed(9), g.manual_seed(9)
    restore_rng(state, {"t": g})
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3), torch.rand(3, generator=g))
    assert want[:3] == got[:3] and torch.equal(want[3], got[3]) and torch.equal(want[4], got[4])


def test_rng_state_loads_weights_only(tmp_path):
    torch.save(capture_rng({"t": torch.Generator()}), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    restore_rng(state, {"t": torch.Generator()})


def test_prune_keeps_last_and_every(tmp_path):
    for s in range(10, 110, 10):
        (tmp_path / f"{s:07d}.pt").write_bytes(b"x")
        (tmp_path / f"{s:07d}-ema.safetensors").write_bytes(b"x")
    prune_checkpoints(tmp_path, keep_last=2, keep_every=40)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40, 80, 90, 100]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        f"{s:07d}-ema.safetensors" for s in (40, 80, 90, 100)]


def test_experiment_name_is_stable_and_distinct():
    a = experiment_name("DiT-XL/2", "diffusion", "imagenet256", 256, 1e-4, 0)
    assert a == "DiT-XL-2-diffusion-imagenet256-bs256-lr1e-4-seed0"
    assert a == experiment_name("DiT-XL/2", "diffusion", "imagenet256", 256, 1e-4, 0, extra={})
    b = experiment_name("DiT-XL/2", "diffusion", "imagenet256", 256, 1e-4, 0, extra={"model": {"kernel_size": 5}})
    c = experiment_name("DiT-XL/2", "diffusion", "imagenet256", 256, 1e-4, 0, extra={"model": {"kernel_size": 3}})
    assert len({a, b, c}) == 3


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10}\n{"step": 20}\n{"step": 30}\n{"ste')
    truncate_metrics(path, 20)
    assert path.read_text() == '{"step": 10}\n{"step": 20}\n'


def test_trajectory_settings_change_the_run_name():
    from train_gen.config import run_name_extra
    from train_gen.run_folder import experiment_name
    from train_gen.train import build_parser

    def name(*flags):
        args = build_parser().parse_args(["--zarr-path", "s", *flags])
        return experiment_name("FCDM-S", "diffusion", "d", 256, 1e-4, 0,
                               extra=run_name_extra({}, {}, vars(args)) or None)

    plain = name()
    assert plain == "FCDM-S-diffusion-d-bs256-lr1e-4-seed0"  # defaults keep the readable name
    assert name("--hflip", "true", "--ema-decay", "0.9999") == plain  # explicit defaults too
    variants = {name("--hflip", "false"), name("--ema-decay", "0.999"), name("--weight-decay", "0.01"),
                name("--grad-clip", "1.0")}
    assert len(variants) == 4 and plain not in variants
