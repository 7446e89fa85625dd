"""The configuration of a training run: one frozen dataclass, built once from the flags by train.py.

`TrainConfig.to_dict()` is what the run folder (config.json) and every checkpoint (`ckpt["config"]`)
record: plain JSON values in sections model / objective / data / vae / train / log / run, read back by
the sampling programs, the evaluation, the exporters and a resumed run. The sections keep the layout
that checkpoints have always had, so checkpoints written by earlier versions load unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from models.latent_space import AutoencoderSpec

PAPER_STEPS = 400_000  # Table 6 / headline results: 400K iterations
REFUSE, WARN = "refuse", "warn"  # what resuming a checkpoint recorded with another value of a setting does
SPELLED_OR_HASHED = object()  # TrajectorySetting.default of the settings the run name holds whatever their value


@dataclass(frozen=True)
class TrajectorySetting:
    """A setting that changes what a run computes. Resuming compares each one with the checkpoint's config
    (train.py resume_mismatches), so a setting listed here cannot be changed silently between two starts."""
    where: str  # its place in TrainConfig.to_dict(): "objective" (top level) or "train.hflip" (section.field)
    on_resume: str  # another value than the checkpoint's: REFUSE (the checkpoint is another run's) or WARN (continue)
    flag: Optional[str] = None  # the one flag that sets it, for messages (None: several flags or derived)
    # the flag's default where the run name's hash covers the setting only when it differs from it (run_name_extra);
    # SPELLED_OR_HASHED: the run name spells it out or hashes it whenever set (experiment_name), or it only rounds
    default: Any = SPELLED_OR_HASHED


# Every setting that changes a run's trajectory, or only its float rounding (the last two), in the order a resume
# reports them: the objective before the network, whose learn_sigma follows from it. A checkpoint of another network,
# loss or latent normalisation cannot continue this run (refused); another optimisation, data or augmentation
# setting continues it on another trajectory (warned), as a pinned run folder (--exp-name, --resume) asks for.
TRAJECTORY_SETTINGS = {
    "objective": TrajectorySetting("objective", REFUSE, "--objective"),
    "model": TrajectorySetting("model", REFUSE, "--model"),
    "model_kwargs": TrajectorySetting("model_kwargs", REFUSE),
    "objective_kwargs": TrajectorySetting("objective_kwargs", REFUSE),
    "repa": TrajectorySetting("repa", REFUSE),
    "latent_norm": TrajectorySetting("data.latent_norm", REFUSE, "--latent-norm", default="none"),
    "data": TrajectorySetting("data.name", WARN),
    "global_batch_size": TrajectorySetting("train.global_batch_size", WARN, "--global-batch-size"),
    "lr": TrajectorySetting("train.lr", WARN, "--lr"),
    "seed": TrajectorySetting("train.seed", WARN, "--seed"),
    "hflip": TrajectorySetting("train.hflip", WARN, "--hflip", default=True),
    "ema_decay": TrajectorySetting("train.ema_decay", WARN, "--ema-decay", default=0.9999),
    "weight_decay": TrajectorySetting("train.weight_decay", WARN, "--weight-decay", default=0.0),
    "grad_clip": TrajectorySetting("train.grad_clip", WARN, "--grad-clip", default=0.0),
    "mixed_precision": TrajectorySetting("train.mixed_precision", WARN, "--mixed-precision"),
    "kernels": TrajectorySetting("train.kernels", WARN, "--kernels"),
}
# Flag defaults that also decide whether a setting goes into the run name's hash (see run_name_extra):
# the paper's values (Table 6) and the network seeing the stored latents as they are.
TRAJECTORY_DEFAULTS = {k: s.default for k, s in TRAJECTORY_SETTINGS.items() if s.default is not SPELLED_OR_HASHED}


@dataclass(frozen=True)
class DataConfig:
    """The training data and the latent space it lives in."""
    zarr_path: Optional[str]  # latent store (preparation/extract_features.py), or None
    feature_path: Optional[str]  # legacy layout: folder of per-image latent .npy files, or None
    label_path: Optional[str]  # legacy layout: folder of per-image label .npy files, or None
    name: str  # short name of the data set (part of the run name)
    count: int  # items
    latent_shape: tuple  # (C, H, W) of the latents the network sees
    num_classes: int  # labels 0..num_classes-1
    image_size: int  # side of the decoded images
    vae: str  # id of the autoencoder the latents come from: "none" or "sd:<snapshot name>"
    scaling_factor: float  # z = (latent - shift_factor) * scaling_factor
    shift_factor: float
    vae_class: str  # diffusers class of the autoencoder ("none" in pixel space)
    downsample: int  # image side / latent side
    hf_model_name: Optional[str]  # hub name of the autoencoder the store records, if any
    hf_model_dir: Optional[str]  # local snapshot folder of the autoencoder the store records, if any
    latent_norm: dict  # {"mode": "none"} or {"mode": "channel", "mean": [...], "std": [...]}


@dataclass(frozen=True)
class PosthocEMAConfig:
    """EDM2's power-function EMAs, kept for train_gen/reconstruct_ema.py."""
    snapshot_every: int  # save snapshots every N steps (0: not tracked)
    sigma_rels: tuple  # relative widths of the tracked averages
    dtype: str  # precision of the snapshot files: bf16, fp16 or fp32


@dataclass(frozen=True)
class OptimConfig:
    """How the network is trained (defaults: Table 6 of the paper)."""
    global_batch_size: int  # images per optimizer step over all processes
    batch_per_process: int  # this run's share of the global batch per process
    batch_per_gpu: int  # micro-batch per process (gradient accumulation below batch_per_process)
    grad_accum_steps: int  # micro-batches per optimizer step
    rng_scheme: str  # version of the per-step random draws (train_gen/step_draws.py)
    posthoc_ema: PosthocEMAConfig
    lr: float  # AdamW learning rate (constant)
    betas: tuple  # AdamW betas
    weight_decay: float  # AdamW weight decay
    max_train_steps: int  # optimizer steps of the whole run
    ema_decay: float  # EMA decay per step
    grad_clip: float  # global gradient-norm clip (0: off)
    seed: int  # global seed
    mixed_precision: str  # autocast precision: no, bf16 or fp16
    grad_checkpointing: str  # none, selective or full
    compile: bool  # torch.compile the blocks
    optimizer_impl: str  # fused or foreach AdamW
    max_bad_steps: int  # stop after this many consecutive non-finite steps
    num_workers: int  # loader threads per process
    data_cache: str  # auto, memory, mmap or none
    hflip: bool  # random horizontal flips
    kernels: str = "torch"  # block implementation: torch or triton (fused kernels); rounding only, not the method


@dataclass(frozen=True)
class LogConfig:
    """Logs, checkpoints and sample grids."""
    log_every: int  # reduce and log metrics every N steps
    ckpt_every: int  # checkpoint every N steps (and at the end)
    keep_last: int  # keep the newest K checkpoints
    keep_every: int  # also keep every step divisible by M (0: none)
    sample_every: int  # sample grid every N steps and at the end (0: never)
    cfg_scale: float  # guidance scale of the grids (either guidance mode)
    cfg_channels: str  # guided channels of the grids: "all" or k
    grid_sampler: str  # sampler of the grids
    grid_steps: int  # sampling steps of the grids
    grid_cols: int  # samples per class row
    grid_seed: int  # seed of the fixed grid noise
    report_to: str  # none, tensorboard or wandb
    grid_guidance: str = "cfg"  # guidance of the grids: "cfg" or "autoguidance" (by guide_ckpt)
    guide_ckpt: Optional[str] = None  # autoguidance guide of the grids and evaluations
    guide_use_ema: bool = True  # the guide's EMA (True) or raw weights


@dataclass(frozen=True)
class RepaConfig:
    """Representation alignment (train_gen/repa.py): the denoiser's features at `site`, projected, pulled towards a
    frozen vision encoder's patch tokens of the clean image."""
    encoder: str  # timm architecture of the frozen encoder (e.g. vit_base_patch14_dinov2.lvd142m)
    encoder_path: str  # its local weights file or snapshot folder
    encoder_resolution: int  # the encoder's input side in pixels
    encoder_grid: tuple  # its patch-token grid (rows, columns)
    encoder_dim: int  # width of its tokens
    site: str  # where in the denoiser the features are taken (models/fcdm.py parse_site)
    site_shape: tuple  # (channels, height, width) of the features there
    weight: float  # lambda: loss = diffusion loss + weight * alignment loss
    projector_width: int  # hidden width of the 3-layer projector MLP
    images_size: int  # side of the clean images stored with the latents


@dataclass(frozen=True)
class RunInfo:
    """Where and how this run was started (informational)."""
    exp_name: str  # run folder name
    run_dir: str  # the run folder
    world_size: int  # processes
    torch: str  # torch version
    device: str  # device type: cuda or cpu


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run was asked to do, as resolved from its flags and its data."""
    model: str  # registry name of the network (models.MODELS)
    model_kwargs: dict  # every constructor argument the run sets (in_channels, num_classes, learn_sigma, ...)
    objective: str  # "diffusion" (iDDPM, learned sigma) or "flow" (flow matching, Appendix E)
    objective_kwargs: dict  # arguments of diffusion.create_objective
    data: DataConfig
    vae: AutoencoderSpec  # the decoder of the grids and the evaluation samples
    train: OptimConfig
    log: LogConfig
    run: RunInfo
    repa: Optional[RepaConfig] = None  # representation alignment (None: off, and absent from to_dict)

    def to_dict(self) -> dict:
        """Plain JSON values (lists, not tuples): what config.json and every checkpoint hold. A run without
        representation alignment records no "repa" section, as before it existed."""
        d = _plain(dataclasses.asdict(self))
        if d["repa"] is None:
            del d["repa"]
        return d


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_name_extra(model_overrides: dict, objective_kwargs: dict, settings: dict, repa: Optional[dict] = None) -> dict:
    """What the run name's hash covers beyond the spelled-out settings: the user's model overrides, the
    objective's arguments, every trajectory setting that differs from TRAJECTORY_DEFAULTS and the
    representation alignment's settings when it is on."""
    changed = {k: v for k, v in settings.items() if k in TRAJECTORY_DEFAULTS and v != TRAJECTORY_DEFAULTS[k]}
    return {k: v for k, v in (("model", model_overrides), ("objective", objective_kwargs), ("train", changed),
                              ("repa", repa)) if v}
