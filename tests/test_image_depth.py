"""High-bit-depth images read by the programs: `fcdm_common.images.to_rgb8` and make_reference, which uses it.

PIL's `convert("RGB")` clips a 16-bit grayscale image (mode "I;16" or "I") to 0..255, so such a data set turned
into a nearly black-and-white one with exit status 0. The reference here is the closed form round(v / 257)
(= round(v * 255 / 65535)); no 16-bit v is a tie, so numpy's round-half-even gives the same integers.
"""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fcdm_common.cli import UserError
from fcdm_common.images import pil_to_tensor, to_rgb8

ALL_16BIT = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once


def _expected8(v: np.ndarray) -> np.ndarray:
    return np.rint(v.astype(np.float64) / 257.0).astype(np.uint8)


def _write_png16(path, arr: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): color type 2 = RGB, 4 = gray+alpha,
    6 = RGBA; `arr` is uint16 (H, W, channels)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))  # filter 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))


def test_closed_form_is_the_integer_formula():
    v = ALL_16BIT.astype(np.int64)
    np.testing.assert_array_equal((v + 128) // 257, _expected8(ALL_16BIT))
    assert _expected8(np.array([0, 128, 129, 32767, 32768, 65535])).tolist() == [0, 0, 1, 127, 128, 255]


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(ALL_16BIT).save(path)
    expected = np.repeat(_expected8(ALL_16BIT)[..., None], 3, axis=-1)
    with Image.open(path) as im:
        assert im.mode == "I;16"
        out = to_rgb8(im, path)
        old = np.asarray(im.convert("RGB"))
        as_int32 = to_rgb8(im.convert("I"), path)  # mode "I" holding 16-bit data, as some readers give it
        big_endian = Image.fromarray(ALL_16BIT.astype(">u2"))  # (PIL's own convert("I;16B") clips too)
        tensor = pil_to_tensor(im)
    assert out.mode == "RGB" and out.size == (256, 256)
    np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(np.asarray(as_int32), expected)
    assert big_endian.mode == "I;16B"
    np.testing.assert_array_equal(np.asarray(to_rgb8(big_endian)), expected)
    np.testing.assert_array_equal(tensor.numpy(), expected.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
    # what every program did before: everything above 255 saturated to white
    np.testing.assert_array_equal(old[..., 0], np.minimum(ALL_16BIT, 255))
    assert (old == 255).mean() > 0.99 and not np.array_equal(old, expected)


def test_refused_modes_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"^x\.tif: 32-bit floating-point image \(PIL mode F\)"):
        to_rgb8(Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)), "x.tif")
    wide = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    with pytest.raises(UserError, match=r"^y\.png: 32-bit integer image \(PIL mode I\) with values 0\.\.70000"):
        to_rgb8(wide, "y.png")
    with pytest.raises(UserError, match=r"^32-bit integer image"):  # no path: the caller names the file
        to_rgb8(Image.fromarray(np.array([[-1, 5]], dtype=np.int32)))


def test_8bit_modes_keep_pils_conversion():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert to_rgb8(rgb) is rgb
    for mode in ("L", "LA", "P", "PA", "1", "RGBA", "CMYK", "YCbCr"):
        img = rgb.convert(mode)
        out = to_rgb8(img)
        assert out.mode == "RGB", mode
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img.convert("RGB")), err_msg=mode)


@pytest.mark.parametrize("color_type, channels, mode", [(2, 3, "RGB"), (6, 4, "RGBA"), (4, 2, "RGBA")])
def test_16bit_color_and_alpha_pngs_arrive_as_8bit(tmp_path, color_type, channels, mode):
    """PIL reduces these to 8 bits itself when it opens them, keeping the high byte: at most one level below
    round(v / 257)."""
    planes = [ALL_16BIT, ALL_16BIT[::-1], ALL_16BIT.T, ALL_16BIT[:, ::-1]][:channels]
    arr = np.stack(planes, axis=-1)
    path = tmp_path / f"c{color_type}.png"
    _write_png16(path, arr, color_type)
    with Image.open(path) as im:
        assert im.mode == mode
        out = np.asarray(to_rgb8(im, path)).astype(np.int64)
    color = arr[..., :3] if channels >= 3 else np.repeat(arr[..., :1], 3, axis=-1)
    np.testing.assert_array_equal(out, color >> 8)
    assert np.abs(out - _expected8(color)).max() == 1


def _folder(root, images):
    for i, img in enumerate(images):
        d = root / str(i % 2)
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:03d}{'.png' if img.mode != 'F' else '.tif'}")


def test_make_reference_reads_16bit_pngs(tmp_path):
    from evaluations.make_reference import make_reference

    values = ALL_16BIT.reshape(-1)[::64].copy()  # 0, 64, ..., 65472, then 65535: 1024 values over the range
    values[-1] = 65535
    tiles = list(values.reshape(4, 16, 16))
    _folder(tmp_path / "data", [Image.fromarray(np.ascontiguousarray(t)) for t in tiles])
    out = tmp_path / "ref.npz"
    make_reference(str(tmp_path / "data"), str(out), 16, backend="digits")
    with np.load(out) as z:
        arr = z["arr_0"]
    order = [0, 2, 1, 3]  # ImageFolder order: class 0 (images 0, 2), then class 1 (images 1, 3)
    expected = np.stack([np.repeat(_expected8(tiles[i])[..., None], 3, axis=-1) for i in order])
    np.testing.assert_array_equal(arr, expected)
    assert arr.max() == 255 and arr.min() == 0 and len(np.unique(arr)) == 256


def test_make_reference_refuses_a_float_image_naming_it(tmp_path, capsys):
    from evaluations.make_reference import main
    from fcdm_common.cli import run_main

    good = Image.fromarray(np.zeros((16, 16), np.uint8))
    bad = Image.fromarray(np.full((16, 16), 0.5, np.float32))
    _folder(tmp_path / "data", [good, bad])
    with pytest.raises(SystemExit) as e:
        run_main(main, ["--data-path", str(tmp_path / "data"), "--out", str(tmp_path / "ref.npz"),
                        "--image-size", "16", "--backend", "digits"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert str(tmp_path / "data" / "1" / "001.tif") in err and "mode F" in err
    assert not (tmp_path / "ref.npz").exists()


def test_extraction_stores_16bit_pngs_scaled_in_its_latents_and_alignment_images(tmp_path):
    """extract_features.py (pixel space, so the latents are the pixels) with the alignment images: both hold
    round(v / 257) of a 16-bit data set, where plain convert("RGB") stored 255 for every v >= 255."""
    from fcdm_common.cli import run_main
    from preparation import extract_features
    from preparation.readers import open_dataset

    values = ALL_16BIT.reshape(-1)[::256].copy()  # 0, 256, ..., 65280: 256 values over the range
    tiles = list(values.reshape(4, 8, 8))
    _folder(tmp_path / "data", [Image.fromarray(np.ascontiguousarray(t)) for t in tiles])
    out = tmp_path / "s.zarr"
    run_main(extract_features.main, ["--data-path", str(tmp_path / "data"), "--zarr-path", str(out), "--vae", "none",
                                     "--image-size", "8", "--store", "sample", "--shard-size", "4", "--chunk-size",
                                     "2", "--num-workers", "0", "--device", "cpu", "--repa-image-size", "8"])
    order = [0, 2, 1, 3]  # ImageFolder order: class 0 (images 0, 2), then class 1 (images 1, 3)
    expected = np.stack([np.repeat(_expected8(tiles[i])[None], 3, axis=0) for i in order])  # (4, 3, 8, 8)
    ds = open_dataset(zarr_path=out, hflip=False, images=True)
    x, _, img = ds.get_batch(np.arange(4), None, orient=np.zeros(4, np.int64))
    np.testing.assert_array_equal(img.numpy(), expected)
    np.testing.assert_array_equal(np.rint((x.numpy().astype(np.float64) + 1) * 127.5), expected)
    assert len(np.unique(expected)) > 200  # the test would see saturation: most values are above 255
