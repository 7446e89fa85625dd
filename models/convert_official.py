"""Convert a checkpoint trained with the authors' FCDM release into this repository's checkpoint format.

    python -m models.convert_official --ckpt release.pt --model FCDM-XL --out ours.pt

The release saves `torch.save({"model", "ema", "opt", "args"})` with `args` an `argparse.Namespace`; it
is read with `torch.load(weights_only=True)` allowing only that one extra class (never plain pickle).
Its networks are 3-level U-Nets whose tensors are renamed here (level 1 = full resolution):

    x_embedder.*                        -> stem.*
    t_embedder_{k}.mlp.{0,2}.*          -> t_embedders.{k-1}.mlp.{0,2}.*
    y_embedder_{k}.embedding_table.*    -> y_embedders.{k-1}.weight      (a zero null row is added when
                                                                          trained without label dropout)
    encoder_level_{1,2}.i.* / latent.i.* / decoder_level_{2,1}.i.*
                                        -> encoder.{0,1}.i.* / middle.i.* / decoder.{1,0}.i.*
      dwconv.*                          -> dwconv.*                      (dim, 1, k, k), same shape
      pwconv{1,2}.weight (out, in, 1, 1)-> pwconv{1,2}.weight (out, in)  (1x1 convs are Linear here)
      grn.gamma / grn.beta (1, C, 1, 1) -> grn.weight / grn.bias (C,)
      adaLN_modulation.1.*              -> adaLN_modulation.1.*
    down1_2 / down2_3 .conv.0.weight    -> downsamples.{0,1}.conv.weight
    up2_1 / up3_2 .conv.0.weight        -> upsamples.{0,1}.conv.weight
    reduce_chans_{1,2}.* (1x1 convs)    -> fuse.{0,1}.*
    output_layer.* (3x3 conv C -> C)    -> head.conv.*
    final_layer.adaLN_modulation.1.*    -> head.adaLN_modulation.1.*
    final_layer.conv.* (3x3 conv -> out)-> head.out.*

The output is our checkpoint layout (models/checkpoints.py): "model" and "ema" state dicts and a
"config" that sampling rebuilds the network, the iDDPM objective and the SD-VAE decoder from. The
release's optimizer state is not carried over (its layout is not ours): the converted file is for
sampling and evaluation. Any unknown, missing or mis-shaped tensor stops the conversion with one message
naming all of them (exit status 2).
"""
from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from fcdm_common.cli import HelpFormatter, UserError, positive_int, run_main
from models import MODELS, create_model
from models.checkpoints import save_checkpoint

# release stage prefix -> (our ModuleList path); level 1 is the full-resolution level
_STAGES = {"encoder_level_1": "encoder.0", "encoder_level_2": "encoder.1", "latent": "middle",
           "decoder_level_2": "decoder.1", "decoder_level_1": "decoder.0"}
_BLOCK_PARAMS = {"dwconv.weight": "dwconv.weight", "dwconv.bias": "dwconv.bias",
                 "pwconv1.weight": "pwconv1.weight", "pwconv1.bias": "pwconv1.bias",
                 "pwconv2.weight": "pwconv2.weight", "pwconv2.bias": "pwconv2.bias",
                 "grn.gamma": "grn.weight", "grn.beta": "grn.bias",
                 "adaLN_modulation.1.weight": "adaLN_modulation.1.weight",
                 "adaLN_modulation.1.bias": "adaLN_modulation.1.bias"}
_FIXED = {"x_embedder.weight": "stem.weight", "x_embedder.bias": "stem.bias",
          "down1_2.conv.0.weight": "downsamples.0.conv.weight", "down2_3.conv.0.weight": "downsamples.1.conv.weight",
          "up2_1.conv.0.weight": "upsamples.0.conv.weight", "up3_2.conv.0.weight": "upsamples.1.conv.weight",
          "reduce_chans_1.weight": "fuse.0.weight", "reduce_chans_1.bias": "fuse.0.bias",
          "reduce_chans_2.weight": "fuse.1.weight", "reduce_chans_2.bias": "fuse.1.bias",
          "output_layer.weight": "head.conv.weight", "output_layer.bias": "head.conv.bias",
          "final_layer.adaLN_modulation.1.weight": "head.adaLN_modulation.1.weight",
          "final_layer.adaLN_modulation.1.bias": "head.adaLN_modulation.1.bias",
          "final_layer.conv.weight": "head.out.weight", "final_layer.conv.bias": "head.out.bias"}
_EMBEDDER = re.compile(r"^(t_embedder|y_embedder)_([123])\.(.+)$")
_BLOCK = re.compile(r"^(" + "|".join(_STAGES) + r")\.(\d+)\.(.+)$")


def release_key_to_ours(key: str) -> Optional[str]:
    """Our parameter name for a release tensor name, or None for a name the release does not use."""
    if key in _FIXED:
        return _FIXED[key]
    m = _EMBEDDER.match(key)
    if m:
        kind, level, rest = m.groups()
        if kind == "t_embedder" and re.fullmatch(r"mlp\.[02]\.(weight|bias)", rest):
            return f"t_embedders.{int(level) - 1}.{rest}"
        if kind == "y_embedder" and rest == "embedding_table.weight":
            return f"y_embedders.{int(level) - 1}.weight"
        return None
    m = _BLOCK.match(key)
    if m and m.group(3) in _BLOCK_PARAMS:
        return f"{_STAGES[m.group(1)]}.{m.group(2)}.{_BLOCK_PARAMS[m.group(3)]}"
    return None


def load_release(path: Path) -> dict:
    """The release's checkpoint dict, read with weights_only=True plus argparse.Namespace."""
    if not path.is_file():
        raise UserError(f"release checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refusals, truncated zips, foreign files
        raise UserError(f"{path} is not a readable release checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "ema" not in ckpt:
        raise UserError(f"{path} is not a release checkpoint: expected a dict with 'model' and 'ema' "
                        f"(and 'opt', 'args'), got {type(ckpt).__name__} with keys "
                        f"{sorted(ckpt)[:8] if isinstance(ckpt, dict) else '-'}")
    return ckpt


def _release_args(ckpt: dict) -> dict:
    """The release's argparse values that are plain JSON-able scalars (kept in our config for the record)."""
    args = ckpt.get("args")
    raw = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    return {k: v for k, v in raw.items() if isinstance(v, (str, int, float, bool)) or v is None}


def convert_state_dict(src: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                       what: str) -> Tuple[Dict[str, torch.Tensor], bool]:
    """Rename and reshape a release state dict onto `target` (our model's state dict, for the shapes).
    Returns (state dict, whether a null label row was added). UserError lists every problem at once."""
    unknown, misshaped, out = [], [], {}
    padded = False
    for key, value in src.items():
        ours = release_key_to_ours(key)
        if ours is None or ours not in target:
            unknown.append(key)
            continue
        want = tuple(target[ours].shape)
        v = value
        if ours.startswith("y_embedders.") and v.ndim == 2 and (v.shape[0] + 1, v.shape[1]) == want:
            v = torch.cat([v, torch.zeros_like(v[:1])])  # no null row (trained without label dropout)
            padded = True
        elif tuple(v.shape) != want and v.numel() == target[ours].numel() and (
                (v.ndim == 4 and v.shape[2:] == (1, 1) and len(want) == 2)  # 1x1 conv -> Linear
                or (ours.split(".")[-2] == "grn" and v.ndim == 4)):  # GRN (1, C, 1, 1) -> (C,)
            v = v.reshape(want)
        if tuple(v.shape) != want:
            misshaped.append(f"{key} {tuple(value.shape)} (expected {want} for {ours})")
            continue
        out[ours] = v.contiguous()  # the release's dtype is kept (loading casts to the model's)
    mapped = {release_key_to_ours(k) for k in src}
    missing = sorted(k for k in target if k not in mapped)
    if unknown or missing or misshaped:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown: {', '.join(sorted(unknown)[:12])}")
        if missing:
            parts.append(f"{len(missing)} missing (our names): {', '.join(missing[:12])}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped: {'; '.join(misshaped[:12])}")
        raise UserError(f"the {what!r} weights do not fit the model: " + " | ".join(parts) +
                        "; pass the --model the release run trained (and --num-classes / --image-size if its "
                        "args lack them)")
    return out, padded


def _infer_kwargs(sd: Mapping[str, torch.Tensor], num_classes: int) -> dict:
    """Constructor arguments read off the release tensors (shapes the --model preset must agree with)."""
    try:
        stem = sd["x_embedder.weight"]  # (C, C_in, 3, 3)
        head = sd["final_layer.conv.weight"]  # (C_out, C, 3, 3)
        dw = sd["encoder_level_1.0.dwconv.weight"]  # (C, 1, k, k)
        pw1 = sd["encoder_level_1.0.pwconv1.weight"]  # (rC, C, 1, 1)
    except KeyError as e:
        raise UserError(f"the release 'ema' weights lack {e.args[0]}; is this an FCDM release checkpoint?") from None
    depths = [1 + max([int(k.split(".")[1]) for k in sd if k.startswith(stage + ".")], default=-1)
              for stage in _STAGES]
    in_ch, out_ch = int(stem.shape[1]), int(head.shape[0])
    return dict(in_channels=in_ch, hidden_size=int(stem.shape[0]), depths=depths, kernel_size=int(dw.shape[-1]),
                mlp_ratio=int(pw1.shape[0]) // int(pw1.shape[1]), num_classes=num_classes,
                learn_sigma=out_ch == 2 * in_ch)


def convert(ckpt: dict, model_name: str, num_classes: Optional[int] = None,
            image_size: Optional[int] = None) -> dict:
    """A release checkpoint dict -> our checkpoint dict (model, ema, config)."""
    if model_name not in MODELS or not model_name.startswith("FCDM"):
        names = ", ".join(sorted(n for n in MODELS if n.startswith("FCDM")))
        raise UserError(f"--model {model_name!r} is not a registered FCDM variant; use one of {names}")
    rargs = _release_args(ckpt)
    num_classes = int(num_classes or rargs.get("num_classes") or 1000)
    image_size = int(image_size or rargs.get("image_size") or 256)
    if image_size % 8:
        raise UserError(f"image size {image_size} is not a multiple of the SD-VAE's downsampling factor 8")
    kwargs = _infer_kwargs(ckpt["ema"], num_classes)
    with torch.device("meta"):
        preset = create_model(model_name)
    if (preset.hidden_size, list(preset.depths)) != (kwargs["hidden_size"], kwargs["depths"]):
        raise UserError(f"the checkpoint holds width {kwargs['hidden_size']} and depths {kwargs['depths']}, "
                        f"not {model_name} (width {preset.hidden_size}, depths {list(preset.depths)}); pass the "
                        "--model the release run trained")
    rows = int(ckpt["ema"]["y_embedder_1.embedding_table.weight"].shape[0]) if \
        "y_embedder_1.embedding_table.weight" in ckpt["ema"] else num_classes + 1
    has_null = rows == num_classes + 1
    kwargs.update(class_dropout_prob=float(rargs.get("class_dropout_prob", 0.1)) if has_null else 0.0,
                  label_dropout="per-level")  # the release's draw, should anyone continue training
    model = create_model(model_name, **kwargs)
    target = model.state_dict()
    converted = {}
    for key in ("model", "ema"):
        converted[key], padded = convert_state_dict(ckpt[key], target, key)
    if padded:
        warnings.warn("the release run was trained without label dropout (its label tables have no null row): "
                      "a zero null-label row was added and class_dropout_prob set to 0. The model never learned "
                      "an unconditional prediction, so classifier-free guidance (--cfg-scale > 1) is meaningless "
                      "for it; sample with --cfg-scale 1", stacklevel=2)
    side = image_size // 8
    config = {"model": model_name, "model_kwargs": kwargs, "objective": "diffusion", "objective_kwargs": {},
              "data": {"latent_shape": [kwargs["in_channels"], side, side], "num_classes": num_classes,
                       "image_size": image_size},
              "vae": {}, "converted_from": {"format": "FCDM release", "args": rargs}}
    return {"model": converted["model"], "ema": converted["ema"], "config": config}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.convert_official", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by the authors' FCDM release")
    p.add_argument("--model", required=True,
                   help="the FCDM variant it holds, e.g. FCDM-XL (checked against the tensors)")
    p.add_argument("--out", required=True,
                   help="where to write our checkpoint (atomically; refuses to overwrite --ckpt)")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="number of classes (default: the release's args.num_classes, else 1000)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="training image size, 256 or 512 (default: the release's args.image_size, else 256)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    src, dst = Path(args.ckpt), Path(args.out)
    if dst.resolve() == src.resolve():
        raise UserError("--out must differ from --ckpt")
    print(f"reading {src}", flush=True)
    ours = convert(load_release(src), args.model, args.num_classes, args.image_size)
    save_checkpoint(ours, dst)
    kw = ours["config"]["model_kwargs"]
    print(f"wrote {dst}: {args.model} ({kw['num_classes']} classes, latents {ours['config']['data']['latent_shape']}, "
          f"class_dropout_prob {kw['class_dropout_prob']}); sample with train_gen/sample.py --ckpt {dst}")


if __name__ == "__main__":
    run_main(main)
