"""train_gen/sample_ddp.py and diffusion/sampling.py on tiny pixel-space checkpoints (CPU, gloo).

References: per-sample reruns (one image at a time), the diffusion/flow sampling loops called directly,
numpy's view of the archive, and exact model-call counts derived from the respaced timesteps.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.respace import space_timesteps
from diffusion.sampling import (
    FixedBatchModel,
    SamplerSettings,
    generate,
    load_setup,
    resolve_sampler,
    sample_generator,
    sample_labels,
    sample_seed,
)
from evaluations.archives import validate_npz, write_npz
from fcdm_common.cli import UserError
from fcdm_common.images import to_uint8
from helpers import one_thread, run_torchrun  # noqa: F401  (one_thread: fixture, used through pytestmark)
from models import create_model
from models.checkpoints import save_checkpoint
from train_gen import sample_ddp

SCRIPT = Path(sample_ddp.__file__)
NUM_CLASSES = 10


def make_checkpoint(path, objective="diffusion", seed=0, **config_changes):
    """A tiny FCDM-digits checkpoint (pixel space, 16x16x3) with weights moved off their zero init."""
    kw = dict(hidden_size=16, depths=(1, 1, 1, 1, 1), in_channels=3, num_classes=NUM_CLASSES,
              learn_sigma=objective == "diffusion")
    torch.manual_seed(seed)
    model = create_model("FCDM-digits", **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = dict(model="FCDM-digits", model_kwargs=kw, objective=objective, objective_kwargs={},
                  data=dict(latent_shape=[3, 16, 16], num_classes=NUM_CLASSES, image_size=16, vae="none",
                            scaling_factor=1.0),
                  vae=dict(vae="none", hf_model_name=None, hf_model_dir=None))
    config.update(config_changes)
    save_checkpoint(dict(model=model.state_dict(), ema=model.state_dict(), step=1, config=config), path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"diffusion": make_checkpoint(root / "diff.pt", "diffusion"),
            "flow": make_checkpoint(root / "flow.pt", "flow", seed=1)}


pytestmark = pytest.mark.usefixtures("one_thread")


def run_inprocess(argv):
    sample_ddp.main([str(a) for a in argv])


def the_archive(sample_dir):
    found = sorted(Path(sample_dir).glob("*.npz"))
    assert len(found) == 1, found
    return found[0]


FLOW_ARGS = ["--num-fid-samples", 11, "--num-sampling-steps", 6, "--cfg-scale", 2.5, "--forward-batch", 8,
             "--label-sampling", "random", "--global-seed", 3]


def test_one_vs_two_processes_and_batch_sizes_give_identical_archives(ckpts, tmp_path):
    run_inprocess(["--ckpt", ckpts["flow"], "--sample-dir", tmp_path / "a", "--per-proc-batch-size", 5, *FLOW_ARGS])
    run_inprocess(["--ckpt", ckpts["flow"], "--sample-dir", tmp_path / "b", "--per-proc-batch-size", 11, *FLOW_ARGS])
    run_torchrun(SCRIPT, ["--ckpt", ckpts["flow"], "--sample-dir", tmp_path / "c", "--per-proc-batch-size", 2,
                          *FLOW_ARGS], timeout=180)

    archives = [np.load(the_archive(tmp_path / d)) for d in "abc"]
    images, labels = archives[0]["arr_0"], archives[0]["arr_1"]
    # ADM's format
    assert sorted(archives[0].files) == ["arr_0", "arr_1"]
    assert images.dtype == np.uint8 and images.shape == (11, 16, 16, 3)
    assert labels.dtype == np.int64 and labels.shape == (11,)
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES and len(set(labels.tolist())) > 1
    saturated = np.mean((images == 0) | (images == 255))
    assert 0.05 < saturated < 0.6 and images.std() > 20  # real pictures, not constant or clipped noise
    for other in archives[1:]:
        assert other["arr_0"].tobytes() == images.tobytes()
        assert other["arr_1"].tobytes() == labels.tobytes()
    # labels are the first draw of each sample's own generator
    np.testing.assert_array_equal(labels, sample_labels(3, range(11), NUM_CLASSES, "random"))
    # a sample computed alone (batch of one) is the same image
    setup = load_setup(ckpts["flow"])
    alone, lab = generate(setup, [7], SamplerSettings("sde", 6, cfg_scale=2.5, forward_batch=8), seed=3)
    np.testing.assert_array_equal(alone[0], images[7])
    assert lab[0] == labels[7]
    # the JSON beside the archive records how to reproduce it
    meta = json.loads(the_archive(tmp_path / "c").with_suffix(".json").read_text())
    assert meta["settings"]["sampler"] == "sde" and meta["settings"]["num_sampling_steps"] == 6
    assert meta["settings"]["cfg_scale"] == 2.5 and meta["settings"]["global_seed"] == 3
    assert len(meta["settings"]["checkpoint_sha256"]) == 64 and meta["versions"]["torch"] == torch.__version__
    assert meta["world_size"] == 2


def test_resume_after_deleting_pngs_restores_the_same_archive(ckpts, tmp_path, capsys):
    args = ["--ckpt", ckpts["diffusion"], "--sample-dir", tmp_path, "--num-fid-samples", 20, "--num-sampling-steps", 4,
            "--per-proc-batch-size", 6, "--forward-batch", 8, "--label-sampling", "balanced", "--ddpm", "true"]
    run_inprocess(args)
    npz = the_archive(tmp_path)
    first = npz.read_bytes()
    folder = npz.parent / npz.name[: -len("-20.npz")]
    assert "ddpm4" in folder.name and len(list(folder.glob("*.png"))) == 20
    labels = np.load(npz)["arr_1"]
    np.testing.assert_array_equal(labels, np.arange(20) % NUM_CLASSES)  # balanced: each class twice
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES

    kept = folder / "000004.png"
    kept_mtime = kept.stat().st_mtime_ns
    for i in (0, 9, 17):
        (folder / f"{i:06d}.png").unlink()
    (folder / "000005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt: must be resampled
    npz.unlink()
    capsys.readouterr()
    run_inprocess(args)
    assert "16 found, 4 to sample" in capsys.readouterr().out
    assert npz.read_bytes() == first
    assert kept.stat().st_mtime_ns == kept_mtime  # good PNGs are reused, not rewritten
    run_inprocess(args)  # complete archive: nothing to do
    assert "nothing to do" in capsys.readouterr().out


def test_readme_command_parses_and_ddpm_flag(ckpts, tmp_path):
    # the original README's flags, --ddpm True / False
    base = ["--model", "FCDM-digits", "--num-fid-samples", 2, "--ckpt", ckpts["diffusion"], "--sample-dir", tmp_path,
            "--cfg-scale", "1.0", "--num-sampling-steps", 2, "--forward-batch", 2]
    run_inprocess([*base, "--ddpm", "True"])
    run_inprocess([*base, "--ddpm", "False"])
    names = sorted(p.name for p in tmp_path.glob("*.npz"))
    assert any("-ddpm2-" in n for n in names) and any("-ddim2-" in n for n in names)
    assert resolve_sampler("diffusion", None, None) == "ddpm"
    assert resolve_sampler("diffusion", None, False) == "ddim"
    assert resolve_sampler("flow", None, None) == "sde"
    assert resolve_sampler("flow", "heun", None) == "heun"
    for bad in [("diffusion", "sde", None), ("flow", "ddpm", None), ("flow", None, True), ("diffusion", "ddim", True)]:
        with pytest.raises(UserError):
            resolve_sampler(*bad)


def test_seeds_depend_on_seed_and_index_only():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert len({sample_seed(s, i) for s in range(3) for i in range(50)}) == 150


@pytest.mark.parametrize("objective,sampler", [("diffusion", "ddpm"), ("diffusion", "ddim"), ("flow", "sde"),
                                               ("flow", "heun")])
def test_scale_one_equals_unguided_reference_loop(ckpts, objective, sampler):
    setup = load_setup(ckpts[objective])
    idx, steps = [4, 1, 8], 5
    images, labels = generate(setup, idx, SamplerSettings(sampler, steps, cfg_scale=1.0, guidance_interval=(0.2, 0.7)),
                              seed=2, label_mode="random")
    # independent reference: the objective's own loop on the raw network, noise drawn after the label
    gens = [sample_generator(2, i) for i in idx]
    ref_labels = [int(torch.randint(NUM_CLASSES, (1,), generator=g)) for g in gens]
    noise = torch.stack([torch.randn(3, 16, 16, generator=g) for g in gens])
    kw = dict(y=torch.tensor(ref_labels))
    obj = setup.objective
    with torch.no_grad():
        if sampler == "ddpm":
            out = obj.respace(str(steps)).p_sample_loop(setup.model, noise.shape, noise=noise, model_kwargs=kw,
                                                        generator=gens)[:, :3]
        elif sampler == "ddim":
            out = obj.respace(f"ddim{steps}").ddim_sample_loop(setup.model, noise.shape, noise=noise,
                                                               model_kwargs=kw, generator=gens)[:, :3]
        elif sampler == "sde":
            out = obj.sample_sde(setup.model, noise, steps, model_kwargs=kw, generator=gens)
        else:
            out = obj.sample_ode(setup.model, noise, steps, method="heun", model_kwargs=kw)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(images, to_uint8(out))


def test_guidance_interval_makes_fewer_model_calls(ckpts):
    setup = load_setup(ckpts["diffusion"])
    idx, steps, n = list(range(4)), 10, 4
    lo, hi = 0.0, 0.45
    counts, images = {}, {}
    for name, scale, interval in [("unguided", 1.0, None), ("full", 3.0, None), ("interval", 3.0, (lo, hi))]:
        counter = FixedBatchModel(setup.model)
        settings = SamplerSettings("ddpm", steps, cfg_scale=scale, guidance_interval=interval)
        images[name], _ = generate(setup, idx, settings, seed=0, label_mode="balanced", counter=counter)
        counts[name] = counter.rows
    in_interval = sum(lo <= t / 1000 <= hi for t in space_timesteps(1000, str(steps)))
    assert 0 < in_interval < steps
    assert counts["unguided"] == n * steps
    assert counts["full"] == 2 * n * steps
    assert counts["interval"] == n * steps + n * in_interval  # unconditional rows only inside the interval
    assert not np.array_equal(images["interval"], images["full"])
    assert not np.array_equal(images["interval"], images["unguided"])


def test_fixed_forward_batch_pads_and_counts(ckpts):
    setup = load_setup(ckpts["flow"])
    x, t, y = torch.randn(5, 3, 16, 16), torch.full((5,), 0.3), torch.arange(5)
    net = FixedBatchModel(setup.model, forward_batch=4)
    with torch.no_grad():
        out = net(x, t, y)
        ref = torch.cat([setup.model(x[:4], t[:4], y[:4]), setup.model(x[4:].repeat(4, 1, 1, 1), t[4:].repeat(4),
                                                                           y[4:].repeat(4))[:1]])
    assert net.calls == 2 and net.rows == 8 and out.shape == (5, 3, 16, 16)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_write_npz_streams_chunks_like_np_savez(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.int64)
    write_npz(tmp_path / "s.npz", (images[:3], images[3:]), labels, image_shape=(4, 5, 3))
    np.savez(tmp_path / "ref.npz", arr_0=images, arr_1=labels)
    got, ref = np.load(tmp_path / "s.npz"), np.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(got["arr_0"], ref["arr_0"])
    np.testing.assert_array_equal(got["arr_1"], ref["arr_1"])
    assert validate_npz(tmp_path / "s.npz", num_samples=7, num_classes=10)["image_shape"] == (4, 5, 3)
    with pytest.raises(UserError):
        validate_npz(tmp_path / "s.npz", num_samples=8)
    with pytest.raises(UserError):
        validate_npz(tmp_path / "s.npz", num_classes=int(labels.max()))
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32), arr_1=labels)
    with pytest.raises(UserError):
        validate_npz(tmp_path / "float.npz")
