"""The one progress-bar factory of every program: tqdm that stays quiet in redirected output.

On a terminal a bar redraws every 0.1 s, which is what people watch. Redirected to a file (SLURM
logs, `> log.txt 2>&1`, CI) each redraw is kept, so thousands of lines accumulate; there the bar
redraws at most every `FILE_INTERVAL_S` seconds instead (still a sign of life and a rate), or is
switched off with FCDM_PROGRESS=0. FCDM_PROGRESS=1 forces terminal behaviour.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

FILE_INTERVAL_S = 60.0  # seconds between redraws when the bar's stream is not a terminal


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_settings(stream=None, environ=os.environ) -> dict:
    """tqdm keyword arguments for `stream` (default stderr): {} on a terminal, else a long
    mininterval/maxinterval and no dynamic width; {"disable": True} with FCDM_PROGRESS=0."""
    mode = environ.get("FCDM_PROGRESS", "").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return {"disable": True}
    if mode in ("1", "true", "on", "yes") or _is_terminal(stream if stream is not None else sys.stderr):
        return {}
    return {"mininterval": FILE_INTERVAL_S, "maxinterval": FILE_INTERVAL_S, "dynamic_ncols": False, "ncols": 100}


def progress(iterable=None, **kwargs):
    """tqdm(iterable, **kwargs) with the settings above; a caller's disable=True always wins."""
    merged = {**kwargs, **progress_settings(kwargs.get("file"))}
    merged["disable"] = bool(kwargs.get("disable")) or bool(merged.get("disable"))
    return tqdm(iterable, **merged)
