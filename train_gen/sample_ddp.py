r"""Sample many images with one or more processes and pack them into one ADM-format .npz for FID.

    torchrun --nnodes=1 --nproc_per_node=4 train_gen/sample_ddp.py --model FCDM-XL \
        --num-fid-samples 50000 --ckpt CKPT --sample-dir samples --ddpm True --cfg-scale 1.0

Autoguidance: `--guide-ckpt GUIDE.pt --cfg-scale W` guides with a weaker model (same latents, objective, classes).

Also runs as a plain `python train_gen/sample_ddp.py ...` (one process, CPU or GPU). Sample i is a function
of (--seed, i) and the settings only (see fcdm_common/sampling.py), so the archive is byte-identical
whatever the number of processes and --per-proc-batch-size. Process r draws the indices r, r + W, r + 2W, ...
and writes `NNNNNN.png` into a folder named from the settings; rerunning the same command after an
interruption keeps every PNG that decodes and only samples the rest. Rank 0 then writes
`<folder>-<N>.npz` (arr_0 uint8 NxHxWx3, arr_1 int64 labels) and `<folder>-<N>.json` (checkpoint hash,
sampler, guidance, seed, versions) beside the folder, both atomically. While it runs, rank 0 holds a lock
on the folder (`sample.lock`, an flock the system frees when the process ends, kill -9 included), so a
second run of the same command waits for nothing and stops with one message instead of deleting the
first one's files.

SIGTERM or SIGUSR1 (a cluster's warning before it kills the job) stops every process at once, after the PNGs
of a finished batch are written (train_gen/preemption.py `SignalStop`); rank 0 prints one line with the number
of images kept, and every process exits with PREEMPTED_STATUS (75), as training does. The rerun resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from diffusion.sampling import SamplerSettings, add_sampler_args, generate, guidance_text, load_setup, sample_labels
from diffusion.schedulers import build_scheduler, is_scheduler_sampler, scheduler_record
from evaluations.archives import package_versions, read_png, validate_npz, write_json, write_npz, write_png
from fcdm_common import distributed as dist_utils
from fcdm_common.cli import (
    HelpFormatter,
    UserError,
    alias_help,
    close_progress_bars,
    peer_lost_message,
    positive_int,
    run_main,
    seed_int,
    storage_error_message,
    str2bool,
)
from fcdm_common.io import remove_stale_temps, sha256_file
from fcdm_common.locks import FolderLock, lock_folder
from fcdm_common.progress import progress as tqdm
from train_gen.preemption import PREEMPTED_STATUS, Preempted, SignalStop

SETTINGS_FILE = "settings.json"  # inside the PNG folder: what its images were sampled with
RESUME_FROM = "the images already written"  # what a rerun keeps (run_main's line when another process died)
LOCK_FILE = "sample.lock"  # inside the PNG folder: rank 0 of the run writing it holds an flock on it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="checkpoint written by train_gen/train.py (<step>.pt, or its EMA export "
                        "<step>-ema.safetensors) or models.convert_official, or a plain DiT state dict (e.g. "
                        "DiT-XL-2-256x256.pt, with --model DiT-XL/2)")
    p.add_argument("--model", default=None,
                   help="optional: the model name the checkpoint must hold (e.g. FCDM-XL); read from the checkpoint")
    p.add_argument("--sample-dir", default="samples", help="folder for the PNG folder, the .npz and its .json")
    p.add_argument("--num-fid-samples", type=positive_int, default=50_000, help="number of images in the archive")
    p.add_argument("--per-proc-batch-size", type=positive_int, default=64,
                   help="samples per sampler batch on each process")
    p.add_argument("--seed", "--global-seed", dest="seed", type=seed_int, default=0,
                   help=alias_help("seed in 0..2**32-1; sample i depends on (seed, i) only", "--global-seed"))
    p.add_argument("--label-sampling", choices=("random", "balanced"), default="random",
                   help="random: uniform labels drawn per sample; balanced: label i %% num_classes")
    p.add_argument("--keep-pngs", type=str2bool, default=True, metavar="BOOL",
                   help="keep the PNG folder after the archive is written (false deletes it)")
    add_sampler_args(p, cfg_scale_default=1.0, forward_batch_default=64)
    return p


def _fmt(x: float) -> str:
    return f"{x:g}"


def run_name(setup, s: SamplerSettings, args) -> str:
    """Folder name from the settings that change the pixels."""
    parts = [setup.model_name, setup.ckpt_path.stem, "ema" if setup.use_ema else "raw", f"{s.sampler}{s.num_steps}"]
    if s.guidance == "autoguidance":  # the guide's identity: its model, checkpoint and weights
        g = setup.guide
        parts.append(f"ag{_fmt(s.cfg_scale)}-{g.model_name}-{g.path.stem}-{'ema' if g.use_ema else 'raw'}")
    else:
        parts.append(f"cfg{_fmt(s.cfg_scale)}")
    if s.time_shift is not None:
        parts.append(f"shift{_fmt(s.time_shift)}")
    if s.cfg_scale != 1.0 and s.cfg_channels != "all":
        parts.append(f"ch{s.cfg_channels}")
    if s.cfg_scale != 1.0 and s.guidance_interval is not None:
        parts.append("int{}-{}".format(*(_fmt(v) for v in s.guidance_interval)))
    if s.sampler == "ddim" and s.ddim_eta != 0:
        parts.append(f"eta{_fmt(s.ddim_eta)}")
    if s.sampler == "dopri5":
        parts.append(f"atol{_fmt(s.atol)}-rtol{_fmt(s.rtol)}")
    parts += [f"vae-{setup.vae_settings['vae']}", s.precision, args.label_sampling, f"seed{args.seed}"]
    return "-".join(str(p).replace("/", "_").replace(":", "_") for p in parts)


def content_settings(setup, s: SamplerSettings, args, ckpt_sha256: str) -> dict:
    """Everything an image depends on (not the sample count, batch size or process count). Settings this
    version added appear only when they are used, so folders sampled before keep matching their command."""
    cfg = setup.config
    extra = {}
    if s.guidance == "autoguidance":
        extra["guidance"] = "autoguidance"
        extra["guide"] = setup.guide.record(sha256_file(setup.guide.path))
    if s.time_shift is not None:
        extra["time_shift"] = s.time_shift
    return {
        "checkpoint_sha256": ckpt_sha256, "model": setup.model_name, "use_ema": setup.use_ema,
        "objective": setup.objective_name, "objective_kwargs": cfg.get("objective_kwargs") or {},
        "sampler": s.sampler, "num_sampling_steps": s.num_steps, "ddim_eta": s.ddim_eta,
        "cfg_scale": s.cfg_scale, "cfg_channels": s.cfg_channels,
        "guidance_interval": list(s.guidance_interval) if s.guidance_interval else None,
        "precision": s.precision, "forward_batch": s.forward_batch, "label_sampling": args.label_sampling,
        "global_seed": args.seed, "vae": setup.vae_settings, "latent_shape": list(setup.latent_shape),
        "num_classes": setup.num_classes, "device_type": setup.device.type,
        **sampler_record(setup, s, args), **extra,
    }


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sampler_record(setup, s: SamplerSettings, args) -> dict:
    """Sampler details that change the pixels: the diffusers scheduler class and config, dopri5's tolerances
    and (its adaptive steps are shared by a batch) the batching; whether the network was compiled, and the block
    kernels when not the torch path (left out for torch, so folders sampled before the option existed still match)."""
    out = {"compile": s.compile}
    if s.kernels not in (None, "torch"):
        out["kernels"] = s.kernels
    if setup.objective_name == "diffusion" and is_scheduler_sampler(s.sampler):
        out["scheduler"] = scheduler_record(build_scheduler(s.sampler, setup.objective))
    if s.sampler == "dopri5":
        out.update(atol=s.atol, rtol=s.rtol, per_proc_batch_size=args.per_proc_batch_size,
                   world_size=_world_size())
    return out


def check_folder(folder: Path, settings: dict) -> str | None:
    """Rank 0: None when the folder is new or was sampled with the same settings (then it is reused)."""
    path = folder / SETTINGS_FILE
    if not path.exists():
        if folder.is_dir() and any(folder.glob("*.png")):
            return (f"{folder} holds PNGs but no {SETTINGS_FILE}, so it cannot be checked against these settings; "
                    "delete it or pass another --sample-dir")
        write_json(path, settings)
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    new = json.loads(json.dumps(settings))  # as it reads back from settings.json (tuples become lists)
    if old != new:
        diff = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != new.get(k))
        return (f"{folder} was sampled with other settings ({', '.join(diff) or 'unreadable ' + SETTINGS_FILE}); "
                "delete it or pass another --sample-dir")
    return None


def lock_sample_folder(folder: Path) -> FolderLock:
    """Lock the PNG folder for this run or raise UserError naming the run that holds it. Two runs of one
    command would otherwise share the folder: the second deletes the first one's temp files as "stale", and
    the first deletes the folder under the second (--keep-pngs false)."""
    return lock_folder(folder, LOCK_FILE, label=str(folder), what="sample_ddp.py run",
                       fix="wait for it to finish (the same command then finds its archive), or pass another "
                           "--sample-dir")


def remove_folder(folder: Path) -> None:
    """Delete the PNG folder (--keep-pngs false) while its lock is still held: the lock file goes last, and a
    file system that keeps a stand-in of an open deleted file (NFS's .nfsXXXX) leaves an empty folder."""
    for p in folder.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    (folder / LOCK_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def archive_done(npz: Path, meta: Path, settings: dict, n: int, num_classes: int) -> bool:
    if not (npz.is_file() and meta.is_file()):
        return False
    try:
        old = json.loads(meta.read_text())
        validate_npz(npz, num_samples=n, num_classes=num_classes)
    except (OSError, ValueError, UserError):
        return False
    return old.get("settings") == json.loads(json.dumps(settings)) and old.get("npz_sha256") == sha256_file(npz)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    run = {}  # "folder": the PNG folder, once it is known (what a stop reports)
    with SignalStop() as stop:
        try:
            info = dist_utils.init_distributed(args.device)
            try:
                _sample(args, info, stop, run)
            finally:
                dist_utils.cleanup()
        except Preempted as e:
            report_preemption(e.signal_name, run.get("folder"), args.num_fid_samples)
        except RuntimeError as e:  # signalled while waiting for a process that the signal already stopped
            if stop.received is None or peer_lost_message(e) is None:
                raise
            report_preemption(stop.received, run.get("folder"), args.num_fid_samples)


def report_preemption(signal_name: str, folder: Path | None, n: int) -> None:
    """After a preemption signal: rank 0 prints one line (what is kept, how to resume); every process exits
    with PREEMPTED_STATUS. Under torchrun every process gets the signal, and each sees the same folder."""
    close_progress_bars()
    if os.environ.get("RANK", "0") == "0":
        if folder is None:
            kept = "stopped while loading, before sampling"
        else:  # every PNG there is complete (written atomically); a rerun checks them again anyway
            count = sum(1 for p in folder.glob("[0-9]*.png") if p.stem.isdigit() and int(p.stem) < n)
            kept = f"{count} of {n} images kept in {folder}"
        print(f"preempted ({signal_name}): {kept}; exiting with status {PREEMPTED_STATUS}; "
              "rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_STATUS)


def _prepare(setup, s: SamplerSettings, args, folder: Path, npz_path: Path, meta_path: Path, n: int):
    """Rank 0, before the others start: hash the checkpoint, lock and check the folder and decide whether
    anything is left to do. Returns (lock or None, state for the broadcast)."""
    sha = sha256_file(setup.ckpt_path)
    settings = content_settings(setup, s, args, sha)
    if archive_done(npz_path, meta_path, settings, n, setup.num_classes):
        return None, {"done": True}
    created = not folder.exists()
    lock = lock_sample_folder(folder)
    try:
        if archive_done(npz_path, meta_path, settings, n, setup.num_classes):  # a run we waited on finished it
            if created and not args.keep_pngs:
                remove_folder(folder)
            lock.release()
            return None, {"done": True}
        # temp files of a killed run (no other run writes here: we hold the lock)
        stale = remove_stale_temps(folder) + remove_stale_temps(folder.parent, names=[npz_path.name, meta_path.name])
        if stale:
            print(f"removed {len(stale)} temp file(s) left by an interrupted run", flush=True)
        return lock, {"done": False, "problem": check_folder(folder, settings), "settings": settings}
    except BaseException:
        lock.release()
        raise


def _sample(args, info, stop: SignalStop, run: dict) -> None:
    torch.backends.cudnn.benchmark = False  # fixed algorithm choice: same bits on every run
    setup = load_setup(args.ckpt, model_name=args.model, use_ema=args.use_ema, vae=args.vae,
                       hf_model_name=args.hf_model_name, hf_model_dir=args.hf_model_dir, device=info.device,
                       guide_ckpt=args.guide_ckpt, guide_use_ema=args.guide_use_ema)
    s = SamplerSettings.from_args(args, setup)
    n = args.num_fid_samples
    name = run_name(setup, s, args)
    sample_dir = Path(args.sample_dir)
    folder = sample_dir / name
    npz_path, meta_path = sample_dir / f"{name}-{n}.npz", sample_dir / f"{name}-{n}.json"
    run["folder"] = folder

    # rank 0 prepares the folder; its errors travel in the broadcast, so every rank stops with them
    state, lock = None, None
    if info.is_main:
        try:
            lock, state = _prepare(setup, s, args, folder, npz_path, meta_path, n)
        except UserError as e:
            state = {"done": False, "problem": str(e)}
        except OSError as e:  # a read-only or full --sample-dir: one message on every rank
            state = {"done": False, "problem": storage_error_message(e) or f"cannot prepare {folder}: {e}"}
    try:
        _sample_locked(args, info, setup, s, state, folder, npz_path, meta_path, stop)
    finally:
        if lock is not None:
            lock.release()


def _sample_locked(args, info, setup, s: SamplerSettings, state, folder: Path, npz_path: Path, meta_path: Path,
                   stop: SignalStop) -> None:
    n = args.num_fid_samples
    state = dist_utils.broadcast_object(state)
    if state["done"]:
        if info.is_main:
            print(f"{npz_path} already holds these {n} samples; nothing to do")
        return
    if state["problem"]:
        raise UserError(state["problem"])
    settings = state["settings"]

    c, h, w = setup.latent_shape
    image_shape = (h * setup.vae.downsample, w * setup.vae.downsample, 3)
    mine = range(info.rank, n, info.world_size)
    todo = [i for i in mine if read_png(folder / f"{i:06d}.png", image_shape) is None]
    total_todo = sum(dist_utils.all_gather_object(len(todo)))
    if info.is_main:
        print(f"sampling {n} images of {setup.model_name} ({s.sampler}, {s.num_steps} steps, "
              f"{guidance_text(s, setup)}, {s.kernels or 'torch'} kernels) with {info.world_size} process(es) into "
              f"{folder}: {n - total_todo} found, "
              f"{total_todo} to sample",
              flush=True)
    bar = tqdm(total=total_todo, unit="img", disable=not info.is_main or total_todo == 0, dynamic_ncols=True)
    b = args.per_proc_batch_size
    stats = {}  # "nfe": guided network evaluations (sampler steps) summed over this process's batches
    for start in range(0, len(todo), b):
        batch = todo[start:start + b]
        images, _ = generate(setup, batch, s, seed=args.seed, label_mode=args.label_sampling, stats=stats)
        with stop.hold():  # a signal stops the run here, once the batch is on disk, or during the next batch
            for i, img in zip(batch, images):
                write_png(folder / f"{i:06d}.png", img)
            bar.update(min(len(batch) * info.world_size, bar.total - bar.n))
            bar.set_postfix(nfe_per_batch=round(stats["nfe"] / (start // b + 1), 1))
    bar.close()
    if todo and info.is_main:
        print(f"network evaluations (NFE) per batch on rank 0: {stats['nfe'] / -(-len(todo) // b):.1f}", flush=True)
    dist_utils.barrier()
    if not info.is_main:
        return

    t0 = time.time()
    labels = sample_labels(args.seed, range(n), setup.num_classes, args.label_sampling)

    def chunks(size: int = 1000):
        for lo in range(0, n, size):
            out = np.empty((min(size, n - lo), *image_shape), dtype=np.uint8)
            for j in range(out.shape[0]):
                arr = read_png(folder / f"{lo + j:06d}.png", image_shape)
                if arr is None:
                    raise UserError(f"{folder / f'{lo + j:06d}.png'} is missing or corrupt after sampling "
                                    "(another job writing the same folder?); rerun the same command to redo it")
                out[j] = arr
            yield out

    write_npz(npz_path, chunks(), labels, image_shape=image_shape)
    validate_npz(npz_path, num_samples=n, num_classes=setup.num_classes)
    write_json(meta_path, {
        "npz": npz_path.name, "npz_sha256": sha256_file(npz_path), "num_samples": n,
        "image_shape": list(image_shape), "checkpoint": str(setup.ckpt_path.resolve()), "settings": settings,
        **({"guide_checkpoint": str(setup.guide.path.resolve())} if s.guidance == "autoguidance" else {}),
        "versions": package_versions(), "command": " ".join(sys.argv),
        "world_size": info.world_size, "per_proc_batch_size": args.per_proc_batch_size,
    })
    if not args.keep_pngs:
        with stop.hold():  # the archive is complete: the folder goes whole
            remove_folder(folder)
    print(f"wrote {npz_path} ({n} images {image_shape}, labels {args.label_sampling}) and {meta_path.name} "
          f"in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    run_main(main, resume_from=RESUME_FROM)
