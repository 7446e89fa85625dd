"""benchmarks/sampler_quality.py: entry parsing and the interleaved timing on a tiny checkpoint."""
import json

import pytest

from benchmarks import sampler_quality
from fcdm_common.cli import UserError
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)
from test_sample_ddp import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_entries_and_interleaved_timing(tmp_path):
    assert sampler_quality.parse_entry("diffusers:DDIMScheduler:20") == ("diffusers:DDIMScheduler", 20)
    for bad in ("dpm++2m", "dpm++2m:0", ":5", "ddpm:x"):
        with pytest.raises(UserError, match="SAMPLER:STEPS"):
            sampler_quality.parse_entry(bad)
    ckpt = make_checkpoint(tmp_path / "c.pt")
    (tmp_path / "ref.npz").write_bytes(b"")  # not read with --skip-quality
    report = sampler_quality.main(["--ckpt", str(ckpt), "--ref-batch", str(tmp_path / "ref.npz"), "--out-dir",
                                  str(tmp_path / "out"), "--samplers", "ddpm:4", "dpm++2m:2", "--skip-quality",
                                  "--timing-rounds", "1", "--timing-samples", "2"])
    rows = report["interleaved_timing"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddpm", 4), ("dpm++2m", 2)]
    assert rows[0]["speedup_vs_first"] == 1.0 and all(r["seconds_per_1000"] > 0 for r in rows)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["interleaved_timing"] == rows
