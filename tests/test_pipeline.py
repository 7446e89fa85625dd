"""FCDMPipeline + train_gen/export_pipeline.py: export, reload offline in a fresh process, same images as sample.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fcdm_common.cli import UserError
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)
from models import create_model
from models.checkpoints import save_checkpoint
from test_sample_ddp import make_checkpoint
from train_gen import export_pipeline, pipeline_sample, sample

pytestmark = pytest.mark.usefixtures("one_thread")


def latent_checkpoint(root, shift_and_norm: bool = False):
    """A tiny FCDM on 4x8x8 latents of a tiny AutoencoderKL (downsample 2 -> 16x16 images). With
    `shift_and_norm` the run has a shift factor and --latent-norm channel statistics, which the
    pipeline must undo before decoding exactly as sample.py does."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=16)
    vae.save_pretrained(root / "vae")
    kw = dict(hidden_size=16, depths=(1, 1, 1, 1, 1), in_channels=4, num_classes=10, learn_sigma=True)
    model = create_model("FCDM-digits", **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = dict(model="FCDM-digits", model_kwargs=kw, objective="diffusion", objective_kwargs={},
                  data=dict(latent_shape=[4, 8, 8], num_classes=10, image_size=16, vae="sd:vae", scaling_factor=0.5),
                  vae=dict(vae="sd", hf_model_name=None, hf_model_dir=str(root / "vae")))
    path = root / "latent.pt"
    if shift_and_norm:
        config["data"].update(shift_factor=0.3, latent_norm={"mode": "channel", "mean": [0.5, -1.0, 0.25, 2.0],
                                                             "std": [2.0, 0.5, 3.0, 1.5]})
        config["vae"]["shift_factor"] = 0.3
        path = root / "latent-norm.pt"
    save_checkpoint(dict(model=model.state_dict(), ema=model.state_dict(), step=42, config=config), path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    ckpt = latent_checkpoint(root)
    export_pipeline.main(["--ckpt", str(ckpt), "--out", str(root / "pipe")])
    pixel = make_checkpoint(root / "pixel.pt", "diffusion")
    export_pipeline.main(["--ckpt", str(pixel), "--out", str(root / "pixel_pipe"), "--scheduler", "unipc"])
    normed = latent_checkpoint(root, shift_and_norm=True)
    export_pipeline.main(["--ckpt", str(normed), "--out", str(root / "norm_pipe")])
    return {"root": root, "ckpt": ckpt, "pipe": root / "pipe", "pixel": pixel, "pixel_pipe": root / "pixel_pipe",
            "norm": normed, "norm_pipe": root / "norm_pipe"}


def read_images(folder):
    return np.stack([np.asarray(Image.open(f)) for f in sorted(folder.iterdir())])


def run_fresh(args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, pipeline_sample.__file__, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)


@pytest.mark.parametrize("kind,sampler", [("latent", "dpm++2m"), ("pixel", "unipc"), ("norm", "dpm++2m")])
def test_exported_pipeline_in_a_fresh_process_equals_sample_py(exported, tmp_path, kind, sampler):
    ckpt, folder = {"latent": (exported["ckpt"], exported["pipe"]),
                    "pixel": (exported["pixel"], exported["pixel_pipe"]),
                    "norm": (exported["norm"], exported["norm_pipe"])}[kind]
    labels = ["3", "1", "4"]
    res = run_fresh(["--pipeline", folder, "--class-labels", *labels, "--num-inference-steps", 5,
                     "--guidance-scale", 2.0, "--seed", 7, "--out", tmp_path / "p.png",
                     "--save-individual", tmp_path / "pipe_imgs"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    sample.main(["--ckpt", str(ckpt), "--class-labels", *labels, "--sampler", sampler, "--num-sampling-steps", "5",
                 "--cfg-scale", "2.0", "--seed", "7", "--out", str(tmp_path / "s.png"),
                 "--save-individual", str(tmp_path / "ref")])
    got, ref = read_images(tmp_path / "pipe_imgs"), read_images(tmp_path / "ref")
    assert got.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(got, ref)


def test_pipeline_api_outputs_scheduler_swap_and_folder(exported):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from diffusion.pipeline import FCDMPipeline

    folder = exported["pipe"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusion.pipeline", "FCDMNetwork"] and index["vae"][1] == "AutoencoderKL"
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert "FCDM-digits" in card and "42 training steps" in card and "arXiv:2603.09408" in card
    assert "DPMSolverMultistepScheduler" in card and "license: apache-2.0" in card
    pixel_index = json.loads((exported["pixel_pipe"] / "model_index.json").read_text())
    assert pixel_index["vae"] == [None, None]  # pixel space: no VAE component

    pipe = FCDMPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    out = pipe(class_labels=[207 % 10, 3], num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 and out.images[0].size == (16, 16)
    arr = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert arr.shape == (2, 16, 16, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    lat = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert lat.shape == (2, 4, 8, 8)
    again = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.testing.assert_close(lat, again, rtol=0, atol=0)  # the generator decides everything
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    swapped = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    assert swapped.shape == lat.shape and not torch.allclose(swapped, lat)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="learned_range",
                                               timestep_spacing="linspace", clip_sample=False)
    assert pipe([1], num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0].size == (16, 16)
    with pytest.raises(ValueError, match="out of range"):
        pipe([10])


def test_bad_pipeline_folders(exported, tmp_path):
    import shutil

    from diffusion.pipeline import FCDMPipeline

    no_weights = tmp_path / "no_weights"
    shutil.copytree(exported["pipe"], no_weights)
    (no_weights / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    other = tmp_path / "other_config"
    shutil.copytree(exported["pipe"], other)
    cfg_path = other / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_kwargs"]["hidden_size"] = 32  # another model's config: the weights do not fit
    cfg_path.write_text(json.dumps(cfg))
    for folder, needle in ((no_weights, "holds no weights"), (other, "cannot load the FCDM pipeline"),
                           (tmp_path / "missing", "does not exist"),
                           (tmp_path, "not a pipeline folder")):
        with pytest.raises(UserError, match=needle):
            FCDMPipeline.from_pretrained(folder, local_files_only=True)
    res = run_fresh(["--pipeline", no_weights, "--class-labels", 1, "--out", tmp_path / "x.png"], tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "holds no weights" in lines[0], res.stderr[-2000:]
    with pytest.raises(UserError, match="not an empty folder"):
        export_pipeline.main(["--ckpt", str(exported["ckpt"]), "--out", str(exported["pipe"])])
    flow = make_checkpoint(tmp_path / "flow.pt", "flow")
    with pytest.raises(UserError, match="diffusion"):
        export_pipeline.main(["--ckpt", str(flow), "--out", str(tmp_path / "flow_pipe")])
    assert not (tmp_path / "flow_pipe").exists()
