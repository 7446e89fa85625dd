"""Every program's --help: states each default once, never "(default: None)", keeps its epilog's
line breaks. The programs' main(["--help"]) run in this process (argparse prints and exits 0).

Reference: argparse's own ArgumentDefaultsHelpFormatter, which the checker must reject.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

from fcdm_common.cli import HelpFormatter

REPO = Path(__file__).resolve().parents[1]


def _programs() -> list:
    """Every module with a command line (a `main(argv)` that builds an ArgumentParser), found in the
    source folders, so a new program is checked without anyone remembering to list it."""
    found = []
    for folder in ("train_gen", "preparation", "evaluations", "benchmarks", "models", "diffusion"):
        for path in sorted((REPO / folder).glob("*.py")):
            text = path.read_text()
            if "def main(" in text and "ArgumentParser(" in text:
                found.append(f"{folder}.{path.stem}")
    return found


PROGRAMS = _programs()


def help_text(module: str, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0
    return out.getvalue()


def option_entries(text: str) -> dict:
    """{first flag: its whole help entry with whitespace collapsed}."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line.strip()
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r"\s+", " ", v) for k, v in entries.items()}


def default_problems(text: str) -> list:
    problems = []
    for flag, entry in option_entries(text).items():
        if "(default: None)" in entry:
            problems.append(f"{flag}: (default: None)")
        head, sep, _ = entry.rpartition("(default: ")
        if entry.count("(default") > 1 or sep and re.search(r"\bdefault[: ]", head, re.I):
            problems.append(f"{flag}: default stated twice: {entry}")
    return problems


def test_checker_rejects_argparse_defaults_formatter():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--size", type=int, default=256, help="side in pixels; default 256")
    assert len(default_problems(p.format_help())) == 3
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--size", type=int, default=256, help="side in pixels; default 256")
    p.add_argument("--workers", type=int, default=4, help="reader processes")
    p.add_argument("--flag", action="store_true", help="switch")
    text = p.format_help()
    assert default_problems(text) == [] and "reader processes (default: 4)" in text
    assert "switch (default" not in text


@pytest.mark.parametrize("module", PROGRAMS)
def test_help_states_defaults_once(module, monkeypatch):
    assert default_problems(help_text(module, monkeypatch)) == []


def test_specific_help_texts(monkeypatch):
    ev = help_text("train_gen.evaluate", monkeypatch)
    assert "(default: tf)" in option_entries(ev)["--backend"]
    assert "    python train_gen/evaluate.py --sample-batch samples.npz \\\n" in ev  # epilog keeps its lines
    ex = option_entries(help_text("preparation.extract_features", monkeypatch))
    assert "(default: 32)" in ex["--per-proc-batch-size"] and "(default: 4)" in ex["--num-workers"]


@pytest.mark.parametrize("module", PROGRAMS)
def test_aliases_are_marked(module, monkeypatch):
    """A flag with more than one name shows its older names as aliases in --help."""
    for line in help_text(module, monkeypatch).splitlines():
        names = re.findall(r"(?:^  |, )(--[\w-]+)", line)
        if len(names) > 1:
            entry = next(v for k, v in option_entries(help_text(module, monkeypatch)).items() if k == names[0])
            marked = entry.replace("- ", "-").split("(alias:")  # help lines may wrap at a hyphen
            assert len(marked) > 1 and all(n in marked[-1] for n in names[1:]), entry


# (program, canonical flag, its older names, a value): both spellings set the same option
ALIASES = [
    ("train_gen.train", "--per-proc-batch-size", ["--batch-per-gpu"], "8"),
    ("train_gen.sample_ddp", "--seed", ["--global-seed"], "3"),
    ("preparation.extract_features", "--zarr-path", ["--features-path"], "out.zarr"),
    ("preparation.extract_features", "--per-proc-batch-size", ["--batch-size"], "16"),
    ("train_gen.evaluate", "--forward-batch", ["--batch-size"], "32"),
    ("train_gen.pipeline_sample", "--cfg-scale", ["--guidance-scale"], "2.5"),
    ("train_gen.pipeline_sample", "--num-sampling-steps", ["--num-inference-steps"], "7"),
    ("train_gen.pipeline_sample", "--sampler", ["--scheduler"], "unipc"),
    ("train_gen.export_pipeline", "--sampler", ["--scheduler"], "unipc"),
]
REQUIRED = {"train_gen.train": [], "train_gen.sample_ddp": ["--ckpt", "c.pt"],
            "preparation.extract_features": ["--data-path", "d", "--zarr-path", "z"],
            "train_gen.evaluate": ["--sample-batch", "s.npz", "--ref-batch", "r.npz"],
            "train_gen.pipeline_sample": ["--pipeline", "p", "--class-labels", "1"],
            "train_gen.export_pipeline": ["--ckpt", "c.pt", "--out", "o"]}


@pytest.mark.parametrize("module,flag,aliases,value", ALIASES)
def test_old_flag_names_still_work(module, flag, aliases, value):
    parser = importlib.import_module(module).build_parser()
    want = vars(parser.parse_args(REQUIRED[module] + [flag, value]))
    for alias in aliases:
        assert vars(parser.parse_args(REQUIRED[module] + [alias, value])) == want
