"""benchmarks/bench_model.py end to end on tiny CPU configs: JSON report, ratios, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_model
from fcdm_common.cli import UserError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"
TINY_FCDM = '{"hidden_size": 16, "depths": [1, 1, 1], "num_classes": 10}'


def test_compare_baseline_writes_json(tmp_path):
    out = tmp_path / "r" / "bench.json"
    report = bench_model.main([
        "--model", "FCDM-S", "--model-kwargs", TINY_FCDM, "--latent-size", "8", "--batch-size", "2",
        "--device", "cpu", "--mode", "both", "--repeats", "1", "--warmup", "1", "--compare-baseline",
        "--peak-tflops", "1", "--json", str(out),
    ])
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"FCDM-S baseline", "FCDM-S optimized"}
    for r in data["results"].values():
        assert r["forward_img_per_s"] > 0 and r["train_steps_per_s"] > 0
        assert r["train_img_per_s"] == pytest.approx(2 * r["train_steps_per_s"])
        assert r["train_mfu"] == pytest.approx(r["train_tflops"] / 1)
        assert 0 < r["gmacs_per_image"] < 0.01
        assert r["train_page_faults_per_call"] >= 0 and r["forward_page_faults_per_call"] >= 0  # CPU only
    assert data["ratios"]["train_speedup_vs_baseline"] > 0
    assert data["config"]["latent_size"] == 8 and data["environment"]["torch"]
    assert report["ratios"] == data["ratios"]


def test_compare_with_dit_forward_and_script_entry(tmp_path):
    out = tmp_path / "dit.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "FCDM-S", "--model-kwargs", TINY_FCDM, "--compare", "DiT-S/2",
         "--resolution", "64", "--batch-size", "1", "--device", "cpu", "--mode", "forward",
         "--repeats", "1", "--warmup", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    dit = data["results"]["DiT-S/2 optimized"]
    assert dit["params_m"] == pytest.approx(32.87, abs=0.01)  # DiT-S/2 preset at 64 / 8 = 8x8 latents
    assert "forward_speedup_FCDM-S_vs_DiT-S/2" in data["ratios"]
    assert "|" in proc.stdout


def test_bad_input_exits_2():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "NoSuchNet", "--device", "cpu"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown model" in proc.stderr
    with pytest.raises(UserError, match="needs an FCDM"):
        bench_model.main(["--model", "DiT-S/2", "--baseline", "--latent-size", "4", "--batch-size", "1",
                          "--device", "cpu", "--mode", "forward", "--repeats", "1", "--warmup", "0"])
    with pytest.raises(UserError, match="divisible"):
        bench_model.main(["--model", "FCDM-S", "--model-kwargs", TINY_FCDM, "--latent-size", "5",
                          "--device", "cpu", "--mode", "forward", "--repeats", "1"])


def test_ablation_variants_and_layer_mode(tmp_path):
    common = ["--model", "FCDM-S", "--model-kwargs", TINY_FCDM, "--latent-size", "4", "--batch-size", "1",
              "--device", "cpu", "--repeats", "1", "--warmup", "0"]
    report = bench_model.main(common + ["--mode", "train", "--compare-baseline", "--ablate"])
    rows = report["results"]
    assert rows["FCDM-S baseline"]["network"] == "reference" and rows["FCDM-S baseline"]["checkpointing"] == "full"
    assert rows["FCDM-S baseline"]["ema_impl"] == "loop" and rows["FCDM-S optimized"]["ema_impl"] == "foreach"
    assert rows["ablate: optimized, bf16 autocast"]["bf16"] is True
    assert rows["ablate: optimized, selective ckpt"]["checkpointing"] == "selective"
    assert rows["ablate: optimized, library depthwise backward"]["handwritten_dw"] is False
    assert rows["ablate: optimized, autograd GRN backward"]["handwritten_grn"] is False
    assert rows["FCDM-S optimized"]["handwritten_dw"] and rows["FCDM-S optimized"]["handwritten_grn"]
    assert all("train_step_s" in r for r in rows.values())
    out = tmp_path / "layers.json"
    layers = bench_model.main(common + ["--mode", "layers", "--json", str(out)])["layers"]
    assert {"level0 4x4 grn", "level1 2x2 depthwise", "level1 2x2 pointwise",
            "level0 4x4 grn hand-written vs autograd backward",
            "level1 2x2 depthwise hand-written vs library backward"} <= set(layers)
    assert json.loads(out.read_text())["layers"].keys() == layers.keys()


def test_ablation_switches_reach_the_network():
    """The variant's switches are set on the network it times (not only written in the report)."""
    from models.layers import GRN, DepthwiseConv

    args = bench_model.parse_args(["--model", "FCDM-S", "--model-kwargs", TINY_FCDM, "--latent-size", "4",
                                   "--batch-size", "1", "--device", "cpu", "--mode", "train"])
    for dw, grn in ((False, True), (True, False)):
        v = bench_model.make_variant("v", "FCDM-S", args, False, handwritten_dw=dw, handwritten_grn=grn)
        bench_model.prepare_variant(v, args, torch.device("cpu"), 4, json.loads(TINY_FCDM))
        mods = list(v.model.modules())
        assert {m.handwritten_backward for m in mods if isinstance(m, DepthwiseConv)} == {dw}
        assert {m.handwritten_backward for m in mods if isinstance(m, GRN)} == {grn}


def test_cpu_allocator_setting_is_reported(tmp_path):
    for setting in ("default", "tuned"):
        out = tmp_path / f"{setting}.json"
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--model", "FCDM-S", "--model-kwargs", TINY_FCDM, "--latent-size", "4",
             "--batch-size", "1", "--device", "cpu", "--mode", "forward", "--repeats", "1", "--warmup", "0",
             "--cpu-allocator", setting, "--json", str(out)],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(out.read_text())["environment"]["cpu_allocator"] == setting
        assert f"CPU allocator {setting}" in proc.stdout


def test_the_baseline_runs_at_the_precision_of_the_run():
    """The paper-mode baseline runs as the authors' release trains: bf16 autocast when the run is bf16 (their
    accelerate setting), so a ratio compares implementations, not precisions; --baseline-tf32 adds the fp32/TF32
    baseline as a row of its own."""
    common = ["--model", "FCDM-S", "--model-kwargs", TINY_FCDM, "--latent-size", "4", "--batch-size", "1",
              "--device", "cpu", "--repeats", "1", "--warmup", "0", "--mode", "train", "--compare-baseline"]
    report = bench_model.main(common + ["--dtype", "bf16", "--baseline-tf32"])
    rows = report["results"]
    assert rows["FCDM-S baseline"]["bf16"] is True and rows["FCDM-S optimized"]["bf16"] is True
    tf32 = rows["FCDM-S baseline, fp32/TF32"]
    assert tf32["bf16"] is False and tf32["network"] == "reference" and tf32["checkpointing"] == "full"
    assert {"train_speedup_vs_baseline", "train_speedup_vs_baseline_tf32"} <= set(report["ratios"])
    rows = bench_model.main(common + ["--dtype", "fp32", "--baseline-tf32"])["results"]
    assert set(rows) == {"FCDM-S baseline", "FCDM-S optimized"} and rows["FCDM-S baseline"]["bf16"] is False
