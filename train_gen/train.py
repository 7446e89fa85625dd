r"""Train FCDM (or any registered model) on precomputed latents, with accelerate.

    accelerate launch --mixed_precision bf16 --num_processes 4 train_gen/train.py --model FCDM-XL \
        --feature-path F --label-path L --results-dir results
    python train_gen/train.py --model FCDM-digits --zarr-path data/digits.zarr --vae none ...

Defaults reproduce the paper's Table 6: AdamW (lr 1e-4 constant, betas (0.9, 0.999), weight decay 0),
global batch 256, EMA 0.9999, the iDDPM hybrid loss (or `--objective flow`), 400K steps.

The run folder is `--results-dir/<name from the settings>` (or `--exp-name`), so rerunning the same
command resumes from the newest readable checkpoint in `<run>/checkpoints/`: model, EMA, optimizer,
step, data position and every random state of every process. Training N steps straight and N/2 +
resume N/2 give bitwise-identical weights (on CPU; on GPUs as far as the kernels are deterministic).

Every random draw of a step (data order, flips, posterior noise, timesteps, noise, label dropout) is
a function of (seed, step, index of the sample in the global batch) (fcdm_common/step_rng.py), so
a run is the same at any process count and `--batch-per-gpu` (gradient accumulation) up to float
summation order, and a checkpoint resumes on another process count on the same trajectory.

Per step there is no host synchronisation: losses and gradient norms accumulate in device tensors
that are reduced over all processes only every `--log-every` steps; a non-finite step is skipped on
the device (fused AdamW's `found_inf`, EMA weight 0). With `--optimizer-impl foreach` the skip needs
one host synchronisation per step (documented in docs/training.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from fcdm_common.checkpoint import load_checkpoint, save_checkpoint
from fcdm_common.cli import HelpFormatter, UserError, error_summary, non_negative_int, positive_int, run_main, str2bool
from fcdm_common.cpu import tune_cpu_allocator
from fcdm_common.data import TrainLoader, open_dataset
from evaluations.in_training import InTrainingEvaluator, add_eval_args, plan_from_args, write_curves
from fcdm_common.ema import (SNAPSHOT_DTYPES, PowerEMA, create_ema, remove_snapshots_after, save_posthoc_snapshots,
                             update_ema)
from fcdm_common.io import atomic_write_text, remove_stale_temps
from fcdm_common.runlock import acquire_run_lock
from fcdm_common.step_rng import RNG_SCHEME, StepDraws, micro_batches, take
from fcdm_common.trainutil import (RunLogger, capture_rng, checkpoint_path, ema_export_path, experiment_name,
                                   export_ema, find_resume_checkpoint, prune_checkpoints, rank_seed, restore_rng,
                                   seed_everything, truncate_metrics)

PAPER_STEPS = 400_000  # Table 6 / headline results: 400K iterations
DIT_GRID_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample classes for ImageNet
CKPT_MODES = ("none", "selective", "full")


# ---------------------------------------------------------------------------------- arguments
def _json_dict(value: str) -> dict:
    try:
        d = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {value!r}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"hidden_size\": 16}}', got {value!r}")
    return d


def _int_list(value: str) -> list:
    try:
        return [int(v) for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,4,8,4,2, got {value!r}") from None


def _ckpt_mode(value: str) -> str:
    v = value.strip().lower()
    if v in CKPT_MODES:
        return v
    try:
        return "full" if str2bool(v) else "none"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected none, selective or full (or a boolean), got {value!r}") from None


def _sigma_list(value: str) -> list:
    from fcdm_common.ema import sigma_rel_to_gamma

    try:
        out = [float(v) for v in value.split(",") if v.strip()]
        for v in out:
            sigma_rel_to_gamma(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated sigma_rel values in (0, 0.2887], got {value!r} "
                                         f"({e})") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one sigma_rel")
    return out


def _positive_float(value: str) -> float:
    v = float(value)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="FCDM-XL", help="registered model name (models.MODELS), e.g. FCDM-S/B/L/XL, DiT-XL/2")
    g.add_argument("--model-kwargs", type=_json_dict, default={},
                   help='JSON object of constructor overrides, e.g. \'{"hidden_size": 16, "kernel_size": 5}\'')
    g.add_argument("--hidden-size", type=positive_int, default=None, help="shortcut for model_kwargs hidden_size")
    g.add_argument("--depths", type=_int_list, default=None, help="shortcut for model_kwargs depths, e.g. 1,1,1,1,1")
    g.add_argument("--label-dropout", choices=("shared", "per-level"), default="shared",
                   help="FCDM label dropout: one draw per sample at every level (paper) or one per level (the release)")
    g.add_argument("--objective", choices=("diffusion", "flow"), default="diffusion",
                   help="iDDPM diffusion with learned sigma (paper) or linear flow matching (Appendix E)")
    g.add_argument("--objective-kwargs", type=_json_dict, default={},
                   help="JSON object passed to diffusion.create_objective (e.g. '{\"noise_schedule\": \"linear\"}')")
    g = p.add_argument_group("data")
    g.add_argument("--zarr-path", default=None, help="latent store written by preparation/extract_features.py")
    g.add_argument("--feature-path", default=None, help="legacy layout: folder of per-image latent .npy files")
    g.add_argument("--label-path", default=None, help="legacy layout: folder of per-image label .npy files")
    g.add_argument("--data-cache", choices=("auto", "memory", "mmap", "none"), default="auto",
                   help="zarr latents: memory (decompressed in RAM), mmap (a decompressed copy beside the store, "
                        "shared by the ranks of a node), none (read zarr per batch: slow), auto (memory when it fits, "
                        "else mmap)")
    g.add_argument("--num-workers", type=non_negative_int, default=2,
                   help="background reader threads per rank (0: read in the training thread)")
    g.add_argument("--hflip", type=str2bool, default=True,
                   help="random horizontal flips (the paper's only augmentation; picks the stored flipped latent). "
                        "false: original orientation only, for data whose mirror image is not valid (digits)")
    g.add_argument("--latent-norm", choices=("none", "channel"), default="none",
                   help="none: the network sees the stored latents (paper); channel: (z - mean_c) / std_c with the "
                        "store's per-channel statistics (preparation/latent_stats.py adds them to older stores)")
    g = p.add_argument_group("run folder and resume")
    g.add_argument("--results-dir", default="results", help="parent folder of run folders")
    g.add_argument("--exp-name", default=None, help="run folder name (default: derived from the settings)")
    g.add_argument("--resume", default=None, help="resume from this checkpoint file instead of the run's newest")
    g.add_argument("--start-over", type=str2bool, default=False,
                   help="train from step 0 when the run folder has checkpoints but none can be read (without it "
                        "that stops with a list of them); the unreadable files stay until overwritten")
    g = p.add_argument_group("optimisation (defaults: paper Table 6)")
    g.add_argument("--global-batch-size", type=positive_int, default=256, help="images per step over all processes")
    g.add_argument("--batch-per-gpu", type=positive_int, default=None,
                   help="micro-batch per process; gradients accumulate over global / (processes x this) micro-batches "
                        "per optimizer step (default: the whole per-process share at once). The run's trajectory "
                        "does not depend on it nor on the process count")
    g.add_argument("--allow-rng-scheme-change", type=str2bool, default=False,
                   help="resume a checkpoint written before per-step random draws anyway (new random streams, "
                        "a different trajectory from the one it started)")
    g.add_argument("--lr", type=_positive_float, default=1e-4, help="AdamW learning rate (constant)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-train-steps", type=positive_int, default=None,
                   help=f"total optimizer steps (default: --epochs, else {PAPER_STEPS})")
    g.add_argument("--epochs", type=positive_int, default=None, help="train this many passes over the data")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    g.add_argument("--posthoc-ema-snapshot-every", type=non_negative_int, default=0,
                   help="also track EDM2 power-function EMAs and save snapshots of them every N steps into "
                        "<run>/posthoc_ema/ for train_gen/reconstruct_ema.py (0: off)")
    g.add_argument("--posthoc-ema-sigma-rels", type=_sigma_list, default=[0.05, 0.10],
                   help="relative widths of the tracked power-function EMAs, comma-separated")
    g.add_argument("--posthoc-ema-dtype", choices=tuple(SNAPSHOT_DTYPES), default="fp16",
                   help="precision of the snapshot files (the tracked averages stay float32)")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="autocast precision (default: what accelerate was launched/configured with, else no)")
    g.add_argument("--grad-checkpointing", type=_ckpt_mode, default="none",
                   help="activation checkpointing: none, selective (keep matmul/conv outputs) or full")
    g.add_argument("--compile", type=str2bool, default=False, help="torch.compile the model's blocks")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm to this (0: off)")
    g.add_argument("--optimizer-impl", choices=("auto", "fused", "foreach"), default="auto",
                   help="AdamW kernel: fused (skips bad steps on the device) or foreach (one sync per step); auto: fused")
    g.add_argument("--max-bad-steps", type=positive_int, default=50,
                   help="stop after this many consecutive steps with non-finite loss or gradients")
    g.add_argument("--seed", type=int, default=0, help="global seed (model init, data order; per-rank streams derive from it)")
    g.add_argument("--tf32", type=str2bool, default=True, help="allow TF32 matmuls/convolutions on CUDA")
    g = p.add_argument_group("logging, checkpoints and sample grids")
    g.add_argument("--log-every", type=positive_int, default=100, help="reduce and log metrics every N steps")
    g.add_argument("--ckpt-every", type=positive_int, default=10_000, help="write a checkpoint every N steps (and at the end)")
    g.add_argument("--keep-last", type=positive_int, default=2, help="keep the newest K checkpoints")
    g.add_argument("--keep-every", type=non_negative_int, default=100_000,
                   help="also keep checkpoints whose step is a multiple of M (0: none)")
    g.add_argument("--sample-every", type=non_negative_int, default=10_000,
                   help="draw the EMA sample grid every N steps and at the end (0: never)")
    g.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale of the grids (1: off)")
    g.add_argument("--cfg-channels", default="all", help="guided channels of the grids: all, or k (DiT: 3)")
    g.add_argument("--grid-sampler", default="auto",
                   help="grid sampler: any --sampler of sample.py (diffusion: ddpm, ddim, dpm++2m, unipc, ..., "
                        "diffusers:<Class>; flow: euler, heun, sde, dopri5); auto: ddim / euler")
    g.add_argument("--grid-steps", type=positive_int, default=50, help="sampling steps of the grids")
    g.add_argument("--grid-cols", type=positive_int, default=8, help="samples per class row of the grid")
    g.add_argument("--grid-seed", type=int, default=0, help="seed of the fixed grid noise")
    g.add_argument("--vae", choices=("sd", "none"), default=None,
                   help="decoder of the grids (default: the VAE recorded with the data)")
    g.add_argument("--hf-model-dir", default=None,
                   help="local diffusers autoencoder snapshot for decoding grids (default: the data's VAE folder)")
    g.add_argument("--hf-model-name", default=None,
                   help="hub name of the grids' VAE (default: the data's; sd-vae-ft-ema for .npy data)")
    g.add_argument("--report-to", choices=("none", "tensorboard", "wandb"), default="none",
                   help="also send metrics to TensorBoard or Weights & Biases")
    add_eval_args(p)  # --eval-every, --eval-samples, --ref-batch, ... (evaluations/in_training.py)
    return p


# ---------------------------------------------------------------------------------- config
def _data_description(args, dataset) -> dict:
    info = dict(dataset.info)
    C, H, W = (int(v) for v in dataset.latent_shape)
    vae_name = info.get("vae")
    if vae_name is None:  # the original release's .npy layout: SD-VAE latents at 1/8 resolution
        vae_name, scale, image_size = "sd:sd-vae-ft-ema", 0.18215, 8 * H
    else:
        scale = float(info.get("scaling_factor", 0.18215))
        image_size = int(info.get("image_size", H if vae_name == "none" else 8 * H))
    source = args.zarr_path or args.feature_path
    return {"zarr_path": args.zarr_path, "feature_path": args.feature_path, "label_path": args.label_path,
            "name": Path(str(source).rstrip("/")).stem or "data", "count": len(dataset),
            "latent_shape": [C, H, W], "num_classes": int(dataset.num_classes), "image_size": image_size,
            "vae": vae_name, "scaling_factor": scale, "shift_factor": float(info.get("shift_factor") or 0.0),
            "vae_class": info.get("vae_class", "none" if vae_name == "none" else "AutoencoderKL"),
            "downsample": image_size // H, "hf_model_name": info.get("hf_model_name"),
            "hf_model_dir": info.get("hf_model_dir")}


GRID_VAE_HINT = ", or train without sample grids (--sample-every 0)"


def _vae_config(args, data: dict) -> dict:
    """The grids' decoder: the data's VAE unless --vae/--hf-model-* override it (warned on a mismatch)."""
    from fcdm_common.autoencoders import vae_for_data

    settings, warning = vae_for_data(data, args.vae, args.hf_model_name, args.hf_model_dir,
                                     hint=GRID_VAE_HINT, strict=args.sample_every > 0)
    if warning and args.sample_every > 0:
        print(f"WARNING: sample grids: {warning}", flush=True)
    return settings


def resolve_model_kwargs(args, data: dict) -> tuple[dict, dict]:
    """(all constructor kwargs, the user's own overrides). Data-bound settings are checked."""
    user = dict(args.model_kwargs)
    if args.hidden_size is not None:
        user["hidden_size"] = args.hidden_size
    if args.depths is not None:
        user["depths"] = list(args.depths)
    if args.label_dropout != "shared":  # a model_kwargs override: in the checkpoint config and the run name
        user["label_dropout"] = args.label_dropout
    C, H, W = data["latent_shape"]
    learn_sigma = args.objective == "diffusion"
    kwargs = dict(user)
    for key, value, why in (("in_channels", C, f"the data's latents have {C} channels"),
                            ("learn_sigma", learn_sigma, f"the {args.objective} objective needs learn_sigma={learn_sigma}")):
        if key in kwargs and kwargs[key] != value:
            raise UserError(f"--model-kwargs sets {key}={kwargs[key]!r} but {why}; drop it from --model-kwargs")
        kwargs[key] = value
    n = data["num_classes"]
    if "num_classes" in kwargs and int(kwargs["num_classes"]) < n:
        raise UserError(f"--model-kwargs num_classes={kwargs['num_classes']} but the data has labels up to {n - 1}; "
                        f"use num_classes >= {n}")
    kwargs.setdefault("num_classes", n)
    if "depths" in kwargs:
        kwargs["depths"] = [int(d) for d in kwargs["depths"]]
    return kwargs, user


def build_model_for_data(name: str, kwargs: dict, data: dict):
    """Create the model; models that take `input_size` (DiT) get the latent size. Returns (model, kwargs)."""
    from models import MODELS, create_model

    if name not in MODELS:
        raise UserError(f"unknown --model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    H = data["latent_shape"][1]
    attempts = [dict(kwargs, input_size=H), dict(kwargs)] if "input_size" not in kwargs else [dict(kwargs)]
    last = None
    for kw in attempts:
        try:
            return create_model(name, **kw), kw
        except TypeError as e:
            last = e
            if "input_size" in str(e) and "input_size" in kw and len(attempts) > 1:
                continue
            break
        except ValueError as e:
            last = e
            break
    raise UserError(f"cannot build --model {name} with {json.dumps(kwargs)}: {last}")


def check_levels_fit_data(model, name: str, data: dict) -> None:
    """A U-Net with n levels halves the latents n-1 times: H and W must be divisible by 2^(n-1)."""
    levels = getattr(model, "num_levels", None)
    if not levels:
        return
    _, H, W = data["latent_shape"]
    f = 2 ** (levels - 1)
    if H % f == 0 and W % f == 0:
        return
    fits = 1
    while H % (2 ** fits) == 0 and W % (2 ** fits) == 0:
        fits += 1  # fits = the most levels these latents allow
    depths = list(getattr(model, "depths", []))
    keep = depths[levels - fits:len(depths) - (levels - fits)] if depths else []
    example = f" (e.g. --depths {','.join(map(str, keep))})" if keep else ""
    raise UserError(f"the model does not fit the data: latents of {H}x{W} are too small for the {levels}-level "
                    f"{name}, whose U-Net needs H and W divisible by "
                    f"2^{levels - 1} = {f}; use at most {fits} level(s) via --depths with {2 * fits - 1} entries"
                    f"{example}, or a larger --image-size")


def check_model_fits_data(model, dataset, data: dict, objective: str, where: str) -> None:
    """One no-grad forward of a real batch item (eval mode: no RNG use) to fail early on shape mismatches."""
    x, y = dataset.get_batch(np.array([0]), np.random.default_rng(0))
    t = torch.zeros(1, dtype=torch.long) if objective == "diffusion" else torch.full((1,), 0.5)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x, t, y)
    except (ValueError, RuntimeError, AssertionError) as e:
        raise UserError(f"the model does not fit the data {where} (latents {tuple(data['latent_shape'])}): "
                        f"{error_summary(e, 300)}") from None
    finally:
        model.train(was_training)
    C = data["latent_shape"][0]
    want = (1, 2 * C if objective == "diffusion" else C, *data["latent_shape"][1:])
    if tuple(out.shape) != want:
        raise UserError(f"the model returns {tuple(out.shape)} for latents {tuple(data['latent_shape'])} of {where}; "
                        f"expected {want}")


# ---------------------------------------------------------------------------------- grids
def grid_labels(num_classes: int, cols: int) -> list:
    """One row per class (up to 16 classes; else 8 fixed classes: DiT's for ImageNet, evenly spaced otherwise)."""
    if num_classes <= 16:
        classes = list(range(num_classes))
    elif num_classes == 1000:
        classes = list(DIT_GRID_CLASSES)
    else:
        classes = [int(c) for c in np.linspace(0, num_classes - 1, 8).round()]
    return [c for c in classes for _ in range(cols)]


@torch.no_grad()
def draw_grid(ema, config: dict, vae, device, path: Path, autocast, step: int | None = None) -> None:
    """Sample the fixed grid with the EMA model and save it as PNG (RNG streams of training untouched)."""
    from diffusion import create_objective, sample
    from fcdm_common.images import save_grid, to_uint8

    log = config["log"]
    C, H, W = config["data"]["latent_shape"]
    labels = grid_labels(config["model_kwargs"]["num_classes"], log["grid_cols"])
    gen = torch.Generator("cpu").manual_seed(log["grid_seed"])
    noise = torch.randn(len(labels), C, H, W, generator=gen).to(device)
    sampler_gen = torch.Generator(device).manual_seed(log["grid_seed"] + 1)
    y = torch.tensor(labels, device=device)
    objective = create_objective(config["objective"], **config["objective_kwargs"])
    cfg_channels = log["cfg_channels"]
    cfg_channels = int(cfg_channels) if str(cfg_channels).isdigit() else cfg_channels
    with autocast():
        z = sample(ema, noise, y, objective=objective, sampler=log["grid_sampler"], num_steps=log["grid_steps"],
                   cfg_scale=log["cfg_scale"], cfg_channels=cfg_channels,
                   null_label=config["model_kwargs"]["num_classes"],
                   generators=sampler_gen)
    images = torch.cat([vae.decode(z[i:i + 32].float()) for i in range(0, len(z), 32)])
    save_grid(to_uint8(images), path, nrow=log["grid_cols"],
              metadata={"step": step, "sampler": log["grid_sampler"], "sampling_steps": log["grid_steps"],
                        "cfg_scale": log["cfg_scale"], "model": config["model"]})


# ---------------------------------------------------------------------------------- main
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


# Settings that change the training trajectory but are not spelled out in the run name: a value other
# than the flag's default goes into the name's hash, so a rerun with it never resumes a different run.
TRAJECTORY_SETTINGS = ("hflip", "ema_decay", "weight_decay", "grad_clip", "latent_norm")


def _nondefault_training(args) -> dict:
    parser = build_parser()
    return {k: getattr(args, k) for k in TRAJECTORY_SETTINGS if getattr(args, k) != parser.get_default(k)}


def accumulation_steps(global_batch: int, world: int, batch_per_gpu) -> tuple[int, int]:
    """(micro-batch per process, micro-batches per optimizer step) for --batch-per-gpu (None: the whole share)."""
    share = global_batch // world
    if batch_per_gpu is None:
        return share, 1
    if batch_per_gpu > share:
        raise UserError(f"--batch-per-gpu {batch_per_gpu} is larger than the per-process share of the global batch "
                        f"({global_batch} / {world} processes = {share}); use --batch-per-gpu <= {share}")
    if global_batch % (world * batch_per_gpu):
        raise UserError(f"--global-batch-size {global_batch} is not divisible by {world} process(es) x --batch-per-gpu "
                        f"{batch_per_gpu}; pick a --batch-per-gpu that divides {share}")
    return batch_per_gpu, share // batch_per_gpu


def check_rng_scheme(ckpt: dict, path, allow: bool, log) -> None:
    """A checkpoint from before per-step draws (no "rng_scheme") cannot continue its trajectory."""
    found = ckpt.get("rng_scheme")
    if found == RNG_SCHEME:
        return
    what = (f"checkpoint {path} was written with random-draw scheme {found!r}" if found else
            f"checkpoint {path} was written before training draws became per step (scheme {RNG_SCHEME!r})")
    if not allow:
        raise UserError(f"{what}, so this version cannot continue the same trajectory; start a new run (another "
                        "--exp-name or --results-dir), or pass --allow-rng-scheme-change true to continue it "
                        "with new random streams")
    log(f"WARNING: {what}; continuing with new random streams (--allow-rng-scheme-change)")


def resume_posthoc_ema(power_ema, ckpt: dict, path, start_step: int, log) -> None:
    """Restore the power-function EMAs (bitwise); they cannot start in the middle of a run."""
    saved = ckpt.get("posthoc_ema")
    if power_ema is None:
        if saved is not None:
            log(f"WARNING: {path} tracked post-hoc EMAs; this run stops tracking them (--posthoc-ema-snapshot-every 0)")
        return
    if saved is None:
        raise UserError(f"{path} (step {start_step}) was trained without --posthoc-ema-snapshot-every; the power-"
                        "function averages must start at step 1, so they cannot be turned on mid-run: resume without "
                        "it, or start a new run (another --exp-name)")
    try:
        power_ema.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise UserError(f"{path}: {e}; resume with --posthoc-ema-sigma-rels "
                        f"{','.join(str(s) for s in saved.get('sigma_rels', []))}") from None


def accumulate_gradients(ddp_model, objective, accelerator, x, y, draws: dict, batch_per_gpu: int) -> dict:
    """Forward and backward of this process's share (x, y and `draws` of StepDraws) in micro-batches of
    `batch_per_gpu`. Each micro-batch's mean loss is divided by their number, so the summed gradient is
    the share's mean (and, after DDP's average over processes, the global batch's mean); under DDP the
    all-reduce runs on the last micro-batch only (no_sync before). Returns the share's mean "loss",
    "mse" (and "vb") as detached float32 0-dim device tensors; no host synchronisation."""
    rows_list = micro_batches(x.shape[0], batch_per_gpu)
    n = len(rows_list)
    sums: dict = {}
    for k, rows in enumerate(rows_list):
        d = take(draws, rows)
        kwargs = {"y": y[rows], **({"drop_mask": d["drop_mask"]} if "drop_mask" in d else {})}
        sync = k == n - 1 or not hasattr(ddp_model, "no_sync")
        with contextlib.nullcontext() if sync else ddp_model.no_sync():
            with accelerator.autocast():
                losses = objective.training_losses(ddp_model, x[rows], d["t"], model_kwargs=kwargs, noise=d["noise"])
            loss = losses["loss"].mean()
            accelerator.backward(loss / n if n > 1 else loss)  # fp16: scaled by the GradScaler
        for key, value in losses.items():
            v = value.detach().float().mean()
            sums[key] = v if key not in sums else sums[key] + v
    return {key: v / n for key, v in sums.items()} if n > 1 else sums


def main(argv=None):
    args = build_parser().parse_args(argv)
    from accelerate import Accelerator

    from models import MODELS

    if args.model not in MODELS:
        raise UserError(f"unknown --model {args.model!r}; registered models: {', '.join(sorted(MODELS))}")
    dataset = open_dataset(args.zarr_path, args.feature_path, args.label_path, cache=args.data_cache,
                           hflip=args.hflip)
    if len(dataset) == 0:
        raise UserError("the training data holds no items")
    data = _data_description(args, dataset)
    from fcdm_common.latent_norm import NormalizedDataset, norm_for_training

    norm = norm_for_training(dataset, args.latent_norm, args.zarr_path or args.feature_path)
    data["latent_norm"] = norm.to_config() if norm is not None else {"mode": "none"}
    dataset = NormalizedDataset(dataset, norm) if norm is not None else dataset
    model_kwargs, user_overrides = resolve_model_kwargs(args, data)
    objective_name = args.objective
    default_sampler = "ddim" if objective_name == "diffusion" else "euler"
    grid_sampler = default_sampler if args.grid_sampler == "auto" else args.grid_sampler
    try:
        from diffusion import check_sampler
        check_sampler(objective_name, grid_sampler)  # every sampler of sample.py, diffusers:<Class> too
    except ValueError as e:
        raise UserError(f"--grid-sampler {grid_sampler} does not fit --objective {objective_name}: {e}") from None
    if args.report_to != "none":
        try:
            __import__("torch.utils.tensorboard" if args.report_to == "tensorboard" else "wandb")
        except ImportError:
            raise UserError(f"--report-to {args.report_to} needs the {args.report_to} package; "
                            f"pip install {args.report_to}") from None
    eval_plan = plan_from_args(args, data, objective_name)  # reference, graph, sampler: checked before writing

    exp_name = args.exp_name or experiment_name(
        args.model, objective_name, data["name"], args.global_batch_size, args.lr, args.seed,
        extra={k: v for k, v in (("model", user_overrides), ("objective", args.objective_kwargs),
                                 ("train", _nondefault_training(args))) if v})
    run_dir = Path(args.results_dir) / exp_name
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=str(run_dir),
                              cpu=not torch.cuda.is_available())  # CPU: gloo process group under torchrun
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    device = accelerator.device
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} processes")
    batch = args.global_batch_size // world
    batch_per_gpu, accum_steps = accumulation_steps(args.global_batch_size, world, args.batch_per_gpu)
    if device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        tune_cpu_allocator()  # reuse freed activations instead of page-faulting them in every step

    # --- model (same init on every rank), checked against the data before anything is written
    seed_everything(args.seed)
    model, model_kwargs = build_model_for_data(args.model, model_kwargs, data)
    check_levels_fit_data(model, args.model, data)
    check_model_fits_data(model, dataset, data, objective_name,
                          args.zarr_path or f"{args.feature_path} / {args.label_path}")
    from diffusion import create_objective

    try:
        objective = create_objective(objective_name, **args.objective_kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad --objective-kwargs {json.dumps(args.objective_kwargs)}: {e}") from None

    loader_probe = len(dataset) // args.global_batch_size
    if loader_probe == 0:
        raise UserError(f"the data has {len(dataset)} items, fewer than one global batch of {args.global_batch_size}; "
                        "lower --global-batch-size")
    max_steps = args.max_train_steps or (args.epochs * loader_probe if args.epochs else PAPER_STEPS)
    opt_impl = args.optimizer_impl
    if opt_impl == "auto":
        opt_impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    config = {
        "model": args.model, "model_kwargs": model_kwargs, "objective": objective_name,
        "objective_kwargs": dict(args.objective_kwargs), "data": data, "vae": _vae_config(args, data),
        "train": {"global_batch_size": args.global_batch_size, "batch_per_process": batch,
                  "batch_per_gpu": batch_per_gpu, "grad_accum_steps": accum_steps, "rng_scheme": RNG_SCHEME,
                  "posthoc_ema": {"snapshot_every": args.posthoc_ema_snapshot_every,
                                  "sigma_rels": args.posthoc_ema_sigma_rels, "dtype": args.posthoc_ema_dtype},
                  "lr": args.lr,
                  "betas": [0.9, 0.999], "weight_decay": args.weight_decay, "max_train_steps": max_steps,
                  "ema_decay": args.ema_decay, "grad_clip": args.grad_clip, "seed": args.seed,
                  "mixed_precision": accelerator.mixed_precision, "grad_checkpointing": args.grad_checkpointing,
                  "compile": args.compile, "optimizer_impl": opt_impl, "max_bad_steps": args.max_bad_steps,
                  "num_workers": args.num_workers, "data_cache": args.data_cache, "hflip": args.hflip},
        "log": {"log_every": args.log_every, "ckpt_every": args.ckpt_every, "keep_last": args.keep_last,
                "keep_every": args.keep_every, "sample_every": args.sample_every, "cfg_scale": args.cfg_scale,
                "cfg_channels": args.cfg_channels, "grid_sampler": grid_sampler, "grid_steps": args.grid_steps,
                "grid_cols": args.grid_cols, "grid_seed": args.grid_seed, "report_to": args.report_to},
        "run": {"exp_name": exp_name, "run_dir": str(run_dir), "world_size": world,
                "torch": str(torch.__version__), "device": device.type},
    }

    config = json.loads(json.dumps(config))  # plain JSON types only (weights_only loading)

    # --- the grids' VAE, checked before anything is written (offline: one message, no run folder)
    vae = None
    if args.sample_every > 0:
        from fcdm_common.autoencoders import decoder_for_run

        vae = decoder_for_run(config["vae"], data, device, load=is_main, hint=GRID_VAE_HINT)  # None off rank 0

    # --- find what to resume from (every rank reads the same file)
    run_lock = acquire_run_lock(run_dir) if is_main else None  # one trainer per run folder, freed on exit
    logger = RunLogger(run_dir, enabled=is_main)
    ckpt, ckpt_file, unreadable = None, None, []
    if args.resume:
        ckpt, ckpt_file = load_checkpoint(args.resume, for_training=True), Path(args.resume)
    else:
        ckpt, ckpt_file, unreadable = find_resume_checkpoint(
            run_dir / "checkpoints", log=logger.log if is_main else (lambda m: None), start_over=args.start_over)
    if ckpt is not None:
        old = ckpt["config"]
        for key in ("model", "model_kwargs", "objective", "objective_kwargs"):
            if json.loads(json.dumps(old.get(key))) != json.loads(json.dumps(config[key])):
                raise UserError(f"checkpoint {ckpt_file} was trained with {key}={json.dumps(old.get(key))}, this "
                                f"command asks for {json.dumps(config[key])}; use another --exp-name/--results-dir")
        from fcdm_common.latent_norm import same_norm

        if not same_norm((old.get("data") or {}).get("latent_norm"), config["data"]["latent_norm"]):
            raise UserError(f"checkpoint {ckpt_file} was trained with latent normalisation "
                            f"{json.dumps((old.get('data') or {}).get('latent_norm', {'mode': 'none'}))}, but the data "
                            f"now gives {json.dumps(config['data']['latent_norm'])}; train on the same store and "
                            "--latent-norm, or start a new run (--exp-name)")
        check_rng_scheme(ckpt, ckpt_file, args.allow_rng_scheme_change, logger.log)
        old_train = old.get("train", {})
        for key in ("global_batch_size", "lr", "seed", "ema_decay", "weight_decay", "mixed_precision", "grad_clip"):
            if key in old_train and old_train[key] != config["train"][key]:
                logger.log(f"WARNING: {key} changed from {old_train[key]} to {config['train'][key]} on resume")

    # --- devices, memory format, switches
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(args.grad_checkpointing)
    elif args.grad_checkpointing != "none":
        raise UserError(f"--model {args.model} has no set_grad_checkpointing(); use --grad-checkpointing none")
    model = model.to(device)  # the network keeps its own (channels-last) activation layout; inputs go in NHWC
    ema = create_ema(model)  # EMA starts as an exact copy (DiT: update_ema(ema, model, decay=0))
    power_ema = PowerEMA(model, args.posthoc_ema_sigma_rels) if args.posthoc_ema_snapshot_every else None
    model.train()
    if args.compile:
        if hasattr(model, "compile_blocks"):
            model.compile_blocks()
        else:
            model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                            fused=opt_impl == "fused", foreach=opt_impl == "foreach")
    scaler = accelerator.scaler  # a GradScaler for fp16 only

    # --- random draws: functions of (seed, step, sample index) (fcdm_common/step_rng.py); the global
    # streams are seeded per rank for anything else, and restored on a same-world-size resume
    seed_everything(rank_seed(args.seed, rank, world))
    generators = {}
    step_draws = StepDraws(args.seed, args.global_batch_size, world, rank, data["latent_shape"], device,
                           objective.sample_timesteps, getattr(model, "label_drop_shape", None),
                           float(getattr(model, "class_dropout_prob", 0.0)))
    start_step, skipped_total = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_step = int(ckpt["step"])
        skipped_total = int(ckpt.get("counters", {}).get("skipped_steps", 0))
        resume_posthoc_ema(power_ema, ckpt, ckpt_file, start_step, logger.log)
        per_rank = ckpt.get("rng_per_rank")
        if per_rank and len(per_rank) == world:
            restore_rng(per_rank[rank], generators)
        else:  # no training draw uses these streams, so the trajectory stays the same
            seed_everything(rank_seed(args.seed, rank, world) + start_step)
        logger.log(f"resumed from {ckpt_file} at step {start_step}")
        if is_main and ckpt_file.parent == run_dir / "checkpoints" and not ema_export_path(ckpt_file).exists():
            logger.log(f"completed the missing export {export_ema(ckpt['ema'], ckpt['config'], start_step, ckpt_file)}")
        del ckpt
    ddp_model = accelerator.prepare_model(model, device_placement=False) if world > 1 else model

    # --- run folder
    if is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):  # temp files of killed writes
            remove_stale_temps(folder)
        atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
        remove_snapshots_after(run_dir, start_step)  # post-hoc EMA snapshots of lost work
    if args.report_to != "none":
        accelerator.init_trackers(exp_name, config=_flat(config),
                                  init_kwargs={"wandb": {"name": exp_name, "dir": str(run_dir)}}
                                  if args.report_to == "wandb" else {})
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(f"{args.model} ({n_params / 1e6:.2f}M parameters) {objective_name} on {data['name']} "
               f"({len(dataset)} items, latents {data['latent_shape']}, {data['num_classes']} classes); "
               f"{world} process(es) x batch {batch}"
               + (f" ({accum_steps} micro-batches of {batch_per_gpu})" if accum_steps > 1 else "")
               + f", precision {accelerator.mixed_precision}, {opt_impl} AdamW; "
               f"run folder {run_dir}; steps {start_step} -> {max_steps}")
    from fcdm_common.launchers import process_count_warning
    if is_main and (launch_warning := process_count_warning(world)):
        logger.log(launch_warning)

    loader = TrainLoader(dataset, batch, rank=rank, world_size=world, seed=args.seed, start_step=start_step,
                         num_workers=args.num_workers, pin_memory=device.type == "cuda")

    # --- device-side accumulators (reduced at log steps only)
    zero = lambda: torch.zeros((), device=device)  # noqa: E731
    sums = {k: zero() for k in ("loss", "mse", "vb", "grad_norm", "good", "bad")}
    consec = zero()  # consecutive non-finite steps, as of the last step
    max_consec = zero()  # max of `consec` since the last check
    decay = args.ema_decay

    def check_bad_streak(step: int) -> None:
        nonlocal max_consec
        worst = int(max_consec.item())  # identical on every rank (gradients are all-reduced)
        max_consec = consec.clone()
        if worst >= args.max_bad_steps:
            last = sorted((run_dir / "checkpoints").glob("*.pt"))
            from fcdm_common.data_checks import describe_nonfinite
            from fcdm_common.distributed import all_gather_object

            records = {s: v for r in all_gather_object(loader.nonfinite_items(step)) for s, v in r.items()}
            cause = describe_nonfinite(records, data["zarr_path"] or data["feature_path"])
            raise UserError(
                f"training stopped at step {step}: {worst} consecutive steps had non-finite loss or gradients "
                f"(--max-bad-steps {args.max_bad_steps}); the last good checkpoint is "
                f"{last[-1] if last else 'none'}; "
                + (cause or "lower --lr, set --grad-clip or use --mixed-precision bf16/no"))

    def save(step: int) -> None:
        skipped = skipped_total + int(sums["bad"].item())  # bad steps are identical on every rank
        rng_all = accelerator.gather_for_metrics([capture_rng(generators)], use_gather_object=True) \
            if world > 1 else [capture_rng(generators)]
        if is_main:
            state = {
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                "rng_scheme": RNG_SCHEME,
                "config": config, "rng": rng_all[0], "rng_per_rank": list(rng_all),
                "data": {"step": loader.step, "epoch": loader.epoch, "seed": args.seed, "world_size": world},
                "counters": {"skipped_steps": skipped, "nimg": step * args.global_batch_size},
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if power_ema is not None:
                state["posthoc_ema"] = power_ema.state_dict()
            path = checkpoint_path(run_dir / "checkpoints", step)
            save_checkpoint(state, path)
            unreadable[:] = [p for p in unreadable if p.name != path.name]  # overwritten: readable now
            export_ema(ema.state_dict(), config, step, path)
            removed = prune_checkpoints(run_dir / "checkpoints", args.keep_last, args.keep_every, unreadable=unreadable)
            logger.log(f"saved checkpoint {path}" + (f" (removed {len(removed)} old files)" if removed else ""))
        accelerator.wait_for_everyone()

    def grid(step: int) -> None:
        if not is_main or vae is None:
            return
        path = run_dir / "samples" / f"{step:07d}.png"
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            draw_grid(ema, config, vae, device, path, accelerator.autocast, step=step)
        logger.log(f"saved sample grid {path}")

    if start_step and args.sample_every and (start_step % args.sample_every == 0 or start_step == max_steps) \
            and not (run_dir / "samples" / f"{start_step:07d}.png").exists():
        grid(start_step)  # killed between the checkpoint and its grid: draw the missing grid now

    from fcdm_common.progress import progress

    evaluator = InTrainingEvaluator(eval_plan, accelerator=accelerator, logger=logger, run_dir=run_dir, config=config,
                                    ema=ema, device=device, max_steps=max_steps, ckpt_every=args.ckpt_every) \
        if eval_plan else None
    if evaluator:
        evaluator.start(start_step)  # reference features; an evaluation a kill left pending
    bar = progress(total=max_steps, initial=start_step, disable=not is_main, dynamic_ncols=True, desc="train")
    step = start_step
    window_start, window_steps, paused = time.perf_counter(), 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data_iter = iter(loader)
    while step < max_steps:
        x, y = next(data_iter)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        losses = accumulate_gradients(ddp_model, objective, accelerator, x, y, step_draws.draw(step), batch_per_gpu)
        loss = losses["loss"]  # mean over this process's share
        if scaler is not None:
            scaler.unscale_(opt)
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True).float()
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))
        if args.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, args.grad_clip, grad_norm, foreach=True)
        if scaler is not None:  # the scaler skips overflowing steps itself
            scaler.step(opt)
            scaler.update()
        elif opt_impl == "fused":
            opt.found_inf = bad.float()  # the fused kernel leaves params, moments and step untouched when 1
            opt.step()
            del opt.found_inf
        else:
            if not bool(bad):  # the one host synchronisation of the foreach path
                opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, decay, weight=(~bad).float())
        if power_ema is not None:  # a skipped step left the weights as they were: still an update
            power_ema.update(model, step + 1)
        good = (~bad).float()
        sums["loss"] += torch.where(bad, 0.0, loss.detach().float())
        sums["mse"] += torch.where(bad, 0.0, losses["mse"].detach().float().mean())
        if "vb" in losses:
            sums["vb"] += torch.where(bad, 0.0, losses["vb"].detach().float().mean())
        sums["grad_norm"] += torch.where(bad, 0.0, grad_norm)
        sums["good"] += good
        sums["bad"] += bad.float()
        consec = torch.where(bad, consec + 1, 0.0)
        max_consec = torch.maximum(max_consec, consec)
        step += 1
        window_steps += 1
        bar.update(1)

        if step % args.log_every == 0 or step == max_steps:
            stats = torch.stack([sums[k] for k in ("loss", "mse", "vb", "grad_norm", "good", "bad")])
            stats = accelerator.reduce(stats, reduction="sum") if world > 1 else stats
            s = stats.tolist()  # the host synchronisation of this window
            good_n = s[4] / world
            elapsed = time.perf_counter() - window_start - paused
            sps = window_steps / max(elapsed, 1e-9)
            mean = (lambda v: v / s[4] if s[4] > 0 else float("nan"))
            skipped_total += int(round(s[5] / world))
            record = {"step": step, "loss": mean(s[0]), "mse": mean(s[1]),
                      "vb": mean(s[2]) if objective_name == "diffusion" else None,
                      "grad_norm": mean(s[3]), "lr": opt.param_groups[0]["lr"],
                      "steps_per_sec": sps, "images_per_sec": sps * args.global_batch_size,
                      "peak_mem_gb": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
                      "skipped_steps": int(round(s[5] / world)), "skipped_total": skipped_total,
                      "epoch": step // loader.steps_per_epoch, "good_steps": int(good_n)}
            logger.metrics(record)
            logger.log(f"step {step:07d} loss {record['loss']:.4f} mse {record['mse']:.4f} grad_norm "
                       f"{record['grad_norm']:.3f} steps/s {sps:.2f} img/s {record['images_per_sec']:.1f}"
                       + (f" skipped {record['skipped_steps']}" if record["skipped_steps"] else ""))
            bar.set_postfix(loss=f"{record['loss']:.4f}", steps_per_s=f"{sps:.2f}")
            if args.report_to != "none":
                accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=step)
            for k in sums:
                sums[k].zero_()
            window_start, window_steps, paused = time.perf_counter(), 0, 0.0
        if step % min(args.log_every, args.max_bad_steps) == 0 or step % args.ckpt_every == 0 or step == max_steps:
            check_bad_streak(step)
        pause_start = time.perf_counter()
        if power_ema is not None and is_main and (step % args.posthoc_ema_snapshot_every == 0 or step == max_steps):
            save_posthoc_snapshots(power_ema, model, run_dir, step, args.posthoc_ema_dtype,
                                   metadata={"config": json.dumps(config)})
        if step % args.ckpt_every == 0 or step == max_steps:
            save(step)
        if args.sample_every > 0 and (step % args.sample_every == 0 or step == max_steps):
            grid(step)
        if evaluator:
            evaluator.maybe_run(step, save)  # after the checkpoint of this step; excluded from steps/s
        paused += time.perf_counter() - pause_start
    bar.close()
    if is_main:
        write_curves(run_dir, logger.log)
    if step == start_step:
        logger.log(f"nothing to do: the run is already at step {step} >= --max-train-steps {max_steps}")
    else:
        logger.log(f"done: {step} steps, {skipped_total} skipped; checkpoints in {run_dir / 'checkpoints'}")
    if args.report_to != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    if run_lock is not None:
        run_lock.release()


if __name__ == "__main__":
    run_main(main)
