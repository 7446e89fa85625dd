"""The embedded demo: the whole FCDM pipeline on a laptop CPU, with the same programs used on a cluster.

    python train_gen/demo.py            # `make demo`: under 10 minutes on 2 CPU cores (README)
    python train_gen/demo.py --quick    # a reduced run (seconds) that checks every stage works

Stages (each one a real program, run as a subprocess):
  1. preparation/make_demo_dataset.py  scikit-learn's 8x8 digits as an ImageFolder (RGB PNGs)
  2. preparation/extract_features.py   --vae none: a pixel-space zarr store
  3. evaluations/make_reference.py     the real digits as a reference batch (digits backend)
  4. train_gen/train.py                FCDM-digits, EMA, label dropout, checkpoints, sample grids, and
                                       FID/IS/precision/recall/class accuracy every 500 steps on 1,000
                                       samples (--eval-every, digits backend) drawn into curves.png
  5. train_gen/sample_ddp.py           class-balanced samples with classifier-free guidance -> ADM .npz
  6. train_gen/evaluate.py             --backend digits: class accuracy, FID, IS, precision, recall

Results go to `--out` (default results/demo): grid.png (one row per digit), curves.png (the training
curves and the evaluations during training), metrics.json, train_log.txt.
Rerunning resumes: finished stages are reused (training resumes from its last checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from diffusion.guidance import CFG_SCALE_HELP, cfg_scale_arg
from fcdm_common.cli import (
    HelpFormatter,
    UserError,
    alias_help,
    float_in,
    non_negative_int,
    positive_int,
    run_main,
)
from fcdm_common.images import save_grid
from fcdm_common.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

# The full demo: tuned to reach >= 0.90 class accuracy within minutes on 2 CPU cores (measured: README),
# evaluating during training every 500 steps on 1,000 samples.
FULL = dict(steps=1500, batch=128, samples=1000, sampling_steps=100, ckpt_every=500, eval_every=500,
            eval_samples=1000, eval_steps=50)
# The reduced form run by the tests and CI: every stage and artifact, no quality target.
QUICK = dict(steps=6, batch=16, samples=20, sampling_steps=4, ckpt_every=3, eval_every=3, eval_samples=20,
             eval_steps=4)
ZOOM = 8  # grid.png shows each 8x8 digit at 64x64


def stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def run(args: list, env: dict) -> None:
    cmd = [sys.executable, *map(str, args)]
    print("$ " + " ".join(str(a) for a in args), flush=True)
    result = subprocess.run(cmd, cwd=REPO, env=env)
    if result.returncode != 0:
        raise UserError(f"stage failed (exit {result.returncode}): {' '.join(str(a) for a in args)}")


def newest_checkpoint(run_dir: Path) -> Path:
    ckpts = sorted((run_dir / "checkpoints").glob("*.pt"))
    if not ckpts:
        raise UserError(f"training wrote no checkpoint in {run_dir / 'checkpoints'}")
    return ckpts[-1]


def class_grid(npz_path: Path, out: Path, num_classes: int, cols: int, zoom: int) -> None:
    """One row per class from a sample archive, nearest-neighbour zoomed for viewing."""
    with np.load(npz_path) as data:
        images, labels = data["arr_0"], data["arr_1"]
    rows = []
    for c in range(num_classes):
        picked = images[labels == c][:cols]
        if len(picked) < cols:  # few samples (quick mode): pad the row with blank tiles
            picked = np.concatenate([picked, np.zeros((cols - len(picked), *images.shape[1:]), images.dtype)])
        rows.append(picked)
    tiles = np.concatenate(rows).repeat(zoom, axis=1).repeat(zoom, axis=2)
    save_grid(tiles, out, nrow=cols)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    p.add_argument("--quick", action="store_true", help="reduced run for tests/CI: few steps and samples")
    p.add_argument("--train-steps", type=positive_int, default=None, help="training steps (default: 1500; quick: 6)")
    p.add_argument("--global-batch-size", "--batch-size", dest="global_batch_size", type=positive_int, default=None,
                   help=alias_help("training batch (default 128; quick: 16)", "--batch-size"))
    p.add_argument("--lr", type=float_in(0.0, 1.0, lo_open=True), default=2e-3,
                   help="AdamW learning rate in (0, 1] (default 2e-3: a short run)")
    p.add_argument("--ema-decay", type=float_in(0.0, 1.0), default=0.995,
                   help="EMA decay in [0, 1] (default 0.995: a short run)")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="class-balanced samples to draw and score (default 1000; quick: 20)")
    p.add_argument("--sampling-steps", type=positive_int, default=None, help="sampler steps (default 100; quick: 4)")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"), help="diffusion sampler (default ddpm)")
    p.add_argument("--cfg-scale", type=cfg_scale_arg, default=2.0,
                   help=f"classifier-free guidance scale {CFG_SCALE_HELP} (default 2.0)")
    p.add_argument("--eval-every", type=non_negative_int, default=None,
                   help="evaluate during training every N steps (default 500; quick: 3; 0: off)")
    p.add_argument("--eval-samples", type=positive_int, default=None,
                   help="samples per evaluation during training (default 1000; quick: 20)")
    p.add_argument("--upscale", type=positive_int, default=1,
                   help="digit upscale factor: 8x8 -> 8K x 8K (default 1; FCDM-digits is sized for 8x8)")
    p.add_argument("--threads", type=non_negative_int, default=1,
                   help="torch (OpenMP) threads per program (default 1: the demo's tensors are tiny, and more "
                        "threads than free cores make OpenMP spin; 0: leave torch's default)")
    p.add_argument("--min-accuracy", type=float_in(0.0, 1.0), default=None,
                   help="exit with status 1 if the samples' class accuracy (in [0, 1]) is below this (default: 0.90 "
                        "for the full demo, no check for --quick)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)

    preset = QUICK if args.quick else FULL
    steps = args.train_steps or preset["steps"]
    batch = args.global_batch_size or preset["batch"]
    num_samples = args.num_samples or preset["samples"]
    sampling_steps = args.sampling_steps or preset["sampling_steps"]
    ckpt_every = min(preset["ckpt_every"], steps)
    eval_every = preset["eval_every"] if args.eval_every is None else args.eval_every
    eval_samples = args.eval_samples or preset["eval_samples"]
    min_acc = args.min_accuracy if args.min_accuracy is not None else (None if args.quick else 0.90)
    size = 8 * args.upscale
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t_start = time.time()
    timings = {}

    t = stage("1/6 digits -> ImageFolder")
    images = out / "digits"
    run(["preparation/make_demo_dataset.py", "--out", images, "--upscale", args.upscale], env)
    timings["data"] = time.time() - t

    t = stage("2/6 ImageFolder -> zarr store (pixel space, --vae none)")
    store = out / "digits.zarr"
    run(["preparation/extract_features.py", "--data-path", images, "--zarr-path", store, "--vae", "none",
         "--image-size", size, "--per-proc-batch-size", 256, "--num-workers", 0, "--device", "cpu"], env)
    timings["extract"] = time.time() - t

    t = stage("3/6 reference batch of real digits")
    ref = out / "digits_ref.npz"
    run(["evaluations/make_reference.py", "--data-path", images, "--out", ref, "--image-size", size,
         "--backend", "digits"], env)
    timings["reference"] = time.time() - t

    t = stage(f"4/6 train FCDM-digits for {steps} steps"
              + (f", evaluating every {eval_every} steps on {eval_samples} samples" if eval_every else ""))
    runs = out / "runs"
    run(["train_gen/train.py", "--model", "FCDM-digits", "--zarr-path", store, "--results-dir", runs,
         "--exp-name", "fcdm-digits", "--hflip", "false", "--global-batch-size", batch, "--lr", args.lr,
         "--ema-decay", args.ema_decay, "--max-train-steps", steps, "--ckpt-every", ckpt_every, "--keep-last", 1,
         "--log-every", max(1, min(100, steps // 10)), "--sample-every", steps, "--grid-sampler", args.sampler,
         "--grid-steps", sampling_steps, "--cfg-scale", args.cfg_scale, "--num-workers", 0, "--vae", "none",
         "--mixed-precision", "no"]
        + (["--eval-every", eval_every, "--eval-samples", eval_samples, "--eval-backend", "digits", "--ref-batch", ref,
            "--eval-steps", preset["eval_steps"], "--eval-cfg-scale", args.cfg_scale,
            "--eval-batch-size", min(250, eval_samples)] if eval_every else []), env)
    run_dir = runs / "fcdm-digits"
    ckpt = newest_checkpoint(run_dir)
    timings["train"] = time.time() - t

    t = stage(f"5/6 sample {num_samples} class-balanced images "
              f"({args.sampler}, {sampling_steps} steps, cfg {args.cfg_scale})")
    samples = out / "samples"
    run(["train_gen/sample_ddp.py", "--ckpt", ckpt, "--sample-dir", samples, "--num-fid-samples", num_samples,
         "--label-sampling", "balanced", "--sampler", args.sampler, "--num-sampling-steps", sampling_steps,
         "--cfg-scale", args.cfg_scale, "--per-proc-batch-size", min(250, num_samples),
         "--forward-batch", min(250, num_samples),
         "--device", "cpu", "--keep-pngs", "false"], env)
    archives = sorted(samples.glob(f"*-{num_samples}.npz"), key=lambda f: f.stat().st_mtime)
    if not archives:
        raise UserError(f"sampling wrote no archive in {samples}")
    archive = archives[-1]
    timings["sample"] = time.time() - t

    t = stage("6/6 evaluate with the digits classifier")
    fid_txt = out / "metrics.txt"
    eval_json = out / "evaluation.json"
    run(["train_gen/evaluate.py", "--sample-batch", archive, "--ref-batch", ref, "--backend", "digits",
         "--output_fid", fid_txt, "--output-json", eval_json], env)
    timings["evaluate"] = time.time() - t

    class_grid(archive, out / "grid.png", num_classes=10, cols=10, zoom=max(1, ZOOM // args.upscale))
    shutil.copyfile(run_dir / "log.txt", out / "train_log.txt")
    if (run_dir / "curves.png").is_file():
        shutil.copyfile(run_dir / "curves.png", out / "curves.png")
    evaluation = json.loads(eval_json.read_text())
    metrics = evaluation["metrics"]
    during = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "eval"]
    timings["train_evaluations"] = sum(r["eval_seconds"] for r in during)  # part of "train"
    summary = {
        "metrics": metrics,
        "settings": {"train_steps": steps, "batch_size": batch, "lr": args.lr, "ema_decay": args.ema_decay,
                     "num_samples": num_samples, "sampler": args.sampler,
                     "eval_every": eval_every, "eval_samples": eval_samples,
                     "sampling_steps": sampling_steps, "cfg_scale": args.cfg_scale, "image_size": size,
                     "quick": args.quick, "checkpoint": str(ckpt), "archive": str(archive)},
        "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.time() - t_start, 1)},
        "evaluations_during_training": [{k: r[k] for k in ("step", "fid", "inception_score", "precision",
                                                           "recall", "class_accuracy", "eval_seconds") if k in r}
                                        for r in during],
    }
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    print(f"\n=== done in {summary['seconds']['total']:.0f} s ===")
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            print(f"{k:>16}: {v:.4f}")
    print(f"grid: {out / 'grid.png'}   curves: {out / 'curves.png'}   metrics: {out / 'metrics.json'}   "
          f"log: {out / 'train_log.txt'}")
    acc = metrics.get("class_accuracy")
    if min_acc is not None and (acc is None or acc < min_acc):
        print(f"class accuracy {acc} is below the target {min_acc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
