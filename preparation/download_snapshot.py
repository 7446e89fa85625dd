"""Download a VAE snapshot from the Hugging Face Hub into a local folder, for offline clusters.

The folder is what `--hf-model-dir` of extract_features.py and the sampling scripts load (with
local_files_only, so the cluster never needs network access).

    python preparation/download_snapshot.py --repo-id stabilityai/sd-vae-ft-ema --local-dir vae/sd-vae-ft-ema
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fcdm_common.cli import HelpFormatter, UserError, run_main


def download(repo_id: str, local_dir, revision: str | None = None,
             allow_patterns: tuple[str, ...] = ("*.json", "*.safetensors")) -> Path:
    """snapshot_download into `local_dir`; checks the folder can be loaded (config.json present)."""
    from huggingface_hub import snapshot_download

    local_dir = Path(local_dir)
    try:
        snapshot_download(repo_id=repo_id, local_dir=str(local_dir), revision=revision,
                          allow_patterns=list(allow_patterns))
    except Exception as e:  # network, auth, unknown repo
        raise UserError(f"could not download {repo_id} to {local_dir}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not (local_dir / "config.json").is_file():
        raise UserError(f"{repo_id} downloaded to {local_dir} has no config.json; is it a diffusers model repo?")
    return local_dir


def main(argv=None):
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description="Download a diffusers VAE snapshot for offline use (--hf-model-dir).")
    p.add_argument("--repo-id", default="stabilityai/sd-vae-ft-ema", help="Hub repository (default stabilityai/sd-vae-ft-ema)")
    p.add_argument("--local-dir", required=True, help="destination folder (created)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--allow-patterns", nargs="+", default=["*.json", "*.safetensors"],
                   help="files to fetch (default: *.json *.safetensors)")
    args = p.parse_args(argv)
    out = download(args.repo_id, args.local_dir, args.revision, tuple(args.allow_patterns))
    print(f"downloaded {args.repo_id} to {out}; use --hf-model-dir {out}")


if __name__ == "__main__":
    run_main(main)
