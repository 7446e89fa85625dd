"""Command-line helpers shared by every script: boolean flags that parse correctly, and one way to fail.

Scripts raise `UserError` for bad input (missing files, wrong shapes, corrupt checkpoints). `run_main`
turns it into a single readable line on stderr and exit status 2, and the failed collective of a process whose
peer died (`peer_lost_message`) into one line and `PEER_LOST_STATUS`.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import signal
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
PEER_LOST_STATUS = 1  # a collective failed because another process of the run died: the rerun resumes

# What a collective operation raises when another process of the run is gone (lower case; the line quotes the one
# found as the cause).
# gloo's tcp transport raises a plain RuntimeError ("[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer
# [127.0.0.1]:31953 ...", "Read error ...: Connection reset by peer", "Write error ...: Broken pipe"); NCCL and the
# c10d store raise torch.distributed's DistBackendError / DistNetworkError (RuntimeError subclasses: "remote process
# exited or there was a network error", "NCCL communicator was aborted on rank 3"). Matched only in the errors of
# torch.distributed (`_distributed_error`), so an ordinary "connection reset" elsewhere is shown as it is.
PEER_DIED_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
                     "communicator was aborted", "ncclremoteerror")
# a collective that a peer did not join within the process group's timeout: it died, hangs or was stopped (gloo's
# "Timed out waiting 1800000ms for recv operation" and "Application timeout caused pair closure", NCCL's
# "Watchdog caught collective operation timeout"); not the store's timeouts at start-up (a wrong MASTER_ADDR)
PEER_TIMEOUT_MARKERS = ("timed out waiting", "timeout caused pair closure", "collective operation timeout")


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


def _distributed_error(e: BaseException, text: str) -> bool:
    """Is `e` (whose message is `text`, lower case) an error of torch.distributed's communication? Looks torch up
    in sys.modules: a program that never imported it cannot have raised one."""
    dist = sys.modules.get("torch.distributed")
    dist_error = getattr(dist, "DistError", None)
    if isinstance(dist_error, type) and isinstance(e, dist_error):
        return True
    return "gloo" in text or "nccl" in text  # gloo raises plain RuntimeErrors, older torch NCCL's too


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's RANK and WORLD_SIZE, else the process group's while it
    exists (a launcher that exports other variables), else (0, 1)."""
    rank, world = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "")
    if rank.isdigit() and world.isdigit():
        return int(rank), int(world)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def peer_lost_message(e: BaseException, resume_from: str = "the last checkpoint") -> Optional[str]:
    """One line for the failed collective of a multi-process run whose other process died or stopped answering
    (a kill -9, the OOM killer, a crash, a lost node), None for any other error. Without it the surviving processes
    each print torch's traceback ending in "Connection closed by peer ... GLHF!", which reads like a bug of their
    own. The dead rank is named when the run has two processes (then it is the other one); with more, the error
    does not say which (a ring passes the failure on)."""
    if not isinstance(e, RuntimeError):
        return None
    rank, world = _rank_and_world()
    text = str(e).lower()
    if world < 2 or not _distributed_error(e, text):
        return None
    died = next((m for m in PEER_DIED_MARKERS if m in text), None)
    if died is None and not any(m in text for m in PEER_TIMEOUT_MARKERS):
        return None
    peer = f"the process of rank {1 - rank}" if world == 2 else "another process of this run"
    what = f"died ({died})" if died else "stopped answering (the collective timed out: it died or hangs)"
    return f"{peer} {what}, so rank {rank} stops too; rerun the same command to resume from {resume_from}"


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, *,
             resume_from: str = "the last checkpoint") -> None:
    """Run a script's `main(argv)`, mapping `UserError` and storage errors (full disk, read-only folder:
    `storage_error_message`) to one line on stderr and exit status 2, Ctrl-C to one line and 130, and a
    collective that failed because another process died (`peer_lost_message`, which names `resume_from` as
    what the rerun resumes from) to one line on every surviving process and PEER_LOST_STATUS.

    Under torchrun every rank hands a user error to the launcher, whose failure summary (the last lines of
    the output) then names it next to the worker's exit code 2, and normally only rank 0 prints it
    (`hand_error_to_launcher`). torchrun itself exits with status 1."""
    install_warning_format()
    try:
        main(argv)
    except RuntimeError as e:
        message = peer_lost_message(e, resume_from)
        if message is None:
            raise
        # torchrun SIGTERMs the survivors within its monitor interval (0.1 s) of a worker's death: it would cut
        # this exit short, and its summary would report a SIGTERM (a preemption?) instead of this status
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        close_progress_bars()
        print(f"error: {message}", file=sys.stderr, flush=True)  # first: the launcher is stopping the survivors
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # its summary shows it, not "To enable traceback see ..."
            hand_error_to_launcher(message, grace_s=0)  # every survivor says it (each saw the failure)
        sys.exit(PEER_LOST_STATUS)
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
