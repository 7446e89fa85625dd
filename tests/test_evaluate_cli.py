"""train_gen/evaluate.py end to end with the digits backend, input validation, and the torch backend."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluations import digits, metrics
from fcdm_common.cli import UserError
from fcdm_common.io import sha256_file
from train_gen.evaluate import main

SCRIPT = Path(__file__).resolve().parents[1] / "train_gen" / "evaluate.py"


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    x_tr, y_tr, x_te, y_te = digits.digits_split()
    np.savez(tmp / "ref.npz", arr_0=digits.digits_to_images(x_tr[:600], 2))
    np.savez(tmp / "samples.npz", arr_0=digits.digits_to_images(x_te, 2), arr_1=y_te)
    wrong = (y_te + 1) % 10
    np.savez(tmp / "mislabelled.npz", arr_0=digits.digits_to_images(x_te, 2), arr_1=wrong)
    return tmp


def _parse(text):
    return {line.split(": ")[0]: float(line.split(": ")[1]) for line in text.strip().splitlines()}


def test_cli_writes_metrics_and_json(batches):
    out = batches / "out.txt"
    main(["--sample-batch", str(batches / "samples.npz"), "--ref-batch", str(batches / "ref.npz"),
          "--output_fid", str(out), "--backend", "digits"])
    lines = _parse(out.read_text())
    assert list(lines) == ["Inception Score", "FID", "sFID", "Precision", "Recall", "Class accuracy"]
    report = json.loads(out.with_suffix(".json").read_text())
    m = report["metrics"]
    assert lines["FID"] == m["fid"] and lines["Recall"] == m["recall"]
    assert report["files"]["sample_batch"]["sha256"] == sha256_file(batches / "samples.npz")
    assert report["files"]["ref_batch"]["sha256"] == sha256_file(batches / "ref.npz")
    assert report["versions"]["numpy"] == np.__version__ and report["backend"] == "digits"

    # the same numbers from the library pieces, computed here independently of the evaluator
    with np.load(batches / "ref.npz") as z:
        ref = digits.digits_features(z["arr_0"])
    with np.load(batches / "samples.npz") as z:
        smp = digits.digits_features(z["arr_0"])
        labels = z["arr_1"]
    fid = metrics.frechet_distance(*metrics.compute_statistics(smp["pool"]), *metrics.compute_statistics(ref["pool"]))
    sfid = metrics.frechet_distance(*metrics.compute_statistics(smp["spatial"]),
                                    *metrics.compute_statistics(ref["spatial"]))
    assert m["fid"] == pytest.approx(fid, rel=1e-9) and m["sfid"] == pytest.approx(sfid, rel=1e-9)
    assert (m["precision"], m["recall"]) == metrics.precision_recall(ref["pool"], smp["pool"])
    assert m["inception_score"] == pytest.approx(metrics.inception_score(smp["softmax"]), rel=1e-12)
    assert m["class_accuracy"] == pytest.approx(np.mean(smp["logits"].argmax(1) == labels))
    assert m["class_accuracy"] > 0.95 and 5 < m["inception_score"] <= 10
    assert 0 < m["fid"] < 5 and m["precision"] > 0.8 and m["recall"] > 0.8  # held-out real digits


def test_cli_identical_batches_and_wrong_labels(batches):
    res = main(["--sample-batch", str(batches / "samples.npz"), "--ref-batch", str(batches / "samples.npz"),
                "--backend", "digits", "--output-fid", str(batches / "self.txt")])
    assert abs(res["metrics"]["fid"]) < 1e-6 and abs(res["metrics"]["sfid"]) < 1e-6
    assert res["metrics"]["precision"] == 1.0 and res["metrics"]["recall"] == 1.0
    res = main(["--sample-batch", str(batches / "mislabelled.npz"), "--ref-batch", str(batches / "ref.npz"),
                "--backend", "digits", "--output-json", str(batches / "wrong.json")])
    assert res["metrics"]["class_accuracy"] < 0.05
    assert json.loads((batches / "wrong.json").read_text())["metrics"]["class_accuracy"] < 0.05


def test_precomputed_reference_statistics_are_used_as_is(batches, tmp_path):
    x_tr, _, x_te, _ = digits.digits_split()
    other = digits.digits_features(digits.digits_to_images(x_tr[600:1000], 2))
    mu, sigma = metrics.compute_statistics(other["pool"])
    mu_s, sigma_s = metrics.compute_statistics(other["spatial"])
    ref_images = digits.digits_to_images(x_tr[:600], 2)
    np.savez(tmp_path / "ref_stats.npz", arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    res = main(["--sample-batch", str(batches / "samples.npz"), "--ref-batch", str(tmp_path / "ref_stats.npz"),
                "--backend", "digits", "--output_fid", str(tmp_path / "o.txt")])
    smp = digits.digits_features(digits.digits_to_images(x_te, 2))
    expected = metrics.frechet_distance(*metrics.compute_statistics(smp["pool"]), mu, sigma)
    assert res["metrics"]["fid"] == pytest.approx(expected, rel=1e-9)
    assert res["ref_statistics"] == "precomputed"
    # precision/recall still come from the reference images
    ref = digits.digits_features(ref_images)
    assert (res["metrics"]["precision"], res["metrics"]["recall"]) == metrics.precision_recall(ref["pool"], smp["pool"])


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("arrays, message", [
    ({"arr_0": np.zeros((4, 16, 16, 3), np.float32)}, "dtype float32, expected uint8"),
    ({"arr_0": np.zeros((4, 16, 16), np.uint8)}, "expected \\(N, H, W, 3\\)"),
    ({"arr_0": np.zeros((4, 16, 16, 4), np.uint8)}, "expected \\(N, H, W, 3\\)"),
    ({"arr_0": np.zeros((1, 16, 16, 3), np.uint8)}, "at least 2"),
    ({"images": np.zeros((4, 16, 16, 3), np.uint8)}, "no 'arr_0'"),
])
def test_bad_sample_batches_are_user_errors(batches, tmp_path, arrays, message):
    bad = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=message) as e:
        main(["--sample-batch", bad, "--ref-batch", str(batches / "ref.npz"), "--backend", "digits"])
    assert "bad.npz" in str(e.value)


def test_bad_reference_statistics_and_missing_files(batches, tmp_path):
    imgs = np.zeros((4, 16, 16, 3), np.uint8)
    partial = _write(tmp_path / "partial.npz", arr_0=imgs, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(UserError, match="all of"):
        main(["--sample-batch", str(batches / "samples.npz"), "--ref-batch", partial, "--backend", "digits"])
    nan = _write(tmp_path / "nan.npz", arr_0=imgs, mu=np.full(64, np.nan), sigma=np.eye(64),
                 mu_s=np.zeros(64), sigma_s=np.eye(64))
    with pytest.raises(UserError, match="NaN"):
        main(["--sample-batch", str(batches / "samples.npz"), "--ref-batch", nan, "--backend", "digits"])
    adm = _write(tmp_path / "adm.npz", arr_0=imgs, mu=np.zeros(2048), sigma=np.eye(2048),
                 mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with pytest.raises(UserError, match="another --backend"):
        main(["--sample-batch", str(batches / "samples.npz"), "--ref-batch", adm, "--backend", "digits"])
    with pytest.raises(UserError, match="not found"):
        main(["--sample-batch", str(tmp_path / "none.npz"), "--ref-batch", str(batches / "ref.npz"),
              "--backend", "digits"])
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        main(["--sample-batch", str(text), "--ref-batch", str(batches / "ref.npz"), "--backend", "digits"])


def test_script_exit_status_and_help(batches, tmp_path):
    bad = _write(tmp_path / "float.npz", arr_0=np.zeros((4, 16, 16, 3), np.float64))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sample-batch", bad, "--ref-batch",
                           str(batches / "ref.npz"), "--backend", "digits"], capture_output=True, text=True)
    assert proc.returncode == 2 and "float.npz" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sample-batch", bad, "--ref-batch",
                           str(batches / "ref.npz")], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert proc.returncode == 2  # tf backend without --inception-pb: a clear error (or bad input first)
    help_text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True).stdout
    for flag in ("--sample-batch", "--ref-batch", "--output_fid", "--output-fid", "--backend", "--inception-pb",
                 "--inception-weights", "--output-json"):
        assert flag in help_text


def test_tf_backend_without_graph_names_the_fix(batches, monkeypatch):
    monkeypatch.delenv("FCDM_INCEPTION_PB", raising=False)
    with pytest.raises(UserError, match="FCDM_INCEPTION_PB"):
        main(["--sample-batch", str(batches / "samples.npz"), "--ref-batch", str(batches / "ref.npz")])


def test_torch_backend_loads_weights_from_a_file(tmp_path):
    import torch

    from evaluations.features_torch import TorchInception, build_inception

    gen = torch.Generator().manual_seed(0)
    state = {}  # random weights with the skeleton's names and shapes (cheaper than initialising)
    for name, t in build_inception(device="meta").state_dict().items():
        if name.endswith("running_var"):
            state[name] = torch.rand(t.shape, generator=gen) + 0.5
        elif name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.long)
        else:
            state[name] = torch.randn(t.shape, generator=gen) * 0.05
    weights = tmp_path / "inception.pt"
    torch.save(state, weights)
    net = TorchInception(str(weights), device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
    out = net(images)
    assert out["pool"].shape == (1, 2048) and out["spatial"].shape == (1, 2023) and out["softmax"].shape == (1, 1008)
    # independent recomputation with the saved weights in a fresh model: logits minus bias are
    # pool @ W^T, and the spatial features are Mixed_6d.branch1x1's first 7 channels in NHWC order
    fresh = build_inception(device="meta").eval()
    fresh.load_state_dict(torch.load(weights, weights_only=True), assign=True)
    seen = {}
    fresh.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("s", o))
    with torch.no_grad():
        x = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(299, 299),
                                            mode="bilinear", align_corners=False)
        logits = fresh((x - 128) / 128) - fresh.fc.bias
    np.testing.assert_allclose(out["softmax"], torch.softmax(logits.double(), 1).numpy(), rtol=1e-4, atol=1e-7)
    expected_spatial = seen["s"][:, :7].permute(0, 2, 3, 1).reshape(1, -1).numpy()
    np.testing.assert_allclose(out["spatial"], expected_spatial, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="does not match"):
        torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
        TorchInception(str(tmp_path / "bad.pt"), device="cpu")
