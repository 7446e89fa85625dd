"""Command-line helpers shared by every script: boolean flags that parse correctly, and one way to fail.

Scripts raise `UserError` for bad input (missing files, wrong shapes, corrupt checkpoints). `run_main`
turns it into a single readable line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import time
import warnings
from typing import Callable, NoReturn, Optional, Sequence


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


SEED_MAX = 2**32 - 1  # seeds are combined with ranks and steps (DiT: seed * world + rank): keep them small


def _bounds_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    lo_s, hi_s = (f"{v:g}" if isinstance(v, float) else str(v) for v in (lo, hi))
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo_s}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi_s}"
    return "finite"


def float_in(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """argparse `type=` for a finite float in a range (None: unbounded on that side); nan and inf are
    always refused. E.g. `float_in(0, 1)` for an EMA decay, `float_in(0, lo_open=True)` for a learning rate."""
    bounds = _bounds_text(lo, hi, lo_open, hi_open)
    expected = "a finite number" + ("" if bounds == "finite" else f" {bounds}")

    def parse(value: str) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        bad = (not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo))
               or (hi is not None and (v >= hi if hi_open else v > hi)))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return v

    parse.__name__ = f"float {_bounds_text(lo, hi, lo_open, hi_open)}"
    return parse


def int_in(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """argparse `type=` for an integer in [lo, hi] (None: unbounded on that side)."""
    expected = f"an integer {_bounds_text(lo, hi, False, False)}".replace(" finite", "")

    def parse(value: str) -> int:
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return v

    parse.__name__ = f"int {_bounds_text(lo, hi, False, False)}"
    return parse


seed_int = int_in(0, SEED_MAX)  # argparse `type=` of every --seed flag: 0 .. 2**32 - 1
seed_int.__name__ = "seed"


def path_component(value: str) -> str:
    """argparse `type=` for a name that becomes one folder (a run name): no separators, not '.'/'..',
    at most 200 characters (file systems allow 255 bytes, and temp names add a few)."""
    bad = (not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value
           or len(value.encode("utf-8")) > 200)
    if bad:
        raise argparse.ArgumentTypeError(
            f"expected one folder name (no '/', not '.' or '..', at most 200 bytes), got {value[:80]!r}"
            + ("..." if len(value) > 80 else ""))
    return value


def alias_help(text: str, *aliases: str) -> str:
    """Help text of a flag that also answers to older names: they keep working, and --help says so."""
    return f"{text} (alias: {', '.join(aliases)})"


def error_summary(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` (at most `limit` characters), or just `Type` for an empty message:
    for quoting a library's exception in a one-line UserError (some, like EOFError, carry no text)."""
    lines = str(e).strip().splitlines()
    first = lines[0].strip()[:limit] if lines else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def close_progress_bars() -> None:
    """Close every open tqdm bar (each ends its line), so a message printed next starts on a line of its own.
    Looks tqdm up in sys.modules: a program that never drew a bar does not import it."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):  # tqdm's set of live bars
        try:
            bar.close()
        except Exception:  # a bar whose stream is gone: nothing to end
            pass


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr (on a line of its own) and exit with status 2."""
    close_progress_bars()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# errors of the file system that the user fixes (full disk, read-only or foreign folder): one message, exit 2
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}
INTERRUPTED_STATUS = 130  # the shell's status for a program stopped by Ctrl-C (128 + SIGINT)


def storage_error_message(e: OSError) -> Optional[str]:
    """One line for an OSError the user fixes (STORAGE_ERRNOS), None for any other. Files are written
    atomically (fcdm_common/io.py), so the message can promise that finished files were kept."""
    what = STORAGE_ERRNOS.get(e.errno)
    if what is None:
        return None
    target = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write{target}: {what}; files already finished (checkpoints, shards, archives) were kept "
                "and no half-written file replaced one: free some space and rerun the same command")
    return f"cannot write{target}: {what}; choose a folder you can write to, or fix its permissions"


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's `main(argv)`, mapping `UserError` and storage errors (full disk, read-only folder:
    `storage_error_message`) to one line on stderr and exit status 2, and Ctrl-C to one line and 130.

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
    except OSError as e:
        message = storage_error_message(e)
        if message is None:
            raise
        if "TORCHELASTIC_ERROR_FILE" in os.environ:
            hand_error_to_launcher(message)
        fail(message)
    except KeyboardInterrupt:
        close_progress_bars()
        if os.environ.get("RANK", "0") == "0":  # under torchrun every worker gets Ctrl-C: rank 0 says it
            print("\ninterrupted (Ctrl-C); finished files were kept, rerun the same command to continue",
                  file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_STATUS)


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
