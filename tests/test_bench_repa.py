"""benchmarks/bench_repa.py on a tiny CPU config: both steps timed in one process, the ratio, and proof that the
aligned step really ran the encoder and trained the projector (and the plain one did neither); bad flags exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_repa
from fcdm_common.cli import UserError
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_repa.py"
TINY_FCDM = '{"hidden_size": 16, "depths": [1, 1, 1, 1, 1], "num_classes": 10}'  # 3 levels: enc1 is 4x4 at 8x8
TINY = ["--model", "FCDM-S", "--model-kwargs", TINY_FCDM, "--latent-size", "8", "--batch", "2",
        "--projector-width", "32", "--threads", "1", "--cpu-allocator", "default", "--quiet"]


def test_tiny_run_times_both_steps_and_the_aligned_one_runs_the_alignment(tmp_path):
    out = tmp_path / "r" / "repa.json"
    report = bench_repa.main(TINY + ["--repeats", "3", "--warmup", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = data["results"]
    for label in ("with alignment", "without alignment"):
        assert rows[label]["step_ms"] > 0 and len(rows[label]["times_s"]) == 3
        assert rows[label]["img_per_s"] == pytest.approx(2 * rows[label]["steps_per_s"])
    assert rows["encoder forward alone"]["ms"] > 0
    assert data["ratio_with_over_without"] == pytest.approx(
        rows["with alignment"]["step_ms"] / rows["without alignment"]["step_ms"])
    assert data["ratio_with_over_without"] > 0 and 0 < data["encoder_share_of_aligned_step"] < 1
    # the encoder ran once per aligned step (warm-up and timed), never in the plain one; every aligned backward
    # reached the projector and AdamW moved it; the plain step has no alignment terms
    checks = data["checks"]
    assert checks["encoder_calls_per_step"] == {"with alignment": 1.0, "without alignment": 0.0}
    assert checks["projector_backwards_per_step"] == {"with alignment": 1.0, "without alignment": 0.0}
    assert checks["projector_max_change"] > 0 and not checks["plain_has_alignment_losses"]
    assert -1 <= checks["repa_cos_last"] <= 1
    # the encoder was built for the site's grid: enc1 of 8x8 latents is 4x4 -> 56 px at patch 14
    assert data["repa"]["site_shape"] == [32, 4, 4] and data["repa"]["encoder_grid"] == [4, 4]
    assert data["encoder"]["resolution"] == 56 and data["config"]["image_size"] == 56
    assert data["encoder"]["random_weights"] and data["environment"]["torch"]
    assert report["ratio_with_over_without"] == data["ratio_with_over_without"]


def test_script_in_bf16_with_a_resized_site(tmp_path):
    """The script entry (bf16 autocast, as the GPU suite runs it) with the encoder at another resolution than the
    site's grid: the projected features are pooled onto the encoder's grid."""
    out = tmp_path / "bf16.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--precision", "bf16", "--site", "enc0",
                           "--encoder-resolution", "56", "--image-size", "64", "--repeats", "1", "--warmup", "0",
                           "--json", str(out)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["repa"]["site_shape"] == [16, 8, 8] and data["repa"]["encoder_grid"] == [4, 4]
    assert data["config"]["precision"] == "bf16" and data["ratio_with_over_without"] > 0
    assert data["checks"]["encoder_calls_per_step"]["with alignment"] == 1.0
    assert "ratio with / without" in proc.stdout


@pytest.mark.parametrize("flags", [["--batch", "0"], ["--repeats", "0"], ["--warmup", "-1"], ["--encoder", "huge"],
                                   ["--model", "DiT-XL/2"], ["--precision", "fp16"], ["--seed", "-1"],
                                   ["--projector-width", "nan"]])
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        bench_repa.build_parser().parse_args(flags)
    assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_bad_settings_are_one_error_line():
    with pytest.raises(UserError, match="--site: unknown feature site 'enc7'"):
        bench_repa.main(TINY + ["--site", "enc7"])
    with pytest.raises(UserError, match="not divisible by 4"):
        bench_repa.main(TINY + ["--latent-size", "6"])
    with pytest.raises(UserError, match="not a multiple of its patch size 14; use 42 or 56"):
        bench_repa.main(TINY + ["--encoder-resolution", "50"])
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--site", "mid.5"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --site: unknown feature site")
