"""One process per run folder and per promotion target, with locks the kernel releases.

`fcntl.flock` locks belong to an open file description: when the holder exits, however it exits
(SIGKILL, the OOM killer, a container stopped without grace), the kernel drops the lock. A killed run
therefore never leaves a stale lock behind and nobody has to delete lock files by hand. The lock
file itself stays (deleting it would let two processes lock two different files of the same name);
while held it names its holder (pid, run name, host, start time), only so that the refusal can say who.

flock is advisory and local: it serializes processes that use this code on one machine. Two runs on two
machines sharing a run folder over NFS are not protected (flock over NFS depends on the server); give each
its own run_name or `paths.output_dir`. One run across machines (torchrun --nnodes) shares its run folder on
purpose: rank 0 alone takes its lock (train/distributed.py, docs/gpu-box.md "Several machines").
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from core.errors import LockHeld


def read_holder(lock_file: Path) -> dict:
    try:
        return json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _write_holder(lock_file: Path, holder: dict | None) -> None:
    # A second descriptor: flock belongs to filelock's open file description, writes through another do not touch it.
    fd = os.open(lock_file, os.O_WRONLY | os.O_TRUNC)
    try:
        if holder:
            os.write(fd, json.dumps(holder).encode())
    finally:
        os.close(fd)


@contextmanager
def hold_lock(lock_file: Path, what: str, run_name: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on lock_file for the duration of the block.

    Waits up to wait_s seconds for another holder to finish, then raises LockHeld naming it.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file, timeout=wait_s, mode=0o644, poll_interval=0.2)
    try:
        lock.acquire()
    except Timeout:
        raise LockHeld(what, lock_file, read_holder(lock_file)) from None
    try:
        holder = {
            "pid": os.getpid(),
            "run_name": run_name,
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_holder(lock_file, holder)
        try:
            yield
        finally:
            _write_holder(lock_file, None)  # the next reader must not name a holder that has gone
    finally:
        lock.release()  # a killed holder's lock is released by the kernel when its descriptor closes


# Promotions are renames that take well under a second; a second exporter of the same target
# waits this long for the first before giving up with LockHeld.
PROMOTION_WAIT_S = 120.0


def promotion_lock(target: Path, run_name: str, wait_s: float = PROMOTION_WAIT_S):
    """The lock of one promotion target (a folder, or a GGUF file stem): <parent>/.locks/<name>.lock.

    In a hidden folder of the target's own folder, not beside the artifacts: what ships (models/gguf, a volume
    the application mounts) holds only what a consumer loads, and containers sharing the volume share the lock."""
    return hold_lock(target.parent / ".locks" / f"{target.name}.lock", f"promotion target {target}", run_name, wait_s)


@contextmanager
def publisher_lock(gguf_dir: Path, name: str, run_name: str, exclusive: bool) -> Iterator[None]:
    """Held for a whole run by what will publish `name` (models/gguf/<name>.gguf): shared by `python -m train` and
    `python -m convert export` (runs of one name may overlap; promotion_lock serializes their publications),
    exclusive by the nightly job, which gates its candidate against the live model and must not have it replaced
    meanwhile (rollback and prune change what is live too). The other kind gets LockHeld at once: a nightly job
    started during a manual training of the same name is refused, and the other way round.

    flock directly (filelock has no shared lock); the holder recorded is the exclusive one's."""
    path = gguf_dir / ".locks" / f"{name}.publishers.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            shared = {
                "who": "a run that will publish it (python -m train or convert export; its run folder's .lock names it)"
            }
            holder = read_holder(path) or shared  # the nightly job records itself; shared holders do not
            raise LockHeld(f"{gguf_dir / name}.gguf (what publishes it)", path, holder) from None
        if exclusive:
            _write_holder(
                path,
                {
                    "pid": os.getpid(),
                    "run_name": run_name,
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
        try:
            yield
        finally:
            if exclusive:
                _write_holder(path, None)
    finally:
        os.close(fd)  # the lock goes with the descriptor (and with the process, however it ends)
