"""Extraction after the user removed a corrupt image: the refusal says what to do, --overwrite does it.

Reference: a fresh extraction of the cleaned folder into a new path (bitwise equal store).
"""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from fcdm_common.cli import run_main
from preparation import extract_features


def _args(images, out, *extra):
    return ["--data-path", str(images), "--features-path", str(out), "--vae", "none", "--image-size", "8",
            "--batch-size", "2", "--shard-size", "2", "--chunk-size", "2", "--num-workers", "0", "--device", "cpu",
            *extra]


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_main(extract_features.main, argv)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_removed_corrupt_image_then_overwrite(tmp_path, capsys):
    images = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (images / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / name / f"{i}.png")
    (images / "b" / "9.png").write_bytes(b"not a png")  # 7 files, one corrupt (sorted last)
    out = tmp_path / "o.zarr"
    assert "9.png" in _error(_args(images, out), capsys)
    (images / "b" / "9.png").unlink()  # the user follows the advice
    err = _error(_args(images, out), capsys)
    assert "holds 7 images but the data now has 6" in err and "--overwrite" in err
    run_main(extract_features.main, _args(images, out, "--overwrite"))
    assert "--overwrite: deleted" in capsys.readouterr().out
    run_main(extract_features.main, _args(images, tmp_path / "fresh.zarr"))
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(tmp_path / "fresh.zarr"), mode="r")
    assert a.attrs["complete"] and a.attrs["count"] == 6
    np.testing.assert_array_equal(a["latents"][:], b["latents"][:])
    np.testing.assert_array_equal(a["labels"][:], b["labels"][:])
    run_main(extract_features.main, _args(images, out, "--overwrite"))  # same settings: kept, nothing to do
    assert "nothing to do" in capsys.readouterr().out
    # --overwrite never deletes something that is not a latent store
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert "not a zarr store" in _error(_args(images, tmp_path / "other", "--overwrite"), capsys)
    assert (tmp_path / "other" / "keep.txt").exists()
