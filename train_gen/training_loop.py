"""The training loop: optimizer steps with EMA, logs, checkpoints, sample grids and evaluations.

`training_loop(config, ...)` runs a run that train.py has configured and whose resume point it has
chosen. One optimizer step (`train_step`) draws its random values for the whole global batch
(train_gen/step_draws.py), accumulates gradients over the micro-batches of this process
(`accumulate_gradients`), and then, without any host synchronisation:
- measures the global gradient norm and flags the step bad when it or the loss is not finite;
- clips (`--grad-clip`), steps AdamW (the fused kernel skips a bad step on the device through its
  `found_inf` input; fp16 uses the GradScaler, which skips overflowing steps itself);
- updates the EMA with weight 0 on a bad step (DiT's `update_ema`, decay 0.9999 in the paper) and the
  post-hoc power EMAs;
- adds loss, mse, vb and gradient norm to device-side sums (`Meter`), reduced over all processes every
  `--log-every` steps only.

Checkpoints hold everything a bitwise-exact resume needs: model, EMA, optimizer, step, every random
state of every process, the data position and the counters (train_gen/run_folder.py). On SIGTERM or
SIGUSR1 (a cluster's warning before it kills the job) the loop finishes the step, checkpoints and
returns "preempted" (train_gen/preemption.py).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import diffusion
from diffusion.guidance import Guide, parse_cfg_channels
from diffusion.sampling import SamplerSettings
from evaluations.in_training import InTrainingEvaluator
from fcdm_common.cli import UserError
from fcdm_common.distributed import all_gather_object
from fcdm_common.images import save_grid, to_uint8
from fcdm_common.io import atomic_write_text, remove_stale_temps
from fcdm_common.launchers import process_count_warning
from fcdm_common.progress import progress
from fcdm_common.rng import capture_rng, rank_seed, restore_rng, seed_everything
from models.checkpoints import save_checkpoint
from models.kernels import use_kernels
from preparation.checks import describe_nonfinite
from train_gen.config import TrainConfig
from train_gen.ema import (
    PowerEMA,
    create_ema,
    redo_resume_snapshots,
    remove_snapshots_after,
    save_posthoc_snapshots,
    update_ema,
)
from train_gen.loader import TrainLoader
from train_gen.plot import write_curves
from train_gen.preemption import PREEMPTED_STATUS, PreemptionWatch, take_marker, write_marker
from train_gen.repa import Repa, describe_repa
from train_gen.run_folder import (
    RunLogger,
    checkpoint_path,
    export_ema,
    prune_checkpoints,
    prune_on_start,
    repair_ema_export,
    truncate_metrics,
)
from train_gen.step_draws import RNG_SCHEME, BatchPlan, StepDraws, take

DIT_GRID_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample classes for ImageNet
METER_KEYS = ("loss", "mse", "vb", "grad_norm", "good", "bad")  # the device-side sums, in reduction order
REPA_METER_KEYS = ("repa_loss", "repa_cos")  # added with representation alignment


# ---------------------------------------------------------------------------------- one step
def accumulate_gradients(ddp_model, objective, accelerator, x, y, draws: dict, micro_slices: list,
                         repa: Optional[Repa] = None, images: Optional[torch.Tensor] = None) -> dict:
    """Forward and backward of this process's share (x, y and `draws` of StepDraws) in the micro-batches
    `micro_slices` (BatchPlan.micro_slices). Each micro-batch's mean loss is divided by their number, so
    the summed gradient is the share's mean (and, after DDP's average over processes, the global batch's
    mean); under DDP the all-reduce runs on the last micro-batch only (no_sync before). Returns the share's
    mean "loss", "mse" (and "vb") as detached float32 0-dim device tensors; no host synchronisation.
    With representation alignment (`repa`, train_gen/repa.py; `ddp_model` then runs `repa.module`) the
    objective's loss gets + lambda * align against the encoder's tokens of the clean `images`, and the
    returned "loss" stays the objective's, with "repa_loss" (lambda * align) and "repa_cos" beside it."""
    n = len(micro_slices)
    sums: dict = {}
    for k, rows in enumerate(micro_slices):
        d = take(draws, rows)
        kwargs = {"y": y[rows], **({"drop_mask": d["drop_mask"]} if "drop_mask" in d else {})}
        sync = k == n - 1 or not hasattr(ddp_model, "no_sync")
        with contextlib.nullcontext() if sync else ddp_model.no_sync():
            with accelerator.autocast():
                losses = objective.training_losses(ddp_model, x[rows], d["t"], model_kwargs=kwargs, noise=d["noise"])
                if repa is not None:
                    align = repa.loss(images[rows])  # (b,) float32, of the forward pass just run
                    losses = {**losses, "repa_loss": repa.weight * align, "repa_cos": -align.detach()}
            loss = losses["loss"].mean() if repa is None else (losses["loss"] + losses["repa_loss"]).mean()
            accelerator.backward(loss / n if n > 1 else loss)  # fp16: scaled by the GradScaler
        for key, value in losses.items():
            v = value.detach().float().mean()
            sums[key] = v if key not in sums else sums[key] + v
    return {key: v / n for key, v in sums.items()} if n > 1 else sums


@dataclass
class TrainState:
    """What the loop changes as it runs (and what a checkpoint saves)."""
    model: torch.nn.Module  # the network being trained (not wrapped in DDP)
    projector: Optional[torch.nn.Module]  # representation alignment's projector (trained, saved, not averaged)
    ema: torch.nn.Module  # its EMA copy
    opt: torch.optim.Optimizer  # AdamW
    params: list  # the trained parameters
    scaler: Optional[object]  # accelerate's GradScaler (fp16 only)
    power_ema: Optional[PowerEMA]  # post-hoc EMAs (--posthoc-ema-snapshot-every)
    generators: dict = field(default_factory=dict)  # named torch.Generators saved with the random states
    step: int = 0  # optimizer steps taken
    skipped_total: int = 0  # non-finite steps skipped up to the last log step
    unreadable: list = field(default_factory=list)  # checkpoint files found unreadable (pruning ignores them)
    named_nonfinite: set = field(default_factory=set)  # dataset items already named in the log as NaN/inf


class Meter:
    """Device-side sums of one logging window, and the streak of consecutive non-finite steps."""

    def __init__(self, device, extra: tuple = ()):
        self.keys = METER_KEYS + tuple(extra)  # extra: per-step means of further losses (REPA_METER_KEYS)
        self.sums = {k: torch.zeros((), device=device) for k in self.keys}
        self.consec = torch.zeros((), device=device)  # consecutive non-finite steps, as of the last step
        self.max_consec = torch.zeros((), device=device)  # max of `consec` since the last check

    def add(self, loss, losses: dict, grad_norm, bad) -> None:
        """Add one step (a bad step adds nothing but its count)."""
        s = self.sums
        s["loss"] += torch.where(bad, 0.0, loss.detach().float())
        s["mse"] += torch.where(bad, 0.0, losses["mse"].detach().float().mean())
        if "vb" in losses:
            s["vb"] += torch.where(bad, 0.0, losses["vb"].detach().float().mean())
        s["grad_norm"] += torch.where(bad, 0.0, grad_norm)
        for k in self.keys[len(METER_KEYS):]:
            s[k] += torch.where(bad, 0.0, losses[k].detach().float().mean())
        s["good"] += (~bad).float()
        s["bad"] += bad.float()
        self.consec = torch.where(bad, self.consec + 1, 0.0)
        self.max_consec = torch.maximum(self.max_consec, self.consec)

    def reduce(self, accelerator, world: int) -> list:
        """The window's sums over all processes, as Python floats (the one host synchronisation)."""
        stats = torch.stack([self.sums[k] for k in self.keys])
        stats = accelerator.reduce(stats, reduction="sum") if world > 1 else stats
        return stats.tolist()

    def reset(self) -> None:
        for v in self.sums.values():
            v.zero_()

    def worst_streak(self) -> int:
        """The longest run of bad steps since the last call (identical on every rank)."""
        worst = int(self.max_consec.item())
        self.max_consec = self.consec.clone()
        return worst


def train_step(state: TrainState, ddp_model, objective, accelerator, x, y, draws: dict, plan: BatchPlan,
               config: TrainConfig, meter: Meter, repa: Optional[Repa] = None,
               images: Optional[torch.Tensor] = None) -> dict:
    """One optimizer step on this process's batch (x, y) with the step's `draws` (and, with representation
    alignment, the clean `images`); returns the losses."""
    opt, params, scaler = state.opt, state.params, state.scaler
    losses = accumulate_gradients(ddp_model, objective, accelerator, x, y, draws, plan.micro_slices(), repa, images)
    loss = losses["loss"]  # mean over this process's share
    if scaler is not None:
        scaler.unscale_(opt)
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True).float()
    bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))
    if config.train.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, config.train.grad_clip, grad_norm, foreach=True)
    if scaler is not None:  # the scaler skips overflowing steps itself
        scaler.step(opt)
        scaler.update()
    elif config.train.optimizer_impl == "fused":
        opt.found_inf = bad.float()  # the fused kernel leaves params, moments and step untouched when 1
        opt.step()
        del opt.found_inf
    elif not bool(bad):  # the one host synchronisation of the foreach path
        opt.step()
    opt.zero_grad(set_to_none=True)
    update_ema(state.ema, state.model, config.train.ema_decay, weight=(~bad).float())
    if state.power_ema is not None:  # a skipped step left the weights as they were: still an update
        state.power_ema.update(state.model, state.step + 1)
    meter.add(loss, losses, grad_norm, bad)
    return losses


# ---------------------------------------------------------------------------------- setting up
def setup_state(config: TrainConfig, model: torch.nn.Module, accelerator, repa: Optional[Repa] = None) -> TrainState:
    """Move the network to the device with its switches, and build the EMA, power EMAs and AdamW (over the
    network's parameters, then the alignment projector's when `repa` is given)."""
    t = config.train
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(t.grad_checkpointing)
    elif t.grad_checkpointing != "none":
        raise UserError(f"--model {config.model} has no set_grad_checkpointing(); use --grad-checkpointing none")
    model = model.to(accelerator.device)  # the network keeps its own (channels-last) activation layout
    use_kernels(model, t.kernels, accelerator.device.type)  # before the EMA copy: grids and evaluations use them too
    ema = create_ema(model)  # EMA starts as an exact copy (DiT: update_ema(ema, model, decay=0))
    power_ema = PowerEMA(model, t.posthoc_ema.sigma_rels) if t.posthoc_ema.snapshot_every else None
    model.train()
    if t.compile:
        if hasattr(model, "compile_blocks"):
            model.compile_blocks()
        else:
            model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    projector = None
    if repa is not None:
        projector = repa.to(accelerator.device).projector.train()
        params += list(projector.parameters())  # clipped and stepped with the network's (REPA's release)
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                            fused=t.optimizer_impl == "fused", foreach=t.optimizer_impl == "foreach")
    return TrainState(model=model, projector=projector, ema=ema, opt=opt, params=params, scaler=accelerator.scaler,
                      power_ema=power_ema)


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


@dataclass
class ResumePoint:
    """Where a run continues from: a loaded checkpoint (None: step 0) and the files that could not be read."""
    ckpt: Optional[dict]  # the loaded checkpoint; dropped once restored (it can hold gigabytes)
    path: Optional[Path]  # its file
    unreadable: list  # newer checkpoint files that could not be read (kept out of pruning)


def restore_state(state: TrainState, resume: ResumePoint, config: TrainConfig, plan: BatchPlan, run_dir: Path,
                  logger: RunLogger, is_main: bool) -> None:
    """Load the resume checkpoint into the state, with the random states of this process (same world size)
    or a fresh seed per rank (the training draws do not use these streams, so the trajectory is the same),
    then drop the checkpoint from memory."""
    ckpt, ckpt_file = resume.ckpt, resume.path
    state.model.load_state_dict(ckpt["model"])
    if state.projector is not None:
        if "projector" not in ckpt:
            raise UserError(f"{ckpt_file} holds no alignment projector; it was trained without --repa-*: resume "
                            "without them, or start a new run (--exp-name)")
        state.projector.load_state_dict(ckpt["projector"])
    state.ema.load_state_dict(ckpt["ema"])
    state.opt.load_state_dict(ckpt["opt"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step = int(ckpt["step"])
    state.skipped_total = int(ckpt.get("counters", {}).get("skipped_steps", 0))
    resume_posthoc_ema(state.power_ema, ckpt, ckpt_file, state.step, logger.log)
    per_rank = ckpt.get("rng_per_rank")
    if per_rank and len(per_rank) == plan.world_size:
        restore_rng(per_rank[plan.rank], state.generators)
    else:
        seed_everything(rank_seed(config.train.seed, plan.rank, plan.world_size) + state.step)
    logger.log(f"resumed from {ckpt_file} at step {state.step}")
    if is_main and ckpt_file.parent == run_dir / "checkpoints":  # its export: missing (a kill) or damaged
        repair_ema_export(ckpt, ckpt_file, logger.log)
    resume.ckpt = None


def prepare_run_folder(run_dir: Path, config: TrainConfig, start_step: int, log=print) -> None:
    """Main process: folders, temp files of killed writes removed, config.json, and the metrics and post-hoc
    EMA snapshots of work lost after `start_step` dropped (damaged snapshots set aside, with a warning)."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
        remove_stale_temps(folder)
    atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    truncate_metrics(run_dir / "metrics.jsonl", start_step)
    remove_snapshots_after(run_dir, start_step, log=log)


def flat_config(d: dict, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys with scalar values (for TensorBoard / W&B)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


# ---------------------------------------------------------------------------------- saving and grids
def save_training_checkpoint(state: TrainState, config: TrainConfig, accelerator, loader: TrainLoader,
                             meter: Meter, logger: RunLogger, step: int) -> None:
    """Write the checkpoint of `step` (a collective: every process hands in its random states), its EMA
    export, and prune old checkpoints."""
    plan = loader.plan
    run_dir = Path(config.run.run_dir)
    skipped = state.skipped_total + int(meter.sums["bad"].item())  # bad steps are identical on every rank
    rng_all = accelerator.gather_for_metrics([capture_rng(state.generators)], use_gather_object=True) \
        if plan.world_size > 1 else [capture_rng(state.generators)]
    if accelerator.is_main_process:
        cfg = config.to_dict()
        ckpt = {
            "model": state.model.state_dict(), "ema": state.ema.state_dict(), "opt": state.opt.state_dict(),
            "step": step, "rng_scheme": RNG_SCHEME, "config": cfg, "rng": rng_all[0], "rng_per_rank": list(rng_all),
            "data": {"step": loader.step, "epoch": loader.epoch, "seed": config.train.seed,
                     "world_size": plan.world_size},
            "counters": {"skipped_steps": skipped, "nimg": step * config.train.global_batch_size},
        }
        if state.scaler is not None:
            ckpt["scaler"] = state.scaler.state_dict()
        if state.projector is not None:  # representation alignment: trained and resumed, never exported
            ckpt["projector"] = state.projector.state_dict()
        if state.power_ema is not None:
            ckpt["posthoc_ema"] = state.power_ema.state_dict()
        path = checkpoint_path(run_dir / "checkpoints", step)
        save_checkpoint(ckpt, path)
        state.unreadable[:] = [p for p in state.unreadable if p.name != path.name]  # overwritten: readable now
        export_ema(state.ema.state_dict(), cfg, step, path)
        removed = prune_checkpoints(run_dir / "checkpoints", config.log.keep_last, config.log.keep_every,
                                    unreadable=state.unreadable)
        logger.log(f"saved checkpoint {path}" + (f" (removed {len(removed)} old files)" if removed else ""))
    accelerator.wait_for_everyone()


def grid_labels(num_classes: int, cols: int) -> list:
    """One row per class (up to 16 classes; else 8 fixed classes: DiT's for ImageNet, evenly spaced otherwise)."""
    if num_classes <= 16:
        classes = list(range(num_classes))
    elif num_classes == 1000:
        classes = list(DIT_GRID_CLASSES)
    else:
        classes = [int(c) for c in np.linspace(0, num_classes - 1, 8).round()]
    return [c for c in classes for _ in range(cols)]


def grid_sampler_settings(config: TrainConfig) -> SamplerSettings:
    """How the training grids are drawn (--grid-sampler, --grid-steps, --cfg-scale, --cfg-channels,
    --grid-guidance)."""
    log = config.log
    return SamplerSettings(sampler=log.grid_sampler, num_steps=log.grid_steps, cfg_scale=log.cfg_scale,
                           cfg_channels=parse_cfg_channels(log.cfg_channels, config.data.latent_shape[0]),
                           guidance=log.grid_guidance)


@torch.no_grad()
def draw_grid(ema, config: TrainConfig, vae, device, path: Path, autocast, step: Optional[int] = None,
              guide: Optional[Guide] = None) -> None:
    """Sample the fixed grid with the EMA model (guided by `guide` under --grid-guidance autoguidance) and save
    it as PNG (the caller keeps training's RNG apart)."""
    log = config.log
    C, H, W = config.data.latent_shape
    labels = grid_labels(config.model_kwargs["num_classes"], log.grid_cols)
    gen = torch.Generator("cpu").manual_seed(log.grid_seed)
    noise = torch.randn(len(labels), C, H, W, generator=gen).to(device)
    sampler_gen = torch.Generator(device).manual_seed(log.grid_seed + 1)
    y = torch.tensor(labels, device=device)
    objective = diffusion.create_objective(config.objective, **config.objective_kwargs)
    settings = grid_sampler_settings(config)
    if settings.guidance == "autoguidance" and guide is None:
        raise ValueError("--grid-guidance autoguidance needs the guide network")
    with autocast():
        z = diffusion.sample(ema, noise, y, objective=objective, null_label=config.model_kwargs["num_classes"],
                             generators=sampler_gen, guide=guide.model if settings.guidance == "autoguidance" else None,
                             **settings.sample_kwargs())
    images = torch.cat([vae.decode(z[i:i + 32].float()) for i in range(0, len(z), 32)])
    save_grid(to_uint8(images), path, nrow=log.grid_cols,
              metadata={"step": step, "sampler": log.grid_sampler, "sampling_steps": log.grid_steps,
                        "cfg_scale": log.cfg_scale, "model": config.model,
                        **({"guidance": "autoguidance", "guide": log.guide_ckpt}
                           if settings.guidance == "autoguidance" else {})})


def save_training_grid(state: TrainState, config: TrainConfig, vae, guide: Optional[Guide], accelerator,
                       logger: RunLogger, step: int) -> None:
    """Main process: the EMA grid of `step` into <run>/samples/, every random stream of training untouched."""
    if not accelerator.is_main_process or vae is None:
        return
    device = accelerator.device
    path = Path(config.run.run_dir) / "samples" / f"{step:07d}.png"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        draw_grid(state.ema, config, vae, device, path, accelerator.autocast, step=step, guide=guide)
    logger.log(f"saved sample grid {path}")


# ---------------------------------------------------------------------------------- logging and guards
def log_window(meter: Meter, state: TrainState, config: TrainConfig, accelerator, loader: TrainLoader,
               logger: RunLogger, bar, step: int, window_steps: int, elapsed: float) -> None:
    """Reduce the window's sums, log one record (metrics.jsonl, log.txt, trackers) and reset the sums."""
    world = loader.plan.world_size
    s = meter.reduce(accelerator, world)
    sps = window_steps / max(elapsed, 1e-9)
    state.skipped_total += int(round(s[5] / world))
    device = accelerator.device
    good = s[4]  # good steps summed over processes: the denominators of the window's means
    mean = [v / good if good > 0 else float("nan") for v in s[:4]]  # loss, mse, vb, grad norm
    extra = {k: v / good if good > 0 else float("nan") for k, v in zip(meter.keys[len(METER_KEYS):], s[6:])}
    record = {"step": step, "loss": mean[0], "mse": mean[1],
              "vb": mean[2] if config.objective == "diffusion" else None,
              "grad_norm": mean[3], "lr": state.opt.param_groups[0]["lr"],
              "steps_per_sec": sps, "images_per_sec": sps * config.train.global_batch_size,
              "peak_mem_gb": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
              "skipped_steps": int(round(s[5] / world)), "skipped_total": state.skipped_total,
              "epoch": step // loader.steps_per_epoch, "good_steps": int(s[4] / world), **extra}
    logger.metrics(record)
    logger.log(f"step {step:07d} loss {record['loss']:.4f} mse {record['mse']:.4f} grad_norm "
               f"{record['grad_norm']:.3f}"
               + (f" repa_cos {extra['repa_cos']:.4f}" if "repa_cos" in extra else "")
               + f" steps/s {sps:.2f} img/s {record['images_per_sec']:.1f}"
               + (f" skipped {record['skipped_steps']}" if record["skipped_steps"] else ""))
    if record["skipped_steps"]:
        name_nonfinite_items(state, config, loader, logger, step)
    bar.set_postfix(loss=f"{record['loss']:.4f}", steps_per_s=f"{sps:.2f}")
    if config.log.report_to != "none":
        accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=step)
    meter.reset()


def name_nonfinite_items(state: TrainState, config: TrainConfig, loader: TrainLoader, logger: RunLogger,
                         step: int) -> None:
    """Name, once each, the dataset items with NaN/inf inputs in the batches up to `step` (a collective: every
    rank calls it after a window with skipped steps). Their batches are skipped every epoch, so the log
    says which item (index, and file for the .npy layout) to remove or re-extract."""
    records = {s: v for r in all_gather_object(loader.nonfinite_items(step)) for s, v in r.items()}
    new = sorted({int(i) for v in records.values() for i in v} - state.named_nonfinite)
    if not new:
        return
    state.named_nonfinite.update(new)
    files = getattr(loader.dataset, "files", None)  # the legacy .npy layout: one file per item
    source = config.data.zarr_path or config.data.feature_path
    names = [f"{i} ({files[i]})" if files is not None else str(i) for i in new[:20]]
    more = f" and {len(new) - 20} more" if len(new) > 20 else ""
    logger.log(f"WARNING: dataset item(s) {', '.join(names)}{more} of {source} hold NaN or inf; every batch that "
               "contains one is skipped (each epoch): re-extract the data or remove these items")


def check_bad_streak(meter: Meter, config: TrainConfig, loader: TrainLoader, step: int) -> None:
    """Stop the run (UserError) after --max-bad-steps consecutive non-finite steps, naming the last good
    checkpoint and, when the inputs themselves were not finite, the dataset items that held NaN/inf."""
    worst = meter.worst_streak()
    if worst < config.train.max_bad_steps:
        return
    last = sorted((Path(config.run.run_dir) / "checkpoints").glob("*.pt"))
    records = {s: v for r in all_gather_object(loader.nonfinite_items(step)) for s, v in r.items()}
    cause = describe_nonfinite(records, config.data.zarr_path or config.data.feature_path)
    raise UserError(
        f"training stopped at step {step}: {worst} consecutive steps had non-finite loss or gradients "
        f"(--max-bad-steps {config.train.max_bad_steps}); the last good checkpoint is "
        f"{last[-1] if last else 'none'}; "
        + (cause or "lower --lr, set --grad-clip or use --mixed-precision bf16/no"))


# ---------------------------------------------------------------------------------- the loop
def training_loop(config: TrainConfig, *, model: torch.nn.Module, dataset, objective, accelerator, plan: BatchPlan,
                  logger: RunLogger, resume: ResumePoint, vae, eval_plan, guide: Optional[Guide] = None,
                  repa: Optional[Repa] = None) -> bool:
    """Train from the resume point to config.train.max_train_steps; True when a preemption signal stopped
    the run early (after a checkpoint: rerun to resume). `guide`: the autoguidance guide of the grids and
    evaluations (--guide-ckpt), frozen. `repa`: representation alignment (train_gen/repa.py), or None."""
    with PreemptionWatch(plan.world_size, accelerator.device) as watch:
        return _train(config, model=model, dataset=dataset, objective=objective, accelerator=accelerator, plan=plan,
                      logger=logger, resume=resume, vae=vae, eval_plan=eval_plan, watch=watch, guide=guide, repa=repa)


def _train(config: TrainConfig, *, model: torch.nn.Module, dataset, objective, accelerator, plan: BatchPlan,
           logger: RunLogger, resume: ResumePoint, vae, eval_plan, watch: PreemptionWatch,
           guide: Optional[Guide], repa: Optional[Repa]) -> bool:
    t, log = config.train, config.log
    run_dir, device, is_main = Path(config.run.run_dir), accelerator.device, accelerator.is_main_process
    state = setup_state(config, model, accelerator, repa)
    state.unreadable = resume.unreadable
    # every training draw is a function of (seed, step, sample index) (train_gen/step_draws.py); the global
    # streams are seeded per rank for anything else, and restored on a same-world-size resume
    seed_everything(rank_seed(t.seed, plan.rank, plan.world_size))
    step_draws = StepDraws(t.seed, plan, config.data.latent_shape, device, objective.sample_timesteps,
                           getattr(state.model, "label_drop_shape", None),
                           float(getattr(state.model, "class_dropout_prob", 0.0)))
    if resume.ckpt is not None:
        restore_state(state, resume, config, plan, run_dir, logger, is_main)
    trained = repa.module if repa is not None else state.model  # alignment: the network and its projector
    ddp_model = accelerator.prepare_model(trained, device_placement=False) if plan.world_size > 1 else trained
    start_step = state.step
    if is_main:
        prepare_run_folder(run_dir, config, start_step, log=logger.log)
        # what a kill left undone: the pruning after a save, the snapshots of the resume step
        prune_on_start(run_dir / "checkpoints", log.keep_last, log.keep_every, resume.path, state.unreadable,
                       logger.log)
        redo_resume_snapshots(state.power_ema, state.model, run_dir, start_step, t.posthoc_ema.snapshot_every,
                              t.posthoc_ema.dtype, metadata={"config": json.dumps(config.to_dict())}, log=logger.log)
        if (marker := take_marker(run_dir)) is not None:
            logger.log(f"resuming after a preemption (checkpoint of step {marker.get('step', '?')}, "
                       f"signal {marker.get('signal', '?')})")
    if log.report_to != "none":
        accelerator.init_trackers(config.run.exp_name, config=flat_config(config.to_dict()),
                                  init_kwargs={"wandb": {"name": config.run.exp_name, "dir": str(run_dir)}}
                                  if log.report_to == "wandb" else {})
    n_params = sum(p.numel() for p in state.model.parameters())
    d = config.data
    logger.log(f"{config.model} ({n_params / 1e6:.2f}M parameters) {config.objective} on {d.name} "
               f"({len(dataset)} items, latents {list(d.latent_shape)}, {d.num_classes} classes); "
               f"{plan.world_size} process(es) x batch {plan.per_process}"
               + (f" ({plan.accumulation} micro-batches of {plan.micro_batch})" if plan.accumulation > 1 else "")
               + f", precision {t.mixed_precision}, {t.kernels} kernels, {t.optimizer_impl} AdamW; "
               f"run folder {run_dir}; steps {start_step} -> {t.max_train_steps}")
    if is_main and (launch_warning := process_count_warning(plan.world_size)):
        logger.log(launch_warning)
    if is_main and (note := getattr(dataset, "checksum_note", None)):  # a store made before checksums
        logger.log(f"note: {note}")
    if repa is not None:
        logger.log(describe_repa(repa.config, repa.encoder))
    if guide is not None:
        logger.log(f"autoguidance guide of the grids/evaluations: {guide.model_name} from {guide.path}"
                   + (f" (step {guide.step})" if guide.step is not None else "")
                   + f", {'EMA' if guide.use_ema else 'raw'} weights")
    loader = TrainLoader(dataset, plan, seed=t.seed, start_step=start_step, num_workers=t.num_workers,
                         pin_memory=device.type == "cuda")
    meter = Meter(device, REPA_METER_KEYS if repa is not None else ())
    save = partial(save_training_checkpoint, state, config, accelerator, loader, meter, logger)  # save(step)
    grid = partial(save_training_grid, state, config, vae, guide, accelerator, logger)  # grid(step)
    if start_step and log.sample_every and (start_step % log.sample_every == 0 or start_step == t.max_train_steps) \
            and not (run_dir / "samples" / f"{start_step:07d}.png").exists():
        grid(start_step)  # killed between checkpoint and grid
    evaluator = InTrainingEvaluator(eval_plan, accelerator=accelerator, logger=logger, run_dir=run_dir,
                                    config=config.to_dict(), ema=state.ema, device=device,
                                    max_steps=t.max_train_steps, ckpt_every=log.ckpt_every,
                                    on_record=lambda: write_curves(run_dir, logger.log), guide=guide) \
        if eval_plan else None
    if evaluator:
        evaluator.start(start_step)  # reference features; an evaluation a kill left pending
    preempted = run_steps(state, config, ddp_model, objective, accelerator, plan, step_draws, loader, meter, logger,
                          grid, evaluator, save, watch, repa)
    if is_main:
        write_curves(run_dir, logger.log)
    if preempted:
        logger.log(f"preempted ({watch.received or 'signal on another process'}): checkpoint of step {state.step} "
                   f"saved; exiting with status {PREEMPTED_STATUS}; rerun the same command to resume")
    elif state.step == start_step:
        logger.log(f"nothing to do: the run is already at step {state.step} >= --max-train-steps {t.max_train_steps}")
    else:
        logger.log(f"done: {state.step} steps, {state.skipped_total} skipped; checkpoints in {run_dir / 'checkpoints'}")
    if log.report_to != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return preempted


def run_steps(state: TrainState, config: TrainConfig, ddp_model, objective, accelerator, plan: BatchPlan,
              step_draws: StepDraws, loader: TrainLoader, meter: Meter, logger: RunLogger, grid, evaluator,
              save, watch: Optional[PreemptionWatch] = None, repa: Optional[Repa] = None) -> bool:
    """The optimizer steps from state.step to the last, with what happens after each: logs, the bad-step
    guard, post-hoc EMA snapshots, checkpoints (`save(step)`), grids (`grid(step)`) and evaluations (excluded
    from steps/s).
    True when `watch` asked to stop early: the step's checkpoint and the preemption marker are written."""
    t, log = config.train, config.log
    run_dir, device, is_main = Path(config.run.run_dir), accelerator.device, accelerator.is_main_process
    max_steps = t.max_train_steps
    bar = progress(total=max_steps, initial=state.step, disable=not is_main, dynamic_ncols=True, desc="train")
    window_start, window_steps, paused = time.perf_counter(), 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data_iter = iter(loader)
    while state.step < max_steps:
        x, y, *images = next(data_iter)  # images: [the clean images (B, 3, S, S) uint8] with alignment
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        images = images[0].to(device, non_blocking=True) if images else None
        train_step(state, ddp_model, objective, accelerator, x, y, step_draws.draw(state.step), plan, config, meter,
                   repa, images)
        state.step += 1
        step = state.step
        window_steps += 1
        bar.update(1)
        if step % log.log_every == 0 or step == max_steps:
            log_window(meter, state, config, accelerator, loader, logger, bar, step, window_steps,
                       time.perf_counter() - window_start - paused)
            window_start, window_steps, paused = time.perf_counter(), 0, 0.0
        if step % min(log.log_every, t.max_bad_steps) == 0 or step % log.ckpt_every == 0 or step == max_steps:
            check_bad_streak(meter, config, loader, step)
        pause_start = time.perf_counter()
        if state.power_ema is not None and is_main and (step % t.posthoc_ema.snapshot_every == 0 or step == max_steps):
            save_posthoc_snapshots(state.power_ema, state.model, run_dir, step, t.posthoc_ema.dtype,
                                   metadata={"config": json.dumps(config.to_dict())})
        if step % log.ckpt_every == 0 or step == max_steps:
            save(step)
        if log.sample_every > 0 and (step % log.sample_every == 0 or step == max_steps):
            grid(step)
        if evaluator:
            evaluator.maybe_run(step, save)  # after the checkpoint of this step; excluded from steps/s
        paused += time.perf_counter() - pause_start
        if watch is not None and step < max_steps and watch.due(step):
            bar.close()
            if step % log.ckpt_every:  # not saved above
                save(step)
            if is_main:
                write_marker(run_dir, step, watch.received)
            return True
    bar.close()
    return False
