"""Ways a run stops on purpose, each with its own exit status (listed in `python -m train --help`).

Every one of them leaves the run folder resumable: the last committed checkpoint is intact and running
the same command again continues from it (docs/operations.md).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_NONFINITE = 5
EXIT_DISK_SPACE = 6
EXIT_LOCKED = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry"


class RunStopped(RuntimeError):
    """The run stopped on purpose; `exit_code` is the process status the CLI returns."""

    exit_code = 1


class Preempted(RunStopped):
    """SIGTERM/SIGINT arrived: the step finished and a checkpoint was committed. Exit 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = f"{checkpoint.name} is committed" if checkpoint else "no checkpoint could be committed"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; {where}.\n  run the same command to resume"
        )


class NonFiniteLoss(RunStopped):
    """A step's loss or gradient norm was NaN/inf; its update was not applied."""

    exit_code = EXIT_NONFINITE

    def __init__(self, step: int, details: dict):
        self.step, self.details = step, details
        super().__init__(
            f"non-finite training signal at step {step}: loss {details['loss']}, gradient norm "
            f"{details['grad_norm']}. The optimizer step was NOT applied; no checkpoint was written for it.\n"
            f"  fix: lower training.learning_rate, check the data around this step, or use bf16 instead of "
            f"fp16; then run the same command to resume from the last committed checkpoint, or --fresh"
        )


class DiskSpaceError(RunStopped):
    """Too little free space for what the run will write, or the disk filled up during a save."""

    exit_code = EXIT_DISK_SPACE


class LockHeld(RunStopped):
    """Another process holds the run folder or the promotion target."""

    exit_code = EXIT_LOCKED

    def __init__(self, what: str, lock_file: Path, holder: dict):
        self.holder = holder
        who = (
            (
                f"pid {holder.get('pid')} (run '{holder.get('run_name')}' on {holder.get('host')}, "
                f"since {holder.get('since')})"
            )
            if holder.get("pid")
            else "another process (holder not recorded yet)"
        )
        super().__init__(
            f"{what} is in use by {who}; lock file {lock_file}.\n"
            f"  fix: wait for it to finish, or stop it (kill {holder.get('pid', '<pid>')}); a stopped or killed "
            f"holder releases the lock at once, nothing needs deleting"
        )


def cli_exit(call: Callable[[], object]) -> int:
    """Run a CLI command and return its exit status: the command's own int (0 if it returns none), or
    the status of an error a user can act on, whose message goes to stderr. Other errors raise."""
    try:
        result = call()
    except BaseException as e:
        status = exit_status(e)
        if status is None:
            raise
        print(status[1], file=sys.stderr)
        return status[0]
    return result if isinstance(result, int) else 0


def exit_status(e: BaseException) -> tuple[int, str] | None:
    """(exit status, message) for an error the user can act on, or None for a bug (let it raise).

    One table for both CLIs (python -m train, python -m convert); the codes are listed in their --help.
    """
    from convert.llamacpp import LlamaCppError
    from convert.verify import VerificationFailed
    from train.config import ConfigError
    from train.data import DataError
    from train.hub import ModelNotFoundError
    from train.run import RunError

    if isinstance(e, Preempted):  # not an error: the run stopped as asked and can resume
        return e.exit_code, str(e)
    if isinstance(e, RunStopped):  # non-finite loss (5), disk space (6), lock held (75)
        return e.exit_code, f"error: {e}"
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C outside the training loop (inside, StopOnSignal handles it)
        return 130, "interrupted"
    if isinstance(e, (ConfigError, DataError, ModelNotFoundError, RunError)):
        return 2, f"error: {e}"
    if isinstance(e, VerificationFailed):
        return 3, f"error: {e}\n  the report is in the run folder (verify.md)"
    if isinstance(e, LlamaCppError):
        return 4, f"error: {e}"
    return None
