"""Starting or continuing a run folder: --fresh, the config and identity checks, and the checkpoint to resume from."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from core.config import RESUME, Config, changed_keys, load_config, to_yaml
from core.errors import RunError
from core.files import atomic_write_text
from core.runfolder import RunFolder
from train import distributed
from train.callbacks import trim_metrics
from train.checkpoint import (
    CheckpointError,
    check_explicit,
    checkpoint_dirs,
    identity_mismatches,
    newest_committed,
    read_record,
    reject,
    step_of,
    verify_checkpoint,
)

log = logging.getLogger(__name__)


def _fix(folder: RunFolder, cfg: Config) -> str:
    return (
        f"  fix: pass --fresh to discard {folder.root} and start over, or keep it and use another "
        f"run_name (e.g. run_name={cfg.run_name}-2)"
    )


def _explicit_checkpoint(folder: RunFolder, resume_from: Path, world_size: int) -> Path:
    resume_from = resume_from.resolve()
    if resume_from.parent != folder.checkpoints.resolve():
        raise RunError(
            f"--resume-from {resume_from}: not a checkpoint of this run (expected {folder.checkpoints}/checkpoint-N)"
        )
    try:
        check_explicit(resume_from, world_size)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    return resume_from


def _check_world_size(folder: RunFolder, cfg: Config, checkpoint: Path | None, world_size: int) -> None:
    """A checkpoint resumes only under as many processes as wrote it: the global batch (processes x per-device
    batch x accumulation) and each rank's data shard and RNG state depend on it. Without this check the
    checkpoints would fail to verify (RNG files missing) and be moved aside, and training would start over."""
    # How many processes wrote it: one RNG state file each (train.checkpoint.rng_files).
    files = (read_record(checkpoint) or {}).get("files", {}) if checkpoint is not None else {}
    ranks = [n for n in files if n.startswith("rng_state_") and n.endswith(".pth")]
    wrote = 1 if "rng_state.pth" in files else len(ranks)
    if not wrote or wrote == world_size:
        return
    launch = "python -m train" if wrote == 1 else f"torchrun --nproc-per-node {wrote} -m train"
    raise RunError(
        f"{checkpoint} was trained by {wrote} process(es) and this run has {world_size}: resuming would change "
        f"the global batch.\n  fix: resume with the same launch ({launch} --config ...), or\n" + _fix(folder, cfg)
    )


@dataclass
class ResumePlan:
    """What a run would resume from, and the checkpoints it would set aside (moved to rejected/, with why)."""

    checkpoint: Path | None
    set_aside: list[tuple[Path, str]] = field(default_factory=list)

    def describe(self) -> str:
        step = f"resume from {self.checkpoint.name}" if self.checkpoint else "train from step 0"
        aside = [f"\n    would set aside {p.name}: {why}" for p, why in self.set_aside]
        return step + "".join(aside)


def plan_resume(
    folder: RunFolder, cfg: Config, fresh: bool, identity: dict, resume_from: Path | None = None
) -> ResumePlan:
    """What prepare_run_folder would do, changing nothing: RunError when resuming would be refused (a config key
    that shapes the weights, core.config.RESUME, or the identity of what is trained: base model and revision, data
    fingerprint, LoRA shape, differs from the run's; another number of processes)."""
    if fresh:
        return ResumePlan(None)
    # A run that never committed a checkpoint has nothing a changed config could corrupt (it failed before its
    # first save, e.g. on a setting the dry run now catches): it starts over with the corrected config.
    if folder.config.is_file() and newest_committed(folder.checkpoints) is not None:
        changed = changed_keys(load_config(folder.config), cfg, RESUME)
        if changed:
            raise RunError(
                f"{folder.root} holds an unfinished run started with a different config; resuming it "
                f"with these changes is unsafe:\n    " + "\n    ".join(changed) + "\n" + _fix(folder, cfg)
            )
    world_size = distributed.world().size
    plan = ResumePlan(None)
    if resume_from is not None:
        _check_world_size(folder, cfg, resume_from.resolve(), world_size)
        plan.checkpoint = _explicit_checkpoint(folder, resume_from, world_size)
        later = [c for c in checkpoint_dirs(folder.checkpoints) if (step_of(c) or 0) > (step_of(plan.checkpoint) or 0)]
        plan.set_aside = [(c, f"newer than the requested --resume-from {plan.checkpoint.name}") for c in later]
    else:
        _check_world_size(folder, cfg, newest_committed(folder.checkpoints), world_size)
        for checkpoint in reversed(checkpoint_dirs(folder.checkpoints)):  # the newest that verifies
            problems = verify_checkpoint(checkpoint, world_size)
            if not problems:
                plan.checkpoint = checkpoint
                break
            plan.set_aside.append((checkpoint, "; ".join(problems)))
    if plan.checkpoint is not None:
        record = read_record(plan.checkpoint) or {}  # a chosen checkpoint has verified, so its record is readable
        mismatches = identity_mismatches(record.get("identity", {}), identity)
        if mismatches:
            raise RunError(
                f"{plan.checkpoint} cannot be resumed by this run: what it was trained on "
                f"has changed:\n    " + "\n    ".join(mismatches) + "\n" + _fix(folder, cfg)
            )
    return plan


def prepare_run_folder(
    folder: RunFolder, cfg: Config, fresh: bool, identity: dict, resume_from: Path | None = None
) -> Path | None:
    """Create or reuse the run folder as plan_resume says; return the verified checkpoint to resume from, if any."""
    if fresh:
        # The manifest goes first: from here until training ends, nothing in this folder vouches for an adapter,
        # so `python -m convert export` refuses the one an earlier run published (convert.export.vouched_adapter).
        folder.manifest.unlink(missing_ok=True)
        for p in folder.root.iterdir() if folder.root.exists() else []:
            if p != folder.lock_file:  # the lock this process holds
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    plan = plan_resume(folder, cfg, False, identity, resume_from)
    for checkpoint, why in plan.set_aside:  # never resumed from by accident later; kept, not deleted
        reject(checkpoint, why)
    trim_metrics(folder.metrics, (step_of(plan.checkpoint) or 0) if plan.checkpoint else 0)
    folder.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.config, to_yaml(cfg))
    return plan.checkpoint
