"""Several processes, one run (torchrun / accelerate launch): rank 0 alone writes, every rank decides alike
(docs/gpu-box.md, "Several GPUs on one machine" and "Several machines").

Our coordination goes through its own gloo process group on the CPU, with a long timeout: rank 0 may export
for many minutes while the others wait at a barrier, far longer than the training group's (NCCL) timeout.
Every helper is a no-op in a single process (WORLD_SIZE unset or 1), so the single-GPU path is unchanged.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from core import signals
from core.errors import RunError, exit_status
from core.files import atomic_write_text

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rank 0 exports (merge, GGUF conversion, quantization, verification) while the others wait: hours, not minutes.
CONTROL_TIMEOUT = timedelta(hours=6)
# The training group's timeout: TrainingArguments.ddp_timeout's default (a collective of the training loop waits this
# long for a rank that does not come).
TRAINING_TIMEOUT = timedelta(minutes=30)
# How long a rank that follows rank 0 out waits for rank 0's process to end before it ends itself.
LEAVE_WAIT_S = 120.0


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    return World(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        size=int(os.environ.get("WORLD_SIZE", "1")),
    )


def is_main() -> bool:
    return world().main


_control: Any = None  # the gloo group of init(); None in one process
_main_at: tuple[str, int] | None = None  # rank 0's host and pid


def init(cuda: bool) -> World:
    """Join the launcher's process group and create the control group. The Trainer (accelerate) finds the group
    initialized and uses it; the replicas' log lines are quietened: rank 0 speaks for the run."""
    global _control, _main_at
    w = world()
    if not w.distributed:
        return w
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TRAINING_TIMEOUT)
    if _control is None:
        _control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        _main_at = broadcast((socket.gethostname(), os.getpid()))
    if not w.main:
        for name in ("core", "train", "convert"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return w


def _group() -> Any:
    """The group our collectives use, or None when this process is alone."""
    if _control is not None:
        return _control
    if world().distributed and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD  # initialized by someone else (a script that built the Trainer itself)
    return None


def _device(group: Any) -> torch.device:
    if group is not _control and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    group = _group()
    if group is not None:
        dist.barrier(group=group)


def all_reduce_max(value: int) -> int:
    """The largest of every rank's value (its own in one process)."""
    group = _group()
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank when it is True on any rank."""
    return all_reduce_max(int(flag)) > 0


def broadcast(obj: T) -> T:
    """Rank 0's obj, on every rank."""
    group = _group()
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group, device=_device(group))
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's obj, in rank order, on every rank ([obj] in one process)."""
    group = _group()
    if group is None:
        return [obj]
    box: list[Any] = [None] * world().size
    dist.all_gather_object(box, obj, group=group)
    return box


class FollowsMain(RunError):
    """A rank other than 0 stops because rank 0 stopped; rank 0 logged why. Exit: rank 0's status."""

    def __init__(self, code: int):
        self.exit_code = code
        super().__init__(f"rank {world().rank}: rank 0 stopped with exit status {code} (its output says why)")


def on_main(fn: Callable[[], T]) -> T:
    """fn() on rank 0 alone, while the others wait; every rank returns rank 0's result. When fn raises on rank 0,
    rank 0 re-raises it and the others raise FollowsMain with its exit status."""
    if _group() is None:
        return fn()
    result: Any = None
    failure: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # every rank must learn of it, then it is re-raised as it was
            failure = e
    code = 0 if failure is None else (exit_status(failure) or (1, ""))[0]  # 1: an unexpected error
    code, result = broadcast((code, result))
    if failure is not None:
        raise failure
    if code:
        raise FollowsMain(code)
    return result


def leave_after_main(e: BaseException) -> NoReturn:
    """End a rank other than 0 that stops with rank 0, after rank 0's process has ended: torchrun SIGTERMs the
    remaining ranks as soon as one exits with a failure, and rank 0 must not be killed while it writes its last
    words. os._exit: no late signal handler can turn it into another status than rank 0's."""
    code, message = exit_status(e) or (1, f"{type(e).__name__}: {e}")
    signals.ignore()
    if _main_at is not None and _main_at[0] == socket.gethostname():
        deadline = time.monotonic() + LEAVE_WAIT_S
        while time.monotonic() < deadline and _alive(_main_at[1]):
            time.sleep(0.05)
    if not isinstance(e, NotShared):  # rank 0 prints the hints; NotShared's fix is for this node's output too
        message = message.splitlines()[0]
    print(f"rank {world().rank}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NotShared(RunError):
    """A rank cannot see the run folder or models/ where rank 0 has them: the nodes do not share that storage."""


def check_shared(places: dict[str, Path]) -> None:
    """Every rank must see rank 0's outputs/ and models/ (`places`: what -> this rank's path of it): rank 0 leaves a
    token file in each place, every rank looks for it at its own path. A new name each time: no stale file, and no
    negative lookup a network file system cached earlier, can answer for it."""
    if _group() is None:
        return
    token, main_host, main_places = on_main(lambda: _leave_token(places))
    missing = [] if is_main() else [what for what, path in places.items() if not _holds(path / token, token)]
    unseen = all_gather((world().rank, socket.gethostname(), [str(places[what].absolute()) for what in missing]))
    if is_main():
        for path in places.values():
            (path / token).unlink(missing_ok=True)
    problems = [f"rank {rank} on host {host} cannot see {' or '.join(paths)}" for rank, host, paths in unseen if paths]
    if problems:
        raise NotShared(
            f"the nodes do not share the run's storage: {'; '.join(problems)} (rank 0 on host {main_host} has "
            f"them: {', '.join(f'{what} {path}' for what, path in main_places.items())})\n"
            "  every rank writes its part of each checkpoint into the run folder and reads the checkpoint it resumes "
            "from; rank 0 promotes the adapter and the exports into models/\n"
            "  fix: put paths.output_dir and paths.models_dir on storage every node mounts at the same path (NFS, "
            'a cluster file system), and start every node with the same config (docs/gpu-box.md, "Several machines")'
        )


def _leave_token(places: dict[str, Path]) -> tuple[str, str, dict[str, str]]:
    """Rank 0: the token file in each place; (token, this host, each place's absolute path)."""
    token = f".shared-{secrets.token_hex(8)}"
    for path in places.values():
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / token, token)  # fsynced and renamed: complete once another node can open it
    return token, socket.gethostname(), {what: str(path.absolute()) for what, path in places.items()}


def _holds(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False


def check_one_process_per_gpu(cuda: bool) -> None:
    """Several visible GPUs in one process would make the Trainer wrap the model in DataParallel (one process
    driving every GPU, slow and not what the memory plan assumes): ask for one process per GPU instead."""
    if not cuda or world().distributed:
        return
    n = torch.cuda.device_count()
    if n > 1:
        raise RunError(
            f"{n} GPUs are visible to a single process.\n"
            f"  fix: launch one process per GPU: torchrun --nproc-per-node {n} -m train --config ... (or accelerate "
            f"launch --config_file configs/accelerate/ddp.yaml -m train --config ...), or train on one GPU with "
            f"CUDA_VISIBLE_DEVICES=0 (docs/gpu-box.md)"
        )
