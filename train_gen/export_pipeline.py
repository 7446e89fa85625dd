"""Export a train.py checkpoint as a diffusers pipeline folder (FCDMPipeline) with a model card.

    python train_gen/export_pipeline.py --ckpt results/000-FCDM-XL/checkpoints/0400000.pt \
        --out fcdm-xl-256 --hf-model-dir sd-vae-ft-ema
    huggingface-cli upload your-name/fcdm-xl-256 fcdm-xl-256     # uploading is left to the hub's CLI

The folder holds model_index.json, transformer/ (config.json + diffusion_pytorch_model.safetensors of the
EMA or raw weights), scheduler/ (DPM-Solver++ 2M configured from the checkpoint's beta schedule, or
--sampler), vae/ (the AutoencoderKL, left out for pixel-space checkpoints) and README.md (the model
card: model, data, training steps, sampler defaults, license, citation). Load it with
`FCDMPipeline.from_pretrained(DIR)` (diffusion/pipeline.py); train_gen/pipeline_sample.py samples from it.
Only diffusion (epsilon) checkpoints export; flow-matching checkpoints are refused.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from diffusion.guidance import CFG_SCALE_HELP, cfg_scale_arg
from diffusion.pipeline import FCDMNetwork, FCDMPipeline
from diffusion.sampling import check_num_steps, load_setup
from diffusion.schedulers import build_scheduler, is_scheduler_sampler
from fcdm_common.cli import HelpFormatter, UserError, alias_help, positive_int, run_main, str2bool
from fcdm_common.io import atomic_write_text, check_writable, disk_full_error, remove_stale_dirs
from models.checkpoints import load_checkpoint

CITATION = """@inproceedings{kwon2026fcdm,
  title     = {Reviving ConvNeXt for Efficient Convolutional Diffusion Models},
  author    = {Kwon and others},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2026},
  note      = {arXiv:2603.09408}
}"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ckpt", required=True,
                   help="checkpoint written by train_gen/train.py (<step>.pt, or its EMA export "
                        "<step>-ema.safetensors)")
    p.add_argument("--out", required=True, help="pipeline folder to write (must not exist, or be empty)")
    p.add_argument("--use-ema", type=str2bool, default=True, metavar="BOOL",
                   help="export the EMA weights (default true)")
    p.add_argument("--vae", choices=("sd", "none"), default=None,
                   help="autoencoder (default: what the checkpoint records)")
    p.add_argument("--hf-model-name", default=None, help="Hugging Face repository of the VAE (downloads if needed)")
    p.add_argument("--hf-model-dir", default=None, help="local AutoencoderKL snapshot (wins over --hf-model-name)")
    p.add_argument("--sampler", "--scheduler", dest="sampler", default="dpm++2m", help=alias_help(
        "default scheduler of the pipeline: a --sampler name of sample.py that is diffusers-driven "
        "(dpm++2m, dpm++2m-karras, unipc, euler, heun) or diffusers:<Class> (default dpm++2m)", "--scheduler"))
    p.add_argument("--num-sampling-steps", "--num-inference-steps", dest="num_sampling_steps", type=positive_int,
                   default=25, help=alias_help("steps the model card recommends, at most the checkpoint's diffusion "
                                               "steps T (default 25)", "--num-inference-steps"))
    p.add_argument("--cfg-scale", "--guidance-scale", dest="cfg_scale", type=cfg_scale_arg, default=4.0,
                   help=alias_help(f"guidance scale the model card shows, {CFG_SCALE_HELP} (default 4.0)",
                                   "--guidance-scale"))
    p.add_argument("--license", default="apache-2.0", help="license tag of the model card (default apache-2.0)")
    return p


def model_card(setup, args, step) -> str:
    cfg = setup.config
    data = cfg.get("data") or {}
    c, h, w = setup.latent_shape
    vae = setup.vae_settings.get("vae")
    source = setup.vae_settings.get("hf_model_dir") or setup.vae_settings.get("hf_model_name")
    scale = setup.vae_settings.get("scaling_factor")
    space = "pixel space" if vae == "none" else f"VAE {source}, scaling factor {scale}"
    scheduler = f"{type(args._scheduler).__name__} ({args.sampler})"
    return f"""---
license: {args.license}
library_name: diffusers
tags: [fcdm, class-conditional, image-generation, convnext]
pipeline_tag: unconditional-image-generation
---
# {setup.model_name} (FCDM)

A Fully Convolutional Diffusion Model from "Reviving ConvNeXt for Efficient Convolutional Diffusion
Models" (Kwon et al., CVPR 2026), exported from `{setup.ckpt_path.name}` with train_gen/export_pipeline.py.

| | |
|---|---|
| model | `{setup.model_name}`, constructor arguments `{json.dumps(cfg.get("model_kwargs") or {}, sort_keys=True)}` |
| weights | {"EMA" if setup.use_ema else "raw (non-EMA)"}, after {step} training steps |
| data | {data.get("num_classes", setup.num_classes)} classes, latents {c}x{h}x{w} ({space}) |
| objective | iDDPM diffusion, {cfg.get("objective_kwargs") or "linear schedule, T = 1000, learned sigma"} |
| default scheduler | {scheduler}, {args.num_sampling_steps} steps, guidance scale {args.cfg_scale} |
| license | {args.license} |

## Use

```python
import torch
from diffusion.pipeline import FCDMPipeline   # pip install -e . of the FCDM repository
pipe = FCDMPipeline.from_pretrained("PATH_OR_REPO")
images = pipe(class_labels=[0, 1], num_inference_steps={args.num_sampling_steps}, guidance_scale={args.cfg_scale},
              generator=torch.Generator().manual_seed(0)).images
```

Swap the scheduler with any epsilon-prediction diffusers scheduler, e.g.
`pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)`. The paper's sampler,
250-step DDPM with the learned variances, is
`DDPMScheduler.from_config(pipe.scheduler.config, variance_type="learned_range", timestep_spacing="linspace",
clip_sample=False)` with `num_inference_steps=250`. `pipe(..., seed=S)` reproduces
`train_gen/sample.py --seed S` image for image.

Upload: `huggingface-cli upload YOUR_NAME/REPO {Path(args.out).name}`.

## Citation

```bibtex
{CITATION}
```
"""


def remove_stale_exports(out: Path) -> list:
    """Delete the half-written pipeline folders (`.<out name>.XXXXXXXX/`, mkdtemp's names) that a killed
    export of `out` left beside it; returns them."""
    return remove_stale_dirs(out.parent, re.compile(rf"\.{re.escape(out.name)}\.[A-Za-z0-9_]{{8}}"))


def save_pipeline(pipe, folder: Path, out: Path) -> None:
    """`pipe.save_pretrained(folder)`; a full disk, which safetensors' writer reports as its own error (not an
    OSError), becomes the OSError ENOSPC run_main prints as one line."""
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
    except OSError:
        raise
    except Exception as e:
        text = str(e)
        if "os error 28" in text.lower() or "no space left" in text.lower() or "StorageFull" in text:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from None
        raise disk_full_error(folder / "model_index.json", out) or e


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; pass a new --out")
    check_writable(out)  # a read-only folder fails now, not after loading the checkpoint
    stale = remove_stale_exports(out)
    if stale:
        print(f"removed {len(stale)} half-written export folder(s) left by an interrupted run", flush=True)
    setup = load_setup(args.ckpt, use_ema=args.use_ema, vae=args.vae, hf_model_name=args.hf_model_name,
                       hf_model_dir=args.hf_model_dir, device="cpu")
    if setup.objective_name != "diffusion":
        raise UserError(f"{args.ckpt} is a {setup.objective_name} checkpoint; FCDMPipeline exports diffusion "
                        "(epsilon) checkpoints only")
    check_num_steps(setup.objective, args.sampler, args.num_sampling_steps)
    if not is_scheduler_sampler(args.sampler):
        raise UserError(f"--sampler {args.sampler} is not diffusers-driven; use dpm++2m, dpm++2m-karras, unipc, "
                        "euler, heun or diffusers:<SchedulerClassName>")
    try:
        scheduler = build_scheduler(args.sampler, setup.objective)
    except ValueError as e:
        raise UserError(f"--sampler {args.sampler}: {e}") from None
    args._scheduler = scheduler
    cfg = setup.config
    network = FCDMNetwork(model_name=setup.model_name, model_kwargs=dict(cfg.get("model_kwargs") or {}),
                          latent_shape=list(setup.latent_shape),
                          latent_scaling_factor=float(setup.vae_settings.get("scaling_factor") or 1.0),
                          num_classes=setup.num_classes, learn_sigma=bool(getattr(setup.model, "learn_sigma", True)),
                          objective=setup.objective_name, objective_kwargs=dict(cfg.get("objective_kwargs") or {}),
                          latent_shift_factor=float(setup.vae_settings.get("shift_factor") or 0.0),
                          latent_norm=(cfg.get("data") or {}).get("latent_norm"))
    network.net.load_state_dict(setup.model.state_dict())
    vae = None if setup.vae_settings.get("vae") == "none" else setup.vae.model
    pipe = FCDMPipeline(transformer=network.eval(), scheduler=scheduler, vae=vae)
    step = load_checkpoint(setup.ckpt_path).get("step", "?")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # written whole, then renamed
    try:
        save_pipeline(pipe, tmp, out)
        atomic_write_text(tmp / "README.md", model_card(setup, args, step))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(p.numel() for p in network.parameters())
    print(f"wrote {out}: {setup.model_name} ({n_params / 1e6:.2f}M parameters, {'EMA' if args.use_ema else 'raw'} "
          f"weights, step {step}), scheduler {type(scheduler).__name__}, "
          f"vae {'none' if vae is None else type(vae).__name__}")


if __name__ == "__main__":
    run_main(main)
