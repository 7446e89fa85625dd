"""One layer over the diffusers autoencoders FCDM can be trained on (and pixel space).

Supported diffusers classes (chosen from the snapshot's config.json `_class_name`, or `vae_class`):

* `AutoencoderKL`: the KL autoencoder of latent diffusion (Rombach et al., 2022): SD 1.x/2.x and
  sd-vae-ft-ema/mse (4 channels, 8x), SDXL, EQ-VAE, and the 16-channel SD3/FLUX-style configs that
  carry a `shift_factor`. The encoder gives a Gaussian posterior N(mean, std^2).
* `AutoencoderDC`: deep-compression autoencoders (Chen et al., 2024; 32x downsampling in the released
  DC-AE f32c32 models). The encoder is deterministic (no posterior std).

The latent the diffusion model sees is z = (latent - shift_factor) * scaling_factor, as in the SD3
and FLUX pipelines (shift 0 for SD-VAE, so z = latent * 0.18215 there, as in DiT and the paper);
`decode` inverts it: latent = z / scaling_factor + shift_factor. Latent channels come from the
config (`latent_channels`), the spatial downsampling from the number of encoder blocks
(2 ** (len(block_out_channels) - 1) for KL, 2 ** (len(encoder_block_out_channels) - 1) for DC);
`scaling_factor` and `shift_factor` from the config (DC-AE configs have no shift: 0). An explicit
argument overrides each.

`encode_moments` returns the UNSCALED, UNSHIFTED posterior (mean, std); for deterministic classes std
is zero, and extraction stores one value per image ("sample" semantics) for them automatically.

"none": an identity "autoencoder" for pixel-space data (the embedded digits demo): 3 channels, no
downsampling, scale 1, shift 0, posterior std 0.

Weights are fetched only when the user names a hub repository without a local folder, and never at
import time. `resolve_snapshot` checks that a VAE can be had BEFORE a program writes anything: on a
machine without network (or with HF_HUB_OFFLINE=1) and no cached copy it fails at once with one
message naming --hf-model-dir and preparation/download_snapshot.py, instead of the hub's retries.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch

from fcdm_common.cli import UserError, error_summary

DEFAULT_HF_MODEL = "stabilityai/sd-vae-ft-ema"
DEFAULT_SCALING_FACTOR = 0.18215  # SD-VAE (Rombach et al., 2022): latents * 0.18215 ~ unit variance

# diffusers class -> (config key of the latent channels, config key whose length sets the downsampling,
#                     deterministic encoder)
SUPPORTED_CLASSES = {
    "AutoencoderKL": ("latent_channels", "block_out_channels", False),
    "AutoencoderDC": ("latent_channels", "encoder_block_out_channels", True),
}
SNAPSHOT_FILES = ("*.json", "*.safetensors")  # what download_snapshot.py fetches


def vae_id(vae: str, hf_model_name: str = DEFAULT_HF_MODEL, hf_model_dir: str | os.PathLike | None = None) -> str:
    """Short id stored with the data: "none", or "sd:<last path component>" (hub name or folder).

    A hub download and a local snapshot of the same repository get the same id
    ("sd:sd-vae-ft-ema"), so resuming on an offline cluster is not flagged as a different VAE.
    """
    if vae == "none":
        return "none"
    source = str(hf_model_dir) if hf_model_dir is not None else (hf_model_name or DEFAULT_HF_MODEL)
    return "sd:" + Path(source.rstrip("/\\")).name


DEFAULT_VAE_ID = vae_id("sd", DEFAULT_HF_MODEL)  # "sd:sd-vae-ft-ema": the paper's autoencoder


# ----------------------------------------------------------------------------- finding a snapshot
def offline_hint(name: str, extra: str = "") -> str:
    return (f"pass --hf-model-dir DIR with a local snapshot, made on a machine with network by "
            f"'python preparation/download_snapshot.py --repo-id {name} --local-dir DIR'{extra}")


def _hub_offline() -> bool:
    try:
        if bool(huggingface_hub.constants.HF_HUB_OFFLINE):
            return True
    except Exception:  # pragma: no cover - very old huggingface_hub
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One TCP connection to the hub endpoint: a fast answer instead of the client's retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_snapshot(hf_model_name: str | None = None, hf_model_dir: str | os.PathLike | None = None,
                     hint: str = "") -> Path:
    """The local folder holding the VAE's config.json and weights (`hf_model_dir` wins).

    A hub name is looked up in the local cache first; it is downloaded only when the hub is reachable.
    Every failure is one UserError naming the fix (`hint` is appended to the offline message)."""
    if hf_model_dir is not None:
        folder = Path(hf_model_dir)
        if not folder.is_dir():
            raise UserError(f"VAE folder {folder} does not exist; download one with "
                            f"preparation/download_snapshot.py --repo-id {hf_model_name or DEFAULT_HF_MODEL} "
                            "--local-dir DIR")
        if not (folder / "config.json").is_file():
            raise UserError(f"VAE folder {folder} has no config.json; point --hf-model-dir at a diffusers "
                            "autoencoder snapshot (preparation/download_snapshot.py writes one)")
        return folder
    name = hf_model_name or DEFAULT_HF_MODEL
    # huggingface_hub's functions are looked up on the module at call time (tests substitute them there)
    try:
        cached = Path(huggingface_hub.snapshot_download(repo_id=name, allow_patterns=list(SNAPSHOT_FILES),
                                                        local_files_only=True))
        if (cached / "config.json").is_file():
            return cached
    except Exception:  # not in the cache
        pass
    if _hub_offline() or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the Hugging Face Hub cannot be reached"
        raise UserError(f"the VAE {name} is not in the local Hugging Face cache and {why}; "
                        + offline_hint(name, hint))
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id=name, allow_patterns=list(SNAPSHOT_FILES)))
    except Exception as e:  # network, auth, unknown repository
        raise UserError(f"could not download the VAE {name} ({error_summary(e)}); "
                        + offline_hint(name, hint)) from None
    if not (folder / "config.json").is_file():
        raise UserError(f"the hub repository {name} has no config.json at its root; is it a diffusers autoencoder? "
                        "(for a pipeline repository, download its vae/ folder and pass it as --hf-model-dir)")
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {error_summary(e)}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return config


def autoencoder_properties(config: dict, *, vae_class: str | None = None, latent_channels: int | None = None,
                           downsample: int | None = None, scaling_factor: float | None = None,
                           shift_factor: float | None = None, where: str = "the VAE config") -> dict:
    """Class, latent channels, downsampling, scale, shift and determinism from a config; arguments win."""
    cls = vae_class or config.get("_class_name")
    if cls is None:
        raise UserError(f"{where} has no _class_name; pass --vae-class ({' or '.join(SUPPORTED_CLASSES)})")
    if cls not in SUPPORTED_CLASSES:
        raise UserError(f"{where} is a {cls}, which is not supported; supported autoencoder classes: "
                        f"{', '.join(SUPPORTED_CLASSES)} (or --vae none for pixel space)")
    ch_key, down_key, deterministic = SUPPORTED_CLASSES[cls]
    if latent_channels is None:
        if config.get(ch_key) is None:
            raise UserError(f"{where} ({cls}) does not give the latent channel count ({ch_key}); "
                            "pass --vae-latent-channels")
        latent_channels = int(config[ch_key])
    if downsample is None:
        blocks = config.get(down_key)
        if not blocks:
            raise UserError(f"{where} ({cls}) has no {down_key}, so the downsampling is unknown; "
                            "pass --vae-downsample")
        downsample = 2 ** (len(blocks) - 1)
    if scaling_factor is None:
        scaling_factor = config.get("scaling_factor")
        scaling_factor = DEFAULT_SCALING_FACTOR if scaling_factor is None and cls == "AutoencoderKL" else scaling_factor
        scaling_factor = 1.0 if scaling_factor is None else scaling_factor
    if shift_factor is None:
        shift_factor = config.get("shift_factor") or 0.0
    scaling_factor, shift_factor = float(scaling_factor), float(shift_factor)
    if not scaling_factor > 0:
        raise UserError(f"the scaling factor must be > 0, got {scaling_factor} (--vae-scaling-factor)")
    if int(latent_channels) < 1 or int(downsample) < 1:
        raise UserError(f"latent channels ({latent_channels}) and downsampling ({downsample}) must be >= 1")
    return {"vae_class": cls, "latent_channels": int(latent_channels), "downsample": int(downsample),
            "scaling_factor": scaling_factor, "shift_factor": shift_factor, "deterministic": bool(deterministic)}


# ----------------------------------------------------------------------------- the autoencoders
class IdentityVAE:
    """Pixel space: latents are the images themselves (3 channels, downsample 1, std 0)."""

    vae_class = "none"
    latent_channels = 3
    downsample = 1
    scaling_factor = 1.0
    shift_factor = 0.0
    deterministic = False  # keeps the demo's 'moments' stores as they were (std 0)
    name = "none"

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device = torch.device(device)  # where outputs live
        self.dtype = dtype  # compute dtype

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, torch.float32)  # (N, 3, H, W) in [-1, 1]
        return x, torch.zeros_like(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_moments(x)[0]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.device, torch.float32)  # (N, 3, H, W)


class DiffusersAutoencoder:
    """A diffusers autoencoder with z = (latent - shift) * scale on encode and the inverse on decode."""

    def __init__(self, model, props: dict, name: str, device="cpu", dtype=torch.float32):
        model = model.to(device=device)
        if dtype != torch.float32:  # casting an fp32 model to fp32 makes diffusers warn needlessly
            model = model.to(dtype=dtype)
        self.model = model.eval().requires_grad_(False)  # AutoencoderKL / AutoencoderDC
        self.vae_class = props["vae_class"]  # diffusers class name
        self.latent_channels = props["latent_channels"]  # C of the latents
        self.downsample = props["downsample"]  # image side / latent side
        self.scaling_factor = props["scaling_factor"]  # z = (latent - shift) * scale ~ unit variance
        self.shift_factor = props["shift_factor"]
        self.deterministic = props["deterministic"]  # no posterior std (DC-AE)
        self.name = name  # id stored with the data
        self.device = torch.device(device)  # device the model runs on
        self.dtype = dtype  # compute dtype of the model

    def _check(self, latent: torch.Tensor, x: torch.Tensor) -> None:
        want = (x.shape[0], self.latent_channels, x.shape[2] // self.downsample, x.shape[3] // self.downsample)
        if tuple(latent.shape) != want:
            raise UserError(f"the {self.vae_class} {self.name} encodes {tuple(x.shape)} images to "
                            f"{tuple(latent.shape)}, "
                            f"not {want} as its config (or --vae-latent-channels/--vae-downsample) says; "
                            "fix or drop those flags")

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3, H, W) in [-1, 1] -> unscaled posterior mean and std, each (N, C, H/d, W/d), float32."""
        out = self.model.encode(x.to(self.device, self.dtype))
        if self.deterministic:
            mean = out.latent.float()
            std = torch.zeros_like(mean)
        else:
            mean, std = out.latent_dist.mean.float(), out.latent_dist.std.float()
        self._check(mean, x)
        return mean, std

    def to_z(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent -> what the diffusion model sees: (latent - shift) * scale."""
        if self.shift_factor:
            latent = latent - self.shift_factor
        return latent * self.scaling_factor

    def from_z(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_z`: z / scale + shift."""
        latent = z / self.scaling_factor
        return latent + self.shift_factor if self.shift_factor else latent

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> z of the posterior mean (the deterministic latent for DC-AE)."""
        return self.to_z(self.encode_moments(x)[0])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, C, h, w) -> images (N, 3, d*h, d*w) in [-1, 1] (not clamped), float32."""
        latent = self.from_z(z.to(self.device, torch.float32))
        return self.model.decode(latent.to(self.dtype)).sample.float()


def describe(vae) -> dict:
    """The latent properties recorded in stores and run configs."""
    return {"vae_class": vae.vae_class, "latent_channels": int(vae.latent_channels), "downsample": int(vae.downsample),
            "scaling_factor": float(vae.scaling_factor), "shift_factor": float(vae.shift_factor)}


def load_autoencoder(vae: str = "sd", hf_model_name: str | None = None, hf_model_dir: str | os.PathLike | None = None,
                     *, vae_class: str | None = None, latent_channels: int | None = None, downsample: int | None = None,
                     scaling_factor: float | None = None, shift_factor: float | None = None, device="cpu",
                     dtype=torch.float32, hint: str = ""):
    """Build the autoencoder. `hf_model_dir` (a local snapshot) wins over `hf_model_name` (hub/cache).

    vae: "sd" (any supported diffusers autoencoder; the name is kept from the original release) or
    "none" (pixel space). The remaining arguments override what the config says."""
    if vae == "none":
        return IdentityVAE(device=device, dtype=dtype)
    if vae != "sd":
        raise UserError(f"unknown --vae {vae!r}; use 'sd' (a diffusers autoencoder: "
                        f"{', '.join(SUPPORTED_CLASSES)}) or 'none' (pixel space)")
    folder = resolve_snapshot(hf_model_name, hf_model_dir, hint=hint)
    props = autoencoder_properties(read_config(folder), vae_class=vae_class, latent_channels=latent_channels,
                                   downsample=downsample, scaling_factor=scaling_factor, shift_factor=shift_factor,
                                   where=f"{folder / 'config.json'}")
    # deferred: diffusers is heavy; only loading an autoencoder needs it
    import diffusers

    cls = getattr(diffusers, props["vae_class"])
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # missing/corrupt weights, config that does not fit the class
        raise UserError(f"cannot load the {props['vae_class']} in {folder}: {error_summary(e)}") from None
    return DiffusersAutoencoder(model, props, vae_id("sd", hf_model_name, hf_model_dir), device=device, dtype=dtype)


