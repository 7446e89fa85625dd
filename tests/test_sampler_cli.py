"""The new samplers through sample.py / sample_ddp.py / generate: diffusers schedulers, dopri5, --compile."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from diffusion.sampling import SamplerSettings, generate, load_setup
from fcdm_common.cli import UserError
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)
from test_sample import ckpts  # noqa: F401  (fixture: tiny diffusion and flow checkpoints)
from train_gen import sample, sample_ddp

pytestmark = pytest.mark.usefixtures("one_thread")




def test_stochastic_scheduler_archive_is_batch_independent_and_records_the_scheduler(ckpts, tmp_path):  # noqa: F811
    args = ["--ckpt", ckpts["diffusion"], "--num-fid-samples", 7, "--sampler", "diffusers:DDPMScheduler",
            "--num-sampling-steps", 5, "--cfg-scale", 2.0, "--forward-batch", 4, "--global-seed", 5]
    archives = []
    for b in (3, 7):
        out = tmp_path / f"b{b}"
        sample_ddp.main([str(a) for a in args + ["--sample-dir", out, "--per-proc-batch-size", b]])
        (npz,) = out.glob("*.npz")
        archives.append(np.load(npz)["arr_0"])
        meta = json.loads(next(out.glob("*.json")).read_text())
    np.testing.assert_array_equal(archives[0], archives[1])
    sched = meta["settings"]["scheduler"]
    assert sched["class"] == "DDPMScheduler" and sched["config"]["variance_type"] == "learned_range"
    assert len(sched["config"]["trained_betas"]) == 1000 and meta["settings"]["sampler"] == "diffusers:DDPMScheduler"
    assert "diffusers_DDPMScheduler5" in npz.name  # no ':' in file names


def test_sample_py_with_dpm_solver_equals_generate(ckpts, tmp_path, capsys):  # noqa: F811
    labels = [3, 1, 4]
    sample.main(["--ckpt", str(ckpts["diffusion"]), "--class-labels", *map(str, labels), "--sampler", "dpm++2m",
                 "--num-sampling-steps", "6", "--seed", "2", "--out", str(tmp_path / "g.png"),
                 "--save-individual", str(tmp_path / "ind")])
    assert "6 network evaluations" in capsys.readouterr().out
    ref, _ = generate(load_setup(ckpts["diffusion"]), range(3), SamplerSettings("dpm++2m", 6, cfg_scale=4.0), seed=2,
                      labels=labels)
    from PIL import Image
    got = np.stack([np.asarray(Image.open(f)) for f in sorted((tmp_path / "ind").iterdir())])
    np.testing.assert_array_equal(got, ref)
    other, _ = generate(load_setup(ckpts["diffusion"]), range(3), SamplerSettings("unipc", 6, cfg_scale=4.0), seed=2,
                        labels=labels)
    assert (other != ref).any()  # the sampler choice reaches the loop


def test_flow_dopri5_logs_nfe(ckpts, tmp_path, capsys):  # noqa: F811
    sample.main(["--ckpt", str(ckpts["flow"]), "--class-labels", "0", "9", "--sampler", "dopri5",
                 "--rtol", "1e-2", "--atol", "1e-4", "--out", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    nfe = int(out.split("cfg 4.0, ")[1].split(" network")[0])
    assert nfe >= 6 and nfe % 6 in (0, 2)  # dopri5: 6 evaluations per step (+ start and initial-step probe)


def test_compiled_sampling_agrees_with_eager(ckpts):  # noqa: F811
    setup = load_setup(ckpts["flow"])
    settings = SamplerSettings("euler", 3, cfg_scale=2.0, forward_batch=4)
    eager, _ = generate(setup, range(2), settings, seed=0, labels=[1, 2])
    compiled, _ = generate(setup, range(2), dataclasses.replace(settings, compile=True), seed=0, labels=[1, 2])
    assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1  # float32 reassociation only


BAD = {
    "unknown diffusers class": (["--ckpt", "{root}/diff.pt", "--sampler", "diffusers:NoSuchScheduler"],
                                "unknown diffusers scheduler"),
    "dopri5 on diffusion": (["--ckpt", "{root}/diff.pt", "--sampler", "dopri5"], "does not apply to a diffusion"),
    "dpm on flow": (["--ckpt", "{root}/flow.pt", "--sampler", "dpm++2m"], "does not apply to a flow"),
    "too many steps": (["--ckpt", "{root}/diff.pt", "--sampler", "unipc", "--num-sampling-steps", "1001"],
                       "exceeds"),
}  # --rtol 0 and other values out of range whatever the checkpoint: argparse, tests/test_flag_ranges.py


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sampler_inputs(ckpts, tmp_path, case):  # noqa: F811
    argv, needle = BAD[case]
    argv = [a.format(root=ckpts["root"]) for a in argv]
    with pytest.raises(UserError, match=needle.replace("-", r"\-")):
        sample_ddp.main(argv + ["--sample-dir", str(tmp_path), "--num-fid-samples", "2"])
    assert not any(tmp_path.rglob("*.png"))


def test_bad_sampler_exit_status(ckpts, tmp_path):  # noqa: F811
    res = subprocess.run([sys.executable, sample.__file__, "--ckpt", str(ckpts["diffusion"]), "--sampler",
                          "diffusers:Nope", "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "unknown diffusers scheduler 'Nope'" in lines[0], res.stderr
    for steps in ("0", "-3"):
        with pytest.raises(SystemExit) as exc:  # argparse: usage and one error line, status 2
            sample.main(["--ckpt", str(ckpts["diffusion"]), "--sampler", "dpm++2m", "--num-sampling-steps", steps])
        assert exc.value.code == 2
