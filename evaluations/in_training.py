"""Evaluation inside train_gen/train.py: FID, sFID, IS, precision and recall of the EMA model while it trains.

    python train_gen/train.py ... --eval-every 50000 --eval-samples 10000 \
        --ref-batch VIRTUAL_imagenet256_labeled.npz --eval-backend tf --inception-pb classify_image_graph_def.pb

What happens at an evaluation step S (a multiple of --eval-every, or the last step):
1. the checkpoint of step S is written first (train.py's own save; an evaluation step that is not a
   checkpoint step gets one), so the weights an evaluation scored are always on disk;
2. every process samples its share of the --eval-samples indices (r, r + W, r + 2W, ...) with the EMA
   model through `diffusion.sampling.generate`, the per-index machinery of sample_ddp.py: sample i
   is a function of (--eval-seed, i) and the settings only, so the archive equals what
   `sample_ddp.py --ckpt checkpoints/S.pt --seed SEED --per-proc-batch-size B --forward-batch B
   --sampler ... --num-sampling-steps ... --cfg-scale ...` draws. Every random state of every process
   is captured before and restored after (the training RNG streams and the data position are
   untouched: a run with evaluation trains bitwise like one without);
3. process 0 packs the ADM archive, computes the backend's features (the TF graph in its own
   subprocess, as evaluate.py does) and the metrics with the same code as evaluate.py
   (`evaluations.evaluator.metrics_from_features`) against the cached reference features;
4. the numbers go to metrics.jsonl (a record {"step": S, "kind": "eval", ...}), log.txt and
   TensorBoard/W&B (`eval/<metric>`), and `on_record` runs (the training loop redraws curves.png). The time
   spent is excluded from steps/s and logged apart (`eval_seconds`).

Kill and resume: the log of an evaluation is keyed by its step. A run killed after checkpoint S but
before the record of S was written resumes from S, finds no record for S and evaluates first (the
EMA of the checkpoint is exactly the EMA that would have been evaluated); a run killed after the
record resumes from S or later and never repeats it. Records after the resumed step were dropped
with the rest of the lost work (train.py's `truncate_metrics`) and are redone at the same steps.

Reference features (pool features for precision/recall, plus the FID statistics: the npz's own
`mu`/`sigma`/`mu_s`/`sigma_s` when present, as ADM uses them) are computed once and cached beside
the reference batch (`<ref>.<backend>-features.npz`, keyed by the hashes of the reference and of the
graph/weights), or in `<run>/eval/` when that folder is read-only.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from tqdm import tqdm

from diffusion import create_objective
from diffusion.guidance import CFG_SCALE_HELP, GUIDANCE_MODES, Guide, cfg_scale_arg
from diffusion.sampling import (
    SamplerSettings,
    check_num_steps,
    generate,
    resolve_sampler,
    sample_labels,
    setup_from_model,
)
from evaluations.archives import write_npz
from evaluations.batches import inspect_batch, read_ref_stats
from evaluations.evaluator import (
    FEATURE_DIMS,
    add_backend_args,
    check_feature_dims,
    compute_features,
    metrics_from_features,
    reference_statistics,
)
from evaluations.features_tf import resolve_pb
from fcdm_common.cli import UserError, non_negative_int, positive_int, seed_int, str2bool
from fcdm_common.io import atomic_path, remove_stale_dirs, remove_stale_temps, sha256_file
from fcdm_common.rng import capture_rng, restore_rng

EVAL_PRECISIONS = ("fp32", "bf16")
FEATURE_BATCH = 64  # images per feature-network call (ADM's Evaluator batch size, evaluate.py's default)
METRIC_KEYS = ("fid", "sfid", "inception_score", "precision", "recall", "class_accuracy")
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------- flags
def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """The --eval-* flags of train.py."""
    g = parser.add_argument_group("evaluation during training (off unless --eval-every > 0)")
    g.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="evaluate the EMA model every N steps and at the last step, right after that step's "
                        "checkpoint (0: never)")
    g.add_argument("--eval-samples", type=positive_int, default=10_000, help="samples per evaluation")
    g.add_argument("--eval-sampler", default="auto",
                   help="sampler of the evaluation samples: any name sample_ddp.py --sampler takes for this "
                        "objective; auto: ddim (diffusion) or the flow default (sde)")
    g.add_argument("--eval-steps", type=positive_int, default=50,
                   help="sampling steps of the evaluation samples (diffusion: at most the model's T = 1000 steps)")
    g.add_argument("--eval-cfg-scale", type=cfg_scale_arg, default=1.0,
                   help=f"guidance scale of the evaluation samples, {CFG_SCALE_HELP}")
    g.add_argument("--eval-guidance", choices=GUIDANCE_MODES, default=None,
                   help="guidance of the evaluation samples: cfg, or autoguidance by train.py's --guide-ckpt "
                        "(default: autoguidance when --guide-ckpt is given, else cfg)")
    g.add_argument("--eval-seed", type=seed_int, default=0,
                   help="global seed of the samples, 0..2**32-1 (sample_ddp.py --seed)")
    g.add_argument("--eval-batch-size", type=positive_int, default=64,
                   help="samples per sampler batch and rows per network call on each process (= sample_ddp.py "
                        "--per-proc-batch-size B --forward-batch B); as with --forward-batch, another value can "
                        "change the last bits of the samples")
    g.add_argument("--eval-precision", choices=EVAL_PRECISIONS, default="fp32",
                   help="network precision of the evaluation samples (sample_ddp.py --precision)")
    g.add_argument("--ref-batch", default=None,
                   help="ADM reference batch .npz (arr_0 uint8 images; optional mu/sigma/mu_s/sigma_s)")
    add_backend_args(g, "--eval-backend")
    g.add_argument("--eval-keep-samples", type=str2bool, default=False,
                   help="keep each evaluation's sample archive as <run>/eval/<step>-samples.npz")


@dataclass(frozen=True)
class EvalPlan:
    """Validated evaluation settings (what `plan_from_args` checked before anything was written)."""
    every: int  # evaluate every N steps (and at the last step)
    num_samples: int  # samples per evaluation
    sampler: str  # resolved sampler name
    num_steps: int  # sampling steps
    cfg_scale: float  # guidance scale (1: off)
    seed: int  # global seed of sample i
    batch_size: int  # per-process samples per generate() call = forward batch
    precision: str  # fp32 | bf16
    ref_batch: str  # the reference npz
    backend: str  # tf | torch | digits
    inception_pb: Optional[str]  # tf: resolved graph path
    inception_weights: Optional[str]  # torch: weights path
    tf_python: Optional[str]  # tf: interpreter
    keep_samples: bool  # keep the archives
    guidance: str = "cfg"  # "cfg" or "autoguidance" (by train.py's --guide-ckpt)

    def sampler_settings(self) -> SamplerSettings:
        """How the evaluation samples are drawn (sample_ddp.py --per-proc-batch-size B --forward-batch B)."""
        return SamplerSettings(sampler=self.sampler, num_steps=self.num_steps, cfg_scale=self.cfg_scale,
                               precision=self.precision, forward_batch=self.batch_size, guidance=self.guidance)

    def settings(self) -> dict:
        """What every eval record carries about how it was measured (the guidance mode when it is autoguidance)."""
        return {"eval_samples": self.num_samples, "eval_sampler": self.sampler, "eval_steps": self.num_steps,
                "eval_cfg_scale": self.cfg_scale, "eval_seed": self.seed, "eval_precision": self.precision,
                "eval_backend": self.backend, "ref_batch": self.ref_batch,
                **({"eval_guidance": self.guidance} if self.guidance != "cfg" else {})}


def _eval_sampler(objective: str, requested: str, num_steps: int, objective_kwargs: Optional[dict] = None) -> str:
    if requested == "auto":
        sampler = "ddim" if objective == "diffusion" else resolve_sampler(objective)
    else:
        try:
            sampler = resolve_sampler(objective, requested)
        except UserError as e:
            raise UserError(str(e).replace("--sampler", "--eval-sampler")) from None
    try:
        obj = create_objective(objective, **(objective_kwargs or {}))
    except (ValueError, TypeError):
        obj = None  # bad --objective-kwargs: train.py reports them itself
    if obj is not None:
        check_num_steps(obj, sampler, num_steps, flag="--eval-steps")
    elif sampler == "sde" and num_steps < 2:
        raise UserError("the SDE sampler needs --eval-steps >= 2")
    return sampler


def plan_from_args(args, data: dict, objective: str) -> Optional[EvalPlan]:
    """Check the --eval-* flags against the data before anything is written; None when --eval-every is 0.
    Raises UserError for a missing or unreadable reference batch, a missing graph/weights file, a sampler
    that does not fit the objective or reference images of another size than the samples."""
    if not args.eval_every:
        return None

    sampler = _eval_sampler(objective, args.eval_sampler, args.eval_steps, getattr(args, "objective_kwargs", None))
    if not np.isfinite(args.eval_cfg_scale) or args.eval_cfg_scale < 0:
        raise UserError(f"--eval-cfg-scale must be a finite number >= 0, got {args.eval_cfg_scale}")
    guidance = getattr(args, "eval_guidance", None) or "cfg"
    if guidance == "autoguidance" and not getattr(args, "guide_ckpt", None):
        raise UserError("--eval-guidance autoguidance needs --guide-ckpt PATH, the weaker model that guides")
    if args.eval_samples < 4:
        raise UserError(f"--eval-samples {args.eval_samples}: precision/recall need more than 3 samples")
    if not args.ref_batch:
        raise UserError("--eval-every needs --ref-batch REF.npz, the reference batch to compare the samples with "
                        "(an ADM batch such as VIRTUAL_imagenet256_labeled.npz, or evaluations/make_reference.py)")
    if not Path(args.ref_batch).is_file():
        raise UserError(f"--ref-batch {args.ref_batch}: file not found")
    info = inspect_batch(args.ref_batch, min_images=4, warn_fid=False)
    side = int(data["image_size"])
    if tuple(info.shape[1:3]) != (side, side):
        raise UserError(f"--ref-batch {args.ref_batch} holds {info.shape[1]}x{info.shape[2]} images but the model "
                        f"samples {side}x{side} images; use the reference batch of this resolution")
    read_ref_stats(args.ref_batch, *FEATURE_DIMS[args.eval_backend])  # mu/sigma: readable, right shapes, finite
    pb = weights = None
    if args.eval_backend == "tf":
        pb = resolve_pb(args.inception_pb)
        if args.tf_python and not Path(args.tf_python).exists() and not shutil.which(args.tf_python):
            raise UserError(f"--tf-python {args.tf_python}: interpreter not found")
    elif args.eval_backend == "torch":
        if not args.inception_weights:
            raise UserError("--eval-backend torch needs --inception-weights PATH (a torchvision inception_v3 "
                            "state_dict with 1008 classes); it is approximate, prefer --eval-backend tf")
        if not Path(args.inception_weights).is_file():
            raise UserError(f"--inception-weights {args.inception_weights}: file not found")
        weights = str(args.inception_weights)
    elif side % 8:
        raise UserError(f"--eval-backend digits needs images whose side is a multiple of 8, the model samples {side}")
    return EvalPlan(every=int(args.eval_every), num_samples=int(args.eval_samples), sampler=sampler,
                    num_steps=int(args.eval_steps), cfg_scale=float(args.eval_cfg_scale), seed=int(args.eval_seed),
                    batch_size=int(args.eval_batch_size), precision=args.eval_precision,
                    ref_batch=str(args.ref_batch), backend=args.eval_backend, inception_pb=pb,
                    inception_weights=weights, tf_python=args.tf_python, keep_samples=bool(args.eval_keep_samples),
                    guidance=guidance)


# ---------------------------------------------------------------------------------- reference cache
def _file_key(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    p = Path(path)
    return {"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}


def reference_cache_path(ref_batch: str, backend: str) -> Path:
    ref = Path(ref_batch)
    return ref.with_name(f"{ref.stem}.{backend}-features.npz")


def load_or_build_reference(plan: EvalPlan, fallback_dir: Path, log: Callable[[str], None]) -> dict:
    """Reference pool features and FID statistics: from the cache when its key (reference, backend,
    graph/weights hashes) matches, else computed (as evaluate.py would) and cached. Returns a dict with
    pool, mu, sigma, mu_s, sigma_s and `statistics` ("precomputed" | "computed")."""
    key = json.dumps({"version": CACHE_VERSION, "backend": plan.backend, "ref": _file_key(plan.ref_batch),
                      "model": _file_key(plan.inception_pb or plan.inception_weights),
                      "batch_size": FEATURE_BATCH}, sort_keys=True)
    candidates = [reference_cache_path(plan.ref_batch, plan.backend),
                  Path(fallback_dir) / reference_cache_path(plan.ref_batch, plan.backend).name]
    for path in candidates:
        try:
            with np.load(path) as z:
                if str(z["key"]) == key:
                    log(f"evaluation: reference features from the cache {path}")
                    return {k: z[k] for k in ("pool", "mu", "sigma", "mu_s", "sigma_s")} | {
                        "statistics": str(z["statistics"])}
        except (OSError, KeyError, ValueError):
            continue
    pool_dim, spatial_dim = FEATURE_DIMS[plan.backend]
    stats = read_ref_stats(plan.ref_batch, pool_dim, spatial_dim)
    for path in candidates:  # temp files of a cache write that was killed (a kill leaves `.<cache>.XXXXXXXX.tmp`)
        try:
            remove_stale_temps(path.parent, names=[path.name])
        except OSError:
            pass  # a read-only folder holds no temp of ours
    log(f"evaluation: computing {plan.backend} features of the reference batch {plan.ref_batch} (once; cached)")
    t0 = time.perf_counter()
    (feats,) = compute_features(plan.backend, [plan.ref_batch], plan.inception_pb, plan.inception_weights,
                                plan.tf_python, None, FEATURE_BATCH)
    check_feature_dims(feats, plan.backend, plan.ref_batch)
    source = "precomputed" if stats is not None else "computed"
    stats = stats if stats is not None else reference_statistics(feats)
    out = {"pool": feats["pool"], **stats, "statistics": source}
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, key=np.array(key), statistics=np.array(source),
                             **{k: out[k] for k in ("pool", "mu", "sigma", "mu_s", "sigma_s")})
            log(f"evaluation: cached the reference features in {path} ({time.perf_counter() - t0:.1f} s)")
            break
        except OSError as e:
            log(f"evaluation: cannot write the cache {path} ({e}); trying the run folder")
    return out


# ---------------------------------------------------------------------------------- the evaluator
def _logged_eval_steps(metrics_path: Path) -> set:
    steps = set()
    if not metrics_path.is_file():
        return steps
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("kind") == "eval":
            steps.add(int(rec["step"]))
    return steps


class InTrainingEvaluator:
    """Runs the evaluations of one training run (every process holds one; process 0 scores and logs)."""

    def __init__(self, plan: EvalPlan, *, accelerator, logger, run_dir, config: dict, ema, device,
                 max_steps: int, ckpt_every: int, on_record: Optional[Callable[[], None]] = None,
                 guide: Optional[Guide] = None):
        self.plan = plan
        self.accelerator = accelerator  # accelerate.Accelerator (ranks, barriers, trackers)
        self.logger = logger  # train_gen.run_folder.RunLogger (enabled on process 0 only)
        self.run_dir = Path(run_dir)
        self.config = config  # the run's resolved config (as stored in its checkpoints)
        self.ema = ema  # the EMA network (eval mode), updated in place by training
        self.device = device
        self.max_steps = int(max_steps)
        self.ckpt_every = int(ckpt_every)
        self.rank = int(accelerator.process_index)
        self.world = int(accelerator.num_processes)
        self.is_main = bool(accelerator.is_main_process)
        self.global_batch_size = int(config["train"]["global_batch_size"])
        self.reference = None  # process 0: cached reference features
        self.logged: set = set()  # steps whose evaluation record is in metrics.jsonl
        self._setup = None  # diffusion.sampling.SamplingSetup around self.ema
        self.on_record = on_record  # called on process 0 after each record is logged (e.g. redraw the curves)
        self.guide = guide  # autoguidance: the frozen guide network (train.py's --guide-ckpt), else None

    # ---- schedule
    def is_eval_step(self, step: int) -> bool:
        return step > 0 and (step % self.plan.every == 0 or step == self.max_steps)

    def _is_checkpoint_step(self, step: int) -> bool:
        return step % self.ckpt_every == 0 or step == self.max_steps

    def _barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def _broadcast(self, obj):
        if self.world == 1:
            return obj

        return broadcast_object_list([obj], from_process=0)[0]

    def start(self, step: int) -> None:
        """Before the first training step: reference features (process 0, cached), the evaluations already
        logged, and the evaluation of `step` if a kill left it pending (its checkpoint was just loaded)."""
        error = None
        if self.is_main:
            self._remove_stale_parts()
            try:
                self.reference = load_or_build_reference(self.plan, self.run_dir / "eval", self.logger.log)
            except UserError as e:
                error = str(e)
            self.logged = _logged_eval_steps(self.run_dir / "metrics.jsonl")
        error, self.logged = self._broadcast((error, self.logged))
        if error:
            raise UserError(f"evaluation: {error}")
        if self.is_eval_step(step) and step not in self.logged:
            self.logger.log(f"evaluation of step {step} is pending (the run stopped before it was logged); running it")
        self.maybe_run(step)

    def maybe_run(self, step: int, save: Optional[Callable[[int], None]] = None) -> None:
        """Evaluate at an evaluation step that has no record yet. `save(step)` (train.py's checkpoint writer,
        a collective) is called first when `step` is not a checkpoint step, so every evaluation has its
        checkpoint on disk; every process must call this with the same step."""
        if not self.is_eval_step(step) or step in self.logged:
            return
        if save is not None and not self._is_checkpoint_step(step):
            save(step)
        self.run(step)

    def _remove_stale_parts(self) -> None:
        """Process 0 at start, before any evaluation (the run lock keeps other trainers out): the per-process
        sample shares (`eval/.parts-<step>/`) and temp files that killed evaluations left behind."""
        eval_dir = self.run_dir / "eval"
        stale = remove_stale_dirs(eval_dir, re.compile(r"\.parts-.*")) + remove_stale_temps(eval_dir)
        if stale:
            self.logger.log(f"evaluation: removed {len(stale)} leftover(s) of interrupted evaluations in {eval_dir}")

    # ---- one evaluation
    def _sampling_setup(self):
        if self._setup is None:
            # the decoder is the one the run config records, as sample_ddp.py finds it in a checkpoint
            self._setup = setup_from_model(self.ema, self.config, path=self.run_dir / "checkpoints",
                                           use_ema=True, device=self.device)
            self._setup.guide = self.guide
        return self._setup

    def _sample_share(self, step: int) -> np.ndarray:
        """uint8 (n_mine, H, W, 3): the samples r, r + W, ... of this process, all random states restored."""
        plan = self.plan
        setup = self._sampling_setup()
        mine = list(range(self.rank, plan.num_samples, self.world))
        state = capture_rng()
        was_training = self.ema.training
        self.ema.eval()
        bar = tqdm(total=plan.num_samples, desc=f"eval {step}", unit="img", leave=False, dynamic_ncols=True,
                   disable=not self.is_main)
        try:
            parts = []
            for lo in range(0, len(mine), plan.batch_size):
                images, _ = generate(setup, mine[lo:lo + plan.batch_size], plan.sampler_settings(), seed=plan.seed,
                                     label_mode="random")
                parts.append(images)
                bar.update(min(len(images) * self.world, bar.total - bar.n))  # process 0's pace for all
        finally:
            bar.close()
            self.ema.train(was_training)
            restore_rng(state)
        if self.device is not None and torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        c, h, w = setup.latent_shape
        side = h * setup.vae.downsample
        return np.concatenate(parts) if parts else np.zeros((0, side, side, 3), np.uint8)

    def run(self, step: int) -> None:
        """Sample on every process, score on process 0, log; all processes leave together."""
        plan = self.plan
        t0 = time.perf_counter()
        self.logger.log(f"evaluation at step {step}: {plan.num_samples} samples ({plan.sampler}, {plan.num_steps} "
                        f"steps, {plan.guidance} {plan.cfg_scale:g}) on {self.world} process(es)")
        parts_dir = self.run_dir / "eval" / f".parts-{step:07d}"
        if self.is_main:
            shutil.rmtree(parts_dir, ignore_errors=True)  # a killed evaluation's leftovers
            parts_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        mine = self._sample_share(step)
        with atomic_path(parts_dir / f"rank{self.rank:05d}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, mine)
        del mine
        t_sampled = time.perf_counter()
        self._barrier()
        if self.is_main:
            try:
                self._score_and_log(step, parts_dir, t0, t_sampled)
            except Exception as e:  # a multi-day run goes on; the checkpoint of this step can be scored later
                self.logger.log(f"ERROR: evaluation at step {step} failed ({type(e).__name__}: {e}); training "
                                f"continues; score checkpoints/{step:07d}.pt with sample_ddp.py + evaluate.py")
            finally:
                shutil.rmtree(parts_dir, ignore_errors=True)
        self.logged.add(step)
        self._barrier()

    def _score_and_log(self, step: int, parts_dir: Path, t0: float, t_sampled: float) -> None:
        plan = self.plan
        setup = self._sampling_setup()
        n, world = plan.num_samples, self.world
        shares = [np.load(parts_dir / f"rank{r:05d}.npy", mmap_mode="r") for r in range(world)]
        image_shape = tuple(shares[0].shape[1:])

        def chunks(size: int = 1024):  # index i is row i // W of process i % W's share
            for lo in range(0, n, size):
                idx = np.arange(lo, min(lo + size, n))
                out = np.empty((len(idx), *image_shape), np.uint8)
                for r in range(world):
                    sel = idx % world == r
                    out[sel] = shares[r][idx[sel] // world]
                yield out

        labels = sample_labels(plan.seed, range(n), setup.num_classes, "random")
        npz = self.run_dir / "eval" / f"{step:07d}-samples.npz"
        write_npz(npz, chunks(), labels, image_shape=image_shape)
        shares.clear()  # release the memory maps
        try:
            (feats,) = compute_features(plan.backend, [str(npz)], plan.inception_pb, plan.inception_weights,
                                        plan.tf_python, None, FEATURE_BATCH)
            check_feature_dims(feats, plan.backend, str(npz))
            ref = self.reference
            failed = {}  # a metric that failed numerically is NaN; its reason goes into the record
            values = metrics_from_features(ref["pool"], ref, feats, labels if plan.backend == "digits" else None,
                                           str(npz), failed=failed)
        finally:
            if not plan.keep_samples:
                npz.unlink(missing_ok=True)
        t_end = time.perf_counter()
        record = {"step": step, "kind": "eval", "nimg": step * self.global_batch_size, **values,
                  **plan.settings(), "eval_seconds": t_end - t0, "eval_sample_seconds": t_sampled - t0,
                  "eval_metric_seconds": t_end - t_sampled, **({"eval_failed": failed} if failed else {})}
        self.logger.metrics(record)
        shown = " ".join(f"{k} {values[k]:.4f}" for k in METRIC_KEYS if k in values)
        self.logger.log(f"eval step {step:07d} {shown} ({n} samples, {plan.sampler}-{plan.num_steps}, {plan.guidance} "
                        f"{plan.cfg_scale:g}, {plan.backend}; sampling {t_sampled - t0:.1f} s, metrics "
                        f"{t_end - t_sampled:.1f} s)")
        if self.accelerator.trackers:
            self.accelerator.log({f"eval/{k}": v for k, v in values.items() if v is not None and np.isfinite(v)}
                                 | {"eval/seconds": t_end - t0}, step=step)
        if self.on_record is not None:
            self.on_record()


