"""benchmarks/kernel_resources.py: every fused-block kernel compiled offline for sm_90a at a tiny model's shapes,
registers read, no spills; the interpreter refused; a spill fails the run.

The compile runs in a subprocess without TRITON_INTERPRET: conftest.py switches the interpreter on for this
process (no GPU), and the kernel modules read it when first imported."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import kernel_resources
from fcdm_common.cli import UserError

triton = pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "FCDM-S", "--model-kwargs", '{"hidden_size": 64, "depths": [1]}', "--latent-size", "8",
        "--batch-size", "4"]  # one level: each kernel compiled once
KERNELS = {"_dwconv_norm_fwd", "_dwconv_norm_bwd", "_dwconv_input_grad", "_dwconv_weight_grad", "_grn_stats",
           "_grn_apply", "_grn_grad_stats", "_grn_grad_apply", "_gate_fwd", "_gate_bwd"}


def test_tiny_model_every_kernel_compiles_without_spills(tmp_path):
    if not os.access(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"), os.X_OK):
        pytest.skip("this triton has no ptxas (no CUDA backend)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "benchmarks/kernel_resources.py", *TINY, "--json", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["launches"]
    assert {r["kernel"] for r in rows} == KERNELS
    assert len(rows) == len(KERNELS) and {r["level"] for r in rows} == {0}  # 10 launches per level
    for r in rows:
        assert r["registers"] > 0 and r["num_warps"] in (4, 8), r
        assert r["spill_stores"] == r["spill_loads"] == 0, r
        assert 0 < r["loads"] and 0 <= r["loads_16b"] <= r["loads"], r
        assert r["constexprs"]["BLOCK_P"] >= 1 and r["constexprs"]["BLOCK_C"] >= 1
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("10 launches (") and last.endswith(", 0 with spills"), last
    assert report["spilling"] == 0 and report["target"] == "sm_90a"


def test_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(UserError, match="TRITON_INTERPRET=1.*unset"):
        kernel_resources.main(TINY)


def test_a_spill_fails_the_run_after_the_report(monkeypatch, tmp_path, capsys):
    row = {"kernel": "_gate_fwd", "level": 0, "grid": [4, 1], "num_warps": 8, "constexprs": {"BLOCK_P": 64},
           "registers": 255, "stack_frame": 64, "spill_stores": 32, "spill_loads": 32, "loads": 6, "loads_16b": 6}
    report = {"model": "FCDM-S", "latent_size": 8, "batch_size": 4, "dtype": "bf16", "target": "sm_90a",
              "triton": "x", "compilations": 1, "spilling": 1, "launches": [row]}
    monkeypatch.setattr(kernel_resources, "run", lambda args: report)
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        kernel_resources.main(["--json", str(out)])
    assert e.value.code == 1
    assert json.loads(out.read_text())["spilling"] == 1
    assert "1 launches (1 distinct compilations), 1 with spills" in capsys.readouterr().out


def test_load_bytes():
    assert [kernel_resources.load_bytes(op) for op in ("ld.global.v4.b32", "ld.global.v2.b32", "ld.global.b16",
                                                       "ld.global.L1::evict_last.v4.b32")] == [16, 8, 2, 16]
