"""Image helpers shared by preparation, training grids and sampling.

`center_crop_arr` reproduces the preprocessing of ADM (Dhariwal & Nichol, 2021, guided-diffusion
`image_datasets.py`) that DiT and FCDM use for ImageNet: while the short side is at least twice the
target, halve the image with a BOX filter (cheap anti-aliasing); then resize with BICUBIC so the
short side equals the target; then take the central square. `to_uint8` rounds like DiT's sampling
scripts: clamp((x + 1) * 127.5 + 0.5, 0, 255) truncated to uint8. `to_rgb8` is how every program turns an
image file it reads into 8-bit RGB (PIL's own `convert("RGB")` clips 16-bit grayscale to 0/255).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from fcdm_common.cli import UserError
from fcdm_common.io import atomic_path

_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's unsigned 16-bit grayscale modes (byte orders)


def to_rgb8(img: Image.Image, path: str | os.PathLike | None = None) -> Image.Image:
    """The 8-bit RGB version of an image read from a file (`path` names it in the error), its pixels loaded (the
    file may be closed afterwards); an RGB image is returned as it is.

    PIL's `convert("RGB")` maps grayscale values 1:1 and clips, which is right for 8-bit modes but turns a
    16-bit grayscale image (a 16-bit PNG opens as "I;16", some readers give "I") into a nearly black-and-white
    one, with no error. Here:
    - "I;16" (any byte order): v in 0..65535 becomes round(v / 257) = round(v * 255 / 65535), the linear map
      that sends 0 to 0 and 65535 to 255 (computed exactly in integers: (v + 128) // 257; no v is a tie);
    - "I" (32-bit integers): read as 16-bit data, the same map, when every value lies in 0..65535 (PIL gives
      16-bit PNGs this mode); other values have no defined 8-bit scale and are refused;
    - "F" (32-bit floats): refused; float images follow no single range convention (0..1, 0..255, HDR);
    - every other mode ("L", "LA", "P", "PA", "1", "RGBA", "CMYK", "YCbCr", ...): PIL's `convert("RGB")`,
      which handles palettes, bilevel and CMYK and drops alpha. PIL itself reduces 16-bit RGB, RGBA and
      grayscale+alpha PNGs to 8 bits when it opens them (modes "RGB", "RGBA", "RGBA"), keeping the high byte:
      floor(v / 256), at most one level below round(v / 257), which is accepted as it is.
    Refusals are `UserError`s naming the file and its mode."""
    if img.mode == "RGB":
        img.load()  # the pixels, read now: callers close the file when this returns
        return img
    where = f"{path}: " if path is not None else ""
    if img.mode in _MODES_16BIT or img.mode == "I":
        v = np.asarray(img).astype(np.int64)  # "I;16B" is big-endian uint16, "I" int32
        if v.size and (v.min() < 0 or v.max() > 65535):
            raise UserError(f"{where}32-bit integer image (PIL mode I) with values {v.min()}..{v.max()}, outside "
                            "the 16-bit range 0..65535; convert it to an 8- or 16-bit image first")
        gray = ((v + 128) // 257).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    if img.mode == "F":
        raise UserError(f"{where}32-bit floating-point image (PIL mode F) has no defined 8-bit scale; "
                        "convert it to an 8- or 16-bit image first")
    try:
        return img.convert("RGB")
    except ValueError as e:  # a mode PIL cannot convert (e.g. "LAB", "HSV")
        raise UserError(f"{where}cannot convert PIL mode {img.mode} to RGB ({e})") from None


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop: BOX halving while the short side >= 2 * image_size, BICUBIC resize, crop."""
    while min(pil_image.size) >= 2 * image_size:
        half = (pil_image.size[0] // 2, pil_image.size[1] // 2)
        pil_image = pil_image.resize(half, resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    target = (round(pil_image.size[0] * scale), round(pil_image.size[1] * scale))
    pil_image = pil_image.resize(target, resample=Image.BICUBIC)
    arr = np.asarray(pil_image)  # (H, W, 3)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def pil_to_tensor(pil_image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1] (ToTensor then Normalize(0.5, 0.5)). Other modes
    go through `to_rgb8` first."""
    arr = np.asarray(to_rgb8(pil_image), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Images in [-1, 1], NCHW float -> uint8 NHWC numpy, rounding like DiT's sample.py."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    x = x.detach().float()
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects NCHW images, got shape {tuple(x.shape)}")
    x = torch.clamp((x + 1.0) * 127.5 + 0.5, 0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images_uint8_nhwc: np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
    """Tile N images (N, H, W, 3) uint8 into one (rows * (H + p) + p, nrow * (W + p) + p, 3) image."""
    images = np.asarray(images_uint8_nhwc)
    if images.ndim == 3:  # grayscale (N, H, W)
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, c = images.shape
    nrow = max(1, min(int(nrow), n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y = padding + r * (h + padding)
        x = padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images_uint8_nhwc: np.ndarray, path: str | os.PathLike, nrow: int, padding: int = 2,
              metadata: dict | None = None) -> None:
    """Write a grid of uint8 NHWC images as one PNG, atomically (temp file + rename). `metadata` (e.g. the
    training step and sampler) goes into the PNG's text chunks (`Image.open(path).text`), None values left out."""
    grid = make_grid(images_uint8_nhwc, nrow, padding)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        if value is not None:
            info.add_text(str(key), str(value))
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG", pnginfo=info)
