"""The latent space a model is trained in: which autoencoder, with which scale, shift and channel statistics.

A run's latents z = (latent - shift) * scale come from one autoencoder (models/autoencoders.py); with
`--latent-norm channel` the network sees x = (z - mean_c) / std_c instead, with the per-channel
statistics of the store (preparation/statistics.py computes them), as EDM2 does for SD-VAE latents and
LightningDiT for VA-VAE. Everything that decodes samples must undo exactly that: `wrap_decoder` puts
`DenormalizingDecoder` (z = x * std_c + mean_c) in front of the autoencoder, and `vae_for_data` /
`decoder_for_run` pick the autoencoder a run's data was made with.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fcdm_common.cli import UserError
from models.autoencoders import (
    DEFAULT_HF_MODEL,
    DEFAULT_SCALING_FACTOR,
    DEFAULT_VAE_ID,
    load_autoencoder,
    resolve_snapshot,
    vae_id,
)

NORM_MODES = ("none", "channel")


class LatentNorm:
    """x = (z - mean_c) / std_c and its inverse, on (N, C, H, W) tensors."""

    def __init__(self, mean, std):
        self.stats = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}  # exact (float64) values
        self.mean = torch.tensor([float(v) for v in mean], dtype=torch.float32)  # (C,)
        self.std = torch.tensor([float(v) for v in std], dtype=torch.float32)  # (C,)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise UserError(f"latent statistics need one mean and one std per channel, got {len(mean)} and {len(std)}")
        if not bool(torch.all(torch.isfinite(self.std) & (self.std > 0)) and torch.all(torch.isfinite(self.mean))):
            raise UserError(f"latent statistics are unusable (std must be finite and > 0): std {self.std.tolist()}")

    def _view(self, z: torch.Tensor):
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return self.mean.to(z.device).view(shape), self.std.to(z.device).view(shape)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._view(z)
        return (z - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._view(x)
        return x * std + mean

    def to_config(self) -> dict:
        return {"mode": "channel", **self.stats}

    @classmethod
    def from_config(cls, cfg) -> "LatentNorm | None":
        """None for a config without normalisation (older runs, mode none)."""
        if not isinstance(cfg, dict) or cfg.get("mode", "none") == "none":
            return None
        if cfg.get("mode") != "channel":
            raise UserError(f"unknown latent normalisation {cfg.get('mode')!r} in the run config; "
                            "expected none or channel")
        return cls(cfg["mean"], cfg["std"])


class DenormalizingDecoder:
    """A decoder that first maps the model's normalised latents back: z = x * std_c + mean_c."""

    def __init__(self, vae, norm: LatentNorm):
        self.vae = vae  # the autoencoder (IdentityVAE / DiffusersAutoencoder)
        self.norm = norm

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.norm.denormalize(x.float()))


def wrap_decoder(vae, norm_cfg):
    """`vae` itself for runs without normalisation, else a DenormalizingDecoder."""
    norm = norm_cfg if isinstance(norm_cfg, LatentNorm) else LatentNorm.from_config(norm_cfg)
    return vae if norm is None or vae is None else DenormalizingDecoder(vae, norm)


def same_stats(a, b, rel: float = 1e-6) -> bool:
    """Whether two statistics dicts/configs (mean, std lists) agree."""
    try:
        return all(len(a[k]) == len(b[k]) and all(math.isclose(float(x), float(y), rel_tol=rel, abs_tol=1e-12)
                                                 for x, y in zip(a[k], b[k])) for k in ("mean", "std"))
    except (KeyError, TypeError):
        return False


def same_norm(a, b) -> bool:
    """Whether two run-config normalisations ({"mode": ...}) are the same."""
    mode_a = (a or {}).get("mode", "none") if isinstance(a, dict) else "none"
    mode_b = (b or {}).get("mode", "none") if isinstance(b, dict) else "none"
    return mode_a == mode_b and (mode_a == "none" or same_stats(a, b))


def check_decoder_matches(decoder, data_cfg: dict, where) -> None:
    """A run trained on normalised latents must decode with the VAE its statistics were taken from."""
    norm = LatentNorm.from_config((data_cfg or {}).get("latent_norm"))
    data_vae = (data_cfg or {}).get("vae")
    name = getattr(decoder, "name", None)
    if data_vae is None or name in (None, data_vae):
        return
    if norm is not None:
        raise UserError(f"{where} was trained on latents of {data_vae} normalised with their per-channel "
                        f"statistics, but the VAE given is {name}, whose statistics differ; pass the VAE the model was "
                        "trained with (--hf-model-dir) or leave the VAE flags out")
    print(f"WARNING: decoding with the VAE {name}, but {where} was trained on latents of {data_vae}", flush=True)


@dataclass(frozen=True)
class AutoencoderSpec:
    """The identity of a latent space: which autoencoder (or pixel space), where its weights are, and how its
    latents are scaled: z = (latent - shift_factor) * scaling_factor. A run config records it as "vae";
    with `--latent-norm channel` the data's channel statistics come on top (`wrap_decoder`)."""
    vae: str  # "sd": a diffusers autoencoder (AutoencoderKL / AutoencoderDC), or "none": pixel space
    hf_model_name: Optional[str] = None  # hub name of the weights, used when hf_model_dir is None
    hf_model_dir: Optional[str] = None  # local snapshot folder
    scaling_factor: float = DEFAULT_SCALING_FACTOR
    shift_factor: float = 0.0

    @property
    def id(self) -> str:
        """The short id stored with data: "none" or "sd:<snapshot name>"."""
        return vae_id(self.vae, self.hf_model_name, self.hf_model_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def locate(self, hint: str = "") -> None:
        """Check that the weights can be had here (no loading): one UserError naming the fix otherwise."""
        if self.vae != "none":
            resolve_snapshot(self.hf_model_name, self.hf_model_dir, hint=hint)

    def load(self, device="cpu", dtype=torch.float32, hint: str = ""):
        """The autoencoder (models/autoencoders.py) with this scale and shift."""
        return load_autoencoder(self.vae, self.hf_model_name, self.hf_model_dir, scaling_factor=self.scaling_factor,
                                shift_factor=self.shift_factor, device=device, dtype=dtype, hint=hint)


PIXEL_SPACE = AutoencoderSpec("none", None, None, 1.0, 0.0)


def vae_for_data(data: dict, vae: str | None = None, hf_model_name: str | None = None,
                 hf_model_dir: str | os.PathLike | None = None, hint: str = "",
                 strict: bool = True) -> tuple[AutoencoderSpec, str | None]:
    """The autoencoder that decodes latents described by `data` (a run config's "data" entry), and a warning.

    By default the VAE the data was made with (the store records its hub name or folder); a user's
    --vae/--hf-model-name/--hf-model-dir wins, with a warning when it is not the data's VAE. Scale and
    shift always come from the data: they define what its latents mean. strict=False (nothing will be
    decoded now) records the data's folder even when it does not exist here instead of failing."""
    data_vae = data.get("vae")
    vae = vae or ("none" if data_vae == "none" else "sd")
    if vae == "none":
        return PIXEL_SPACE, (None if data_vae in (None, "none") else
                             f"--vae none decodes nothing, but the data holds latents of {data_vae}")
    if hf_model_name is None and hf_model_dir is None:
        folder = data.get("hf_model_dir")
        if folder and Path(folder).is_dir():
            hf_model_dir = folder
        elif data.get("hf_model_name"):
            hf_model_name = data["hf_model_name"]
        elif data_vae in (None, DEFAULT_VAE_ID):  # stores of the original release's VAE
            hf_model_name = DEFAULT_HF_MODEL
        elif not strict:
            hf_model_dir = folder
        else:
            where = f" from the folder {folder}, which does not exist on this machine" if folder else ""
            raise UserError(f"the data was made with the VAE {data_vae}{where}; pass its snapshot with "
                            f"--hf-model-dir (or its hub name with --hf-model-name){hint}")
    spec = AutoencoderSpec(vae, hf_model_name=hf_model_name or (None if hf_model_dir else DEFAULT_HF_MODEL),
                           hf_model_dir=None if hf_model_dir is None else str(hf_model_dir),
                           scaling_factor=float(data.get("scaling_factor") or DEFAULT_SCALING_FACTOR),
                           shift_factor=float(data.get("shift_factor") or 0.0))
    warning = None
    if data_vae not in (None, spec.id):
        warning = (f"decoding with the VAE {spec.id}, but the data was made with {data_vae}; images will be wrong "
                   "unless the two are the same autoencoder")
    return spec, warning


def spec_for_checkpoint(config: dict, vae: str | None = None, hf_model_name: str | None = None,
                        hf_model_dir: str | None = None) -> AutoencoderSpec:
    """The autoencoder a checkpoint's config records ("vae", with the data's scale and shift), with the
    sampling programs' --vae/--hf-model-name/--hf-model-dir taking precedence."""
    vae_cfg, data_cfg = dict(config.get("vae") or {}), config.get("data") or {}
    vae = vae or vae_cfg.get("vae") or ("none" if data_cfg.get("vae") == "none" else "sd")
    if vae == "none":
        return PIXEL_SPACE
    return AutoencoderSpec(
        vae, hf_model_name=hf_model_name or vae_cfg.get("hf_model_name") or DEFAULT_HF_MODEL,
        hf_model_dir=hf_model_dir if hf_model_dir is not None else
        (vae_cfg.get("hf_model_dir") if hf_model_name is None else None),
        scaling_factor=float(data_cfg.get("scaling_factor") or vae_cfg.get("scaling_factor") or DEFAULT_SCALING_FACTOR),
        shift_factor=float(data_cfg.get("shift_factor") or vae_cfg.get("shift_factor") or 0.0))


def decoder_for_run(spec: AutoencoderSpec, data: dict, device="cpu", load: bool = True, hint: str = ""):
    """The decoder of a run's grids: loaded (and wrapped to undo --latent-norm) where `load`, only located
    elsewhere, so every process fails alike and early."""
    if not load:
        spec.locate(hint)
        return None
    vae = spec.load(device=device, hint=hint)
    C = int(data["latent_shape"][0])
    if int(vae.latent_channels) != C:
        raise UserError(f"the VAE {vae.name} has {vae.latent_channels} latent channels but the data has {C}; "
                        f"pass the data's VAE with --hf-model-dir{hint}")
    return wrap_decoder(vae, data.get("latent_norm"))  # decodes z = x * std_c + mean_c for normalised runs
