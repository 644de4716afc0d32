"""train/distributed.py and the callbacks' all-reduced decisions, on two real gloo processes (no model, no CLI).

The CLI tests (tests/cli/test_distributed.py) cover a signal to one rank end to end; a non-finite loss on one rank
only is hard to provoke there, so the guard's verdict is checked here with the real collectives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp
from transformers import TrainerControl, TrainerState

from core import signals
from core.errors import NonFiniteLoss, Preempted, RunError
from train import distributed
from train.callbacks import NonFiniteGuard, StopOnSignal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    """One of two ranks: every decision this module makes, recorded to <out>/<rank>.json."""
    torch.set_num_threads(1)  # a forked child: no OpenMP team inherited from the parent's (DataLoader workers do it)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    assert distributed.init(cuda=False).distributed
    got: dict = {
        "flag_any": distributed.all_reduce_flag(rank == 1),
        "flag_none": distributed.all_reduce_flag(False),
        "max": distributed.all_reduce_max(15 if rank == 1 else 0),
        "broadcast": distributed.broadcast(f"from {rank}"),
        "on_main": distributed.on_main(lambda: f"ran on {rank}"),
    }

    def fails() -> None:
        raise RunError("rank 0 cannot go on")

    try:
        distributed.on_main(fails)
    except distributed.FollowsMain as e:
        got["on_main_failure"] = ["follows", e.exit_code]
    except RunError as e:
        got["on_main_failure"] = ["raised", e.exit_code]

    args = SimpleNamespace(output_dir=out)
    state = TrainerState(global_step=3)
    stop, control = StopOnSignal(), TrainerControl()
    with signals.handled(), signals.deferred():  # as train.trainer.fit runs the training loop
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # reaches rank 1 only: pending until the step's end
        stop.on_step_end(args, state, control)
        got["stop_controls"] = [control.should_save, control.should_training_stop, control.should_log]
        try:
            stop.on_train_end(args, state, control)
        except Preempted as e:
            got["preempted"] = e.exit_code

    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    guard = NonFiniteGuard()
    guard.bad_loss = float("nan") if rank == 1 else None  # rank 1's micro-batch had a NaN loss; rank 0's not
    try:
        guard.on_pre_optimizer_step(args, state, control, model=model, optimizer=torch.optim.SGD(model.parameters()))
        got["non_finite"] = None
    except NonFiniteLoss as e:
        got["non_finite"] = [e.step, e.details["loss"]]
    clean = NonFiniteGuard()
    clean.on_pre_optimizer_step(args, state, control, model=model, optimizer=torch.optim.SGD(model.parameters()))
    distributed.barrier()
    Path(out, f"{rank}.json").write_text(json.dumps(got))
    torch.distributed.destroy_process_group()


def test_two_ranks_decide_alike(tmp_path: Path):
    # forked, not spawned: the ranks share this process's imports (transformers' trainer modules: ~6 s each)
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    for got in (r0, r1):
        assert got["flag_any"] is True and got["flag_none"] is False and got["max"] == 15
        assert got["broadcast"] == "from 0" and got["on_main"] == "ran on 0"
        assert got["stop_controls"] == [True, True, True], "a signal to rank 1 stops rank 0 at the same step"
        assert got["preempted"] == 143
        assert got["non_finite"] == [4, "nan" if got is r1 else "finite"], "both stop before the step"
    assert r0["on_main_failure"] == ["raised", 2] and r1["on_main_failure"] == ["follows", 2]


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.init(cuda=False).distributed and distributed.is_main()
    distributed.barrier()
    assert distributed.all_reduce_flag(True) is True and distributed.all_reduce_flag(False) is False
    assert distributed.all_reduce_max(7) == 7 and distributed.broadcast("x") == "x"
    assert distributed.on_main(lambda: 5) == 5
