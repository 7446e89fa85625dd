"""Sampler quality vs time: sample one checkpoint with several samplers and score each archive.

    python benchmarks/sampler_quality.py --ckpt results/demo/runs/fcdm-digits/checkpoints/0001500.pt \\
        --ref-batch results/demo/digits_ref.npz --backend digits --out-dir /tmp/samplers \\
        --samplers ddpm:250 ddpm:100 ddim:50 dpm++2m:10 dpm++2m:20 dpm++2m:50 unipc:20 \\
        --timing-rounds 2

Each entry SAMPLER:STEPS runs train_gen/sample_ddp.py in this process (class-balanced labels, the
same seed for every sampler) and train_gen/evaluate.py's metrics on the archive. The table reports
FID (and class accuracy for the digits backend), the wall time of the sampling program per 1,000
samples (model load, sampling, PNG and archive writing) and its ratio to the first entry's time.
Timings on a shared machine are noisy; the ratios inside one run are what to compare.
`--timing-rounds R` adds a fairer timing: `diffusion.sampling.generate` (what sample_ddp.py calls)
on `--timing-samples` samples per entry, the entries alternated R times, so every sampler sees the
same load; `--skip-quality` runs only that.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffusion.guidance import CFG_SCALE_HELP, cfg_scale_arg
from diffusion.sampling import SamplerSettings, generate, load_setup
from evaluations.evaluator import evaluate
from fcdm_common.cli import HelpFormatter, UserError, non_negative_int, positive_int, run_main, seed_int
from fcdm_common.io import atomic_write_text
from train_gen import sample_ddp


def parse_entry(text: str) -> tuple:
    name, sep, steps = text.rpartition(":")
    if not sep or not name or not steps.isdigit() or int(steps) < 1:
        raise UserError(f"--samplers entry {text!r} is not SAMPLER:STEPS (e.g. dpm++2m:20)")
    return name, int(steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ckpt", required=True, help="checkpoint of train_gen/train.py")
    p.add_argument("--ref-batch", required=True, help="reference .npz for train_gen/evaluate.py")
    p.add_argument("--backend", default="digits", help="evaluate.py backend: digits (default), torch or tf")
    p.add_argument("--out-dir", required=True, help="folder for the archives and the report (report.json)")
    p.add_argument("--samplers", nargs="+", required=True, metavar="SAMPLER:STEPS",
                   help="entries to compare, e.g. ddpm:250 dpm++2m:20 diffusers:DEISMultistepScheduler:20")
    p.add_argument("--num-samples", type=positive_int, default=1000, help="samples per entry (default 1000)")
    p.add_argument("--cfg-scale", type=cfg_scale_arg, default=2.0,
                   help=f"guidance scale of every entry, {CFG_SCALE_HELP} (default 2.0)")
    p.add_argument("--batch-size", type=positive_int, default=250,
                   help="--per-proc-batch-size and --forward-batch of sample_ddp.py (default 250)")
    p.add_argument("--seed", type=seed_int, default=0, help="--seed of every entry, 0..2**32-1 (default 0)")
    p.add_argument("--device", default="cpu", help="sampling device (default cpu)")
    p.add_argument("--threads", type=non_negative_int, default=1,
                   help="torch CPU threads (default 1; 0: torch's default)")
    p.add_argument("--timing-rounds", type=non_negative_int, default=0,
                   help="interleaved timing rounds after the quality runs (default 0: none)")
    p.add_argument("--timing-samples", type=positive_int, default=100, help="samples per timed call (default 100)")
    p.add_argument("--skip-quality", action="store_true", help="only the interleaved timing (needs --timing-rounds)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    entries = [parse_entry(e) for e in args.samplers]
    for path in (args.ckpt, args.ref_batch):
        if not Path(path).is_file():
            raise UserError(f"{path} does not exist")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    if args.timing_rounds < 0 or (args.skip_quality and args.timing_rounds == 0):
        raise UserError("--timing-rounds must be >= 0, and > 0 with --skip-quality")
    rows = []
    for name, steps in ([] if args.skip_quality else entries):
        sample_dir = out_dir / f"{name.replace(':', '_')}-{steps}"
        print(f"--- {name} {steps} steps: {args.num_samples} samples", flush=True)
        t0 = time.perf_counter()
        sample_ddp.main(["--ckpt", args.ckpt, "--sample-dir", str(sample_dir),
                         "--num-fid-samples", str(args.num_samples),
                         "--label-sampling", "balanced", "--sampler", name, "--num-sampling-steps", str(steps),
                         "--cfg-scale", str(args.cfg_scale), "--per-proc-batch-size", str(args.batch_size),
                         "--forward-batch", str(args.batch_size), "--seed", str(args.seed),
                         "--device", args.device, "--keep-pngs", "false"])
        seconds = time.perf_counter() - t0
        archive = sorted(sample_dir.glob("*.npz"))[-1]
        metrics = evaluate(str(archive), args.ref_batch, backend=args.backend)["metrics"]
        rows.append(dict(sampler=name, steps=steps, fid=metrics.get("fid"),
                         class_accuracy=metrics.get("class_accuracy"), seconds=seconds,
                         seconds_per_1000=seconds * 1000.0 / args.num_samples, archive=str(archive)))
        print(f"    FID {metrics.get('fid'):.3f}  class accuracy {metrics.get('class_accuracy')}  "
              f"{rows[-1]['seconds_per_1000']:.1f} s / 1000 samples", flush=True)
    timing = interleaved_timing(args, entries) if args.timing_rounds else None
    report = dict(ckpt=args.ckpt, ref_batch=args.ref_batch, backend=args.backend, num_samples=args.num_samples,
                  cfg_scale=args.cfg_scale, threads=args.threads, rows=rows, interleaved_timing=timing)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    if rows:
        print_table(rows, entries)
    print(f"wrote {out_dir / 'report.json'}")
    return report


def interleaved_timing(args, entries) -> list:
    """Seconds per 1000 samples of generate() for each entry, the entries alternated args.timing_rounds times."""
    setup = load_setup(args.ckpt, device=args.device)
    n = args.timing_samples
    times = {e: [] for e in entries}
    for rnd in range(args.timing_rounds):
        for name, steps in entries:
            t0 = time.perf_counter()
            generate(setup, range(n), SamplerSettings(name, steps, cfg_scale=args.cfg_scale, forward_batch=n),
                     seed=args.seed, label_mode="balanced")
            times[(name, steps)].append(time.perf_counter() - t0)
            print(f"timing round {rnd + 1}: {name} {steps}: {times[(name, steps)][-1]:.2f} s for {n}", flush=True)
    base = statistics.median(times[entries[0]])
    out = []
    for (name, steps), v in times.items():
        med = statistics.median(v)
        out.append(dict(sampler=name, steps=steps, seconds=v, seconds_per_1000=med * 1000.0 / n,
                        speedup_vs_first=base / med))
        print(f"{name} {steps}: {med * 1000.0 / n:.1f} s / 1000 samples, {base / med:.1f}x faster than "
              f"{entries[0][0]} {entries[0][1]}")
    return out


def print_table(rows, entries) -> None:
    base = rows[0]["seconds_per_1000"]
    print(f"\n| sampler | steps | FID | class accuracy | s / 1000 samples | time vs {entries[0][0]}-{entries[0][1]} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        acc = "-" if r["class_accuracy"] is None else f"{r['class_accuracy']:.3f}"
        print(f"| {r['sampler']} | {r['steps']} | {r['fid']:.3f} | {acc} | {r['seconds_per_1000']:.1f} | "
              f"{r['seconds_per_1000'] / base:.3f} |")


if __name__ == "__main__":
    run_main(main)
