"""The run folder of a training run: its name, lock, checkpoints and logs.

<results-dir>/<run name>/ holds checkpoints/<step>.pt (+ <step>-ema.safetensors), samples/, log.txt,
metrics.jsonl, config.json and run.lock. The name comes from the settings, so rerunning the same
command resumes the same run. The main process holds an exclusive `fcntl.flock` on run.lock for the
run's life (the kernel releases it when the process ends in any way, also kill -9), so two trainers
never share a folder; flock works on local file systems and on NFSv4 / Lustre mounted with flock
support, and where the file system refuses locks the run continues with a warning.

The random states a checkpoint holds are captured and restored by fcdm_common/rng.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Iterable, Optional

import torch
from tqdm import tqdm

from fcdm_common.cli import UserError
from fcdm_common.digests import stamp_metadata
from fcdm_common.io import atomic_write_text, fault_point, save_safetensors
from fcdm_common.locks import FolderLock, lock_folder
from models.checkpoints import DamagedCheckpoint, load_checkpoint, load_ema_export

CKPT_RE = re.compile(r"^(\d{7,})\.pt$")  # checkpoints/<step, 7+ digits>.pt


# ---------------------------------------------------------------------------------- run naming
def format_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def experiment_name(model: str, objective: str, data_name: str, global_batch_size: int, lr: float, seed: int,
                    extra: Optional[dict] = None) -> str:
    """A stable name for a run from its settings: rerunning the same command maps to the same folder.

    `extra` (settings that change training, e.g. model overrides) adds a short hash when non-empty.
    """
    name = f"{model.replace('/', '-')}-{objective}-{data_name}-bs{global_batch_size}-lr{format_lr(lr)}-seed{seed}"
    if extra:
        blob = json.dumps(extra, sort_keys=True, separators=(",", ":"))
        name += "-" + hashlib.sha256(blob.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


# ---------------------------------------------------------------------------------- checkpoints
def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"{step:07d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in the folder, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume_checkpoint(ckpt_dir: str | os.PathLike, log=print, start_over: bool = False,
                           flag: str = "--start-over true") -> tuple[Optional[dict], Optional[Path], list[Path]]:
    """(checkpoint, its path, the unreadable newer files skipped) for resuming a run. Every unreadable
    file (empty, truncated, random bytes, text, a zip of something else, an export, contents that differ
    from its digest) is skipped with a warning and the previous one is used. When checkpoints exist but
    none loads, UserError lists them, unless `start_over` (then training starts from step 0, keeping the
    files; see `prune_checkpoints`).

    A damaged file stays where it is, under its name (not renamed aside): `prune_checkpoints` keeps it while
    it is newer than every readable checkpoint, a rerun skips it again (and says so), and the resumed run,
    bitwise the same as the one that wrote it, replaces it with an intact copy when it saves that step."""
    unreadable = []
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_checkpoint(path, for_training=True), path, unreadable
        except DamagedCheckpoint as e:
            log(f"WARNING: skipping damaged checkpoint {path} ({e.detail}); falling back to the previous one (the "
                f"file is kept: the run's next save of step {step} replaces it)")
            unreadable.append(path)
        except UserError as e:
            log(f"WARNING: skipping unreadable checkpoint {path} ({e}); falling back to the previous one")
            unreadable.append(path)
    if unreadable and not start_over:
        raise UserError(f"no checkpoint in {ckpt_dir} can be read ({', '.join(p.name for p in reversed(unreadable))}: "
                        f"see the warnings above), so the run cannot resume; restore a good copy, or pass {flag} "
                        "to train this run folder from step 0 (the unreadable files are kept until overwritten)")
    return None, None, unreadable


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep_last: int, keep_every: int,
                      suffixes: Iterable[str] = ("-ema.safetensors",), unreadable: Iterable = ()) -> list[Path]:
    """Delete checkpoints except the newest `keep_last` and every step that is a multiple of
    `keep_every` (0: none). Companion files (<step><suffix>) go with their checkpoint. Files known to
    be `unreadable` never count among the newest (so the newest readable one is always kept); those
    newer than every readable checkpoint stay until the run overwrites them, older ones are deleted."""
    bad = {Path(p).name for p in unreadable}
    everything = list_checkpoints(ckpt_dir)
    ckpts = [(s, p) for s, p in everything if p.name not in bad]
    keep = {s for s, _ in ckpts[-keep_last:]} if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s, _ in ckpts if s % keep_every == 0}
    newest = ckpts[-1][0] if ckpts else -1
    keep |= {s for s, p in everything if p.name in bad and s > newest}
    ckpts = everything
    removed = []
    for s, p in ckpts:
        if s in keep:
            continue
        for q in [p] + [p.with_name(f"{s:07d}{suf}") for suf in suffixes]:
            if q.exists():
                q.unlink()
                removed.append(q)
    return removed


def prune_on_start(ckpt_dir: str | os.PathLike, keep_last: int, keep_every: int,
                   resume_path: Optional[str | os.PathLike], unreadable: Iterable = (), log=print) -> list[Path]:
    """Start of training (rank 0, under the run lock, after the resume checkpoint's export is complete):
    the pruning a save was killed before (a save writes the checkpoint, its EMA export, then prunes), which
    otherwise only the next save would do - never, when the run had already reached its last step.
    The rule of `prune_checkpoints`, applied only when the run resumes from its newest readable checkpoint
    `resume_path` (which is then kept); a --resume of another file leaves pruning to the next save."""
    bad = {Path(p).name for p in unreadable}
    readable = [p for _, p in list_checkpoints(ckpt_dir) if p.name not in bad]
    if resume_path is None or not readable or Path(resume_path).resolve() != readable[-1].resolve():
        return []
    removed = prune_checkpoints(ckpt_dir, keep_last, keep_every, unreadable=unreadable)
    if removed:
        log(f"removed {len(removed)} old checkpoint files an interrupted save had left (--keep-last {keep_last}, "
            f"--keep-every {keep_every}): {', '.join(p.name for p in removed)}")
    return removed


def ema_export_path(ckpt_path: str | os.PathLike) -> Path:
    """<run>/checkpoints/<step>-ema.safetensors beside <step>.pt."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}-ema.safetensors")


def export_ema(ema_state: dict, config: dict, step: int, ckpt_path: str | os.PathLike) -> Path:
    """The EMA weights of checkpoint `ckpt_path` as safetensors with the run config, the step and the content
    digest (fcdm_common/digests.py) as metadata (the same bytes whether written at save time or repaired on
    a rerun from the loaded checkpoint)."""
    path = ema_export_path(ckpt_path)
    save_safetensors(ema_state, path, metadata=stamp_metadata(ema_state, {"config": json.dumps(config), "step": step}))
    return path


def repair_ema_export(ckpt: dict, ckpt_path: str | os.PathLike, log=print) -> Optional[Path]:
    """Resuming from `ckpt` (loaded from `ckpt_path`, its digest checked): write its EMA export again when it is
    missing (a kill between checkpoint and export) or damaged (unreadable, different from its digest, or
    weights other than the checkpoint's EMA, which also catches damage in an export written before digests).
    The path written, or None when the export was intact."""
    path = ema_export_path(ckpt_path)
    if not path.exists():
        path = export_ema(ckpt["ema"], ckpt["config"], int(ckpt["step"]), ckpt_path)
        log(f"completed the missing export {path}")
        return path
    try:
        export = load_ema_export(path, note=False)
    except UserError as e:
        reason = e.detail if isinstance(e, DamagedCheckpoint) else str(e)
    else:
        ema = ckpt["ema"]
        if export["ema"].keys() == ema.keys() and all(torch.equal(v, ema[k].cpu()) for k, v in export["ema"].items()):
            return None
        reason = "its weights differ from the checkpoint's EMA weights"
    export_ema(ckpt["ema"], ckpt["config"], int(ckpt["step"]), ckpt_path)
    log(f"WARNING: the EMA export {path} was damaged ({reason}); rewrote it from {ckpt_path}")
    return path


# ---------------------------------------------------------------------------------- logs
class RunLogger:
    """log.txt (human) and metrics.jsonl (one JSON object per log step), both appended and flushed.

    Only the main process writes; other ranks get a logger with `enabled=False`."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, echo: bool = True):
        self.run_dir = Path(run_dir)  # where log.txt and metrics.jsonl live
        self.enabled = enabled  # main process only
        self.echo = echo  # also print to stdout
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        if self.echo:
            try:
                tqdm.write(line)
            except ImportError:
                print(line, flush=True)
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(line + "\n")

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = json.dumps(clean) + "\n"
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            fault_point("metrics.jsonl", before_kill=lambda: (f.write(line[:len(line) // 2]), f.flush()))
            f.write(line)
            f.flush()


def truncate_metrics(path: str | os.PathLike, max_step: int) -> None:
    """Drop metrics.jsonl records after `max_step` (work lost by a kill, redone after resume)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    atomic_write_text(path, "".join(s + "\n" for s in kept))


# ---------------------------------------------------------------------------------- the run lock
LOCK_NAME = "run.lock"


def acquire_run_lock(run_dir: str | os.PathLike, what: str = "trainer", log=print) -> FolderLock:
    """Lock `run_dir` for this process (fcdm_common/locks.py) or raise UserError naming the process that
    holds it."""
    return lock_folder(run_dir, LOCK_NAME, label=f"run folder {run_dir}", what=what, log=log, reentrant=True,
                       fix="wait for it to finish or stop it, or pass another --exp-name / --results-dir")
