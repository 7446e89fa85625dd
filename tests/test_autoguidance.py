"""Autoguidance (diffusion/guidance.py): the guided prediction, every sampler, the guide check, sample.py,
sample_ddp.py and the grids and evaluations of train.py.

References: closed-form identities (an identical guide gives the main model for any w; w = 0 gives the
guide alone, w = 1 the main model alone), the formula on a hand-computed toy network, sample_ddp.py's
archive for other batch sizes and process counts, and sample_ddp.py on the checkpoint an evaluation during
training scored.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion
from diffusion.guidance import GuidedModel, resolve_guidance
from diffusion.sampling import SamplerSettings, generate, load_setup
from fcdm_common.cli import UserError
from helpers import one_thread, run_torchrun  # noqa: F401  (one_thread: fixture, used through pytestmark)
from models import create_model
from models.checkpoints import save_checkpoint
from test_guidance import NULL, ToyNet
from test_in_training import METRICS, _eval_flags, records
from test_in_training import ref as ref  # noqa: F401  (fixture)
from test_train import TINY, assert_same_state, make_store, run_train
from train_gen import evaluate, sample, sample_ddp

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


class OtherToyNet(ToyNet):
    """A second deterministic network standing in for a weaker guide: another prediction (the first C channels);
    its learned variance is ToyNet's, or another one with `same_variance=False`."""

    def __init__(self, learn_sigma=True, t_scale=1000.0, same_variance=True):
        super().__init__(learn_sigma, t_scale)
        self.same_variance = same_variance

    def __call__(self, x, t, y):
        out = super().__call__(x, t, y).clone()
        c = x.shape[1] if self.same_variance else out.shape[1]
        out[:, :c] = 0.7 * out[:, :c] + 0.02 * (y.float().reshape(-1, 1, 1, 1) - 3.0)
        return out


class Forbidden:
    """A guide that must not be called."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("the guide was called")


# ----------------------------------------------------------------------------- the guided prediction
def test_identical_guide_gives_the_main_model_for_any_weight():
    x, t, y = torch.randn(4, 4, 3, 3), torch.tensor([10, 500, 900, 999]), torch.tensor([0, 1, 2, 9])
    main = ToyNet()(x, t, y)
    for w in (0.0, 0.5, 2.0, 7.5, 100.0):
        for k in ("all", 3):
            out = GuidedModel(ToyNet(), w, NULL, k, guide=ToyNet())(x, t, y)
            assert torch.equal(out, main), (w, k)


def test_weight_one_is_the_main_model_and_zero_is_the_guide():
    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([5, 50, 500]), torch.tensor([1, 2, 3])
    assert torch.equal(GuidedModel(ToyNet(), 1.0, NULL, guide=Forbidden())(x, t, y), ToyNet()(x, t, y))
    out = GuidedModel(ToyNet(), 0.0, NULL, guide=OtherToyNet(same_variance=False))(x, t, y)
    guide, main = OtherToyNet(same_variance=False)(x, t, y), ToyNet()(x, t, y)
    assert not torch.allclose(guide[:, 4:], main[:, 4:])
    assert torch.equal(out[:, :4], guide[:, :4])  # the guided (epsilon) channels: the guide's
    assert torch.equal(out[:, 4:], main[:, 4:])  # the learned variance: always the main model's


def test_autoguidance_formula_channels_and_interval():
    x, t, y = torch.randn(5, 4, 2, 2), torch.tensor([0, 200, 400, 600, 999]), torch.tensor([0, 1, 2, 3, 4])
    main, weak = ToyNet()(x, t, y), OtherToyNet(same_variance=False)(x, t, y)
    for k, ch in (("all", 4), (3, 3)):
        out = GuidedModel(ToyNet(), 2.5, NULL, k, guide=OtherToyNet(same_variance=False))(x, t, y)
        ref = main.clone()
        ref[:, :ch] = weak[:, :ch] + 2.5 * (main[:, :ch] - weak[:, :ch])
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, :ch], main[:, :ch])  # the guide did change the output
    # interval [0.3, 0.7] of t / 1000: rows 2 and 3 (0.4, 0.6) are guided; the guide sees only them
    guide = OtherToyNet()
    out = GuidedModel(ToyNet(), 2.5, NULL, "all", (0.3, 0.7), noise_level_fn=lambda tt: tt.float() / 1000,
                      guide=guide)(x, t, y)
    assert guide.batches == [2]
    inside = [2, 3]
    ref = main.clone()
    ref[inside, :4] = weak[inside, :4] + 2.5 * (main[inside, :4] - weak[inside, :4])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # no row inside: the main model alone, the guide never called
    out = GuidedModel(ToyNet(), 2.5, NULL, "all", (0.0, 0.1), noise_level_fn=lambda tt: torch.ones_like(tt.float()),
                      guide=Forbidden())(x, t, y)
    assert torch.equal(out, main)


DIFFUSION = [("ddpm", 6), ("ddim", 6), ("dpm++2m", 5)]
FLOW = [("euler", 4), ("heun", 3), ("sde", 5), ("dopri5", 1)]


@pytest.mark.parametrize("objective_name,sampler,steps", [("diffusion", s, n) for s, n in DIFFUSION]
                         + [("flow", s, n) for s, n in FLOW])
def test_every_sampler_identical_guide_is_unguided_and_zero_weight_is_the_guide(objective_name, sampler, steps):
    diff = objective_name == "diffusion"
    objective = diffusion.create_diffusion() if diff else diffusion.create_flow()
    scale = 1000.0 if diff else 1.0
    noise, y = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 7])

    def draw(model, w, guide=None, interval=None):
        return diffusion.sample(model, noise, y, objective=objective, sampler=sampler, num_steps=steps, cfg_scale=w,
                                null_label=NULL, guide=guide, guidance_interval=interval,
                                generators=[torch.Generator().manual_seed(i) for i in range(3)])

    plain = draw(ToyNet(diff, scale), 1.0)
    for w in (0.5, 3.0):
        assert torch.equal(draw(ToyNet(diff, scale), w, ToyNet(diff, scale)), plain), w
    assert torch.equal(draw(ToyNet(diff, scale), 3.0, ToyNet(diff, scale), (0.2, 0.6)), plain)
    # w = 0: the guide's own samples; a real guide changes them
    assert torch.equal(draw(ToyNet(diff, scale), 0.0, OtherToyNet(diff, scale)), draw(OtherToyNet(diff, scale), 1.0))
    assert not torch.allclose(draw(ToyNet(diff, scale), 3.0, OtherToyNet(diff, scale)), plain)


def test_resolve_guidance():
    assert resolve_guidance(None, None) == "cfg" and resolve_guidance(None, "g.pt") == "autoguidance"
    assert resolve_guidance("autoguidance", "g.pt") == "autoguidance"
    with pytest.raises(UserError, match="needs --guide-ckpt"):
        resolve_guidance("autoguidance", None)
    with pytest.raises(UserError, match="--guidance is cfg"):
        resolve_guidance("cfg", "g.pt")


# ----------------------------------------------------------------------------- checkpoints
NUM_CLASSES = 10


def tiny_ckpt(path, objective="diffusion", seed=0, num_classes=NUM_CLASSES, side=16, step=1, data=None,
              objective_kwargs=None, hidden=16, learn_sigma=None, vae=None):
    """A tiny pixel-space FCDM-digits checkpoint with weights moved off their zero init."""
    kw = dict(hidden_size=hidden, depths=(1, 1, 1, 1, 1), in_channels=3, num_classes=num_classes,
              learn_sigma=objective == "diffusion" if learn_sigma is None else learn_sigma)
    torch.manual_seed(seed)
    model = create_model("FCDM-digits", **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = dict(latent_shape=[3, side, side], num_classes=num_classes, image_size=side, vae="none", scaling_factor=1.0)
    d.update(data or {})
    config = dict(model="FCDM-digits", model_kwargs=kw, objective=objective, objective_kwargs=objective_kwargs or {},
                  data=d, vae=vae or dict(vae="none", hf_model_name=None, hf_model_dir=None))
    save_checkpoint(dict(model=model.state_dict(), ema=model.state_dict(), step=step, config=config), path)
    return Path(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ag")
    return {"main": tiny_ckpt(root / "main.pt", seed=0, step=40),
            "guide": tiny_ckpt(root / "guide.pt", seed=5, step=10, hidden=8),  # smaller and "earlier"
            "flow": tiny_ckpt(root / "flow.pt", "flow", seed=1), "flow_guide": tiny_ckpt(root / "fg.pt", "flow", 2),
            "root": root}


def test_mismatched_guides_are_refused_naming_both_checkpoints(ckpts):
    root = ckpts["root"]
    bad = {
        "objective": tiny_ckpt(root / "b_obj.pt", "flow"),
        "classes": tiny_ckpt(root / "b_cls.pt", num_classes=4),
        "sample shape": tiny_ckpt(root / "b_side.pt", side=8),
        "latent normalisation": tiny_ckpt(root / "b_norm.pt", data=dict(
            latent_norm={"mode": "channel", "mean": [0.1, 0.2, 0.3], "std": [1.0, 1.1, 1.2]})),
        "latent space": tiny_ckpt(root / "b_vae.pt", data=dict(vae="sd:other-vae", scaling_factor=0.5),
                                  vae=dict(vae="sd", hf_model_name="someone/other-vae", hf_model_dir=None)),
        "objective ": tiny_ckpt(root / "b_sched.pt", objective_kwargs={"noise_schedule": "squaredcos_cap_v2"}),
    }
    for what, path in bad.items():
        with pytest.raises(UserError) as e:
            load_setup(ckpts["main"], guide_ckpt=path)
        msg = str(e.value)
        assert str(path) in msg and str(ckpts["main"]) in msg and what.strip() in msg and "\n" not in msg, msg
    # the guide's own differences that do not matter: its width, seed, step (and learned sigma, see below)
    setup = load_setup(ckpts["main"], guide_ckpt=ckpts["guide"], guide_use_ema=False)
    assert setup.guide.model_name == "FCDM-digits" and setup.guide.step == 10 and not setup.guide.use_ema
    assert not any(p.requires_grad for p in setup.guide.model.parameters())
    with pytest.raises(UserError, match="file not found"):
        load_setup(ckpts["main"], guide_ckpt=root / "missing.pt")
    # the command line: exit status 2, one line naming both checkpoints, nothing written
    out = root / "never.png"
    proc = subprocess.run([sys.executable, str(REPO / "train_gen" / "sample.py"), "--ckpt", str(ckpts["main"]),
                           "--guide-ckpt", str(bad["classes"]), "--out", str(out), "--num-sampling-steps", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad["classes"]) in lines[0] and "classes 10 vs 4" in lines[0], proc.stderr


def test_guide_without_learned_sigma_guides_a_learned_sigma_model(ckpts, tmp_path):
    """iDDPM: the variance channels come from the main model, so the guide's own variance does not matter."""
    guide = tiny_ckpt(tmp_path / "nosigma.pt", seed=3, learn_sigma=False, objective_kwargs={"learn_sigma": False})
    setup = load_setup(ckpts["main"], guide_ckpt=guide)
    assert setup.guide.model.out_channels == 3 and setup.model.out_channels == 6
    settings = SamplerSettings("ddpm", 4, cfg_scale=2.0, guidance="autoguidance")
    images, _ = generate(setup, range(3), settings, seed=0)
    plain, _ = generate(setup, range(3), SamplerSettings("ddpm", 4), seed=0)
    assert images.shape == (3, 16, 16, 3) and not np.array_equal(images, plain)


def test_sample_py_autoguidance_and_flags(ckpts, tmp_path, capsys):
    args = ["--ckpt", str(ckpts["main"]), "--class-labels", "1", "2", "3", "--num-sampling-steps", "4",
            "--sampler", "ddim", "--cfg-scale", "2", "--seed", "3"]
    sample.main([*args, "--guide-ckpt", str(ckpts["guide"]), "--out", str(tmp_path / "ag.png")])
    assert "autoguidance 2.0 by FCDM-digits step 10 (ema)" in capsys.readouterr().out
    sample.main([*args, "--out", str(tmp_path / "cfg.png")])
    setup = load_setup(ckpts["main"], guide_ckpt=ckpts["guide"])
    ref, _ = generate(setup, range(3), SamplerSettings("ddim", 4, cfg_scale=2.0, guidance="autoguidance"), seed=3,
                      labels=[1, 2, 3])
    from fcdm_common.images import make_grid

    ag = np.asarray(Image.open(tmp_path / "ag.png"))
    assert np.array_equal(ag, make_grid(ref, nrow=2))
    assert not np.array_equal(ag, np.asarray(Image.open(tmp_path / "cfg.png")))
    with pytest.raises(UserError, match="needs --guide-ckpt"):
        sample.main([*args, "--guidance", "autoguidance", "--out", str(tmp_path / "x.png")])
    with pytest.raises(UserError, match="--guidance is cfg"):
        sample.main([*args, "--guidance", "cfg", "--guide-ckpt", str(ckpts["guide"]), "--out", str(tmp_path / "x.png")])
    with pytest.raises(UserError, match="--time-shift applies to flow checkpoints"):
        sample.main([*args, "--time-shift", "0.5", "--out", str(tmp_path / "x.png")])


AG_ARGS = ["--num-fid-samples", 9, "--sampler", "dpm++2m", "--num-sampling-steps", 4, "--cfg-scale", 2.5,
           "--forward-batch", 4, "--label-sampling", "random", "--global-seed", 5, "--device", "cpu"]


def test_sample_ddp_autoguidance_archive_is_the_same_for_any_batch_and_process_count(ckpts, tmp_path):
    def archive(out, *extra, torchrun=False):
        argv = ["--ckpt", ckpts["main"], "--guide-ckpt", ckpts["guide"], "--sample-dir", out, *AG_ARGS, *extra]
        if torchrun:
            run_torchrun(REPO / "train_gen" / "sample_ddp.py", [str(a) for a in argv], timeout=240)
        else:
            sample_ddp.main([str(a) for a in argv])
        (npz,) = Path(out).glob("*.npz")
        return npz

    a = archive(tmp_path / "a", "--per-proc-batch-size", 3)
    b = archive(tmp_path / "b", "--per-proc-batch-size", 5)
    c = archive(tmp_path / "c", "--per-proc-batch-size", 2, torchrun=True)
    with np.load(a) as za, np.load(b) as zb, np.load(c) as zc:
        assert np.array_equal(za["arr_0"], zb["arr_0"]) and np.array_equal(za["arr_0"], zc["arr_0"])
        assert np.array_equal(za["arr_1"], zb["arr_1"])
        setup = load_setup(ckpts["main"], guide_ckpt=ckpts["guide"])
        ref, labels = generate(setup, range(9), SamplerSettings("dpm++2m", 4, cfg_scale=2.5, guidance="autoguidance",
                                                                forward_batch=4), seed=5)
        assert np.array_equal(za["arr_0"], ref) and np.array_equal(za["arr_1"], labels)
    assert "-ag2.5-FCDM-digits-guide-ema-" in a.name
    meta = json.loads(a.with_suffix(".json").read_text())
    settings = meta["settings"]
    assert settings["guidance"] == "autoguidance" and settings["guide"]["step"] == 10
    from fcdm_common.io import sha256_file

    assert settings["guide"]["checkpoint_sha256"] == sha256_file(ckpts["guide"])
    assert meta["guide_checkpoint"] == str(ckpts["guide"].resolve())
    # without a guide, the settings record nothing new (folders sampled before keep matching their command)
    sample_ddp.main([str(v) for v in ["--ckpt", ckpts["main"], "--sample-dir", tmp_path / "plain", *AG_ARGS]])
    (plain,) = (tmp_path / "plain").glob("*.json")
    assert not {"guidance", "guide", "time_shift"} & set(json.loads(plain.read_text())["settings"])


def test_flow_autoguidance_with_every_flow_sampler_via_generate(ckpts):
    setup = load_setup(ckpts["flow"], guide_ckpt=ckpts["flow_guide"])
    same = load_setup(ckpts["flow"], guide_ckpt=ckpts["flow"])  # a guide identical to the model
    for sampler, steps in FLOW:
        ag = SamplerSettings(sampler, steps, cfg_scale=2.0, guidance="autoguidance", forward_batch=4)
        plain = SamplerSettings(sampler, steps, cfg_scale=1.0, forward_batch=4)
        a, _ = generate(same, range(4), ag, seed=1)
        b, _ = generate(same, range(4), plain, seed=1)
        assert np.array_equal(a, b), sampler
        c, _ = generate(setup, range(4), ag, seed=1)
        assert not np.array_equal(c, b), sampler


# ----------------------------------------------------------------------------- training: grids and evaluations
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "tiny.zarr")


def test_training_grids_and_evaluations_with_a_guide(store, ref, tmp_path):  # noqa: F811  (ref: fixture)
    common = TINY + ["--zarr-path", store, "--exp-name", "run", "--log-every", 3, "--sample-every", 6,
                     "--grid-steps", 2, "--grid-cols", 2, "--ckpt-every", 100, "--keep-last", 5]
    run_train(common + ["--results-dir", tmp_path / "guide", "--max-train-steps", 3])
    guide = tmp_path / "guide" / "run" / "checkpoints" / "0000003.pt"
    run_train(common + ["--results-dir", tmp_path / "ag", "--max-train-steps", 6, "--guide-ckpt", guide,
                        "--cfg-scale", 3.0, "--eval-cfg-scale", 2.0, "--eval-keep-samples", "true"]
              + _eval_flags(ref, 6, 24, batch=8))
    run_train(common + ["--results-dir", tmp_path / "cfg", "--max-train-steps", 6, "--cfg-scale", 3.0])
    rd, plain = tmp_path / "ag" / "run", tmp_path / "cfg" / "run"
    # the guide changes no bit of training
    assert_same_state(torch.load(rd / "checkpoints" / "0000006.pt", weights_only=True),
                      torch.load(plain / "checkpoints" / "0000006.pt", weights_only=True))
    config = json.loads((rd / "config.json").read_text())
    assert config["log"]["grid_guidance"] == "autoguidance" and config["log"]["guide_ckpt"] == str(guide)
    assert "autoguidance guide of the grids/evaluations: FCDM-digits" in (rd / "log.txt").read_text()
    grid = Image.open(rd / "samples" / "0000006.png")
    assert grid.text["guidance"] == "autoguidance"
    assert not np.array_equal(np.asarray(grid), np.asarray(Image.open(plain / "samples" / "0000006.png")))
    # the evaluation's samples are sample_ddp.py's with the same guide, and its numbers evaluate.py's
    (r,) = records(rd, "eval")
    assert r["eval_guidance"] == "autoguidance"
    out = tmp_path / "ddp"
    sample_ddp.main(["--ckpt", str(rd / "checkpoints" / "0000006.pt"), "--guide-ckpt", str(guide),
                     "--sample-dir", str(out), "--num-fid-samples", "24", "--sampler", "ddim",
                     "--num-sampling-steps", "3", "--cfg-scale", "2", "--per-proc-batch-size", "8",
                     "--forward-batch", "8", "--global-seed", "0", "--device", "cpu"])
    (archive,) = out.glob("*-24.npz")
    with np.load(archive) as a, np.load(rd / "eval" / "0000006-samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    result = evaluate.main(["--sample-batch", str(archive), "--ref-batch", str(ref), "--backend", "digits",
                            "--output-json", str(out / "eval.json")])
    for k in METRICS:
        assert result["metrics"][k] == r[k], k


def test_training_refuses_a_guide_that_does_not_fit_before_writing(store, tmp_path):
    common = TINY + ["--zarr-path", store, "--exp-name", "run", "--max-train-steps", 2, "--sample-every", 0]
    other = tiny_ckpt(tmp_path / "other.pt", side=16)  # 10 classes, 3x16x16: the store is 4 classes, 3x8x8
    with pytest.raises(UserError) as e:
        run_train(common + ["--results-dir", tmp_path / "res", "--guide-ckpt", other])
    assert str(other) in str(e.value) and "the run" in str(e.value) and "classes 4 vs 10" in str(e.value)
    assert not (tmp_path / "res").exists()
    with pytest.raises(UserError, match="--grid-guidance autoguidance needs --guide-ckpt"):
        run_train(common + ["--results-dir", tmp_path / "res", "--grid-guidance", "autoguidance"])
    with pytest.raises(UserError, match="both cfg"):
        run_train(common + ["--results-dir", tmp_path / "res", "--guide-ckpt", other, "--grid-guidance", "cfg",
                            "--eval-guidance", "cfg"])
    assert not (tmp_path / "res").exists()


def test_guidance_space_of_configs_that_record_no_vae():
    """Converted release checkpoints record no VAE: their latents are SD-VAE's, as those of a run on SD-VAE
    latents, so one can guide the other; a pixel-space run cannot."""
    from diffusion.guidance import guidance_space
    from models.autoencoders import DEFAULT_SCALING_FACTOR, DEFAULT_VAE_ID

    release = {"objective": "diffusion", "objective_kwargs": {}, "vae": {},
               "data": {"latent_shape": [4, 32, 32], "num_classes": 1000, "image_size": 256}}
    ours = {"objective": "diffusion", "objective_kwargs": {"noise_schedule": "linear"},
            "vae": {"vae": "sd", "hf_model_name": "stabilityai/sd-vae-ft-ema"},
            "data": {"vae": DEFAULT_VAE_ID, "scaling_factor": DEFAULT_SCALING_FACTOR, "latent_norm": {"mode": "none"}}}
    pixels = {"objective": "diffusion", "vae": {"vae": "none"}, "data": {"vae": "none", "scaling_factor": 1.0}}
    a, b, c = (guidance_space(cfg, 1000, (4, 32, 32)) for cfg in (release, ours, pixels))
    assert a == b and a.latent_space == f"{DEFAULT_VAE_ID} latents x{DEFAULT_SCALING_FACTOR:g}"
    assert c.latent_space == "pixel space" and c != a
