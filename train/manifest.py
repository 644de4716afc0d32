"""What a run records in its manifest when it starts training and when training ends."""

from __future__ import annotations

from pathlib import Path

from core.config import Config
from core.files import record_files
from core.hub import ResolvedModel
from core.provenance import git_commit, package_versions
from core.runfolder import Manifest, RunFolder
from train.callbacks import plot_losses, read_metrics
from train.checkpoint import checkpoint_dirs
from train.data import PreparedData, record_data


def start_manifest(cfg: Config, folder: RunFolder, base: ResolvedModel, data: PreparedData) -> Manifest:
    manifest = Manifest(
        status="training",
        run_name=cfg.run_name,
        base_model={"repo_id": base.repo_id, "revision": base.revision, "path": str(base.path)},
        data=record_data(folder.root, cfg.data, data.train_stats, data.eval_stats),  # + skipped_records.jsonl
        packages=package_versions(),
        git_commit=git_commit(),
    )
    folder.write_manifest(manifest)
    return manifest


def record_training(
    manifest: Manifest, folder: RunFolder, steps: int, loss: float | None, resume: Path | None, seconds: float
) -> None:
    plot = plot_losses(folder.metrics, folder.root / "loss.png")
    losses = [float(r["loss"]) for r in read_metrics(folder.metrics) if "loss" in r]
    manifest.training = {
        "global_step": steps,
        "train_loss": loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 1),
        "resumed_from": resume.name if resume else None,
        "checkpoints": [p.name for p in checkpoint_dirs(folder.checkpoints)],
    }
    manifest.artifacts = {
        # hashed in the run folder, where the export takes it from (convert.export.vouched_adapter checks it)
        "adapter": {"path": str(folder.adapter_out), "files": record_files(folder.adapter)},
        "metrics": str(folder.metrics),
        "loss_plot": str(plot) if plot else None,
    }
    folder.write_manifest(manifest)
