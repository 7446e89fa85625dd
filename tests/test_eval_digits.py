"""The digits backend (evaluations/digits.py) and make_reference on a digits ImageFolder."""
from __future__ import annotations

import numpy as np
import pytest

from evaluations import digits, metrics
from fcdm_common.cli import UserError


def test_classifier_accuracy_on_held_out_real_digits_through_images():
    _, _, x_test, y_test = digits.digits_split()
    for scale in (2, 4):  # 16x16 and 32x32 renders, the demo's formats
        feats = digits.digits_features(digits.digits_to_images(x_test, scale))
        acc = np.mean(np.argmax(feats["logits"], axis=1) == y_test)
        assert acc > 0.95, (scale, acc)
        assert feats["pool"].shape == (len(y_test), digits.HIDDEN)
        np.testing.assert_allclose(feats["softmax"].sum(axis=1), 1.0, rtol=1e-12)


def test_split_is_disjoint_and_fixed():
    x_tr, y_tr, x_te, y_te = digits.digits_split()
    assert len(y_tr) + len(y_te) == 1797
    x_tr2, _, _, _ = digits.digits_split()
    np.testing.assert_array_equal(x_tr, x_tr2)
    train_rows = {row.tobytes() for row in x_tr}
    assert sum(row.tobytes() in train_rows for row in x_te) < 10  # only literal duplicate digits


def test_images_to_digits_inverts_the_demo_rendering():
    _, _, x, _ = digits.digits_split()
    x = x[:50]
    for scale in (1, 2, 4):
        img = digits.digits_to_images(x, scale)
        assert img.dtype == np.uint8 and img.shape == (50, 8 * scale, 8 * scale, 3)
        back = digits.images_to_digits(img)
        assert np.abs(back - x).max() <= 0.5 * 16 / 255 + 1e-12  # uint8 rounding only
    # area average: a 16x16 image whose 2x2 blocks hold 0, 255, 0, 255 reads as 8 everywhere
    img = np.zeros((1, 16, 16, 3), np.uint8)
    img[:, ::2, ::2] = 255
    img[:, 1::2, 1::2] = 255
    np.testing.assert_allclose(digits.images_to_digits(img), 8.0)


def test_training_is_deterministic():
    first = digits.digits_classifier()
    digits.digits_classifier.cache_clear()
    second = digits.digits_classifier()
    for a, b in ((first.w1, second.w1), (first.b2, second.b2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(2, 12, 12, 3), (2, 16, 8, 3), (2, 16, 16, 1)])
def test_rejects_bad_image_shapes(shape):
    with pytest.raises(UserError):
        digits.images_to_digits(np.zeros(shape, np.uint8), "bad.npz")


def _write_digits_folder(root, x, y, scale):
    from PIL import Image

    for i, (img, label) in enumerate(zip(digits.digits_to_images(x, scale), y)):
        d = root / str(label)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")


def test_make_reference_on_digits_image_folder(tmp_path):
    from evaluations.make_reference import main, make_reference

    x_tr, y_tr, _, _ = digits.digits_split()
    x, y = x_tr[:120], y_tr[:120]
    _write_digits_folder(tmp_path / "data", x, y, 2)
    out = tmp_path / "ref.npz"
    info = make_reference(str(tmp_path / "data"), str(out), 16, backend="digits")
    assert info["classes"] == [str(c) for c in range(10)] and info["num_images"] == 120
    with np.load(out) as z:
        arr, labels = z["arr_0"], z["arr_1"]
        assert arr.dtype == np.uint8 and arr.shape == (120, 16, 16, 3)
        # ImageFolder order: class folders, then file names; every image survives the PNG round trip
        order = np.lexsort((np.arange(120), y))
        np.testing.assert_array_equal(labels, y[order])
        np.testing.assert_array_equal(arr, digits.digits_to_images(x[order], 2))
        feats = digits.digits_features(arr)
        for key, name in (("mu", "pool"), ("mu_s", "spatial")):
            mu, _ = metrics.compute_statistics(feats[name])
            np.testing.assert_allclose(z[key], mu, rtol=1e-12)
        np.testing.assert_allclose(z["sigma"], np.cov(feats["pool"], rowvar=False), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(z["mu_s"], x[order].mean(axis=0), atol=0.02)  # spatial = pixels
    # the command line, with a subset
    main(["--data-path", str(tmp_path / "data"), "--out", str(tmp_path / "sub.npz"), "--image-size", "16",
          "--backend", "digits", "--num-images", "30"])
    with np.load(tmp_path / "sub.npz") as z:
        assert z["arr_0"].shape == (30, 16, 16, 3) and z["sigma_s"].shape == (64, 64)
    with pytest.raises(UserError, match="not a directory"):
        make_reference(str(tmp_path / "nope"), str(tmp_path / "x.npz"), 16, backend="digits")


def test_center_crop_matches_adm_geometry():
    from PIL import Image

    from evaluations.make_reference import center_crop_arr

    # a 40x20 (W x H) image with a distinct centre column: short side 20 -> 10, width 20, crop 5..15
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 18:22] = 200
    out = center_crop_arr(Image.fromarray(arr), 10)
    assert out.shape == (10, 10, 3)
    assert out[:, 4:6].mean() > 150 and out[:, :3].max() < 30 and out[:, 7:].max() < 30
