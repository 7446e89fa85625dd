"""Checkpoints: one dict of tensors and plain Python values, loadable with `torch.load(weights_only=True)`.

Layout (the contract between train.py, sample.py, sample_ddp.py and any user code):

    {
      "model":  state_dict of the raw network,
      "ema":    state_dict of the EMA network (the weights to report and sample from),
      "opt":    optimizer state_dict,
      "step":   int, optimizer steps taken,
      "config": the resolved run configuration (plain JSON-able dict), with at least
                "model" (registry name), "model_kwargs" (every constructor override, incl. in_channels,
                num_classes, learn_sigma), "objective" ("diffusion" | "flow"), "objective_kwargs",
                "data" (latent_shape [C, H, W], num_classes, image_size, vae name, scaling_factor) and
                "vae" (the flags to rebuild the decoder: vae, hf_model_name, hf_model_dir),
      "rng":    random states (python, numpy, torch CPU, torch CUDA) of the saving process,
      ... anything else train.py needs to resume exactly (data position, counters).
    }

A release export, `<step>-ema.safetensors` (train_gen/run_folder.py's `export_ema`: the EMA weights, with the
run config and the step as metadata), loads as {"ema", "config", "step"}: whatever samples from a checkpoint
samples from it too (not training: it has no optimizer state).

Both carry a content digest (fcdm_common/digests.py: crc32c per tensor and per top-level value), the checkpoint
under the top-level key "digest", the export in its header metadata: `save_checkpoint` writes it, the loaders
check it and raise `DamagedCheckpoint` (a UserError naming the file and the damaged tensor) on a mismatch, since
neither torch.load nor safetensors notices flipped bytes. A loaded checkpoint is returned without its "digest";
files written before digests load with a note. A checkpoint edited and saved with plain `torch.save` keeps its
old digest and then reads as damaged: save it with `save_checkpoint`, which renews the digest.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open

from fcdm_common.cli import UserError, error_summary
from fcdm_common.digests import (  # noqa: F401  (DamagedCheckpoint: re-exported)
    DamagedCheckpoint,
    check,
    check_safetensors,
    note_unverified,
    stamp,
)
from fcdm_common.io import atomic_torch_save
from models import create_model

REQUIRED_CONFIG_KEYS = ("model", "model_kwargs", "objective")
TRAINING_KEYS = ("model", "ema", "opt", "step")  # what resuming a run needs
CHECKPOINT_FIX = ("use an earlier checkpoint of the run or an intact copy of this one (a checkpoint edited on purpose "
                  "must be saved with models.checkpoints.save_checkpoint, which renews the digest)")
EXPORT_FIX = "pass its <step>.pt checkpoint instead, which holds the same EMA weights"


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Atomically write a checkpoint (temp file + rename: a crash never leaves a partial file) with the content
    digest that `load_checkpoint` checks (under "digest"; one that `obj` holds is replaced)."""
    atomic_torch_save(stamp(obj), path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", require_config: bool = True,
                    for_training: bool = False, adapt: Optional[Callable[[Any], Optional[dict]]] = None) -> dict:
    """Load a checkpoint safely (weights_only=True). Missing, empty, truncated, random, text or foreign
    files (and a valid zip with other contents) raise `UserError` naming the file; so does a checkpoint
    without a usable "config" and, with `for_training`, one without the state a resume needs. One whose
    contents differ from its digest raises `DamagedCheckpoint` (a UserError) naming the damaged tensor.
    `adapt(obj)` may turn another layout into ours (e.g. models.dit.dit_checkpoint_from_state_dict) or
    return None to leave it; its ValueError becomes a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file written by train_gen/train.py")
    unchecked = None  # why the file was not checked against a digest (noted once it has passed the other checks)
    if path.suffix.lower() == ".safetensors":
        ckpt = load_ema_export(path, map_location)
    else:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file raises anything (EOFError, KeyError, RuntimeError, ...)
            raise UserError(
                f"checkpoint {path} is corrupt or not a torch checkpoint ({error_summary(e)}); "
                "use an earlier checkpoint of the run"
            ) from None
        ckpt, unchecked = check(ckpt, path, "checkpoint", CHECKPOINT_FIX)  # before `adapt`: the file as written
    if adapt is not None:
        try:
            adapted = adapt(ckpt)
        except ValueError as e:
            raise UserError(f"checkpoint {path}: {e}") from None
        if adapted:  # another program's file (e.g. DiT's release): it never had a digest, no note
            ckpt, unchecked = adapted, None
    if not isinstance(ckpt, dict) or not ({"model", "ema"} & set(ckpt)):
        raise UserError(f"checkpoint {path} holds no 'model' or 'ema' weights; "
                        "it was not written by train_gen/train.py")
    if require_config:
        config = ckpt.get("config")
        if not isinstance(config, dict) or any(k not in config for k in REQUIRED_CONFIG_KEYS):
            raise UserError(
                f"checkpoint {path} has no run config (needs keys {', '.join(REQUIRED_CONFIG_KEYS)}); "
                "it was not written by train_gen/train.py, so the model cannot be rebuilt from it"
            )
    missing = [k for k in TRAINING_KEYS if k not in ckpt] if for_training else []
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}, so training cannot resume from it; "
                        "it is an export, not a checkpoint written by train_gen/train.py")
    if unchecked:
        note_unverified("checkpoint", path, unchecked)
    return ckpt


def load_ema_export(path: Path, map_location: Any = "cpu", note: bool = True) -> dict:
    """{"ema", "config", "step"} of an `<step>-ema.safetensors` export (see the module docstring); a damaged file,
    or a safetensors file without the run config in its metadata, raises UserError naming it (DamagedCheckpoint
    when its tensors or metadata differ from its digest). `note`: say so when it has no digest."""
    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged file raises the reader's own errors
        raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({error_summary(e)}); "
                        "export it again from its .pt checkpoint (train_gen/train.py writes both)") from None
    unchecked = check_safetensors(state, meta, path, "EMA export", EXPORT_FIX)
    try:
        config = json.loads(meta["config"])
        step = int(meta["step"]) if "step" in meta else None
    except (KeyError, ValueError, TypeError):
        raise UserError(f"checkpoint {path} is a safetensors file without a run config in its metadata, so the model "
                        "cannot be rebuilt from it; pass the <step>.pt checkpoint or its <step>-ema.safetensors "
                        "export written by train_gen/train.py") from None
    if unchecked and note:
        note_unverified("EMA export", path, unchecked)
    return {"ema": state, "config": config, **({"step": step} if step is not None else {})}


def build_model(config: dict):
    """Build the (randomly initialised) network a config describes."""
    try:
        return create_model(config["model"], **config.get("model_kwargs", {}))
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot build model {config.get('model')!r} from the checkpoint config: {e}") from None


def model_from_checkpoint(ckpt: dict, use_ema: bool = True, path: str | os.PathLike = "checkpoint"):
    """The network of a loaded checkpoint with its EMA (default) or raw weights, in eval mode."""
    key = "ema" if use_ema else "model"
    if key not in ckpt:
        raise UserError(f"{path} has no {key!r} weights; use --use-ema {'false' if use_ema else 'true'}")
    model = build_model(ckpt["config"])
    try:
        model.load_state_dict(ckpt[key])
    except (RuntimeError, ValueError) as e:  # ValueError: a model's own load check (e.g. DiT's pos_embed)
        raise UserError(f"{path}: the {key!r} weights do not fit model {ckpt['config']['model']!r}: "
                        f"{str(e)[:300]}") from None
    return model.eval()
