"""Download a VAE snapshot from the Hugging Face Hub into a local folder, for offline clusters.

The folder is what `--hf-model-dir` of extract_features.py and the sampling scripts load (with
local_files_only, so the cluster never needs network access).

    python preparation/download_snapshot.py --repo-id stabilityai/sd-vae-ft-ema --local-dir vae/sd-vae-ft-ema
"""
from __future__ import annotations

import argparse
from pathlib import Path

import huggingface_hub

from fcdm_common.cli import HelpFormatter, UserError, error_summary, run_main


def download(repo_id: str, local_dir, revision: str | None = None,
             allow_patterns: tuple[str, ...] = ("*.json", "*.safetensors"), subfolder: str | None = None) -> Path:
    """snapshot_download into `local_dir`; checks the folder can be loaded (config.json present).

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
        raise UserError(f"{repo_id} downloaded to {folder} has no config.json; is it a diffusers model repo? "
                        "(for a pipeline repository, pass --subfolder vae)")
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                description="Download a diffusers VAE snapshot for offline use (--hf-model-dir).")
    p.add_argument("--repo-id", default="stabilityai/sd-vae-ft-ema",
                   help="Hub repository (default stabilityai/sd-vae-ft-ema)")
    p.add_argument("--local-dir", required=True, help="destination folder (created)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--allow-patterns", nargs="+", default=["*.json", "*.safetensors"],
                   help="files to fetch (default: *.json *.safetensors)")
    p.add_argument("--subfolder", default=None,
                   help="fetch only this folder of the repository, e.g. vae for an SD3/FLUX pipeline repository")
    args = p.parse_args(argv)
    out = download(args.repo_id, args.local_dir, args.revision, tuple(args.allow_patterns), args.subfolder)
    print(f"downloaded {args.repo_id} to {out}; use --hf-model-dir {out}")


if __name__ == "__main__":
    run_main(main)
