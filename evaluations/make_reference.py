r"""Build an ADM-style reference batch from an ImageFolder, for data sets other than ImageNet.

    python evaluations/make_reference.py --data-path DATA/train --out REF.npz --image-size 256 \
        --backend tf --inception-pb classify_image_graph_def.pb [--num-images 10000]

The output holds what ADM's reference batches (e.g. VIRTUAL_imagenet256_labeled.npz) hold:
`arr_0` uint8 (N, S, S, 3) images, `arr_1` int64 class indices (ImageFolder order: sorted class
folder names), and the statistics `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial
features) computed with the chosen backend (np.mean / np.cov). Statistics are backend-specific:
evaluate against this file with the same `--backend`. For `digits`, the "spatial" statistics are
those of the 8x8 pixel values (see evaluations/digits.py).

Images are centre-cropped the way ADM/DiT prepare ImageNet (`center_crop_arr` in guided-diffusion):
halve with a box filter while the short side is >= 2x the target, resize the short side to the
target with bicubic filtering, then crop the centre square.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from evaluations import metrics
from evaluations.evaluator import BACKENDS, compute_features
from fcdm_common.cli import HelpFormatter, UserError, alias_help, positive_int, run_main, seed_int
from fcdm_common.images import to_rgb8
from fcdm_common.io import atomic_path, check_writable, remove_stale_dirs, remove_stale_temps
from fcdm_common.progress import progress as tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM's centre crop: box-halve while short side >= 2*size, bicubic to size, crop. -> uint8 (S, S, 3).
    Images that are not 8-bit RGB (16-bit grayscale, palette, ...) are converted by `to_rgb8` first."""
    pil_image = to_rgb8(pil_image)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)  # (H, W, 3)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top : top + image_size, left : left + image_size])


def list_image_folder(data_path: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """torchvision-ImageFolder order: sorted class folders, sorted files; returns ([(path, label)], classes)."""
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"{data_path}: not a directory; --data-path must be an ImageFolder (one folder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{data_path}: no class folders; an ImageFolder has DATA/<class>/<image> files")
    items = []
    for label, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / cls)):
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((str(Path(dirpath) / name), label))
    if not items:
        raise UserError(f"{data_path}: no images with extensions {', '.join(IMAGE_EXTENSIONS)} in its class folders")
    return items, classes


def work_dir_prefix(out_path: Path) -> str:
    """Prefix of the work folder (the images as an npz for the feature network) beside `out_path`."""
    return f".make_reference_{out_path.name}."


def remove_stale_work(out_path: Path) -> list:
    """Delete what a killed run writing `out_path` left beside it: its work folders
    (`.make_reference_<out name>.XXXXXXXX/`, and `.make_reference_XXXXXXXX/` of versions that did not name
    them after the output) and the temp file of its output. Returns them."""
    folder = out_path.parent
    work = re.compile(rf"{re.escape(work_dir_prefix(out_path))}[A-Za-z0-9_]{{8}}|\.make_reference_[a-z0-9_]{{8}}")
    return remove_stale_dirs(folder, work) + remove_stale_temps(folder, names=[out_path.name])


def make_reference(
    data_path: str,
    out: str,
    image_size: int,
    backend: str = "tf",
    num_images: Optional[int] = None,
    seed: int = 0,
    inception_pb: Optional[str] = None,
    inception_weights: Optional[str] = None,
    tf_python: Optional[str] = None,
    device: Optional[str] = None,
    batch_size: int = 64,
) -> Dict[str, object]:
    """Write a reference batch to `out`; returns {"num_images", "classes", "path"}.

    num_images: keep a random subset of this size (seeded, in ImageFolder order); None = all.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "digits" and image_size % 8 != 0:
        raise UserError(f"--image-size {image_size}: the digits backend needs a multiple of 8")
    check_writable(out)  # a read-only folder fails now, not after reading the images
    stale = remove_stale_work(Path(out))
    if stale:
        print(f"removed {len(stale)} leftover(s) of an interrupted run beside {out}", flush=True)
    items, classes = list_image_folder(data_path)
    if num_images is not None and num_images < len(items):
        keep = np.sort(np.random.default_rng(seed).choice(len(items), size=num_images, replace=False))
        items = [items[i] for i in keep]
    if len(items) < 2:
        raise UserError(f"{data_path}: {len(items)} image(s); a reference batch needs at least 2")

    print(f"reading {len(items)} images from {data_path} ({len(classes)} classes) at {image_size}x{image_size}")
    images = np.zeros((len(items), image_size, image_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(items, desc="images")):
        try:
            with Image.open(path) as im:
                images[i] = center_crop_arr(to_rgb8(im, path), image_size)  # path: named if refused
        except OSError as e:
            raise UserError(f"{path}: cannot read image ({e})") from None
    labels = np.array([label for _, label in items], dtype=np.int64)

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=work_dir_prefix(out_path), dir=out_path.parent) as tmp:
        images_npz = str(Path(tmp) / "images.npz")
        np.savez(images_npz, arr_0=images)
        print(f"computing {backend} features")
        (feats,) = compute_features(backend, [images_npz], inception_pb, inception_weights, tf_python, device,
                                    batch_size)
    mu, sigma = metrics.compute_statistics(feats["pool"])
    mu_s, sigma_s = metrics.compute_statistics(feats["spatial"])
    with atomic_path(out_path) as tmp_out:
        with open(tmp_out, "wb") as f:
            np.savez(f, arr_0=images, arr_1=labels, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    print(f"wrote {out_path}: arr_0 {images.shape}, mu {mu.shape}, mu_s {mu_s.shape} ({backend} backend)")
    return {"path": str(out_path), "num_images": len(items), "classes": classes}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                description="Build an ADM-style reference batch (images + FID statistics) "
                                            "from an ImageFolder.")
    p.add_argument("--data-path", required=True, help="ImageFolder root: one sub-folder of images per class")
    p.add_argument("--out", required=True, help="output .npz (arr_0, arr_1, mu, sigma, mu_s, sigma_s)")
    p.add_argument("--image-size", type=positive_int, required=True, help="side of the centre-cropped images")
    p.add_argument("--backend", choices=BACKENDS, default="tf", help="feature network for the statistics")
    p.add_argument("--num-images", type=positive_int, default=None,
                   help="use a seeded random subset of this many images (default: all; ADM's ImageNet "
                        "reference batches hold 10,000)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the --num-images subset, 0..2**32-1")
    p.add_argument("--inception-pb", default=None, help="tf backend: classify_image_graph_def.pb "
                                                          "(default: $FCDM_INCEPTION_PB)")
    p.add_argument("--inception-weights", default=None, help="torch backend: inception_v3 state_dict file")
    p.add_argument("--tf-python", default=None, help="tf backend: Python with TensorFlow (default: this one)")
    p.add_argument("--device", default=None, help="torch backend: device (default cuda if available)")
    p.add_argument("--forward-batch", "--batch-size", dest="forward_batch", type=positive_int, default=64,
                   help=alias_help("images per feature-network call", "--batch-size"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    make_reference(args.data_path, args.out, args.image_size, args.backend, args.num_images, args.seed,
                   args.inception_pb, args.inception_weights, args.tf_python, args.device, args.forward_batch)


if __name__ == "__main__":
    run_main(main)
