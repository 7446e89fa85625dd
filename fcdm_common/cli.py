"""Command-line helpers shared by every script: boolean flags that parse correctly, and one way to fail.

Scripts raise `UserError` for bad input (missing files, wrong shapes, corrupt checkpoints). `run_main`
turns it into a single readable line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Callable, NoReturn, Sequence


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def str2bool(value: str | bool) -> bool:
    """argparse `type=` for booleans: accepts true/false, 1/0, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("true", "1", "yes", "y", "on", "t"):
        return True
    if v in ("false", "0", "no", "n", "off", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {value!r}")


def positive_int(value: str) -> int:
    """argparse `type=` for integers > 0."""
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return v


def non_negative_int(value: str) -> int:
    """argparse `type=` for integers >= 0."""
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return v


def alias_help(text: str, *aliases: str) -> str:
    """Help text of a flag that also answers to older names: they keep working, and --help says so."""
    return f"{text} (alias: {', '.join(aliases)})"


def error_summary(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` (at most `limit` characters), or just `Type` for an empty message:
    for quoting a library's exception in a one-line UserError (some, like EOFError, carry no text)."""
    lines = str(e).strip().splitlines()
    first = lines[0].strip()[:limit] if lines else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's `main(argv)`, mapping `UserError` to one line on stderr and exit status 2.

    Under torchrun every rank hands it to the launcher, whose failure summary (the last lines of
    the output) then names it next to the worker's exit code 2, and normally only rank 0 prints it
    (`hand_error_to_launcher`). torchrun itself exits with status 1."""
    install_warning_format()
    try:
        main(argv)
    except UserError as e:
        if "TORCHELASTIC_ERROR_FILE" in os.environ:
            hand_error_to_launcher(str(e))
        fail(str(e))


def hand_error_to_launcher(message: str, grace_s: float = 5.0) -> None:
    """Under torchrun (or accelerate's multi-process launch, which is torchrun): write `message` to
    this worker's error file, so the launcher's closing failure summary - the last lines of the
    output - shows it instead of "To enable traceback see ...".

    A rank other than 0 then waits up to `grace_s`: rank 0 normally fails the same way, prints the
    message and exits, and the launcher stops the other workers, so the message is printed once.
    A rank that is still running afterwards (rank 0 did not fail) returns and prints it itself.
    Reads the environment only."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:  # a plain-string message is shown as it is (elastic's ProcessFailure)
            json.dump({"message": f"error: {message}", "timestamp": int(time.time())}, f)
    except OSError:
        return
    if os.environ.get("RANK", "0") != "0":
        time.sleep(grace_s)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}\n"


def install_warning_format() -> None:
    """Print warnings as one `Category: message` line, without the echoed source line below it."""
    warnings.formatwarning = _one_line_warning


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the description and epilog keep their line breaks (commands stay
    copyable), and each option states its default once: "(default: X)" is added unless the help
    text already talks about its default, and never for a default of None or False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        if action.nargs == 0:  # store_true/store_const flags: the default is "off"
            return text
        return text + " (default: %(default)s)"
