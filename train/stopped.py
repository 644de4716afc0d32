"""What a run records when training ends early, so the folder stays resumable and says why it stopped."""

from __future__ import annotations

import contextlib
import signal

from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError

from core.errors import DiskSpaceError, NonFiniteLoss, Preempted, RunError, RunStopped, resume_command
from core.files import human_size
from core.runfolder import Manifest, RunFolder
from core.signals import Interrupted
from train.checkpoint import newest_committed, remove_partial
from train.diskspace import free_bytes, is_disk_full


def _reason(e: BaseException) -> str:
    """Why training stopped, as the manifest says it: the signal's name for a stop that a signal asked for."""
    if isinstance(e, (Preempted, Interrupted)):
        return signal.Signals(e.signum).name
    return "SIGINT" if isinstance(e, KeyboardInterrupt) else type(e).__name__


def training_stopped(e: BaseException, folder: RunFolder, manifest: Manifest, step: int) -> BaseException:
    """Leave the run folder resumable after training ended early; return the exception to raise.

    The checkpoint being written when it failed is removed (uncommitted, so incomplete), the manifest
    records where and why training stopped, and a full disk becomes DiskSpaceError (exit 6).
    """
    disk_full = isinstance(e, Exception) and not isinstance(e, RunStopped) and is_disk_full(e, folder.checkpoints)
    partial = remove_partial(folder.checkpoints, step)
    last = newest_committed(folder.checkpoints)
    manifest.status = "interrupted" if isinstance(e, (Preempted, KeyboardInterrupt)) else "failed"
    manifest.stopped = {
        "after_step": step,
        "reason": "disk full" if disk_full else _reason(e),
        "error": str(e).splitlines()[0] if str(e) else "",
        "last_committed_checkpoint": last.name if last else None,
        "removed_partial_checkpoint": partial.name if partial else None,
        **({"non_finite": e.details} if isinstance(e, NonFiniteLoss) else {}),
    }
    with contextlib.suppress(OSError):  # the disk may still be full; the checkpoints are what matter
        folder.write_manifest(manifest)
    if isinstance(e, (BackendCompilerFailed, InductorError)):
        return _compile_failed(e, last.name if last else None)
    if not disk_full:
        return e
    return DiskSpaceError(
        f"the disk filled up during training after step {step}: {e}\n  "
        + (f"removed the partial {partial}; " if partial else "")
        + (
            f"the last committed checkpoint, {last.name}, is intact and a rerun resumes from it.\n"
            if last
            else "no checkpoint had been committed yet.\n"
        )
        + f"  fix: free space at {folder.root} ({human_size(free_bytes(folder.root))} free now), then "
        f"{resume_command()}"
    )


def _compile_failed(e: BaseException, last: str | None) -> RunError:
    """torch.compile (training.torch_compile) could not build its kernels: an environment problem, not a bug."""
    cause = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return RunError(
        f"torch.compile failed while building the training step's kernels: {cause}\n"
        "  fix: inductor needs a working C/C++ compiler (gcc, g++; the CXX variable names another) and, on CUDA, "
        "Triton; or set training.torch_compile: false to train without compiling (slower). "
        + (f"Then {resume_command()} resumes from {last}." if last else "No checkpoint had been committed yet.")
    )
