"""Write scikit-learn's handwritten digits (UCI optical digits, 1797 8x8 images) as an ImageFolder.

Used by the embedded demo: one class folder per digit ("0".."9"), RGB PNGs whose grey value is
round(v * 255 / 16) for the 0..16 pixel intensities, enlarged by nearest-neighbour upscaling by an
integer factor K (8x8 -> 8K x 8K).

    python preparation/make_demo_dataset.py --out data/digits --upscale 2
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fcdm_common.cli import HelpFormatter, UserError, positive_int, run_main
from fcdm_common.io import atomic_write_text


def digits_images(upscale: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images (N, 8K, 8K, 3) and int64 labels (N,) of the digits data set."""
    # deferred: scikit-learn serves the digits demo only
    from sklearn.datasets import load_digits

    if upscale < 1:
        raise UserError(f"--upscale must be a positive integer, got {upscale}")
    digits = load_digits()
    grey = np.rint(digits.images.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)  # (N, 8, 8)
    grey = grey.repeat(upscale, axis=1).repeat(upscale, axis=2)  # nearest-neighbour upscale
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # (N, 8K, 8K, 3)
    return rgb, digits.target.astype(np.int64)


def make_demo_dataset(out: str | os.PathLike, upscale: int = 2) -> Path:
    """Write the ImageFolder under `out` (files out/<digit>/<index>.png) and return its path.

    A hidden marker `out/.complete` (ignored by ImageFolder) is written last; when it already
    records the same upscale the folder is reused as is, so the demo can call this every time.
    """
    out = Path(out)
    marker = out / ".complete"
    images, labels = digits_images(upscale)
    stamp = f"sklearn digits, upscale={upscale}, count={len(labels)}\n"
    if marker.is_file() and marker.read_text() == stamp:
        return out
    marker.unlink(missing_ok=True)
    for d in range(10):
        (out / str(d)).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(out / str(int(label)) / f"{i:05d}.png", format="PNG")
    atomic_write_text(marker, stamp)  # the folder is complete only once this exists
    return out


def main(argv=None):
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                description="Write scikit-learn's digits as an ImageFolder (class folders 0..9).")
    p.add_argument("--out", required=True, help="output folder (created; existing digit PNGs are overwritten)")
    p.add_argument("--upscale", type=positive_int, default=2,
                   help="integer nearest-neighbour upscale factor: 8x8 -> 8K x 8K (default 2)")
    args = p.parse_args(argv)
    out = make_demo_dataset(args.out, args.upscale)
    n = sum(1 for _ in out.glob("*/*.png"))
    print(f"wrote {n} digit images ({8 * args.upscale}x{8 * args.upscale}) to {out}")


if __name__ == "__main__":
    run_main(main)
