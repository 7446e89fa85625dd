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
    assert "(default: 32)" in ex["--batch-size"] and "(default: 4)" in ex["--num-workers"]
