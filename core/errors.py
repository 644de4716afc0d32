"""Errors a user can act on, each carrying the exit status the CLIs return for it (`cli_exit`, the one place that
turns exceptions into statuses). Anything but a PipelineError (or an interrupt) is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from core import signals
from core.signals import Interrupted

log = logging.getLogger(__name__)

EXIT_INVALID = 2
EXIT_VERIFICATION = 3
EXIT_LLAMA_CPP = 4
EXIT_NONFINITE = 5
EXIT_DISK_SPACE = 6
EXIT_LOCKED = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry"
EXIT_SIGINT = 128 + signal.SIGINT
REFUSALS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR)  # OSErrors that are the user's to fix


# The command that continues this process's work, in the hints a stop prints. A CLI names itself
# (set_resume_command); "the same command" is right only where rerunning it verbatim loses nothing.
_resume_command = "the same command"


def set_resume_command(argv: list[str]) -> None:
    """`python -m train` names the command that resumes it: its own, without --fresh (which would discard the
    checkpoints just committed) and without --resume-from (which would set the newer ones aside)."""
    global _resume_command
    kept, args = [], iter(argv)
    for arg in args:
        if arg == "--resume-from":
            next(args, None)  # its value
        elif arg != "--fresh" and not arg.startswith("--resume-from="):
            kept.append(arg)
    _resume_command = "`" + shlex.join(["python", "-m", "train", *kept]) + "`"


def resume_command() -> str:
    return _resume_command


class PipelineError(RuntimeError):
    """Base of every error whose message says what went wrong and how to fix it."""

    exit_code = 1

    def cli_message(self) -> str:
        return f"error: {self}"


class InvalidInput(PipelineError):
    """Config, data, model or paths are not usable as given: nothing was trained or promoted."""

    exit_code = EXIT_INVALID


class ConfigError(InvalidInput, ValueError):
    """A config file or override is invalid; the message lists every problem."""


class ModelNotFoundError(InvalidInput):
    """The configured base model is not in the local cache and may not be downloaded."""


class RunError(InvalidInput):
    """The run cannot proceed as configured; the message says why and what to do."""


class PathError(InvalidInput):
    """A path the user gave is missing, or not the kind of thing expected there (core/paths.py)."""


class DataError(InvalidInput, ValueError):
    """Invalid training data; `problems` holds one `file:line: field: reason` line each."""

    def __init__(self, problems: list[str], hint: str = ""):
        self.problems = problems
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        tail = f"\n  {hint}" if hint else ""
        super().__init__(f"{len(problems)} data problem(s):\n  " + "\n  ".join(shown) + more + tail)


class LlamaCppError(PipelineError):
    """The llama.cpp tooling is missing, mismatched, or a conversion step failed."""

    exit_code = EXIT_LLAMA_CPP


class RunStopped(PipelineError):
    """The run stopped on purpose; the last committed checkpoint is intact and a rerun resumes from it."""


class Preempted(RunStopped):
    """SIGTERM/SIGINT arrived: the step finished and a checkpoint was committed. Exit 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = f"{checkpoint.name} is committed" if checkpoint else "no checkpoint could be committed"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; {where}.\n  to resume: {resume_command()}"
        )

    def cli_message(self) -> str:  # not an error: the run stopped as asked and can resume
        return str(self)


class NonFiniteLoss(RunStopped):
    """A step's loss or gradient norm was NaN/inf; its update was not applied."""

    exit_code = EXIT_NONFINITE

    def __init__(self, step: int, details: dict):
        self.step, self.details = step, details
        super().__init__(
            f"non-finite training signal at step {step}: loss {details['loss']}, gradient norm "
            f"{details['grad_norm']}. The optimizer step was NOT applied; no checkpoint was written for it.\n"
            f"  fix: lower training.learning_rate, check the data around this step, or use bf16 instead of "
            f"fp16; then {resume_command()} resumes from the last committed checkpoint (or add --fresh to start over)"
        )


class DiskSpaceError(RunStopped):
    """Too little free space for what the run will write, or the disk filled up during a save."""

    exit_code = EXIT_DISK_SPACE


class LockHeld(RunStopped):
    """Another process holds the run folder or the promotion target."""

    exit_code = EXIT_LOCKED

    def __init__(self, what: str, lock_file: Path, holder: dict):
        self.holder = holder
        who = holder.get("who", "another process (holder not recorded yet)")
        if holder.get("pid"):
            who = (
                f"pid {holder['pid']} (run '{holder.get('run_name')}' on {holder.get('host')}, "
                f"since {holder.get('since')})"
            )
        super().__init__(
            f"{what} is in use by {who}; lock file {lock_file}.\n"
            f"  fix: wait for it to finish, or stop it (kill {holder.get('pid', '<pid>')}); a stopped or killed "
            f"holder releases the lock at once, nothing needs deleting"
        )


def exit_status(e: BaseException) -> tuple[int, str] | None:
    """(exit status, message) for an error the user can act on, or None for a bug (let it raise)."""
    if isinstance(e, PipelineError):
        return e.exit_code, e.cli_message()
    if isinstance(e, Interrupted):
        return e.exit_code, f"{e}; nothing was published by the unfinished stage. To continue: {resume_command()}"
    if isinstance(e, KeyboardInterrupt):  # SIGINT before the handler was installed
        return EXIT_SIGINT, "interrupted"
    # a file system refusing a path the user gave (permissions, read-only, a file where a folder belongs)
    if isinstance(e, OSError) and e.filename is not None and e.errno in REFUSALS:
        return EXIT_INVALID, (
            f"error: cannot use {e.filename}: {e.strerror}.\n  fix: check the path and its permissions "
            "(the config's paths section, or the file named on the command line)"
        )
    return None


def stdout_gone() -> None:
    """The reader of stdout went away (`... | head`): send the rest to /dev/null, as `python -m json.tool` style
    tools end quietly; without this, the flush at exit prints a BrokenPipeError (Python docs, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def cli_exit(call: Callable[[], object]) -> int:
    """Run a CLI command and return its exit status: the command's own int (0 if none), or the status of an error a
    user can act on, whose message is logged; other errors raise. Native code that calls back into Python can turn the
    signal handler's Interrupted into an unrelated error: any error that escapes after a stop signal is the stop."""
    signals_before = len(signals.received())
    try:
        with signals.handled():
            result = call()
            sys.stdout.flush()
    except BrokenPipeError:
        stdout_gone()
        return 0
    except BaseException as e:
        status = exit_status(e)
        stops = signals.received()
        if status is None and len(stops) > signals_before:
            log.debug("error raised while stopping for a signal", exc_info=e)
            status = exit_status(Interrupted(stops[-1]))
        if status is None:
            raise
        log.error(status[1])
        return status[0]
    return result if isinstance(result, int) else 0
