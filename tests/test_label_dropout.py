"""Label dropout across the U-Net levels: "shared" (paper; one draw per sample) vs "per-level" (the
authors' release; each level's embedder draws on its own), and train.py's --label-dropout flag."""
from __future__ import annotations

import math

import pytest
import torch

from models.fcdm import FCDM

P = 0.1


def _mixed_fraction(mode: str, n: int) -> float:
    torch.manual_seed(0)
    model = FCDM(in_channels=1, hidden_size=4, depths=(0, 0, 0, 0, 0), num_classes=10, class_dropout_prob=P,
                 learn_sigma=False, label_dropout=mode).train()
    y = torch.randint(0, 10, (n,))
    levels = torch.stack(model.level_labels(y))  # (3, n)
    dropped = levels == model.num_classes
    mixed = dropped.any(0) & ~dropped.all(0)
    return mixed.double().mean().item()


def test_per_level_mixes_labels_at_the_binomial_rate_shared_never():
    n = 200_000
    expected = 1 - ((1 - P) ** 3 + P ** 3)  # 0.271: not all kept and not all dropped
    sd = math.sqrt(expected * (1 - expected) / n)  # binomial standard error, ~0.001
    got = _mixed_fraction("per-level", n)
    assert abs(got - expected) < 5 * sd, (got, expected, sd)
    assert _mixed_fraction("shared", n) == 0.0


def test_train_flag_goes_into_model_kwargs_and_run_name():
    from train_gen.run_folder import experiment_name
    from train_gen.train import build_parser, resolve_model_kwargs

    data = {"latent_shape": (4, 8, 8), "num_classes": 10}
    names = {}
    for flags in ([], ["--label-dropout", "shared"], ["--label-dropout", "per-level"]):
        args = build_parser().parse_args(["--zarr-path", "s", "--model", "FCDM-S", *flags])
        kwargs, user = resolve_model_kwargs(args, data["latent_shape"], data["num_classes"])
        names[tuple(flags)] = experiment_name("FCDM-S", "diffusion", "d", 8, 1e-4, 0,
                                              extra={"model": user} if user else None)
        if args.label_dropout == "per-level":
            assert kwargs["label_dropout"] == "per-level" == user["label_dropout"]
        else:
            assert "label_dropout" not in kwargs  # the default stays out: the run name equals the one without the flag
    assert names[()] == names[("--label-dropout", "shared")] != names[("--label-dropout", "per-level")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--zarr-path", "s", "--label-dropout", "per-sample"])
