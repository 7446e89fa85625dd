r"""Train FCDM (or any registered model) on precomputed latents, with accelerate.

    accelerate launch --mixed_precision bf16 --num_processes 4 train_gen/train.py --model FCDM-XL \
        --feature-path F --label-path L --results-dir results
    python train_gen/train.py --model FCDM-digits --zarr-path data/digits.zarr --vae none ...

Defaults reproduce the paper's Table 6: AdamW (lr 1e-4 constant, betas (0.9, 0.999), weight decay 0),
global batch 256, EMA 0.9999, the iDDPM hybrid loss (or `--objective flow`), 400K steps.

The flags become one `TrainConfig` (train_gen/config.py); the run folder is
`--results-dir/<name from the settings>` (or `--exp-name`), so rerunning the same command resumes from
the newest readable checkpoint in `<run>/checkpoints/`: model, EMA, optimizer, step, data position and
every random state of every process. Training N steps straight and N/2 + resume N/2 give
bitwise-identical weights (on CPU; on GPUs as far as the kernels are deterministic). The loop itself
is train_gen/training_loop.py.

Every random draw of a step (data order, flips, posterior noise, timesteps, noise, label dropout) is
a function of (seed, step, index of the sample in the global batch) (train_gen/step_draws.py), so
a run is the same at any process count and `--per-proc-batch-size` (gradient accumulation) up to float
summation order, and a checkpoint resumes on another process count on the same trajectory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import operator
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator

from diffusion import check_sampler, create_objective
from diffusion.flow_schedules import add_time_schedule_args, schedule_objective_kwargs
from diffusion.guidance import CFG_SCALE_MAX, GUIDANCE_MODES, cfg_scale_arg, parse_cfg_channels
from diffusion.sampling import check_num_steps, load_guide
from evaluations.in_training import add_eval_args, plan_from_args
from fcdm_common.cli import (
    HelpFormatter,
    UserError,
    alias_help,
    error_summary,
    float_in,
    non_negative_int,
    path_component,
    positive_int,
    run_main,
    seed_int,
    str2bool,
)
from fcdm_common.cpu import tune_cpu_allocator
from fcdm_common.rng import seed_everything
from models import MODELS, create_model
from models.autoencoders import DEFAULT_SCALING_FACTOR, DEFAULT_VAE_ID
from models.checkpoints import load_checkpoint
from models.kernels import KERNELS, KERNELS_HELP, kernels_problem
from models.latent_space import NORM_MODES, AutoencoderSpec, decoder_for_run, same_norm, vae_for_data
from models.registry import INPUT_SIZE_ARGS
from preparation.readers import open_dataset
from preparation.statistics import NormalizedDataset, norm_for_training
from train_gen.config import (
    PAPER_STEPS,
    REFUSE,
    TRAJECTORY_DEFAULTS,
    TRAJECTORY_SETTINGS,
    DataConfig,
    LogConfig,
    OptimConfig,
    PosthocEMAConfig,
    RepaConfig,
    RunInfo,
    TrainConfig,
    run_name_extra,
)
from train_gen.ema import SNAPSHOT_DTYPES, sigma_rel_to_gamma
from train_gen.preemption import PREEMPTED_STATUS
from train_gen.repa import (
    add_repa_args,
    build_repa,
    check_repa_flags,
    repa_identity,
    repa_name_settings,
    repa_requested,
)
from train_gen.run_folder import RunLogger, acquire_run_lock, experiment_name, find_resume_checkpoint
from train_gen.step_draws import RNG_SCHEME, BatchPlan
from train_gen.training_loop import ResumePoint, training_loop

CKPT_MODES = ("none", "selective", "full")
GRID_VAE_HINT = ", or train without sample grids (--sample-every 0)"
# How a resume compares the recorded values of a trajectory setting where equality is not the question: alignment
# without the encoder's file path (it may move), normalisations by mode and statistics (to a rounding tolerance).
SAME_ON_RESUME = {"repa": lambda a, b: repa_identity(a) == repa_identity(b), "latent_norm": same_norm}


# ---------------------------------------------------------------------------------- arguments
def json_dict_arg(value: str) -> dict:
    try:
        d = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {value!r}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"hidden_size\": 16}}', got {value!r}")
    return d


def int_list_arg(value: str) -> list:
    try:
        return [int(v) for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,4,8,4,2, got {value!r}") from None


def ckpt_mode_arg(value: str) -> str:
    v = value.strip().lower()
    if v in CKPT_MODES:
        return v
    try:
        return "full" if str2bool(v) else "none"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected none, selective or full (or a boolean), got {value!r}") from None


def sigma_list_arg(value: str) -> list:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="FCDM-XL",
                   help="registered model name (models.MODELS), e.g. FCDM-S/B/L/XL, DiT-XL/2")
    g.add_argument("--model-kwargs", type=json_dict_arg, default={},
                   help='JSON object of constructor overrides, e.g. \'{"hidden_size": 16, "kernel_size": 5}\'')
    g.add_argument("--hidden-size", type=positive_int, default=None, help="shortcut for model_kwargs hidden_size")
    g.add_argument("--depths", type=int_list_arg, default=None, help="shortcut for model_kwargs depths, e.g. 1,1,1,1,1")
    g.add_argument("--label-dropout", choices=("shared", "per-level"), default="shared",
                   help="FCDM label dropout: one draw per sample at every level (paper) or one per level (the release)")
    g.add_argument("--objective", choices=("diffusion", "flow"), default="diffusion",
                   help="iDDPM diffusion with learned sigma (paper) or linear flow matching (Appendix E)")
    g.add_argument("--objective-kwargs", type=json_dict_arg, default={},
                   help="JSON object passed to diffusion.create_objective (e.g. '{\"noise_schedule\": \"linear\"}')")
    add_time_schedule_args(p)  # --time-distribution, --logit-mean/std, --time-shift (diffusion/flow_schedules.py)
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
    g.add_argument("--hflip", type=str2bool, default=TRAJECTORY_DEFAULTS["hflip"],
                   help="random horizontal flips (the paper's only augmentation; picks the stored flipped latent). "
                        "false: original orientation only, for data whose mirror image is not valid (digits)")
    g.add_argument("--latent-norm", choices=NORM_MODES, default=TRAJECTORY_DEFAULTS["latent_norm"],
                   help="none: the network sees the stored latents (paper); channel: (z - mean_c) / std_c with the "
                        "store's per-channel statistics (preparation/latent_stats.py adds them to older stores)")
    g = p.add_argument_group("run folder and resume")
    g.add_argument("--results-dir", default="results", help="parent folder of run folders")
    g.add_argument("--exp-name", type=path_component, default=None,
                   help="run folder name, one path component inside --results-dir (default: derived from the settings)")
    g.add_argument("--resume", default=None, help="resume from this checkpoint file instead of the run's newest")
    g.add_argument("--start-over", type=str2bool, default=False,
                   help="train from step 0 when the run folder has checkpoints but none can be read (without it "
                        "that stops with a list of them); the unreadable files stay until overwritten")
    g = p.add_argument_group("optimisation (defaults: paper Table 6)")
    g.add_argument("--global-batch-size", type=positive_int, default=256, help="images per step over all processes")
    g.add_argument("--per-proc-batch-size", "--batch-per-gpu", dest="per_proc_batch_size", type=positive_int,
                   default=None, help=alias_help(
                       "micro-batch per process; gradients accumulate over global / (processes x this) micro-batches "
                       "per optimizer step (default: the whole per-process share at once). The run's trajectory "
                       "does not depend on it nor on the process count", "--batch-per-gpu"))
    g.add_argument("--allow-rng-scheme-change", type=str2bool, default=False,
                   help="resume a checkpoint written before per-step random draws anyway (new random streams, "
                        "a different trajectory from the one it started)")
    g.add_argument("--lr", type=float_in(0, lo_open=True), default=1e-4, help="AdamW learning rate (constant), > 0")
    g.add_argument("--weight-decay", type=float_in(0), default=TRAJECTORY_DEFAULTS["weight_decay"],
                   help="AdamW weight decay, >= 0")
    g.add_argument("--max-train-steps", type=positive_int, default=None,
                   help=f"total optimizer steps (default: --epochs, else {PAPER_STEPS})")
    g.add_argument("--epochs", type=positive_int, default=None, help="train this many passes over the data")
    g.add_argument("--ema-decay", type=float_in(0, 1), default=TRAJECTORY_DEFAULTS["ema_decay"],
                   help="EMA decay per step, in [0, 1] (0: the EMA is the model; 1: it stays the initial weights)")
    g.add_argument("--posthoc-ema-snapshot-every", type=non_negative_int, default=0,
                   help="also track EDM2 power-function EMAs and save snapshots of them every N steps into "
                        "<run>/posthoc_ema/ for train_gen/reconstruct_ema.py (0: off)")
    g.add_argument("--posthoc-ema-sigma-rels", type=sigma_list_arg, default=[0.05, 0.10],
                   help="relative widths of the tracked power-function EMAs, comma-separated")
    g.add_argument("--posthoc-ema-dtype", choices=tuple(SNAPSHOT_DTYPES), default="fp16",
                   help="precision of the snapshot files (the tracked averages stay float32)")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="autocast precision (default: what accelerate was launched/configured with, else no)")
    g.add_argument("--grad-checkpointing", type=ckpt_mode_arg, default="none",
                   help="activation checkpointing: none, selective (keep matmul/conv outputs) or full")
    g.add_argument("--compile", type=str2bool, default=False, help="torch.compile the model's blocks")
    g.add_argument("--kernels", choices=KERNELS, default="torch",
                   help=f"{KERNELS_HELP}. Not part of the run name; may change on resume (with a warning)")
    g.add_argument("--grad-clip", type=float_in(0), default=TRAJECTORY_DEFAULTS["grad_clip"],
                   help="clip the global gradient norm to this, >= 0 (0: off)")
    g.add_argument("--optimizer-impl", choices=("auto", "fused", "foreach"), default="auto",
                   help="AdamW kernel: fused (skips bad steps on the device) or foreach (one sync per step); "
                        "auto: fused")
    g.add_argument("--max-bad-steps", type=positive_int, default=50,
                   help="stop after this many consecutive steps with non-finite loss or gradients")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="global seed, 0 .. 2**32-1 (model init, data order; per-rank streams derive from it)")
    g.add_argument("--tf32", type=str2bool, default=True, help="allow TF32 matmuls/convolutions on CUDA")
    g = p.add_argument_group("logging, checkpoints and sample grids")
    g.add_argument("--log-every", type=positive_int, default=100, help="reduce and log metrics every N steps")
    g.add_argument("--ckpt-every", type=positive_int, default=10_000,
                   help="write a checkpoint every N steps (and at the end)")
    g.add_argument("--keep-last", type=positive_int, default=2, help="keep the newest K checkpoints")
    g.add_argument("--keep-every", type=non_negative_int, default=100_000,
                   help="also keep checkpoints whose step is a multiple of M (0: none)")
    g.add_argument("--sample-every", type=non_negative_int, default=10_000,
                   help="draw the EMA sample grid every N steps and at the end (0: never)")
    g.add_argument("--cfg-scale", type=cfg_scale_arg, default=4.0,
                   help=f"guidance scale of the grids (classifier-free or, with --guide-ckpt, autoguidance), in "
                        f"[0, {CFG_SCALE_MAX:g}] (1: off)")
    g.add_argument("--grid-guidance", choices=GUIDANCE_MODES, default=None,
                   help="guidance of the grids: cfg, or autoguidance by --guide-ckpt (default: autoguidance when "
                        "--guide-ckpt is given, else cfg)")
    g.add_argument("--guide-ckpt", default=None, metavar="PATH",
                   help="autoguidance guide of the grids and evaluations: a checkpoint trained on the same latents, "
                        "objective and classes (e.g. a smaller or shorter run); checked before anything is written")
    g.add_argument("--guide-use-ema", type=str2bool, default=True, metavar="BOOL",
                   help="the guide's EMA weights (default true) or its raw weights")
    g.add_argument("--cfg-channels", default="all",
                   help="guided channels of the grids: all, or k in 1..latent channels (DiT: 3)")
    g.add_argument("--grid-sampler", default="auto",
                   help="grid sampler: any --sampler of sample.py (diffusion: ddpm, ddim, dpm++2m, unipc, ..., "
                        "diffusers:<Class>; flow: euler, heun, sde, dopri5); auto: ddim / euler")
    g.add_argument("--grid-steps", type=positive_int, default=50,
                   help="sampling steps of the grids (diffusion: at most its 1000 training steps)")
    g.add_argument("--grid-cols", type=positive_int, default=8, help="samples per class row of the grid")
    g.add_argument("--grid-seed", type=seed_int, default=0, help="seed of the fixed grid noise, 0 .. 2**32-1")
    g.add_argument("--vae", choices=("sd", "none"), default=None,
                   help="decoder of the grids (default: the VAE recorded with the data)")
    g.add_argument("--hf-model-dir", default=None,
                   help="local diffusers autoencoder snapshot for decoding grids (default: the data's VAE folder)")
    g.add_argument("--hf-model-name", default=None,
                   help="hub name of the grids' VAE (default: the data's; sd-vae-ft-ema for .npy data)")
    g.add_argument("--report-to", choices=("none", "tensorboard", "wandb"), default="none",
                   help="also send metrics to TensorBoard or Weights & Biases")
    add_eval_args(p)  # --eval-every, --eval-samples, --ref-batch, ... (evaluations/in_training.py)
    add_repa_args(p)  # --repa-encoder, --repa-site, --repa-weight, ... (train_gen/repa.py)
    return p


# ---------------------------------------------------------------------------------- from flags to a config
def describe_data(args, dataset, latent_norm: dict) -> DataConfig:
    """The data section of the config, from the store's attributes (the .npy layout records none: it holds
    SD-VAE latents at 1/8 of the image size, the original release's setting)."""
    info = dict(dataset.info)
    C, H, W = (int(v) for v in dataset.latent_shape)
    vae_name = info.get("vae")
    if vae_name is None:
        vae_name, scale, image_size = DEFAULT_VAE_ID, DEFAULT_SCALING_FACTOR, 8 * H
    else:
        scale = float(info.get("scaling_factor", DEFAULT_SCALING_FACTOR))
        image_size = int(info.get("image_size", H if vae_name == "none" else 8 * H))
    source = args.zarr_path or args.feature_path
    return DataConfig(zarr_path=args.zarr_path, feature_path=args.feature_path, label_path=args.label_path,
                      name=Path(str(source).rstrip("/")).stem or "data", count=len(dataset), latent_shape=(C, H, W),
                      num_classes=int(dataset.num_classes), image_size=image_size, vae=vae_name,
                      scaling_factor=scale, shift_factor=float(info.get("shift_factor") or 0.0),
                      vae_class=info.get("vae_class", "none" if vae_name == "none" else "AutoencoderKL"),
                      downsample=image_size // H, hf_model_name=info.get("hf_model_name"),
                      hf_model_dir=info.get("hf_model_dir"), latent_norm=latent_norm)


def grid_decoder(args, data: DataConfig) -> AutoencoderSpec:
    """The grids' decoder: the data's VAE unless --vae/--hf-model-* override it (warned on a mismatch)."""
    spec, warning = vae_for_data(dataclasses.asdict(data), args.vae, args.hf_model_name, args.hf_model_dir,
                                 hint=GRID_VAE_HINT, strict=args.sample_every > 0)
    if warning and args.sample_every > 0:
        print(f"WARNING: sample grids: {warning}", flush=True)
    return spec


def resolve_model_kwargs(args, latent_shape, num_classes: int) -> tuple[dict, dict]:
    """(all constructor kwargs, the user's own overrides). Data-bound settings are checked."""
    user = dict(args.model_kwargs)
    if args.hidden_size is not None:
        user["hidden_size"] = args.hidden_size
    if args.depths is not None:
        user["depths"] = list(args.depths)
    if args.label_dropout != "shared":  # a model_kwargs override: in the checkpoint config and the run name
        user["label_dropout"] = args.label_dropout
    C = latent_shape[0]
    learn_sigma = args.objective == "diffusion"
    kwargs = dict(user)
    for key, value, why in (("in_channels", C, f"the data's latents have {C} channels"),
                            ("learn_sigma", learn_sigma,
                             f"the {args.objective} objective needs learn_sigma={learn_sigma}")):
        if key in kwargs and kwargs[key] != value:
            raise UserError(f"--model-kwargs sets {key}={kwargs[key]!r} but {why}; drop it from --model-kwargs")
        kwargs[key] = value
    n = num_classes
    if "num_classes" in kwargs and int(kwargs["num_classes"]) < n:
        raise UserError(f"--model-kwargs num_classes={kwargs['num_classes']} but the data has labels up to {n - 1}; "
                        f"use num_classes >= {n}")
    kwargs.setdefault("num_classes", n)
    if "depths" in kwargs:
        kwargs["depths"] = [int(d) for d in kwargs["depths"]]
    return kwargs, user


def build_model_for_data(name: str, kwargs: dict, data: DataConfig):
    """Create the model; models built for one input size (DiT) get the latent side. Returns (model, kwargs)."""
    arg = INPUT_SIZE_ARGS.get(name)
    if arg is not None and arg not in kwargs:
        kwargs = dict(kwargs, **{arg: data.latent_shape[1]})
    try:
        return create_model(name, **kwargs), kwargs
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build --model {name} with {json.dumps(kwargs)}: {e}") from None


def check_levels_fit_data(model, name: str, data: DataConfig) -> None:
    """A U-Net with n levels halves the latents n-1 times: H and W must be divisible by 2^(n-1)."""
    levels = getattr(model, "num_levels", None)
    if not levels:
        return
    _, H, W = data.latent_shape
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


def check_model_fits_data(model, dataset, data: DataConfig, objective: str, where: str) -> None:
    """One no-grad forward of a real batch item (eval mode: no RNG use) to fail early on shape mismatches."""
    x, y = dataset.get_batch(np.array([0]), np.random.default_rng(0))[:2]  # (and the image, with alignment)
    t = torch.zeros(1, dtype=torch.long) if objective == "diffusion" else torch.full((1,), 0.5)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x, t, y)
    except (ValueError, RuntimeError, AssertionError) as e:
        raise UserError(f"the model does not fit the data {where} (latents {tuple(data.latent_shape)}): "
                        f"{error_summary(e, 300)}") from None
    finally:
        model.train(was_training)
    C = data.latent_shape[0]
    want = (1, 2 * C if objective == "diffusion" else C, *data.latent_shape[1:])
    if tuple(out.shape) != want:
        raise UserError(f"the model returns {tuple(out.shape)} for latents {tuple(data.latent_shape)} of {where}; "
                        f"expected {want}")


def build_config(args, *, model_kwargs: dict, data: DataConfig, grid_sampler: str, plan: BatchPlan,
                 max_steps: int, mixed_precision: str, optimizer_impl: str, exp_name: str, run_dir: Path,
                 device_type: str, repa: Optional[RepaConfig] = None) -> TrainConfig:
    """The run's one configuration, from the flags and what was resolved from them."""
    return TrainConfig(
        model=args.model, model_kwargs=model_kwargs, objective=args.objective,
        objective_kwargs=dict(args.objective_kwargs), data=data, vae=grid_decoder(args, data),
        train=OptimConfig(
            global_batch_size=plan.global_batch, batch_per_process=plan.per_process, batch_per_gpu=plan.micro_batch,
            grad_accum_steps=plan.accumulation, rng_scheme=RNG_SCHEME,
            posthoc_ema=PosthocEMAConfig(snapshot_every=args.posthoc_ema_snapshot_every,
                                         sigma_rels=tuple(args.posthoc_ema_sigma_rels), dtype=args.posthoc_ema_dtype),
            lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, max_train_steps=max_steps,
            ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed, mixed_precision=mixed_precision,
            grad_checkpointing=args.grad_checkpointing, compile=args.compile, kernels=args.kernels,
            optimizer_impl=optimizer_impl,
            max_bad_steps=args.max_bad_steps, num_workers=args.num_workers, data_cache=args.data_cache,
            hflip=args.hflip),
        log=LogConfig(log_every=args.log_every, ckpt_every=args.ckpt_every, keep_last=args.keep_last,
                      keep_every=args.keep_every, sample_every=args.sample_every, cfg_scale=args.cfg_scale,
                      cfg_channels=args.cfg_channels, grid_sampler=grid_sampler, grid_steps=args.grid_steps,
                      grid_cols=args.grid_cols, grid_seed=args.grid_seed, report_to=args.report_to,
                      grid_guidance=args.grid_guidance, guide_ckpt=args.guide_ckpt, guide_use_ema=args.guide_use_ema),
        run=RunInfo(exp_name=exp_name, run_dir=str(run_dir), world_size=plan.world_size, torch=str(torch.__version__),
                    device=device_type),
        repa=repa)


# ---------------------------------------------------------------------------------- the resume decision
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


def recorded_setting(config: dict, where: str) -> tuple[bool, Any]:
    """(whether the run config records it, its value or None) of a TrajectorySetting.where like "train.hflip"."""
    value = config
    for part in where.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def resume_mismatches(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, the checkpoint's value, this command's value) of every setting of config.TRAJECTORY_SETTINGS on which
    the checkpoint's run config `old` and this run's `new` differ, in that table's order. A warned setting that `old`
    does not record (a checkpoint from before the option) is not compared; a refused one compares as None, which is
    what run configs without it mean (e.g. no alignment section: alignment off)."""
    found = []
    for key, setting in TRAJECTORY_SETTINGS.items():
        recorded, was = recorded_setting(old, setting.where)
        if not recorded and setting.on_resume != REFUSE:
            continue
        now = recorded_setting(new, setting.where)[1]
        if not SAME_ON_RESUME.get(key, operator.eq)(was, now):
            found.append((key, was, now))
    return found


def flag_value(value: Any) -> str:
    """A value as it is written on the command line (flow, false, 0.0001)."""
    return value if isinstance(value, str) else json.dumps(value)


def refusal(path, key: str, was: Any, now: Any) -> str:
    """Why the checkpoint cannot continue this run, named by the flag that sets the setting where one does."""
    if key == "latent_norm":  # the statistics come from the store, not only from --latent-norm
        return (f"checkpoint {path} was trained with latent normalisation {json.dumps(was or {'mode': 'none'})}, but "
                f"the data now gives {json.dumps(now)}; train on the same store and --latent-norm, or start a new run "
                "(--exp-name)")
    flag = TRAJECTORY_SETTINGS[key].flag
    if key == "repa":
        was, now = repa_identity(was), repa_identity(now)
    said_was, said_now = ((f"{flag} {flag_value(was)}", f"{flag} {flag_value(now)}") if flag else
                          (f"{key}={json.dumps(was)}", json.dumps(now)))
    return (f"checkpoint {path} was trained with {said_was}; this command asks for {said_now}, which is another run: "
            "use another --exp-name/--results-dir")


def check_resume_compatible(ckpt: dict, path: Path, config: dict, allow_rng_change: bool, log) -> None:
    """The checkpoint must belong to this run: every trajectory setting (config.TRAJECTORY_SETTINGS) is compared
    with its run config, a refused one that differs stops with one message (the first in the table's order), a
    warned one is continued with a warning."""
    mismatches = resume_mismatches(ckpt["config"], config)
    for key, was, now in mismatches:
        if TRAJECTORY_SETTINGS[key].on_resume == REFUSE:
            raise UserError(refusal(path, key, was, now))
    check_rng_scheme(ckpt, path, allow_rng_change, log)
    for key, was, now in mismatches:
        log(f"WARNING: {key} changed from {was} to {now} on resume")


def find_resume_point(args, config: TrainConfig, run_dir: Path, logger: RunLogger, is_main: bool) -> ResumePoint:
    """The checkpoint to continue from: --resume, else the run folder's newest readable one, else none."""
    if args.resume:
        resume = ResumePoint(load_checkpoint(args.resume, for_training=True), Path(args.resume), [])
    else:
        ckpt, path, unreadable = find_resume_checkpoint(
            run_dir / "checkpoints", log=logger.log if is_main else (lambda m: None), start_over=args.start_over)
        resume = ResumePoint(ckpt, path, unreadable)
    if resume.ckpt is not None:
        check_resume_compatible(resume.ckpt, resume.path, config.to_dict(), args.allow_rng_scheme_change, logger.log)
    return resume


# ---------------------------------------------------------------------------------- main
def open_training_data(args):
    """The data set (normalised with --latent-norm channel) and its config section."""
    dataset = open_dataset(args.zarr_path, args.feature_path, args.label_path, cache=args.data_cache,
                           hflip=args.hflip, images=repa_requested(args))  # alignment: the clean images too
    if len(dataset) == 0:
        raise UserError("the training data holds no items")
    norm = norm_for_training(dataset, args.latent_norm, args.zarr_path or args.feature_path)
    data = describe_data(args, dataset, norm.to_config() if norm is not None else {"mode": "none"})
    return (NormalizedDataset(dataset, norm) if norm is not None else dataset), data


def resolve_guidance_flags(args) -> None:
    """--grid-guidance and --eval-guidance resolved in place: autoguidance by default when --guide-ckpt is given;
    UserError when a mode needs a guide that is missing or the guide is given and used by neither."""
    guide = args.guide_ckpt
    for flag, key in (("--grid-guidance", "grid_guidance"), ("--eval-guidance", "eval_guidance")):
        mode = getattr(args, key) or ("autoguidance" if guide else "cfg")
        if mode == "autoguidance" and not guide:
            raise UserError(f"{flag} autoguidance needs --guide-ckpt PATH, the weaker model that guides")
        setattr(args, key, mode)
    if guide and "autoguidance" not in (args.grid_guidance, args.eval_guidance):
        raise UserError("--guide-ckpt is given but --grid-guidance and --eval-guidance are both cfg; "
                        "leave --guide-ckpt out or use autoguidance for one of them")


def check_flags(args, objective_name: str) -> str:
    """Flags that can be checked before any data is read; returns the grid sampler."""
    check_repa_flags(args)
    if args.model not in MODELS:
        raise UserError(f"unknown --model {args.model!r}; registered models: {', '.join(sorted(MODELS))}")
    grid_sampler = ("ddim" if objective_name == "diffusion" else "euler") if args.grid_sampler == "auto" \
        else args.grid_sampler
    try:
        check_sampler(objective_name, grid_sampler)  # every sampler of sample.py, diffusers:<Class> too
    except ValueError as e:
        raise UserError(f"--grid-sampler {grid_sampler} does not fit --objective {objective_name}: {e}") from None
    if args.report_to != "none":
        try:
            __import__("torch.utils.tensorboard" if args.report_to == "tensorboard" else "wandb")
        except ImportError:
            raise UserError(f"--report-to {args.report_to} needs the {args.report_to} package; "
                            f"pip install {args.report_to}") from None
    return grid_sampler


def check_grid_flags(args, objective, grid_sampler: str, data: DataConfig) -> None:
    """Grid flags that depend on the objective and the data: --grid-steps within what the grid sampler takes
    (a diffusion model's training steps at most), --cfg-channels within the latent channels (both checked
    again when the grid is drawn)."""
    if args.sample_every > 0:
        check_num_steps(objective, grid_sampler, args.grid_steps, flag="--grid-steps", whose="the run's")
    parse_cfg_channels(args.cfg_channels, data.latent_shape[0])


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.objective_kwargs = schedule_objective_kwargs(args, args.objective, args.objective_kwargs)
    resolve_guidance_flags(args)
    grid_sampler = check_flags(args, args.objective)
    dataset, data = open_training_data(args)
    model_kwargs, user_overrides = resolve_model_kwargs(args, data.latent_shape, data.num_classes)
    eval_plan = plan_from_args(args, dataclasses.asdict(data), args.objective)  # checked before writing

    exp_name = args.exp_name or experiment_name(
        args.model, args.objective, data.name, args.global_batch_size, args.lr, args.seed,
        extra=run_name_extra(user_overrides, args.objective_kwargs, vars(args), repa_name_settings(args)))
    run_dir = Path(args.results_dir) / exp_name
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=str(run_dir),
                              cpu=not torch.cuda.is_available())  # CPU: gloo process group under torchrun
    plan = BatchPlan(args.global_batch_size, accelerator.num_processes, accelerator.process_index,
                     args.per_proc_batch_size)
    device = accelerator.device
    if device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        tune_cpu_allocator()  # reuse freed activations instead of page-faulting them in every step

    # the model (same init on every rank), checked against the data before anything is written
    seed_everything(args.seed)
    model, model_kwargs = build_model_for_data(args.model, model_kwargs, data)
    check_levels_fit_data(model, args.model, data)
    if problem := kernels_problem(model, args.kernels, device.type):
        raise UserError(f"--kernels {args.kernels}: {problem}")
    check_model_fits_data(model, dataset, data, args.objective,
                          args.zarr_path or f"{args.feature_path} / {args.label_path}")
    repa_config, repa = build_repa(args, model, data.latent_shape, dataset.images_size, device) \
        if repa_requested(args) else (None, None)  # the projector's init follows the model's, from --seed
    try:
        objective = create_objective(args.objective, **args.objective_kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad --objective-kwargs {json.dumps(args.objective_kwargs)}: {e}") from None
    check_grid_flags(args, objective, grid_sampler, data)
    steps_per_epoch = plan.steps_per_epoch(len(dataset))
    max_steps = args.max_train_steps or (args.epochs * steps_per_epoch if args.epochs else PAPER_STEPS)
    optimizer_impl = args.optimizer_impl
    if optimizer_impl == "auto":
        optimizer_impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    config = build_config(args, model_kwargs=model_kwargs, data=data, grid_sampler=grid_sampler, plan=plan,
                          max_steps=max_steps, mixed_precision=accelerator.mixed_precision,
                          optimizer_impl=optimizer_impl, exp_name=exp_name, run_dir=run_dir, device_type=device.type,
                          repa=repa_config)

    # the grids' VAE and the autoguidance guide, checked before anything is written (one message, no run folder)
    vae = None
    if args.sample_every > 0:
        vae = decoder_for_run(config.vae, dataclasses.asdict(config.data), device, load=accelerator.is_main_process,
                              hint=GRID_VAE_HINT)
    guide = None
    if args.guide_ckpt:
        guide = load_guide(args.guide_ckpt, config.to_dict(), data.num_classes, data.latent_shape,
                           main=f"the run {run_dir}", downsample=data.downsample, use_ema=args.guide_use_ema,
                           device=device)

    run_lock = acquire_run_lock(run_dir) if accelerator.is_main_process else None  # freed on exit
    logger = RunLogger(run_dir, enabled=accelerator.is_main_process)
    resume = find_resume_point(args, config, run_dir, logger, accelerator.is_main_process)
    preempted = training_loop(config, model=model, dataset=dataset, objective=objective, accelerator=accelerator,
                              plan=plan, logger=logger, resume=resume, vae=vae, eval_plan=eval_plan, guide=guide,
                              repa=repa)
    if run_lock is not None:
        run_lock.release()
    if preempted:
        sys.exit(PREEMPTED_STATUS)  # after the checkpoint; a requeue script tests it (train_gen/preemption.py)


if __name__ == "__main__":
    run_main(main)
