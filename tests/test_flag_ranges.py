"""Every numeric flag has its valid range, checked at the command line (argparse: usage, one error line
naming the flag, exit status 2), and the ranges that depend on the checkpoint (sampling steps beyond the
model's diffusion steps, class labels beyond its classes) are one `error:` line after loading.

Structural part: every program's `build_parser()` (found by reading the source folders with `ast`, so a
new program is checked without anyone listing it) and every `add_argument` call in those folders use a
named range-checked type (fcdm_common/cli.py: positive_int, int_in, float_in, seed_int, ...), never a
bare `int`/`float` (which take nan, inf, negative counts and 64-bit seeds) or a lambda.

References: the samplers' code (diffusion/__init__.py: a diffusion model has T = 1000 training steps and
every diffusion sampler picks among them; flow samplers integrate continuous time), the guidance formula
(diffusion/guidance.py) and DDIM's step (diffusion/gaussian_diffusion.py: eta > 1 can put a negative
number under a square root).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion.guidance import CFG_SCALE_MAX
from diffusion.sampling import SamplerSettings, add_sampler_args, load_setup
from evaluations.in_training import add_eval_args
from fcdm_common.cli import UserError, float_in
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)
from test_sample_ddp import make_checkpoint
from train_gen import pipeline_sample, sample, sample_ddp

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("train_gen", "preparation", "evaluations", "benchmarks", "models")

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- structure
def _has_build_parser(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "build_parser" for n in tree.body)


def programs_with_build_parser() -> list:
    return [f"{folder}.{p.stem}" for folder in FOLDERS for p in sorted((REPO / folder).glob("*.py"))
            if _has_build_parser(p)]


def bare_type_problems(parser: argparse.ArgumentParser) -> list:
    """Flags whose `type` is the bare int/float or a lambda (argparse's own actions, e.g. --help, have none)."""
    bad = []
    for action in parser._actions:
        kind = action.type
        if kind in (int, float) or getattr(kind, "__name__", "") == "<lambda>":
            name = action.option_strings[0] if action.option_strings else action.dest
            bad.append(f"{name}: type={getattr(kind, '__name__', kind)}")
    return bad


def test_the_checker_finds_bare_types_and_passes_named_ones():
    p = argparse.ArgumentParser()
    p.add_argument("--a", type=int)
    p.add_argument("--b", type=float, nargs=2)
    p.add_argument("--c", type=lambda v: int(v))
    p.add_argument("--d", type=float_in(0, 1))
    p.add_argument("--e", type=str)
    assert bare_type_problems(p) == ["--a: type=int", "--b: type=float", "--c: type=<lambda>"]


def test_every_program_is_discovered():
    found = programs_with_build_parser()
    for module in ("train_gen.sample", "train_gen.sample_ddp", "train_gen.evaluate", "train_gen.plot",
                   "train_gen.demo", "evaluations.make_reference", "benchmarks.bench_model", "benchmarks.gpu_suite",
                   "models.summary", "models.convert_official", "train_gen.train"):
        assert module in found, module


@pytest.mark.parametrize("module", programs_with_build_parser())
def test_build_parser_uses_only_range_checked_numeric_types(module):
    parser = importlib.import_module(module).build_parser()
    assert bare_type_problems(parser) == []


def static_problems(path: Path) -> list:
    """`add_argument(..., type=int|float|lambda)` anywhere in a file (programs without build_parser too)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for kw in node.keywords:
                v = kw.value
                bare = isinstance(v, ast.Lambda) or (isinstance(v, ast.Name) and v.id in ("int", "float"))
                if kw.arg == "type" and bare:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}: type={ast.unparse(v)[:40]}")
    return bad


SOURCES = [p.relative_to(REPO).as_posix() for f in FOLDERS for p in sorted((REPO / f).glob("*.py"))
           if "add_argument(" in p.read_text()]


@pytest.mark.parametrize("path", SOURCES)
def test_no_add_argument_call_uses_a_bare_numeric_type(path):
    assert static_problems(REPO / path) == []


# ------------------------------------------------------------------------------------------- behaviour
def refused_by_argparse(main, argv, flag, capsys):
    """main(argv) stops in argparse: exit status 2, and exactly one `error:` line, which names `flag`."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"argument {flag}" in errors[0], errors
    return errors[0]


SAMPLER_CASES = [  # (flag values, the flag named): refused by sample.py, sample_ddp.py and pipeline flags alike
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--cfg-scale", "inf"], "--cfg-scale"),
    (["--cfg-scale", "-1"], "--cfg-scale"),
    (["--cfg-scale", str(CFG_SCALE_MAX * 2)], "--cfg-scale"),
    (["--ddim-eta", "nan"], "--ddim-eta"),
    (["--ddim-eta", "1.5"], "--ddim-eta"),
    (["--ddim-eta", "-0.1"], "--ddim-eta"),
    (["--num-sampling-steps", "0"], "--num-sampling-steps"),
    (["--atol", "0"], "--atol"),
    (["--atol", "nan"], "--atol"),
    (["--rtol", "-1e-3"], "--rtol"),
    (["--rtol", "inf"], "--rtol"),
    (["--forward-batch", "-1"], "--forward-batch"),
    (["--guidance-interval", "0.8", "0.2"], "--guidance-interval"),
    (["--guidance-interval", "0", "1.5"], "--guidance-interval"),
    (["--guidance-interval", "-0.1", "0.5"], "--guidance-interval"),
    (["--guidance-interval", "nan", "1"], "--guidance-interval"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64 + 1)], "--seed"),
    (["--seed", str(2**32)], "--seed"),
]


@pytest.mark.parametrize("values,flag", SAMPLER_CASES, ids=[" ".join(v) for v, _ in SAMPLER_CASES])
@pytest.mark.parametrize("script", ["sample", "sample_ddp"])
def test_sampler_flags_out_of_range(script, values, flag, tmp_path, capsys):
    main = {"sample": sample.main, "sample_ddp": sample_ddp.main}[script]
    line = refused_by_argparse(main, ["--ckpt", tmp_path / "never-read.pt", *values], flag, capsys)
    assert "expected" in line or "LO" in line
    assert not any(tmp_path.iterdir())


PROGRAM_CASES = [  # (module, arguments, the flag named)
    ("train_gen.sample", ["--ckpt", "x.pt", "--nrow", "0"], "--nrow"),
    ("train_gen.sample", ["--ckpt", "x.pt", "--class-labels", "3", "-1"], "--class-labels"),
    ("train_gen.sample_ddp", ["--ckpt", "x.pt", "--num-fid-samples", "0"], "--num-fid-samples"),
    ("train_gen.sample_ddp", ["--ckpt", "x.pt", "--per-proc-batch-size", "-4"], "--per-proc-batch-size"),
    ("train_gen.sample_ddp", ["--ckpt", "x.pt", "--global-seed", "-1"], "--seed"),
    ("train_gen.pipeline_sample", ["--pipeline", "p", "--class-labels", "1", "--cfg-scale", "nan"], "--cfg-scale"),
    ("train_gen.pipeline_sample", ["--pipeline", "p", "--class-labels", "-2"], "--class-labels"),
    ("train_gen.pipeline_sample", ["--pipeline", "p", "--class-labels", "1", "--seed", "-1"], "--seed"),
    ("train_gen.pipeline_sample", ["--pipeline", "p", "--class-labels", "1", "--num-inference-steps", "0"],
     "--num-sampling-steps"),
    ("train_gen.export_pipeline", ["--ckpt", "x.pt", "--out", "o", "--guidance-scale", "inf"], "--cfg-scale"),
    ("train_gen.export_pipeline", ["--ckpt", "x.pt", "--out", "o", "--num-sampling-steps", "0"],
     "--num-sampling-steps"),
    ("train_gen.evaluate", ["--sample-batch", "s.npz", "--ref-batch", "r.npz", "--forward-batch", "0"],
     "--forward-batch"),
    ("train_gen.plot", ["run", "--smooth", "1"], "--smooth"),
    ("train_gen.plot", ["run", "--smooth", "nan"], "--smooth"),
    ("train_gen.plot", ["run", "--dpi", "5"], "--dpi"),
    ("train_gen.demo", ["--lr", "0"], "--lr"),
    ("train_gen.demo", ["--lr", "nan"], "--lr"),
    ("train_gen.demo", ["--ema-decay", "1.5"], "--ema-decay"),
    ("train_gen.demo", ["--cfg-scale", "inf"], "--cfg-scale"),
    ("train_gen.demo", ["--min-accuracy", "2"], "--min-accuracy"),
    ("evaluations.make_reference", ["--data-path", "d", "--out", "o.npz", "--image-size", "8", "--seed", "-1"],
     "--seed"),
    ("evaluations.make_reference", ["--data-path", "d", "--out", "o.npz", "--image-size", "0"], "--image-size"),
    ("benchmarks.bench_model", ["--cfg-scale", "nan"], "--cfg-scale"),
    ("benchmarks.bench_model", ["--peak-tflops", "0"], "--peak-tflops"),
    ("benchmarks.bench_model", ["--seed", "-1"], "--seed"),
    ("benchmarks.gpu_suite", ["--budget-s", "0"], "--budget-s"),
    ("benchmarks.gpu_suite", ["--budget-s", "inf"], "--budget-s"),
    ("benchmarks.gpu_suite", ["--repeats", "0"], "--repeats"),
    ("benchmarks.sampler_quality", ["--ckpt", "c", "--ref-batch", "r", "--out-dir", "o", "--samplers", "ddim:2",
                                    "--cfg-scale", "nan"], "--cfg-scale"),
    ("benchmarks.sampler_quality", ["--ckpt", "c", "--ref-batch", "r", "--out-dir", "o", "--samplers", "ddim:2",
                                    "--seed", str(2**64)], "--seed"),
    ("benchmarks.sampler_quality", ["--ckpt", "c", "--ref-batch", "r", "--out-dir", "o", "--samplers", "ddim:2",
                                    "--timing-rounds", "-1"], "--timing-rounds"),
]


@pytest.mark.parametrize("module,argv,flag", PROGRAM_CASES,
                         ids=[f"{m} {' '.join(a[-2:])}" for m, a, _ in PROGRAM_CASES])
def test_program_flags_out_of_range(module, argv, flag, capsys):
    refused_by_argparse(importlib.import_module(module).main, argv, flag, capsys)


@pytest.mark.parametrize("values,flag", [(["--eval-cfg-scale", "nan"], "--eval-cfg-scale"),
                                         (["--eval-cfg-scale", "-2"], "--eval-cfg-scale"),
                                         (["--eval-seed", "-1"], "--eval-seed"),
                                         (["--eval-seed", str(2**64)], "--eval-seed"),
                                         (["--eval-steps", "0"], "--eval-steps")])
def test_evaluation_during_training_flags_out_of_range(values, flag, capsys):
    p = argparse.ArgumentParser()
    add_eval_args(p)
    refused_by_argparse(p.parse_args, values, flag, capsys)


def test_values_inside_the_ranges_are_taken():
    p = argparse.ArgumentParser()
    add_sampler_args(p)
    args = p.parse_args(["--cfg-scale", "0", "--ddim-eta", "1", "--guidance-interval", "0.3", "0.3", "--atol", "1e-9",
                         "--forward-batch", "0"])
    assert (args.cfg_scale, args.ddim_eta, args.guidance_interval, args.atol, args.forward_batch) == (
        0.0, 1.0, (0.3, 0.3), 1e-9, 0)
    assert p.parse_args(["--cfg-scale", str(CFG_SCALE_MAX)]).cfg_scale == CFG_SCALE_MAX
    args = sample_ddp.build_parser().parse_args(["--ckpt", "c", "--seed", str(2**32 - 1)])
    assert args.seed == 2**32 - 1


def test_help_states_the_guidance_range(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"in [0, {CFG_SCALE_MAX:g}]: 1 = no guidance" in text and "0 = the unconditional model" in text
    assert "0 <= LO <= HI <= 1" in text


# ------------------------------------------------------------------------------ ranges from the checkpoint
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranges")
    return {"diffusion": make_checkpoint(root / "diff.pt", "diffusion"),
            "flow": make_checkpoint(root / "flow.pt", "flow", seed=1)}


def settings_for(ckpt, *flags):
    p = argparse.ArgumentParser()
    add_sampler_args(p)
    return SamplerSettings.from_args(p.parse_args([str(f) for f in flags]), load_setup(ckpt))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "unipc", "diffusers:DDPMScheduler"])
def test_diffusion_samplers_take_at_most_the_training_steps(ckpts, sampler):
    assert settings_for(ckpts["diffusion"], "--sampler", sampler, "--num-sampling-steps", 1000).num_steps == 1000
    with pytest.raises(UserError, match="--num-sampling-steps 1001 exceeds the checkpoint's 1000 diffusion steps"):
        settings_for(ckpts["diffusion"], "--sampler", sampler, "--num-sampling-steps", 1001)


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde", "dopri5"])
def test_flow_samplers_take_any_positive_step_count(ckpts, sampler):
    assert settings_for(ckpts["flow"], "--sampler", sampler, "--num-sampling-steps", 5000).num_steps == 5000


def test_settings_from_a_namespace_are_checked_too(ckpts):
    """SamplerSettings.from_args also refuses values that did not come through argparse."""
    p = argparse.ArgumentParser()
    add_sampler_args(p)
    setup = load_setup(ckpts["diffusion"])
    for field, value, needle in (("cfg_scale", math.nan, "--cfg-scale"), ("cfg_scale", -1.0, "--cfg-scale"),
                                 ("ddim_eta", math.inf, "--ddim-eta"), ("guidance_interval", (0.9, 0.1), "interval")):
        args = p.parse_args([])
        setattr(args, field, value)
        with pytest.raises(UserError, match=needle):
            SamplerSettings.from_args(args, setup)


def run_script(script, *argv):
    proc = subprocess.run([sys.executable, str(script), *map(str, argv)], capture_output=True, text=True,
                          timeout=180)
    return proc.returncode, proc.stderr.strip().splitlines()


def test_known_garbage_exits_2_with_one_line_before_writing(ckpts, tmp_path):
    """Before: --ddim-eta nan wrote an all-black archive with exit 0; 5000 DDPM steps crashed with a traceback."""
    out = tmp_path / "s"
    common = ["--ckpt", ckpts["diffusion"], "--sample-dir", out, "--num-fid-samples", 2]
    rc, lines = run_script(sample_ddp.__file__, *common, "--sampler", "ddim", "--ddim-eta", "nan")
    assert rc == 2 and "argument --ddim-eta" in lines[-1] and "Traceback" not in "\n".join(lines)
    rc, lines = run_script(sample_ddp.__file__, *common, "--sampler", "ddpm", "--num-sampling-steps", 5000)
    assert rc == 2 and lines == ["error: --num-sampling-steps 5000 exceeds the checkpoint's 1000 diffusion steps; "
                                 "a diffusion sampler takes at most 1000"], lines
    assert not out.exists() or not any(out.rglob("*.np*")) and not any(out.rglob("*.png"))


def test_class_labels_beyond_the_checkpoint(ckpts, tmp_path):
    with pytest.raises(UserError, match=r"--class-labels 10 out of range: .* has classes 0\.\.9"):
        sample.main(["--ckpt", str(ckpts["diffusion"]), "--class-labels", "3", "10", "--num-sampling-steps", "2",
                     "--out", str(tmp_path / "g.png")])
    assert not (tmp_path / "g.png").exists()


def test_pipeline_steps_and_labels_beyond_the_network(ckpts, tmp_path):
    from train_gen import export_pipeline  # deferred: only this test exports a pipeline

    with pytest.raises(UserError, match="--num-sampling-steps 1001 exceeds the checkpoint's 1000"):
        export_pipeline.main(["--ckpt", str(ckpts["diffusion"]), "--out", str(tmp_path / "p"),
                              "--num-sampling-steps", "1001"])
    assert not (tmp_path / "p").exists()
    export_pipeline.main(["--ckpt", str(ckpts["diffusion"]), "--out", str(tmp_path / "p")])
    base = ["--pipeline", str(tmp_path / "p"), "--out", str(tmp_path / "g.png")]
    with pytest.raises(UserError, match="--num-sampling-steps 5000 exceeds the network's 1000 diffusion steps"):
        pipeline_sample.main([*base, "--class-labels", "1", "--num-sampling-steps", "5000"])
    with pytest.raises(UserError, match="out of range 0..9"):
        pipeline_sample.main([*base, "--class-labels", "10"])
    assert not (tmp_path / "g.png").exists()
    pipeline_sample.main([*base, "--class-labels", "1", "--num-sampling-steps", "2", "--cfg-scale", "0"])
    assert np.asarray(Image.open(tmp_path / "g.png")).std() > 0  # a real picture
