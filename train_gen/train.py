"""Train FCDM (or any registered model) on precomputed latents, with accelerate.

    accelerate launch --mixed_precision bf16 --num_processes 4 train_gen/train.py --model FCDM-XL \
        --feature-path F --label-path L --results-dir results
    python train_gen/train.py --model FCDM-digits --zarr-path data/digits.zarr --vae none ...

Defaults reproduce the paper's Table 6: AdamW (lr 1e-4 constant, betas (0.9, 0.999), weight decay 0),
global batch 256, EMA 0.9999, the iDDPM hybrid loss (or `--objective flow`), 400K steps.

The run folder is `--results-dir/<name from the settings>` (or `--exp-name`), so rerunning the same
command resumes from the newest readable checkpoint in `<run>/checkpoints/`: model, EMA, optimizer,
step, data position and every random state of every process. Training N steps straight and N/2 +
resume N/2 give bitwise-identical weights (on CPU; on GPUs as far as the kernels are deterministic).

Per step there is no host synchronisation: losses and gradient norms accumulate in device tensors
that are reduced over all processes only every `--log-every` steps; a non-finite step is skipped on
the device (fused AdamW's `found_inf`, EMA weight 0). With `--optimizer-impl foreach` the skip needs
one host synchronisation per step (documented in docs/training.md).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fcdm_common.checkpoint import load_checkpoint, save_checkpoint
from fcdm_common.cli import UserError, non_negative_int, positive_int, run_main, str2bool
from fcdm_common.cpu import tune_cpu_allocator
from fcdm_common.data import TrainLoader, open_dataset
from fcdm_common.ema import create_ema, update_ema
from fcdm_common.io import atomic_write_text
from evaluations.in_training import InTrainingEvaluator, add_eval_args, plan_from_args, write_curves
from fcdm_common.trainutil import (RunLogger, capture_rng, checkpoint_path, experiment_name, load_latest_valid,
                                   prune_checkpoints, rank_seed, restore_rng, save_safetensors, seed_everything,
                                   truncate_metrics)

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


def _positive_float(value: str) -> float:
    v = float(value)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="FCDM-XL", help="registered model name (models.MODELS), e.g. FCDM-S/B/L/XL, DiT-XL/2")
    g.add_argument("--model-kwargs", type=_json_dict, default={},
                   help='JSON object of constructor overrides, e.g. \'{"hidden_size": 16, "kernel_size": 5}\'')
    g.add_argument("--hidden-size", type=positive_int, default=None, help="shortcut for model_kwargs hidden_size")
    g.add_argument("--depths", type=_int_list, default=None, help="shortcut for model_kwargs depths, e.g. 1,1,1,1,1")
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
    g = p.add_argument_group("run folder and resume")
    g.add_argument("--results-dir", default="results", help="parent folder of run folders")
    g.add_argument("--exp-name", default=None, help="run folder name (default: derived from the settings)")
    g.add_argument("--resume", default=None, help="resume from this checkpoint file instead of the run's newest")
    g = p.add_argument_group("optimisation (defaults: paper Table 6)")
    g.add_argument("--global-batch-size", type=positive_int, default=256, help="images per step over all processes")
    g.add_argument("--lr", type=_positive_float, default=1e-4, help="AdamW learning rate (constant)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-train-steps", type=positive_int, default=None,
                   help=f"total optimizer steps (default: --epochs, else {PAPER_STEPS})")
    g.add_argument("--epochs", type=positive_int, default=None, help="train this many passes over the data")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
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
                   help="grid sampler: ddpm/ddim (diffusion), euler/heun/sde (flow); auto: ddim / euler")
    g.add_argument("--grid-steps", type=positive_int, default=50, help="sampling steps of the grids")
    g.add_argument("--grid-cols", type=positive_int, default=8, help="samples per class row of the grid")
    g.add_argument("--grid-seed", type=int, default=0, help="seed of the fixed grid noise")
    g.add_argument("--vae", choices=("sd", "none"), default=None,
                   help="decoder of the grids (default: the VAE recorded with the data)")
    g.add_argument("--hf-model-dir", default=None, help="local diffusers AutoencoderKL snapshot for decoding grids")
    g.add_argument("--hf-model-name", default=None, help="hub name of the VAE (default: the data's, sd-vae-ft-ema)")
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
            "vae": vae_name, "scaling_factor": scale}


def _vae_config(args, data: dict) -> dict:
    from fcdm_common.vae import DEFAULT_HF_MODEL

    vae = args.vae or ("none" if data["vae"] == "none" else "sd")
    return {"vae": vae, "hf_model_name": args.hf_model_name or DEFAULT_HF_MODEL, "hf_model_dir": args.hf_model_dir,
            "scaling_factor": data["scaling_factor"]}


def resolve_model_kwargs(args, data: dict) -> tuple[dict, dict]:
    """(all constructor kwargs, the user's own overrides). Data-bound settings are checked."""
    user = dict(args.model_kwargs)
    if args.hidden_size is not None:
        user["hidden_size"] = args.hidden_size
    if args.depths is not None:
        user["depths"] = list(args.depths)
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
                        f"{str(e).splitlines()[0][:300]}") from None
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
TRAJECTORY_SETTINGS = ("hflip", "ema_decay", "weight_decay", "grad_clip")


def _nondefault_training(args) -> dict:
    parser = build_parser()
    return {k: getattr(args, k) for k in TRAJECTORY_SETTINGS if getattr(args, k) != parser.get_default(k)}


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
    model_kwargs, user_overrides = resolve_model_kwargs(args, data)
    objective_name = args.objective
    default_sampler = "ddim" if objective_name == "diffusion" else "euler"
    grid_sampler = default_sampler if args.grid_sampler == "auto" else args.grid_sampler
    allowed = ("ddpm", "ddim") if objective_name == "diffusion" else ("euler", "heun", "sde")
    if grid_sampler not in allowed:
        raise UserError(f"--grid-sampler {grid_sampler} does not fit --objective {objective_name}; use one of {allowed}")
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
    if device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        tune_cpu_allocator()  # reuse freed activations instead of page-faulting them in every step

    # --- model (same init on every rank), checked against the data before anything is written
    seed_everything(args.seed)
    model, model_kwargs = build_model_for_data(args.model, model_kwargs, data)
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
        "train": {"global_batch_size": args.global_batch_size, "batch_per_process": batch, "lr": args.lr,
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

    # --- find what to resume from (every rank reads the same file)
    logger = RunLogger(run_dir, enabled=is_main)
    ckpt, ckpt_file = None, None
    if args.resume:
        ckpt, ckpt_file = load_checkpoint(args.resume), Path(args.resume)
    else:
        ckpt, ckpt_file = load_latest_valid(run_dir / "checkpoints", log=logger.log if is_main else (lambda m: None))
    if ckpt is not None:
        old = ckpt["config"]
        for key in ("model", "model_kwargs", "objective", "objective_kwargs"):
            if json.loads(json.dumps(old.get(key))) != json.loads(json.dumps(config[key])):
                raise UserError(f"checkpoint {ckpt_file} was trained with {key}={json.dumps(old.get(key))}, this "
                                f"command asks for {json.dumps(config[key])}; use another --exp-name/--results-dir")
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

    # --- per-rank random streams
    seed_everything(rank_seed(args.seed, rank, world))
    t_gen = torch.Generator(device).manual_seed(rank_seed(args.seed, rank, world) + 0x7151)
    generators = {"timesteps": t_gen}
    start_step, skipped_total = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_step = int(ckpt["step"])
        skipped_total = int(ckpt.get("counters", {}).get("skipped_steps", 0))
        per_rank = ckpt.get("rng_per_rank")
        if per_rank and len(per_rank) == world:
            restore_rng(per_rank[rank], generators)
        else:
            logger.log(f"WARNING: {ckpt_file} was written by {len(per_rank or [])} processes, this run has {world}; "
                       "random streams restart from the seed (resume is not bitwise exact)")
            seed_everything(rank_seed(args.seed, rank, world) + start_step)
            t_gen.manual_seed(rank_seed(args.seed, rank, world) + 0x7151 + start_step)
        logger.log(f"resumed from {ckpt_file} at step {start_step}")
        del ckpt
    ddp_model = accelerator.prepare_model(model, device_placement=False) if world > 1 else model

    # --- run folder
    if is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob(".*.tmp"):  # temp files of a killed save
            stale.unlink()
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
    if args.report_to != "none":
        accelerator.init_trackers(exp_name, config=_flat(config),
                                  init_kwargs={"wandb": {"name": exp_name, "dir": str(run_dir)}}
                                  if args.report_to == "wandb" else {})
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(f"{args.model} ({n_params / 1e6:.2f}M parameters) {objective_name} on {data['name']} "
               f"({len(dataset)} items, latents {data['latent_shape']}, {data['num_classes']} classes); "
               f"{world} process(es) x batch {batch}, precision {accelerator.mixed_precision}, {opt_impl} AdamW; "
               f"run folder {run_dir}; steps {start_step} -> {max_steps}")

    vae = None
    if args.sample_every > 0 and is_main:
        from fcdm_common.vae import load_vae

        v = config["vae"]
        vae = load_vae(v["vae"], hf_model_name=v["hf_model_name"], hf_model_dir=v["hf_model_dir"],
                       scaling_factor=v["scaling_factor"], device=device)

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
            raise UserError(
                f"training stopped at step {step}: {worst} consecutive steps had non-finite loss or gradients "
                f"(--max-bad-steps {args.max_bad_steps}); the last good checkpoint is "
                f"{last[-1] if last else 'none'}; lower --lr, set --grad-clip or use --mixed-precision bf16/no")

    def save(step: int) -> None:
        skipped = skipped_total + int(sums["bad"].item())  # bad steps are identical on every rank
        rng_all = accelerator.gather_for_metrics([capture_rng(generators)], use_gather_object=True) \
            if world > 1 else [capture_rng(generators)]
        if is_main:
            state = {
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                "config": config, "rng": rng_all[0], "rng_per_rank": list(rng_all),
                "data": {"step": loader.step, "epoch": loader.epoch, "seed": args.seed, "world_size": world},
                "counters": {"skipped_steps": skipped, "nimg": step * args.global_batch_size},
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            path = checkpoint_path(run_dir / "checkpoints", step)
            save_checkpoint(state, path)
            save_safetensors(ema.state_dict(), path.with_name(f"{step:07d}-ema.safetensors"),
                             metadata={"config": json.dumps(config), "step": step})
            removed = prune_checkpoints(run_dir / "checkpoints", args.keep_last, args.keep_every)
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

    from tqdm import tqdm

    evaluator = InTrainingEvaluator(eval_plan, accelerator=accelerator, logger=logger, run_dir=run_dir, config=config,
                                    ema=ema, device=device, max_steps=max_steps, ckpt_every=args.ckpt_every) \
        if eval_plan else None
    if evaluator:
        evaluator.start(start_step)  # reference features; an evaluation a kill left pending
    bar = tqdm(total=max_steps, initial=start_step, disable=not is_main, dynamic_ncols=True, desc="train")
    step = start_step
    window_start, window_steps, paused = time.perf_counter(), 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data_iter = iter(loader)
    while step < max_steps:
        x, y = next(data_iter)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        t = objective.sample_timesteps(x.shape[0], device, generator=t_gen)
        with accelerator.autocast():
            losses = objective.training_losses(ddp_model, x, t, model_kwargs=dict(y=y))
        loss = losses["loss"].mean()
        accelerator.backward(loss)  # fp16: scaled by the GradScaler
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


if __name__ == "__main__":
    run_main(main)
