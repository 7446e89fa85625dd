"""Frozen self-supervised vision encoders (any timm ViT) for representation alignment (REPA).

REPA (Yu et al., ICLR 2025) pulls a projection of the denoiser's hidden state towards the patch tokens
of a frozen pretrained encoder applied to the clean image; the paper's default is DINOv2-B/14 fed the
image resized to 224 and normalised with ImageNet's mean/std, giving a 16x16 grid of 768-d tokens.

`load_vision_encoder(name, path, resolution)` builds a timm architecture WITHOUT pretrained weights
(`pretrained=False`: timm then never downloads anything) and loads the weights from a local path only:

* a weights file: `.safetensors`, or `.pth` / `.pt` / `.bin` holding a state dict, read with
  `torch.load(weights_only=True)`. A state dict nested in a training checkpoint is found under
  "teacher" (DINO/DINOv2 training checkpoints: the teacher is the network that is evaluated), "model",
  "state_dict" or "module", and the prefixes "module." (DDP), "_orig_mod." (torch.compile) and
  "backbone." (DINOv2's teacher also holds dino_head./ibot_head., which are dropped) are removed.
  DINOv2's official files (dinov2_vitb14_pretrain.pth, also with registers) are converted by timm's
  own checkpoint filter (mask_token dropped, register_tokens -> reg_token). `name` is required here.
* a snapshot folder in timm's Hugging Face layout (what `timm.models.save_for_hf` writes and the hub's
  `timm/...` repositories hold, fetched by preparation/download_snapshot.py): config.json with
  "architecture", optionally "pretrained_cfg" (mean, std, input size, tag) and "model_args"
  (constructor arguments), next to model.safetensors (preferred) or pytorch_model.bin.

The position embedding is resampled (bicubic, antialiased, timm's `resample_abs_pos_embed`, the
resampling timm applies to its own pretrained weights) from the checkpoint's grid to the grid of the
requested resolution: timm's DINOv2 checkpoints are 518x518 (37x37 patches), REPA uses 224 (16x16).
Every failure (missing or unreadable file, a model without patch tokens, a resolution that is not a
multiple of the patch size, weights that do not fit the architecture) is one UserError naming the
file and the fix.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import safetensors.torch
import timm
import timm.models
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from fcdm_common.cli import UserError, error_summary

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_ENCODER = "vit_base_patch14_dinov2.lvd142m"  # REPA's default: DINOv2-B/14
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
SNAPSHOT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # timm's hub layout, in order of preference
NESTED_KEYS = ("teacher", "model", "state_dict", "module")  # where training checkpoints keep the weights
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
CLASSIFIER_PREFIXES = ("head", "head_dist")  # classifier heads: not used by forward_features
DOWNLOAD_HINT = ("'python preparation/download_snapshot.py --repo-id timm/vit_base_patch14_dinov2.lvd142m "
                 "--local-dir DIR'")


# ----------------------------------------------------------------------------- grid arithmetic
def patch_grid(resolution: int, patch_size: int) -> tuple[int, int]:
    """(gh, gw) patch grid of a square `resolution` input; UserError unless the patch size divides it
    (naming the nearest valid resolutions)."""
    if patch_size < 1:
        raise ValueError(f"patch size must be >= 1, got {patch_size}")
    if resolution < patch_size or resolution % patch_size:
        lower = max(resolution // patch_size, 1) * patch_size
        options = sorted({lower, lower + patch_size} - {resolution})
        raise UserError(f"the vision encoder resolution {resolution} is not a multiple of its patch size "
                        f"{patch_size}; use {' or '.join(map(str, options))} (patch size x grid side)")
    side = resolution // patch_size
    return side, side


def resolution_for_grid(side: int, patch_size: int) -> int:
    """The input resolution whose patch grid is side x side: side * patch_size.

    Used to match the encoder's token grid to the denoiser's feature map (REPA: DINOv2-B/14 at 224 gives
    16x16 tokens for a 16x16 map; a 32x32 map needs 448)."""
    if side < 1 or patch_size < 1:
        raise ValueError(f"grid side and patch size must be >= 1, got {side} and {patch_size}")
    return side * patch_size


# ----------------------------------------------------------------------------- the module
class VisionEncoder(torch.nn.Module):
    """A frozen timm ViT returning the patch tokens of uint8 (or [0, 1] float) images.

    Attributes: `model` (the timm network), `name` (architecture, with its pretrained tag when known),
    `patch_size`, `resolution` (input side), `grid` (gh, gw), `embed_dim`, `num_prefix_tokens` (class +
    register tokens), `mean`, `std` (per-channel tuples), `num_params`.

    Frozen: every parameter has requires_grad False, `forward` runs under torch.no_grad, and the module is
    always in eval mode (`train()` keeps it there: no dropout / drop-path, whatever the caller does to the
    model that holds it).

    Prefix tokens are dropped: REPA aligns the denoiser's spatial tokens with the encoder's spatial
    tokens one to one; the class token and DINOv2's registers (Darcet et al., 2024: tokens that collect
    global information and have no position in the image) have no place in the grid.

    mean / std are the normalisation the weights were trained with: from the snapshot's
    pretrained_cfg, else timm's registered pretrained cfg of the architecture (and tag), else ImageNet's
    (DINOv2 uses ImageNet's).
    """

    def __init__(self, model: torch.nn.Module, name: str, resolution: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model
        self.name = name
        patch = tuple(int(p) for p in _pair(model.patch_embed.patch_size))
        if patch[0] != patch[1]:
            raise UserError(f"{name} has non-square patches {patch}; only square patches are supported")
        self.patch_size = patch[0]
        self.resolution = int(resolution)
        self.grid = patch_grid(self.resolution, self.patch_size)
        self.embed_dim = int(getattr(model, "embed_dim", None) or model.num_features)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError(f"{name}: mean {self.mean} / std {self.std} must be 3 values each, std > 0")
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.train(False)

    def train(self, mode: bool = True):
        """Always eval: the encoder is a fixed target, never trained (the argument is ignored)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] (B, 3, H, W) -> float32 at `resolution`, normalised.

        Bicubic resize (antialiased when downscaling, as a resize for a recognition network should be),
        clamped to [0, 1] (bicubic overshoots), then (x - mean) / std."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        elif images.is_floating_point():
            x = images.float()
        else:
            raise ValueError(f"expected uint8 or float images, got {images.dtype}")
        size = (self.resolution, self.resolution)
        if tuple(x.shape[-2:]) != size:
            downscale = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=downscale)
            x = x.clamp(0.0, 1.0)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, gh * gw, embed_dim) in row-major grid order, without class/register tokens.

        Runs in the caller's autocast (e.g. bf16 on the GPU) and otherwise in the weights' dtype."""
        x = self.preprocess(images)
        weight = self.model.patch_embed.proj.weight
        x = x.to(device=weight.device, dtype=weight.dtype)
        tokens = self.model.forward_features(x)
        n = self.grid[0] * self.grid[1]
        if tokens.ndim != 3 or tokens.shape[1] != self.num_prefix_tokens + n:
            raise UserError(f"{self.name}.forward_features gave {tuple(tokens.shape)}, not (B, "
                            f"{self.num_prefix_tokens} prefix + {n} patch tokens, C); it is not a plain ViT")
        return tokens[:, self.num_prefix_tokens:]

    def describe(self) -> dict:
        """A short summary for logs."""
        return {"arch": self.name, "resolution": self.resolution, "patch": self.patch_size,
                "grid": f"{self.grid[0]}x{self.grid[1]}", "embed_dim": self.embed_dim,
                "params_m": round(self.num_params / 1e6, 2), "prefix_tokens": self.num_prefix_tokens}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())


# ----------------------------------------------------------------------------- loading
def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _split_tag(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def _read_snapshot_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"the vision encoder folder {folder} has no config.json; pass a timm snapshot folder "
                        f"(made by {DOWNLOAD_HINT}) or a .safetensors/.pth weights file with the architecture name")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {error_summary(e)}; download the snapshot again with "
                        f"{DOWNLOAD_HINT}") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise UserError(f"{path} does not name a timm \"architecture\"; is {folder} a timm model snapshot? "
                        f"(a timm encoder repository such as timm/vit_base_patch14_dinov2.lvd142m, fetched by "
                        f"{DOWNLOAD_HINT})")
    return config


def _snapshot_parts(config: dict) -> tuple[str, dict, dict]:
    """(architecture with tag, pretrained_cfg, model_args) of a timm hub config.json (either layout:
    the current one with a "pretrained_cfg" object, or the older flat one)."""
    if isinstance(config.get("pretrained_cfg"), dict):
        pretrained_cfg = dict(config["pretrained_cfg"])
    else:
        pretrained_cfg = {k: v for k, v in config.items() if k not in ("architecture", "model_args")}
    model_args = dict(config.get("model_args") or {})
    arch = config["architecture"]
    tag = pretrained_cfg.get("tag")
    return (f"{arch}.{tag}" if tag and "." not in arch else arch), pretrained_cfg, model_args


def _registered_cfg(name: str) -> dict:
    """timm's registered pretrained cfg (mean, std, input size) of `name`; {} when there is none."""

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return {}
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


def _weights_file(path: Path) -> tuple[Path, dict | None]:
    """The weights file and, for a snapshot folder, its config."""
    if path.is_dir():
        config = _read_snapshot_config(path)
        for fname in SNAPSHOT_WEIGHTS:
            if (path / fname).is_file():
                return path / fname, config
        raise UserError(f"the vision encoder folder {path} has a config.json but no {' or '.join(SNAPSHOT_WEIGHTS)}; "
                        f"download the snapshot again with {DOWNLOAD_HINT}")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise UserError(f"cannot read the vision encoder weights {path}: unknown file type {path.suffix!r}; pass a "
                        f"{'/'.join(WEIGHT_SUFFIXES)} state dict or a timm snapshot folder")
    return path, None


def _read_state_dict(file: Path) -> dict:
    """Tensors of a .safetensors file or a (possibly nested) torch state dict; see the module docstring."""
    hint = ("pass a .safetensors file, a .pth/.pt/.bin state dict or a timm snapshot folder "
            f"(made by {DOWNLOAD_HINT})")
    try:
        if file.suffix.lower() == ".safetensors":

            state = safetensors.torch.load_file(str(file), device="cpu")
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, pickled objects
        raise UserError(f"cannot read the vision encoder weights {file} ({error_summary(e)}); {hint}") from None
    for _ in range(4):  # descend into training checkpoints
        if not isinstance(state, dict):
            break
        inner = next((state[k] for k in NESTED_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) and k in ("pos_embed", "cls_token")
                                for k, v in state.items()):
            break
        state = inner
    if not isinstance(state, dict):
        raise UserError(f"the vision encoder weights {file} hold a {type(state).__name__}, not a state dict; {hint}")
    state = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"the vision encoder weights {file} hold no tensors; {hint}")
    for prefix in STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # DINO(v2) training checkpoint: keep the backbone only
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _build(arch: str, name: str, model_args: dict, img_size: int | None):

    kwargs = {k: v for k, v in model_args.items() if k not in ("num_classes", "pretrained_cfg")}
    kwargs["num_classes"] = 0  # no classifier: forward_features is all REPA uses
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        # pretrained=False: timm builds the architecture only and fetches nothing
        return timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as e:
        if "img_size" in str(e):
            raise UserError(f"{name} is not a ViT with patch tokens (it takes no img_size); REPA needs a timm "
                            f"vision transformer such as {DEFAULT_ENCODER}") from None
        raise UserError(f"cannot build {name} with {kwargs}: {error_summary(e)}") from None
    except Exception as e:
        raise UserError(f"cannot build {name} with {kwargs}: {error_summary(e)}") from None


def _is_prefix(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _fit_state_dict(state: dict, model, file: Path, name: str) -> dict:
    """timm's checkpoint filter (format conversions, position-embedding resampling), then checks that
    the weights fit: UserError on missing/unexpected keys (classifier heads aside) or shape mismatches."""

    model_state = model.state_dict()
    fix = (f"name the architecture (and constructor arguments) the weights were saved from, or pass the weights "
           f"of {name}")
    # a patch kernel of another size would be silently resampled by timm's filter: refuse it here
    kernel = state.get("patch_embed.proj.weight")
    target = model_state.get("patch_embed.proj.weight")
    if kernel is not None and target is not None and kernel.ndim == 4 and kernel.shape != target.shape:
        raise UserError(f"the weights in {file} do not fit {name}: patch_embed.proj.weight is "
                        f"{tuple(kernel.shape)} there, {tuple(target.shape)} in the model (another patch size or "
                        f"width); {fix}")
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(dict(state), model)
        except Exception as e:
            raise UserError(f"the weights in {file} do not fit {name} ({error_summary(e)}); {fix}") from None
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in model_state and pos.shape != model_state["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
        n = pos.shape[1] - prefix
        side = math.isqrt(max(n, 0))
        if pos.ndim != 3 or n < 1 or side * side != n or pos.shape[-1] != model_state["pos_embed"].shape[-1]:
            raise UserError(f"the weights in {file} do not fit {name}: pos_embed is {tuple(pos.shape)} there, "
                            f"{tuple(model_state['pos_embed'].shape)} in the model; {fix}")
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix)
    classifier = list(CLASSIFIER_PREFIXES)
    missing = [k for k in model_state if k not in state and not _is_prefix(k, classifier)]
    unexpected = [k for k in state if k not in model_state and not _is_prefix(k, classifier)]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in model_state.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"shapes (file vs model) {few(shapes)}" if shapes else ""]
        raise UserError(f"the weights in {file} do not fit {name}: {'; '.join(p for p in parts if p)}; {fix}")
    return {k: v for k, v in state.items() if k in model_state}


def load_vision_encoder(name: str | None, path: str | os.PathLike, resolution: int | None = None,
                        device="cpu", *, model_args: dict | None = None) -> VisionEncoder:
    """A frozen `VisionEncoder` with weights read from the local `path` only (see the module docstring).

    name: a timm architecture, with or without a pretrained tag ("vit_base_patch14_dinov2.lvd142m");
        optional for a snapshot folder, whose config.json names it (UserError if both are given and the
        architectures, or the tags when both have one, differ). The tag selects timm's registered
        pretrained cfg (mean, std, input size) when the folder gives none.
    resolution: the encoder's input side; default: the size the weights were made for (model_args'
        img_size, else the pretrained cfg's input size, e.g. 518 for timm's DINOv2). Must be a multiple
        of the patch size; the position embedding is resampled to its grid.
    model_args: extra timm constructor arguments (e.g. a non-standard width or depth), over the
        snapshot's "model_args".
    """
    if path is None or str(path) == "":
        raise UserError(f"no vision encoder weights given; pass a timm snapshot folder made by {DOWNLOAD_HINT}")
    path = Path(path)
    if not path.exists():
        raise UserError(f"vision encoder weights {path} do not exist; download a timm encoder with "
                        f"{DOWNLOAD_HINT} and pass DIR (or a .safetensors/.pth weights file)")
    file, config = _weights_file(path)
    args: dict = {}
    pretrained_cfg: dict = {}
    if name is not None and (":" in name or "/" in name):
        raise UserError(f"the vision encoder name {name!r} must be a timm architecture (e.g. {DEFAULT_ENCODER}), "
                        f"not a hub id or path: weights are only read from the local path; fetch them with "
                        f"{DOWNLOAD_HINT}")
    if config is not None:
        folder_name, pretrained_cfg, args = _snapshot_parts(config)
        if name is not None:
            (a1, t1), (a2, t2) = _split_tag(name), _split_tag(folder_name)
            if a1 != a2 or (t1 and t2 and t1 != t2):
                raise UserError(f"the vision encoder name {name} differs from {folder_name} named by "
                                f"{path / 'config.json'}; drop the name or pass the matching snapshot folder")
            if t1 and not t2:
                folder_name = name
        name = folder_name
    elif name is None:
        raise UserError(f"the vision encoder weights {file} are a bare file: name their timm architecture "
                        f"(e.g. {DEFAULT_ENCODER}), or pass a snapshot folder whose config.json names it")
    args.update(model_args or {})
    arch, tag = _split_tag(name)

    if not timm.is_model(arch):
        raise UserError(f"unknown timm architecture {arch!r} for the vision encoder {file}; use a name from "
                        f"timm.list_models(), e.g. {DEFAULT_ENCODER}")
    registered = _registered_cfg(name)
    if tag and not registered and not pretrained_cfg:
        raise UserError(f"timm has no pretrained tag {tag!r} for {arch}; drop the tag or use one of "
                        f"timm.list_pretrained('{arch}*')")
    cfg = {**registered, **pretrained_cfg}
    native = args.pop("img_size", None)
    if native is None and cfg.get("input_size"):
        native = cfg["input_size"][-1]
    native = _pair(native)[-1] if native is not None else None
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise UserError(f"the vision encoder resolution must be a positive integer, got {resolution!r}")
    target = resolution if resolution is not None else native
    model = _build(arch, name, args, target)
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens") \
            or not hasattr(model.patch_embed, "patch_size"):
        raise UserError(f"{name} is not a ViT with patch tokens (no patch_embed / num_prefix_tokens); REPA needs "
                        f"a timm vision transformer such as {DEFAULT_ENCODER}")
    patch = _pair(model.patch_embed.patch_size)[0]
    if target is None:
        target = _pair(getattr(model.patch_embed, "img_size", None) or patch)[0]
    patch_grid(int(target), int(patch))  # UserError before reading weights
    state = _fit_state_dict(_read_state_dict(file), model, file, name)
    model.load_state_dict(state, strict=False)  # every non-head key checked above
    encoder = VisionEncoder(model, name, int(target), mean=cfg.get("mean") or IMAGENET_MEAN,
                            std=cfg.get("std") or IMAGENET_STD)
    return encoder.to(device)
