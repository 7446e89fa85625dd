"""FCDMPipeline: class-conditional sampling from an FCDM checkpoint as a diffusers `DiffusionPipeline`.

    pipe = FCDMPipeline.from_pretrained("fcdm-xl-256")          # a folder written by train_gen/export_pipeline.py
    images = pipe(class_labels=[207, 360], num_inference_steps=25, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0)).images          # PIL images
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)  # any epsilon scheduler

Components (saved by `save_pretrained`, loaded offline by `from_pretrained`):
  transformer  `FCDMNetwork` (diffusers ModelMixin + ConfigMixin around our registered network:
               config.json with the registry name and constructor arguments, safetensors weights);
               importable as diffusion.pipeline.FCDMNetwork, which model_index.json names;
  scheduler    any diffusers scheduler configured from the model's beta schedule (the exporter
               writes DPM-Solver++ 2M, see diffusion/schedulers.py);
  vae          AutoencoderKL, or None for pixel-space models (the digits demo).

The sampling loop is `diffusion.schedulers.scheduler_sample_loop` with `diffusion.guidance.GuidedModel`,
the same code sample.py runs, so `pipe(..., seed=S)` gives sample.py's images for `--seed S`, the same
labels and the same sampler (the per-sample generators of fcdm_common/sampling.py). With
`generator=...` the pipeline draws its noise the diffusers way (`randn_tensor`, one generator or one per
image). The learned-variance channels are dropped for every scheduler except DDPMScheduler with
variance_type "learned_range".
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from diffusion.guidance import GuidedModel
from diffusion.sampling import label_and_noise, sample_generator
from diffusion.schedulers import scheduler_sample_loop
from fcdm_common.cli import UserError
from fcdm_common.images import to_uint8
from models import create_model
from models.autoencoders import DEFAULT_SCALING_FACTOR
from models.latent_space import LatentNorm

__all__ = ["FCDMNetwork", "FCDMPipeline", "check_pipeline_folder"]


class FCDMNetwork(ModelMixin, ConfigMixin):
    """A registered network (models.create_model) as a diffusers model: config + safetensors weights."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, model_name: str = "FCDM-XL", model_kwargs: Optional[dict] = None,
                 latent_shape: Sequence[int] = (4, 32, 32), latent_scaling_factor: float = DEFAULT_SCALING_FACTOR,
                 num_classes: int = 1000, learn_sigma: bool = True, objective: str = "diffusion",
                 objective_kwargs: Optional[dict] = None, latent_shift_factor: float = 0.0,
                 latent_norm: Optional[dict] = None):
        # model_name/model_kwargs: models.create_model arguments; latent_shape: (C, H, W) sampled;
        # latent_scaling_factor / latent_shift_factor: z = (VAE latent - shift) * scale (1, 0 in pixel
        # space); latent_norm: the run's --latent-norm channel statistics {"mode", "mean", "std"} (the
        # network then sees (z - mean_c) / std_c), None without; objective(_kwargs):
        # diffusion.create_objective arguments of the training run (the beta schedule lives there).
        super().__init__()
        self.net = create_model(model_name, **(model_kwargs or {}))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net(x, t, y, drop_mask=drop_mask)  # (N, C_out, H, W)


def check_pipeline_folder(folder: Union[str, os.PathLike]) -> Path:
    """A local pipeline folder that has what FCDMPipeline.from_pretrained needs (UserError naming what is missing)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise UserError(f"{folder} is not a pipeline folder (no model_index.json); write one with "
                        "train_gen/export_pipeline.py")
    try:
        meta = json.loads(index.read_text())
    except ValueError as e:
        raise UserError(f"{index} is not valid JSON: {e}") from None
    if meta.get("_class_name") != "FCDMPipeline" or meta.get("transformer", [None, None])[1] != "FCDMNetwork":
        raise UserError(f"{folder} holds a {meta.get('_class_name')} pipeline, not an FCDMPipeline with an "
                        "FCDMNetwork; export an FCDM checkpoint with train_gen/export_pipeline.py")
    net = folder / "transformer"
    if not (net / "config.json").is_file():
        raise UserError(f"{net} has no config.json; the pipeline folder is incomplete, export it again")
    if not any(net.glob("diffusion_pytorch_model*.safetensors")) and not any(net.glob("diffusion_pytorch_model*.bin")):
        raise UserError(f"{net} holds no weights (diffusion_pytorch_model.safetensors); export the pipeline again")
    return folder


class FCDMPipeline(DiffusionPipeline):
    """Class-conditional FCDM sampling with classifier-free guidance and any diffusers scheduler."""

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: FCDMNetwork, scheduler, vae=None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader; a local folder is checked first, and a network whose weights do not fit its
        config (another model's config) raises UserError instead of a long traceback."""
        pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        if os.path.isdir(pretrained_model_name_or_path):
            check_pipeline_folder(pretrained_model_name_or_path)
        elif os.path.isabs(pretrained_model_name_or_path) or pretrained_model_name_or_path.startswith("."):
            raise UserError(f"pipeline folder {pretrained_model_name_or_path} does not exist")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (RuntimeError, ValueError, OSError, KeyError, TypeError) as e:
            raise UserError(f"cannot load the FCDM pipeline in {pretrained_model_name_or_path}: "
                            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from None

    # -------------------------------------------------------------------------------------------------
    def _initial(self, labels: List[int], seed: Optional[int], generator):
        """(noise (N, C, H, W), per-sample generators or `generator`) on the network's device."""
        cfg = self.transformer.config
        shape = tuple(int(v) for v in cfg.latent_shape)
        device = self._execution_device
        if seed is not None:
            gens = [sample_generator(seed, k) for k in range(len(labels))]
            noise = torch.stack([label_and_noise(g, cfg.num_classes, shape)[1] for g in gens])
            return noise.to(device), gens
        if isinstance(generator, list) and len(generator) != len(labels):
            raise ValueError(f"got {len(generator)} generators for {len(labels)} class labels")
        return randn_tensor((len(labels), *shape), generator=generator, device=device, dtype=torch.float32), generator

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (N, 3, H, W) in [-1, 1], float32 (identity without a VAE)."""
        cfg = self.transformer.config
        x = latents.float()
        norm = LatentNorm.from_config(getattr(cfg, "latent_norm", None))
        if norm is not None:  # undo --latent-norm channel: z = x * std_c + mean_c
            x = norm.denormalize(x)
        if self.vae is None:
            return x
        z = x / float(cfg.latent_scaling_factor) + float(getattr(cfg, "latent_shift_factor", 0.0) or 0.0)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    @torch.no_grad()
    def __call__(self, class_labels: Union[int, Sequence[int]], num_inference_steps: int = 25,
                 guidance_scale: float = 4.0, generator=None, seed: Optional[int] = None,
                 output_type: str = "pil", cfg_channels: Union[str, int] = "all",
                 guidance_interval: Optional[Tuple[float, float]] = None, eta: float = 0.0,
                 return_dict: bool = True):
        """Sample one image per class label.

        num_inference_steps: scheduler steps; guidance_scale: classifier-free guidance s (1 = off);
        generator: torch.Generator or one per image (diffusers noise); seed: instead, the per-sample
        streams of sample.py/sample_ddp.py (image k is that of index k); output_type: "pil" (list of
        PIL images), "np" (float32 (N, H, W, 3) in [0, 1], multiples of 1/255) or "latent" (the latents);
        cfg_channels: "all" or k (DiT: 3); guidance_interval: (lo, hi) noise-level fraction; eta: DDIM eta.
        """
        labels = [int(class_labels)] if isinstance(class_labels, int) else [int(v) for v in class_labels]
        cfg = self.transformer.config
        if not labels:
            raise ValueError("class_labels is empty")
        bad = [v for v in labels if not 0 <= v < cfg.num_classes]
        if bad:
            raise ValueError(f"class labels {bad} are out of range 0..{cfg.num_classes - 1}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if cfg.objective != "diffusion":
            raise ValueError("FCDMPipeline samples diffusion (epsilon) models; this network was trained "
                             f"with the {cfg.objective!r} objective")
        noise, gens = self._initial(labels, seed, generator)
        y = torch.tensor(labels, dtype=torch.long, device=noise.device)
        total = int(self.scheduler.config.num_train_timesteps)
        self.transformer.eval()
        guided = GuidedModel(lambda x, t, yy: self.transformer(x, t, yy).float(), guidance_scale, cfg.num_classes,
                             cfg_channels, guidance_interval, noise_level_fn=lambda t: t.float() / total)
        latents = scheduler_sample_loop(guided, self.scheduler, noise, num_inference_steps, {"y": y},
                                        learned_sigma=bool(cfg.learn_sigma), generators=gens, eta=eta,
                                        progress=False)
        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = latents
        else:
            uint8 = to_uint8(self.decode_latents(latents))  # (N, H, W, 3), rounded as sample.py does
            if output_type == "np":
                images = uint8.astype(np.float32) / 255.0
            else:
                images = [Image.fromarray(im) for im in uint8]
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
