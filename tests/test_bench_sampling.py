"""bench_model.py --mode sample on a tiny CPU config: a whole guided sampling loop per batch size."""
import json

import pytest

from benchmarks import bench_model
from fcdm_common.cli import UserError
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model", "FCDM-S", "--model-kwargs", '{"hidden_size": 16, "depths": [1, 1, 1], "num_classes": 10}',
        "--latent-size", "8", "--device", "cpu", "--mode", "sample", "--repeats", "2", "--warmup", "0"]


def test_sample_mode_reports_images_per_second(tmp_path):
    out = tmp_path / "s.json"
    bench_model.main(TINY + ["--sample-batches", "2", "3", "--sampling-steps", "3", "--sampler", "dpm++2m",
                             "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["rows"]] == [2, 3] and data["sampler"] == "dpm++2m"
    for r in data["rows"]:
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds"])
        assert r["network_calls"] == 2 * 3  # repeats x steps: guidance rides in the same call (2 x batch rows)
    bench_model.main(TINY + ["--sample-batches", "2", "--sampling-steps", "3", "--cfg-scale", "1", "--sampler", "ddim",
                             "--json", str(out)])
    assert json.loads(out.read_text())["rows"][0]["network_calls"] == 6


def test_sample_mode_bad_sampler():
    with pytest.raises(UserError, match="unknown diffusers scheduler"):
        bench_model.main(TINY + ["--sampler", "diffusers:Nope"])
