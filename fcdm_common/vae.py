"""The autoencoder between pixels and the latent space FCDM is trained in.

"sd": the Stable Diffusion KL autoencoder (Rombach et al., 2022) loaded with diffusers
`AutoencoderKL`, as in DiT and the FCDM paper (stabilityai/sd-vae-ft-ema, 8x downsampling,
4 channels). Latents are multiplied by the scaling factor 0.18215 so they have roughly unit
variance; `encode_moments` returns the UNSCALED posterior N(mean, std^2) and `decode` takes
SCALED latents, which is what training and sampling hold.

"none": an identity "autoencoder" for pixel-space data (the embedded digits demo): 3 channels,
no downsampling, scaling factor 1, posterior std 0.

Weights are fetched only when the user asks for `hf_model_name` without `hf_model_dir`; importing
this module or loading from a local folder never touches the network.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fcdm_common.cli import UserError

DEFAULT_HF_MODEL = "stabilityai/sd-vae-ft-ema"
DEFAULT_SCALING_FACTOR = 0.18215


def vae_id(vae: str, hf_model_name: str = DEFAULT_HF_MODEL, hf_model_dir: str | None = None) -> str:
    """Short id stored with the data: "none", or "sd:<last path component>" (hub name or folder).

    A hub download and a local snapshot of the same repository get the same id
    ("sd:sd-vae-ft-ema"), so resuming on an offline cluster is not flagged as a different VAE.
    """
    if vae == "none":
        return "none"
    source = str(hf_model_dir) if hf_model_dir is not None else hf_model_name
    return "sd:" + Path(source.rstrip("/\\")).name


class IdentityVAE:
    """Pixel space: latents are the images themselves (3 channels, downsample 1, std 0)."""

    latent_channels = 3
    downsample = 1
    scaling_factor = 1.0
    name = "none"

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device = torch.device(device)  # where outputs live
        self.dtype = dtype  # compute dtype

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, torch.float32)  # (N, 3, H, W) in [-1, 1]
        return x, torch.zeros_like(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.device, torch.float32)  # (N, 3, H, W)


class SDVAE:
    """diffusers AutoencoderKL wrapped with the scaling convention above."""

    downsample = 8

    def __init__(self, model, scaling_factor: float, name: str, device="cpu", dtype=torch.float32):
        model = model.to(device=device)
        if dtype != torch.float32:  # casting an fp32 model to fp32 makes diffusers warn needlessly
            model = model.to(dtype=dtype)
        self.model = model.eval().requires_grad_(False)  # AutoencoderKL
        self.scaling_factor = float(scaling_factor)  # latents * factor ~ unit variance
        self.name = name  # id stored with the data
        self.device = torch.device(device)  # device the model runs on
        self.dtype = dtype  # compute dtype of the model
        self.latent_channels = int(model.config.latent_channels)
        # downsampling = 2 ** (number of down blocks - 1) in diffusers' Encoder
        self.downsample = 2 ** (len(model.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3, H, W) in [-1, 1] -> posterior mean and std, each (N, C, H/8, W/8), float32."""
        posterior = self.model.encode(x.to(self.device, self.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, 8h, 8w) in [-1, 1] (not clamped), float32."""
        z = z.to(self.device, torch.float32) / self.scaling_factor
        return self.model.decode(z.to(self.dtype)).sample.float()


def load_vae(vae: str = "sd", hf_model_name: str = DEFAULT_HF_MODEL, hf_model_dir: str | os.PathLike | None = None,
             scaling_factor: float = DEFAULT_SCALING_FACTOR, device="cpu", dtype=torch.float32):
    """Build the autoencoder. `hf_model_dir` (a local snapshot) wins over `hf_model_name` (downloads)."""
    if vae == "none":
        return IdentityVAE(device=device, dtype=dtype)
    if vae != "sd":
        raise UserError(f"unknown --vae {vae!r}; use 'sd' (diffusers AutoencoderKL) or 'none' (pixel space)")
    if not scaling_factor > 0:
        raise UserError(f"--vae-scaling-factor must be > 0, got {scaling_factor}")
    from diffusers import AutoencoderKL

    if hf_model_dir is not None:
        folder = Path(hf_model_dir)
        if not folder.is_dir():
            raise UserError(f"VAE folder {folder} does not exist; download one with "
                            "preparation/download_snapshot.py --repo-id stabilityai/sd-vae-ft-ema --local-dir DIR")
        if not (folder / "config.json").is_file():
            raise UserError(f"VAE folder {folder} has no config.json; point --hf-model-dir at a diffusers "
                            "AutoencoderKL snapshot (preparation/download_snapshot.py writes one)")
        try:
            model = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as e:
            raise UserError(f"cannot load the AutoencoderKL in {folder}: {str(e).splitlines()[0]}") from None
    else:
        import warnings

        with warnings.catch_warnings():  # diffusers still passes huggingface_hub >= 1 its removed argument
            warnings.filterwarnings("ignore", message=".*`local_dir_use_symlinks` argument is deprecated")
            model = AutoencoderKL.from_pretrained(hf_model_name)
    return SDVAE(model, scaling_factor, vae_id("sd", hf_model_name, hf_model_dir), device=device, dtype=dtype)
