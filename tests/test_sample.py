"""train_gen/sample.py (grid + individual images) and the bad inputs of both sampling scripts."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.sampling import SamplerSettings, generate, load_setup
from fcdm_common.cli import UserError
from fcdm_common.images import make_grid
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)
from test_sample_ddp import make_checkpoint
from train_gen import sample, sample_ddp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"diffusion": make_checkpoint(root / "diff.pt", "diffusion"),
            "flow": make_checkpoint(root / "flow.pt", "flow", seed=1), "root": root}


def test_grid_and_individual_images(ckpts, tmp_path):
    labels = [3, 1, 4, 1, 5]
    sample.main(["--ckpt", str(ckpts["diffusion"]), "--class-labels", *map(str, labels), "--sampler", "ddim",
                 "--num-sampling-steps", "4", "--cfg-scale", "2.0", "--seed", "7", "--nrow", "3",
                 "--out", str(tmp_path / "grid.png"), "--save-individual", str(tmp_path / "ind")])
    setup = load_setup(ckpts["diffusion"])
    ref, ref_labels = generate(setup, range(5), SamplerSettings("ddim", 4, cfg_scale=2.0), seed=7, labels=labels)
    np.testing.assert_array_equal(ref_labels, labels)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    np.testing.assert_array_equal(grid, make_grid(ref, nrow=3))
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    files = sorted((tmp_path / "ind").iterdir())
    assert [f.name for f in files] == [f"{k:06d}_{lab}.png" for k, lab in enumerate(labels)]
    for f, img in zip(files, ref):
        np.testing.assert_array_equal(np.asarray(Image.open(f)), img)


def test_the_ema_export_samples_like_its_checkpoint(ckpts, tmp_path):
    """<step>-ema.safetensors, the release export train.py writes beside <step>.pt, is accepted wherever a
    checkpoint is sampled from (sample.py, sample_ddp.py, the autoguidance guide) and gives the same bytes."""
    from models.checkpoints import load_checkpoint
    from train_gen.run_folder import export_ema

    for kind in ("diffusion", "flow"):
        ckpt = load_checkpoint(ckpts[kind])
        export = export_ema(ckpt["ema"], ckpt["config"], ckpt["step"], ckpts[kind])
        assert export.name == f"{ckpts[kind].stem}-ema.safetensors"
        loaded = load_checkpoint(export)
        assert loaded["config"] == json.loads(json.dumps(ckpt["config"]))  # train.py's configs are JSON already
        assert loaded["step"] == ckpt["step"] and "model" not in loaded
        assert all(torch.equal(loaded["ema"][k], v) for k, v in ckpt["ema"].items())
    with pytest.raises(UserError, match="an export, not a checkpoint"):  # it cannot resume training
        load_checkpoint(export, for_training=True)
    export = ckpts["root"] / "diff-ema.safetensors"
    args = ["--class-labels", "3", "1", "--sampler", "ddim", "--num-sampling-steps", "3", "--seed", "5"]
    for name, path in (("pt", ckpts["diffusion"]), ("st", export)):
        sample.main(["--ckpt", str(path), *args, "--out", str(tmp_path / f"{name}.png")])
        sample_ddp.main(["--ckpt", str(path), "--num-fid-samples", "4", "--num-sampling-steps", "3",
                         "--sample-dir", str(tmp_path / f"ddp-{name}"), "--guide-ckpt", str(path)])
    assert (tmp_path / "pt.png").read_bytes() == (tmp_path / "st.png").read_bytes()
    archives = [np.load(next((tmp_path / f"ddp-{n}").glob("*.npz")))["arr_0"] for n in ("pt", "st")]
    np.testing.assert_array_equal(*archives)


def test_bf16_flow_sample_runs_close_to_fp32(ckpts, tmp_path):
    args = ["--ckpt", str(ckpts["flow"]), "--class-labels", "0", "9", "--num-sampling-steps", "4", "--sampler", "euler"]
    sample.main([*args, "--out", str(tmp_path / "fp32.png")])
    sample.main([*args, "--out", str(tmp_path / "bf16.png"), "--precision", "bf16"])
    a = np.asarray(Image.open(tmp_path / "fp32.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "bf16.png")).astype(int)
    assert np.abs(a - b).mean() < 8  # same picture up to bf16 rounding


@pytest.fixture(scope="module")
def bad_files(ckpts):
    root = ckpts["root"]
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    torch.save({"model": {}, "ema": {}, "step": 0}, root / "noconfig.pt")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=16)
    vae.save_pretrained(root / "vae4")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(root / "noconfig.safetensors"), metadata={"step": "3"})
    from models.checkpoints import load_checkpoint
    from train_gen.run_folder import export_ema

    ckpt = load_checkpoint(root / "diff.pt")
    export_ema(ckpt["ema"], ckpt["config"], ckpt["step"], root / "diff.pt")  # diff-ema.safetensors
    (root / "corrupt-ema.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    return root


BAD = {
    "missing checkpoint": (["--ckpt", "{root}/nope.pt"], "does not exist"),
    "corrupt checkpoint": (["--ckpt", "{root}/corrupt.pt"], "corrupt"),
    "no config": (["--ckpt", "{root}/noconfig.pt"], "no run config"),
    "export without config": (["--ckpt", "{root}/noconfig.safetensors"], "without a run config"),
    "corrupt export": (["--ckpt", "{root}/corrupt-ema.safetensors"], "corrupt or not a safetensors"),
    "raw weights of an export": (["--ckpt", "{root}/diff-ema.safetensors", "--use-ema", "false"], "has no 'model'"),
    "model mismatch": (["--ckpt", "{root}/diff.pt", "--model", "FCDM-XL"], "does not match"),
    "vae channels": (["--ckpt", "{root}/diff.pt", "--vae", "sd", "--hf-model-dir", "{root}/vae4"], "latent channels"),
    "sampler for objective": (["--ckpt", "{root}/diff.pt", "--sampler", "sde"], "does not apply"),
    "ddpm on flow": (["--ckpt", "{root}/flow.pt", "--ddpm", "true"], "--ddpm"),
    "cfg channels": (["--ckpt", "{root}/diff.pt", "--cfg-channels", "4"], "--cfg-channels"),
    "too many steps": (["--ckpt", "{root}/diff.pt", "--sampler", "ddpm", "--num-sampling-steps", "1001"], "exceeds"),
}  # flag values that are out of range whatever the checkpoint: argparse, tests/test_flag_ranges.py


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("script", ["sample", "sample_ddp"])
def test_bad_inputs_raise_user_error(bad_files, tmp_path, case, script):
    argv, needle = BAD[case]
    argv = ["--num-sampling-steps", "2"] + [a.format(root=bad_files) for a in argv]
    if script == "sample":
        main, argv = sample.main, argv + ["--out", str(tmp_path / "g.png")]
    else:
        main, argv = sample_ddp.main, argv + ["--sample-dir", str(tmp_path), "--num-fid-samples", "2"]
    with pytest.raises(UserError, match=needle.replace("-", r"\-")):
        main(argv)
    assert not any(tmp_path.rglob("*.png")) and not any(tmp_path.rglob("*.npz"))  # nothing half-written


def test_labels_out_of_range_and_sample_count(bad_files, tmp_path):
    with pytest.raises(UserError, match="out of range"):
        sample.main(["--ckpt", str(bad_files / "diff.pt"), "--class-labels", "3", "10",
                     "--out", str(tmp_path / "g.png")])
    for n in ("0", "-5"):  # refused by argparse: usage and one error line, status 2
        with pytest.raises(SystemExit) as exc:
            sample_ddp.main(["--ckpt", str(bad_files / "diff.pt"), "--num-fid-samples", n,
                             "--sample-dir", str(tmp_path)])
        assert exc.value.code == 2


def test_folder_from_other_settings_is_refused(bad_files, tmp_path):
    args = ["--ckpt", str(bad_files / "diff.pt"), "--sample-dir", str(tmp_path), "--num-fid-samples", "2",
            "--num-sampling-steps", "2", "--forward-batch", "2"]
    sample_ddp.main(args)
    # same folder name, but a different forward batch changes the bits: reusing its PNGs would mix settings
    with pytest.raises(UserError, match="other settings"):
        sample_ddp.main([*args[:-1], "4"])


def test_exit_status_two_with_one_line(bad_files, tmp_path):
    for script in (sample.__file__, sample_ddp.__file__):
        res = subprocess.run([sys.executable, script, "--ckpt", str(bad_files / "noconfig.pt"),
                              "--sample-dir" if "ddp" in script else "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "noconfig.pt" in lines[0]
