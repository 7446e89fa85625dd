"""Quiet output in normal runs: progress bars in redirected output, TensorFlow's start-up lines,
the DataLoader worker count, the extraction bar's global count.

References: plain tqdm in the same redirected setting (many redraws), and known child output.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fcdm_common.progress import FILE_INTERVAL_S, progress_settings

REPO = Path(__file__).resolve().parents[1]
LOOP = """
import sys, time
from {module} import {name} as bar
for _ in bar(range(150), desc="work"):
    time.sleep(0.01)
"""


def _redraws(module: str, name: str, **env) -> int:
    proc = subprocess.run([sys.executable, "-c", LOOP.format(module=module, name=name)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.count("work")


def test_bars_are_slow_in_redirected_output():
    assert progress_settings(environ={})["mininterval"] == FILE_INTERVAL_S  # pytest's stderr is captured
    assert progress_settings(environ={"FCDM_PROGRESS": "0"}) == {"disable": True}
    assert progress_settings(environ={"FCDM_PROGRESS": "1"}) == {}
    plain = _redraws("tqdm", "tqdm")
    ours = _redraws("fcdm_common.progress", "progress")
    assert plain >= 5 and ours <= 2, (plain, ours)  # ours: the first draw and the final one
    assert _redraws("fcdm_common.progress", "progress", FCDM_PROGRESS="0") == 0


CHILD = r"""
import sys
w = sys.stderr.write
w("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
w("I0000 00:00:1.0  1 port.cc:153] oneDNN custom operations are on. You may see slightly different results\n")
w("bar 1/2\rbar 2/2\n")
w("a real warning\n")
w("partial tail")
"""


def test_tf_startup_lines_are_dropped_and_the_rest_passes(capfd):
    from evaluations.features_tf import run_filtering_tf_noise

    proc = run_filtering_tf_noise([sys.executable, "-c", CHILD], dict(os.environ))
    assert proc.returncode == 0
    assert capfd.readouterr().err == "bar 1/2\rbar 2/2\na real warning\npartial tail"


def test_worker_count_is_capped_at_the_usable_cpus():
    from preparation.extract_features import worker_count

    said = []
    cpus = len(os.sched_getaffinity(0))
    assert worker_count(cpus, said.append) == cpus and not said
    assert worker_count(cpus + 3, said.append) == cpus and f"using {cpus}" in said[0]


def test_extraction_bar_counts_every_rank(tmp_path):
    import re

    import numpy as np
    from PIL import Image

    from helpers import run_torchrun

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    # 3 shards of 2 images: rank 0 encodes shards 0 and 2 (4 images), rank 1 shard 1
    err = run_torchrun(REPO / "preparation" / "extract_features.py",
                       ["--data-path", tmp_path / "imgs", "--features-path", tmp_path / "o.zarr", "--vae", "none",
                        "--image-size", "8", "--batch-size", "2", "--shard-size", "2", "--chunk-size", "2",
                        "--num-workers", "0", "--device", "cpu"], timeout=120)
    totals = set(re.findall(r"encoding \(all 2 procs\):.*?\d+/(\d+)", err))
    assert totals == {"6"}, err[-2000:]


def test_hub_vae_load_is_quiet(tmp_path, monkeypatch):
    """A hub-named VAE is resolved to its snapshot folder (the Hugging Face cache) and loaded from that
    folder, so diffusers never calls the hub with the `local_dir_use_symlinks` argument that
    huggingface_hub >= 1 deprecates: loading prints no warning at all. Nothing is downloaded here: the
    cache look-up returns a tiny VAE saved by the test."""
    import warnings

    import diffusers
    import huggingface_hub

    from models.autoencoders import load_autoencoder

    folder = tmp_path / "snapshot"
    diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
                            latent_channels=4).save_pretrained(folder)
    calls = []

    def cached_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("local_files_only")))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_snapshot)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        vae = load_autoencoder("sd", hf_model_name="some/repo", hf_model_dir=None, device="cpu")
    assert [str(w.message) for w in seen] == []
    assert calls == [("some/repo", True)]  # the cache only, no download
    assert vae.latent_channels == 4
