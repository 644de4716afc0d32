"""One process per run folder and per promotion target, with `fcntl.flock` locks, never stale (docs/operations.md,
"Locking"). A lock file stays: deleting it would let two processes lock two different files of the same name.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from filelock import FileLock, Timeout

from core.errors import LockHeld
from core.files import now


def read_holder(lock_file: Path) -> dict:
    try:
        return json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def _holder_recorded(lock_file: Path, run_name: str) -> Iterator[None]:
    """The lock file names this process while the block runs, and nobody after it (no reader names a holder that has
    gone). Written through a second descriptor: the flock belongs to the locker's, which writes here do not touch."""
    since = now()
    lock_file.write_text(
        json.dumps({"pid": os.getpid(), "run_name": run_name, "host": socket.gethostname(), "since": since})
    )
    try:
        yield
    finally:
        lock_file.write_text("")


@contextmanager
def hold_lock(lock_file: Path, what: str, run_name: str, wait_s: float = 0.0) -> Iterator[None]:
    """An exclusive lock for the block, waiting up to wait_s seconds for another holder before LockHeld names it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file, timeout=wait_s, mode=0o644, poll_interval=0.2)
    try:
        lock.acquire()
    except Timeout:
        raise LockHeld(what, lock_file, read_holder(lock_file)) from None
    try:
        with _holder_recorded(lock_file, run_name):
            yield
    finally:
        lock.release()  # a killed holder's lock is released by the kernel when its descriptor closes


# Promotions are renames that take well under a second; a second exporter of the same target
# waits this long for the first before giving up with LockHeld.
PROMOTION_WAIT_S = 120.0


def promotion_lock(target: Path, run_name: str, wait_s: float = PROMOTION_WAIT_S):
    """The lock of one promotion target (a folder, or a GGUF file stem): <parent>/.locks/<name>.lock, hidden so that
    what ships holds only what a consumer loads, while containers sharing the volume share the lock."""
    return hold_lock(target.parent / ".locks" / f"{target.name}.lock", f"promotion target {target}", run_name, wait_s)


@contextmanager
def publisher_lock(gguf_dir: Path, name: str, run_name: str, exclusive: bool) -> Iterator[None]:
    """Held for a whole run by what will publish `name`: shared by `python -m train` and `convert export` (runs of
    one name may overlap; promotion_lock serializes their publications), exclusive by the nightly job, which gates its
    candidate against the live model and must not have it replaced meanwhile. The other kind gets LockHeld at once.
    flock directly: filelock has no shared lock."""
    path = gguf_dir / ".locks" / f"{name}.publishers.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            shared = "a run that will publish it (python -m train or convert export; its run folder's .lock names it)"
            holder = read_holder(path) or {"who": shared}  # the nightly job records itself; shared holders do not
            raise LockHeld(f"{gguf_dir / name}.gguf (what publishes it)", path, holder) from None
        with _holder_recorded(path, run_name) if exclusive else nullcontext():
            yield
    finally:
        os.close(fd)  # the lock goes with the descriptor (and with the process, however it ends)
