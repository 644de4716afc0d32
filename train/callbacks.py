"""Small, single-purpose Trainer callbacks (train.trainer.training_callbacks orders them), metrics.jsonl and the
loss-curve picture. Under several ranks only rank 0 writes metrics.jsonl and commits checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from core import signals
from core.errors import NonFiniteLoss, Preempted
from core.files import atomic_write_text, jsonable
from train import distributed
from train.checkpoint import apply_retention, commit_checkpoint, newest_committed

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


class MetricsJsonl(TrainerCallback):
    """One JSON line per logged step, closed at once so that a killed run keeps every line it logged; NaN/inf as the
    strings "nan"/"inf" (JSON has no literal for them), never hidden."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch} | jsonable(logs)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The logged rows; a last line cut short (the process died mid-write) is left out."""
    if not path.is_file():
        return []
    rows = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return rows


def trim_metrics(path: Path, step: int) -> int:
    """Keep only rows up to `step` (the checkpoint a run resumes from): the steps after it are run again, and their
    rows would otherwise appear twice. Return how many were dropped."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(rows) or (path.is_file() and not path.read_text().endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(rows) - len(kept)


def plot_losses(metrics_path: Path, out_path: Path) -> Path | None:
    """loss.png: training loss (and eval loss when present) against the optimizer step."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], float(r["loss"])) for r in rows if "loss" in r]
    evals = [(r["step"], float(r["eval_loss"])) for r in rows if "eval_loss" in r]
    if not train:
        return None
    from matplotlib.figure import Figure  # noqa: PLC0415 (0.5 s of import, for one picture at the end of a run)

    fig = Figure(figsize=(7, 4), dpi=100)  # no pyplot: no global state, no GUI backend to pick
    ax = fig.subplots()
    ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (supervised tokens)")
    ax.set_title(metrics_path.parent.name)
    return save_figure(fig, ax, out_path)


def save_figure(fig: Figure, ax, out: Path) -> Path:
    """Grid, legend and layout, written under a temporary name: a reader never sees half a picture."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format=out.suffix.lstrip(".") or "png")
    os.replace(tmp, out)
    return out


class IntervalsOfThisRun(TrainerCallback):
    """A resumed run logs, evaluates and saves at this run's training.logging_steps, eval_steps and save_steps,
    which may change on resume (core.config: placed). Trainer._init_training_state (transformers 5.24) restores the
    checkpoint's intervals with its trainer_state.json and only warns that they differ."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


class CommitCheckpoints(TrainerCallback):
    """Commit every checkpoint the Trainer saves (train/checkpoint.py), then apply retention: ours, because the
    Trainer's rotation counts folders whether committed or not and could delete the only one a resume can use."""

    def __init__(self, identity: dict[str, Any], keep_last: int | None):
        self.identity, self.keep_last = identity, keep_last
        self.eval_loss: dict[int, float | None] = {}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:  # into the commit record: retention keeps the best finite one
            loss = float(metrics["eval_loss"])
            self.eval_loss[state.global_step] = loss if math.isfinite(loss) else None

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every rank's RNG file is written before rank 0 hashes the folder
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            extra = {"eval_loss": self.eval_loss[state.global_step]} if state.global_step in self.eval_loss else {}
            commit_checkpoint(folder, self.identity, args.world_size, extra)
            apply_retention(folder.parent, self.keep_last)
        distributed.barrier()  # no rank goes on (or stops, naming the newest commit) before the commit is in place


class NonFiniteGuard(TrainerCallback):
    """Stop before the optimizer applies a step whose loss or gradient norm is NaN or inf: Trainer._run_epoch
    (transformers 5.24) clips, then calls on_pre_optimizer_step, then optimizer.step(). The norm is recomputed from
    the clipped gradients (clipping turns a NaN/inf norm into NaN gradients); the loss is read per micro-batch by a
    forward hook. The verdict is all-reduced: a NaN seen by one rank stops every rank before the step."""

    def __init__(self):
        self.bad_loss: float | None = None
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_hook(self._watch_loss)

    def _watch_loss(self, module, inputs, output):
        loss = output.get("loss") if isinstance(output, dict) else None
        if module.training and loss is not None and self.bad_loss is None and not bool(torch.isfinite(loss).all()):
            self.bad_loss = float(loss.detach().float().sum())

    def on_step_begin(self, args, state, control, **kwargs):
        self.bad_loss = None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if not distributed.all_reduce_flag(self.bad_loss is not None or not bool(torch.isfinite(norm))):
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        updates = [int(s["step"]) for s in inner.state.values() if "step" in s]
        trainable = [p for p in model.parameters() if p.requires_grad]
        raise NonFiniteLoss(
            state.global_step + 1,
            {
                "step": state.global_step + 1,
                "loss": "finite" if self.bad_loss is None else str(self.bad_loss),
                "grad_norm": str(float(norm)),
                # Measured here, before optimizer.step(): proof that the bad update was not applied.
                "optimizer_updates_applied": max(updates, default=0),
                "trainable_weights_finite": all(bool(torch.isfinite(p).all()) for p in trainable),
            },
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT (deferred by train.trainer.fit): finish the step in progress, log, save and commit a
    checkpoint, stop, and raise Preempted (docs/operations.md). Keep it last: it raises from on_train_end once the
    others have closed their files. A signal may reach one rank only: what each received is all-reduced at every
    step boundary, so all ranks stop at the same step with the same signal (the highest when they differ)."""

    def __init__(self) -> None:
        self.stopping: int = 0  # by any rank, as of the last step boundary

    def _any_rank_received(self) -> int:
        self.stopping = distributed.all_reduce_max(self.stopping or signals.pending() or 0)
        return self.stopping

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received():
            control.should_log = True  # losses since the last log line would otherwise be lost
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self._any_rank_received():  # arrived during this save: stop right after it
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._any_rank_received():
            signals.take()  # acted on here: Preempted, not Interrupted
            raise Preempted(self.stopping, state.global_step, newest_committed(Path(args.output_dir)))
