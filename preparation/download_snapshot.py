"""Download a model snapshot from the Hugging Face Hub into a local folder, for offline clusters.

Two kinds of repository:

* a diffusers autoencoder (VAE): config.json (+ *.safetensors) at the root, or in --subfolder vae of a
  pipeline repository. The folder is what `--hf-model-dir` of extract_features.py and the sampling
  scripts load (with local_files_only, so the cluster never needs network access).
* a timm vision encoder for representation alignment (REPA), e.g. timm/vit_base_patch14_dinov2.lvd142m
  (DINOv2-B/14): config.json naming the timm "architecture", and model.safetensors. The folder is what
  train.py's `--repa-encoder-path` loads (models/vision_encoders.py, from the local files only).

    python preparation/download_snapshot.py --repo-id stabilityai/sd-vae-ft-ema --local-dir vae/sd-vae-ft-ema
    python preparation/download_snapshot.py --repo-id timm/vit_base_patch14_dinov2.lvd142m --local-dir encoders/dinov2-b
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import huggingface_hub

from fcdm_common.cli import HelpFormatter, UserError, error_summary, run_main

TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what models/vision_encoders.py reads from a folder
NEEDS = ("a diffusers VAE needs config.json at the folder's root (for a pipeline repository, pass --subfolder vae); "
         "a timm encoder (e.g. timm/vit_base_patch14_dinov2.lvd142m) needs config.json naming its \"architecture\" "
         "and model.safetensors")


def snapshot_kind(folder) -> str:
    """"timm" when the folder's config.json names a timm "architecture", else "diffusers"."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {error_summary(e)}") from None
    return "timm" if isinstance(config, dict) and isinstance(config.get("architecture"), str) else "diffusers"


def download(repo_id: str, local_dir, revision: str | None = None,
             allow_patterns: tuple[str, ...] = ("*.json", "*.safetensors"), subfolder: str | None = None) -> Path:
    """snapshot_download into `local_dir`; checks the folder can be loaded.

    Both kinds need config.json; a timm encoder's (it names an "architecture") also needs its weights
    (model.safetensors, or pytorch_model.bin when --allow-patterns fetched it).
    `subfolder`: only that folder of the repository (e.g. "vae" of an SD3/FLUX pipeline); the returned
    path is local_dir/subfolder, the folder to pass as --hf-model-dir."""
    local_dir = Path(local_dir)
    if subfolder:
        allow_patterns = tuple(f"{subfolder.strip('/')}/{p}" for p in allow_patterns)
    try:
        # looked up on the module at call time, so a substitute set on huggingface_hub is used
        huggingface_hub.snapshot_download(repo_id=repo_id, local_dir=str(local_dir), revision=revision,
                                          allow_patterns=list(allow_patterns))
    except Exception as e:  # network, auth, unknown repo
        raise UserError(f"could not download {repo_id} to {local_dir}: {error_summary(e)}") from None
    folder = local_dir / subfolder.strip("/") if subfolder else local_dir
    if not (folder / "config.json").is_file():
        raise UserError(f"{repo_id} downloaded to {folder} has no config.json; is it a diffusers or timm model "
                        f"repository? ({NEEDS})")
    if snapshot_kind(folder) == "timm" and not any((folder / f).is_file() for f in TIMM_WEIGHTS):
        raise UserError(f"{repo_id} downloaded to {folder} is a timm model (config.json names an architecture) but "
                        f"has no {' or '.join(TIMM_WEIGHTS)}; a timm encoder needs its weights next to config.json "
                        "(keep *.safetensors in --allow-patterns)")
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Download a diffusers VAE snapshot (for --hf-model-dir) or a timm vision encoder snapshot "
                    "(for train.py's --repa-encoder-path, e.g. --repo-id timm/vit_base_patch14_dinov2.lvd142m) "
                    "for offline use.")
    p.add_argument("--repo-id", default="stabilityai/sd-vae-ft-ema",
                   help="Hub repository (default stabilityai/sd-vae-ft-ema); a timm encoder for REPA: e.g. "
                        "timm/vit_base_patch14_dinov2.lvd142m (DINOv2-B/14)")
    p.add_argument("--local-dir", required=True, help="destination folder (created)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--allow-patterns", nargs="+", default=["*.json", "*.safetensors"],
                   help="files to fetch (default: *.json *.safetensors, enough for both kinds)")
    p.add_argument("--subfolder", default=None,
                   help="fetch only this folder of the repository, e.g. vae for an SD3/FLUX pipeline repository")
    args = p.parse_args(argv)
    out = download(args.repo_id, args.local_dir, args.revision, tuple(args.allow_patterns), args.subfolder)
    flag = "train.py's --repa-encoder-path" if snapshot_kind(out) == "timm" else "--hf-model-dir"
    print(f"downloaded {args.repo_id} to {out}; use {flag} {out}")


if __name__ == "__main__":
    run_main(main)
