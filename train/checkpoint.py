"""Committed checkpoints: a checkpoint counts only once its commit record is durably in place (docs/operations.md:
the Trainer never fsyncs and resumes from the highest-numbered folder without looking inside). Only the checkpoint
this process was writing when it failed is deleted (remove_partial): known to be incomplete, and keeping it would
keep the disk full; any other bad one is evidence, moved to <run>/rejected/.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from core.files import atomic_write_json, differences, fsync_dir, now, record_files
from core.paths import what_is

log = logging.getLogger(__name__)

COMMIT_FILE = "COMMITTED.json"
RECORD_FORMAT = 1

# What a resume reads: the adapter (peft load_adapter, safetensors only), optimizer and scheduler
# (Trainer._load_optimizer_and_scheduler), the step and log history (TrainerState.load_from_json) and
# the RNG states (Trainer._load_rng_state). A checkpoint without any of them cannot resume exactly.
REQUIRED_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be committed or resumed from; the message names the file."""


def rng_files(world_size: int) -> list[str]:
    """Trainer._save_rng_state's files: one per process when distributed."""
    return ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{i}.pth" for i in range(world_size)]


def step_of(folder: Path) -> int | None:
    prefix, _, number = folder.name.partition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def checkpoint_dirs(checkpoints: Path) -> list[Path]:
    """Oldest step first."""
    found = [p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def commit_checkpoint(
    folder: Path, identity: dict[str, Any], world_size: int = 1, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Make checkpoint folder durable and write its commit record; return the record."""
    step = step_of(folder)
    missing = [n for n in (*REQUIRED_FILES, *rng_files(world_size)) if not (folder / n).is_file()]
    if step is None or missing:
        raise CheckpointError(
            f"{folder}: cannot commit: {', '.join(missing) or 'not a checkpoint-N folder'} "
            f"missing after the Trainer's save (save_only_model must stay off)"
        )
    files = record_files(folder, fsync=True, skip=lambda p: p.name == COMMIT_FILE or p.name.endswith(".tmp"))
    for sub in {folder, *(p for p in folder.rglob("*") if p.is_dir())}:
        fsync_dir(sub)
    record = {
        "format": RECORD_FORMAT,
        "step": step,
        "committed_at": now(),
        "identity": identity,
        **(extra or {}),
        "files": files,
    }
    atomic_write_json(folder / COMMIT_FILE, record)  # tmp + fsync + rename + fsync(folder)
    fsync_dir(folder.parent)  # the checkpoint-N entry itself
    return record


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / COMMIT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def verify_checkpoint(folder: Path, world_size: int = 1) -> list[str]:
    """Problems that make folder unusable for resuming; empty when every committed file matches."""
    if not (folder / COMMIT_FILE).is_file():
        return [
            f"{folder / COMMIT_FILE}: missing: the save never completed (the process was killed or "
            f"failed while writing)"
        ]
    record = read_record(folder)
    if record is None:
        return [f"{folder / COMMIT_FILE}: unreadable commit record"]
    problems = [
        f"{folder / name}: {'RNG state' if name.startswith('rng_state') else 'required file'} not in the commit "
        "record: the run could not resume exactly"
        for name in (*REQUIRED_FILES, *rng_files(world_size))
        if name not in record["files"]
    ]
    problems += differences(record["files"], folder, "the commit record")
    if not problems:
        state = json.loads((folder / "trainer_state.json").read_text())
        if not (state.get("global_step") == record.get("step") == step_of(folder)):
            problems.append(
                f"{folder / 'trainer_state.json'}: global_step {state.get('global_step')} does not "
                f"match the folder and commit record (step {record.get('step')})"
            )
    return problems


def identity_mismatches(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    labels = {
        "base_model": "base model",
        "base_revision": "base model revision",
        "data_fingerprint": "training data fingerprint (the tokenized examples)",
        "lora": "LoRA shape",
    }
    return [
        f"{label}: checkpoint has {recorded.get(key)!r}, this run has {current.get(key)!r}"
        for key, label in labels.items()
        if recorded.get(key) != current.get(key)
    ]


def reject(folder: Path, why: str) -> Path:
    """Out of every resume's way, kept as evidence."""
    dest_dir = folder.parent.parent / "rejected"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / folder.name
    n = 1
    while dest.exists():
        dest, n = dest_dir / f"{folder.name}.{n}", n + 1
    folder.rename(dest)
    log.warning(f"warning: skipping {folder.name}: {why}; moved to {dest}")
    return dest


def check_explicit(folder: Path, world_size: int = 1) -> None:
    """--resume-from's checkpoint must verify."""
    if not folder.is_dir():
        committed = [c.name for c in checkpoint_dirs(folder.parent) if (c / COMMIT_FILE).is_file()]
        raise CheckpointError(
            f"--resume-from {folder}: is {what_is(folder)}; this run's committed checkpoints: "
            f"{', '.join(committed) or 'none'}"
        )
    if step_of(folder) is None:
        raise CheckpointError(f"--resume-from {folder}: not a checkpoint-N folder")
    problems = verify_checkpoint(folder, world_size)
    if problems:
        raise CheckpointError(
            f"cannot resume from {folder}:\n  "
            + "\n  ".join(problems)
            + "\n  fix: resume from another checkpoint, leave out --resume-from to take the "
            "newest good one, or --fresh"
        )


def apply_retention(checkpoints: Path, keep_last: int | None) -> list[Path]:
    """Delete committed checkpoints beyond the newest keep_last (>= 1: the newest, which a resume needs, stays),
    keeping the best by eval loss too. Uncommitted folders are left alone here; resume moves them to rejected/."""
    if keep_last is None:
        return []
    committed = [(c, r) for c in checkpoint_dirs(checkpoints) if (r := read_record(c)) is not None]
    keep = {c for c, _ in committed[-keep_last:]}
    evaluated = [(r["eval_loss"], step_of(c), c) for c, r in committed if r.get("eval_loss") is not None]
    if evaluated:
        keep.add(min(evaluated)[2])
    removed = [c for c, _ in committed if c not in keep]
    for folder in removed:
        # The record goes first: a kill in the middle of rmtree leaves an uncommitted folder, never
        # a committed one with files missing.
        (folder / COMMIT_FILE).unlink()
        shutil.rmtree(folder)
    if removed:
        log.info(f"retention: removed {', '.join(p.name for p in removed)} (training.save_total_limit={keep_last})")
    return removed


def remove_partial(checkpoints: Path, step: int) -> Path | None:
    """Remove checkpoint-<step> if this process left it uncommitted (a save that failed midway)."""
    folder = checkpoints / f"checkpoint-{step}"
    if folder.is_dir() and not (folder / COMMIT_FILE).is_file():
        shutil.rmtree(folder, ignore_errors=True)
        return folder
    return None


def newest_committed(checkpoints: Path) -> Path | None:
    committed = [c for c in checkpoint_dirs(checkpoints) if (c / COMMIT_FILE).is_file()]
    return committed[-1] if committed else None


def holds_last_step(folder: Path) -> bool:
    """Whether the checkpoint is the run's last step. Trainer.train resumed from it would run one step past
    the end (transformers 5.24 _run_epoch takes a step before its stop check), so the run loads it instead."""
    state = json.loads((folder / "trainer_state.json").read_text())
    return state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"]
