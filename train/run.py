"""One run, top to bottom: resolve -> tokenizer -> data -> model -> train -> adapter -> export -> manifest.

Everything a run writes lands in outputs/<run_name>/; finished artifacts are promoted to models/.
A run whose manifest says "complete" is not trained again: the command reports it (see
docs/architecture.md, "Reruns"); `--fresh` discards the run folder and starts over.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from train.artifacts import (
    atomic_replace_dir,
    atomic_write_json,
    atomic_write_text,
    git_commit,
    hash_tree,
    human_size,
    package_versions,
)
from train.config import Config, to_yaml
from train.hub import ResolvedModel, resolve_model

TEMPLATES = Path(__file__).parent / "templates"


class RunError(RuntimeError):
    """The run cannot proceed as configured; the message says why and what to do."""


@dataclass
class RunPaths:
    root: Path
    adapter_out: Path  # models/finetuned/adapters/<run>
    merged_out: Path  # models/finetuned/final_models/<run>

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @classmethod
    def of(cls, cfg: Config) -> RunPaths:
        models = Path(cfg.paths.models_dir)
        return cls(
            Path(cfg.paths.output_dir) / cfg.run_name,
            models / "finetuned" / "adapters" / cfg.run_name,
            models / "finetuned" / "final_models" / cfg.run_name,
        )


# ----------------------------------------------------------------------------- tokenizer and data


def chat_template_text(spec: str) -> str:
    path = Path(spec) if spec.endswith(".jinja") else TEMPLATES / f"{spec}.jinja"
    if not path.is_file():
        known = ", ".join(p.stem for p in TEMPLATES.glob("*.jinja"))
        raise RunError(f"model.chat_template: no template '{spec}' (built-in: {known}; or give a .jinja path)")
    return path.read_text(encoding="utf-8")


def load_tokenizer(base: ResolvedModel, cfg: Config):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base.path), trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.chat_template:
        tok.chat_template = chat_template_text(cfg.model.chat_template)
    if tok.chat_template is None:
        raise RunError(f"{base.path}: the tokenizer has no chat template and model.chat_template is null")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # Gemma's pad (0) differs from eos (1); padding with eos would teach the model never to stop.
        raise RunError(f"tokenizer pad id {tok.pad_token_id} is missing or equals eos {tok.eos_token_id}")
    if "<end_of_turn>" not in tok.get_vocab():
        raise RunError("tokenizer has no <end_of_turn> token: not a Gemma tokenizer")
    tok.padding_side = "right"
    return tok


def load_data(tokenizer, cfg: Config):
    """(train rows, train stats, eval rows, eval stats or None); raises DataError before anything is written."""
    from train.data import heldout_texts, load_datasets

    train, train_stats, evals, eval_stats = load_datasets(tokenizer, cfg.data)
    if cfg.export.enabled and cfg.verify.heldout_files:  # fail now, not after training, on bad held-out data
        heldout_texts(tokenizer, cfg.verify.heldout_files, cfg.data, cfg.verify.max_heldout_records)
    skipped = len(train_stats.skipped) + (len(eval_stats.skipped) if eval_stats else 0)
    if skipped:
        print(
            f"warning: skipping {skipped} invalid record(s) (data.max_invalid_fraction="
            f"{cfg.data.max_invalid_fraction}); each is listed in {RunPaths.of(cfg).root}/skipped_records.jsonl"
        )
    return train, train_stats, evals, eval_stats


# ----------------------------------------------------------------------------- model and trainer


def compute_dtype(cfg: Config):
    import torch

    if cfg.model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.model.dtype)


def build_model(base: ResolvedModel, cfg: Config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    # get_peft_model draws LoRA's A matrices from torch's RNG, and the Trainer seeds only in its
    # __init__, later: without this every process starts from a different adapter.
    set_seed(cfg.training.seed)
    model = AutoModelForCausalLM.from_pretrained(
        str(base.path),
        dtype=compute_dtype(cfg),
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,  # never unpickle weights (a .bin-only model fails here, by design)
    )
    lora = LoraConfig(task_type="CAUSAL_LM", **cfg.lora.model_dump())
    return get_peft_model(model, lora)


def build_trainer(model, tokenizer, train, evals, paths: RunPaths, cfg: Config, identity: dict, say=print):
    import os

    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from train import faults
    from train.callbacks import CommitCheckpoints, MetricsJsonl, NonFiniteGuard, StopOnSignal
    from train.data import collate

    def to_dataset(examples):
        return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(paths.root / "runs")
    t = cfg.training
    args = TrainingArguments(
        output_dir=str(paths.checkpoints),
        **t.model_dump(exclude={"eval_steps", "save_total_limit"}),
        save_total_limit=None,  # retention is CommitCheckpoints' job: it only counts committed checkpoints
        eval_strategy="steps" if evals else "no",
        eval_steps=(t.eval_steps or t.logging_steps) if evals else None,
        bf16=compute_dtype(cfg) == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),
        data_seed=t.seed,
        remove_unused_columns=False,  # our dataset is already input_ids/labels
        logging_nan_inf_filter=False,  # a NaN must show in the logs, never be hidden
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(evals) if evals else None,
        data_collator=partial(collate, pad_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        # InjectFaults (test hooks, env vars only) precedes NonFiniteGuard; StopOnSignal must be last.
        callbacks=[
            *([faults.InjectFaults()] if faults.requested() else []),
            MetricsJsonl(paths.metrics),
            CommitCheckpoints(identity, t.save_total_limit, say),
            NonFiniteGuard(),
            StopOnSignal(),
        ],
    )


# ----------------------------------------------------------------------------- the run


def prepare_run_folder(
    paths: RunPaths, cfg: Config, fresh: bool, identity: dict, resume_from: Path | None = None, say=print
) -> Path | None:
    """Create or reuse the run folder; return the verified checkpoint to resume from, if any.

    Resuming is refused when the config (train.checkpoint.unsafe_config_changes) or the identity of
    what is trained (base model and revision, data fingerprint, LoRA shape) differs from the run's.
    """
    import os

    from train.callbacks import trim_metrics
    from train.checkpoint import (
        CheckpointError,
        check_explicit,
        checkpoint_dirs,
        choose_resume,
        identity_mismatches,
        read_record,
        reject,
        step_of,
        unsafe_config_changes,
    )
    from train.config import load_config

    fix = (
        f"  fix: pass --fresh to discard {paths.root} and start over, or keep it and use another "
        f"run_name (e.g. run_name={cfg.run_name}-2)"
    )
    if fresh:  # everything but the lock this process holds
        for p in paths.root.iterdir() if paths.root.exists() else []:
            if p != paths.lock:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    if paths.config.is_file():
        changed = unsafe_config_changes(load_config(paths.config), cfg)
        if changed:
            raise RunError(
                f"{paths.root} holds an unfinished run started with a different config; resuming it "
                f"with these changes is unsafe:\n    " + "\n    ".join(changed) + "\n" + fix
            )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if resume_from is not None:
        resume_from = resume_from.resolve()
        if resume_from.parent != paths.checkpoints.resolve():
            raise RunError(
                f"--resume-from {resume_from}: not a checkpoint of this run (expected {paths.checkpoints}/checkpoint-N)"
            )
        try:
            check_explicit(resume_from, world_size)
        except CheckpointError as e:
            raise RunError(str(e)) from None
        resume = resume_from
    else:
        resume = choose_resume(paths.checkpoints, world_size, say) if paths.checkpoints.is_dir() else None
    if resume is not None:
        mismatches = identity_mismatches(read_record(resume)["identity"], identity)
        if mismatches:
            raise RunError(
                f"{resume} cannot be resumed by this run: what it was trained on has changed:\n    "
                + "\n    ".join(mismatches)
                + "\n"
                + fix
            )
    if resume_from is not None:  # the abandoned branch must not be picked up by a later automatic resume
        for later in [c for c in checkpoint_dirs(paths.checkpoints) if step_of(c) > step_of(resume_from)]:
            reject(later, f"newer than the requested --resume-from {resume_from.name}", say)
    trim_metrics(paths.metrics, step_of(resume) if resume else 0)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config, to_yaml(cfg))
    return resume


def training_stopped(e: BaseException, paths: RunPaths, manifest: dict, step: int) -> BaseException:
    """Leave the run folder resumable after training ended early; return the exception to raise.

    The checkpoint being written when it failed is removed (uncommitted, so incomplete), the manifest
    records where and why training stopped, and a full disk becomes DiskSpaceError (exit 6).
    """
    import contextlib

    from train.checkpoint import newest_committed, remove_partial
    from train.diskspace import free_bytes, is_disk_full
    from train.stops import DiskSpaceError, NonFiniteLoss, Preempted, RunStopped

    disk_full = isinstance(e, Exception) and not isinstance(e, RunStopped) and is_disk_full(e, paths.checkpoints)
    partial = remove_partial(paths.checkpoints, step)
    last = newest_committed(paths.checkpoints)
    manifest["status"] = "interrupted" if isinstance(e, (Preempted, KeyboardInterrupt)) else "failed"
    manifest["stopped"] = {
        "after_step": step,
        "reason": "disk full" if disk_full else type(e).__name__,
        "error": str(e).splitlines()[0] if str(e) else "",
        "last_committed_checkpoint": last.name if last else None,
        "removed_partial_checkpoint": partial.name if partial else None,
        **({"non_finite": e.details} if isinstance(e, NonFiniteLoss) else {}),
    }
    with contextlib.suppress(OSError):  # the disk may still be full; the checkpoints are what matter
        atomic_write_json(paths.manifest, manifest)
    if not disk_full:
        return e
    return DiskSpaceError(
        f"the disk filled up during training after step {step}: {e}\n  "
        + (f"removed the partial {partial}; " if partial else "")
        + (
            f"the last committed checkpoint, {last.name}, is intact and the next run resumes from it.\n"
            if last
            else "no checkpoint had been committed yet.\n"
        )
        + f"  fix: free space at {paths.root} ({human_size(free_bytes(paths.root))} free now), then run the "
        f"same command"
    )


def run(cfg: Config, *, dry_run: bool = False, fresh: bool = False, resume_from: Path | None = None, say=print) -> dict:
    """Train (or resume), export and verify; return the manifest.

    The run folder's lock (train/locking.py) is held throughout; a second process on the same run
    folder gets LockHeld (exit 75). A dry run writes nothing and takes no lock.
    """
    import os

    from train.locking import hold_lock

    paths = RunPaths.of(cfg)
    if dry_run or os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 holds the lock for all
        return _run(cfg, paths, dry_run=dry_run, fresh=fresh, resume_from=resume_from, say=say)
    with hold_lock(paths.lock, f"run folder {paths.root}", cfg.run_name):
        return _run(cfg, paths, dry_run=False, fresh=fresh, resume_from=resume_from, say=say)


def _run(cfg: Config, paths: RunPaths, *, dry_run: bool, fresh: bool, resume_from: Path | None, say) -> dict:
    from train.data import record_data, show_example
    from train.report import describe_plan, finished_summary, manifest_status, print_summary

    if not fresh and resume_from is None and not dry_run and manifest_status(paths.manifest) == "complete":
        return finished_summary(paths, cfg, say)

    # --- resolve: model, tokenizer, data (everything that can fail fast fails here)
    base = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    tokenizer = load_tokenizer(base, cfg)
    train, train_stats, evals, eval_stats = load_data(tokenizer, cfg)
    if dry_run:
        say(describe_plan(cfg, paths, base, train_stats, eval_stats, show_example(tokenizer, train_stats.sample)))
        return {}

    # --- train
    t0 = time.time()
    # What a checkpoint was trained on; a resume with any of it changed is refused (prepare_run_folder).
    identity = {
        "base_model": base.repo_id or str(base.path),
        "base_revision": base.revision,
        "data_fingerprint": train_stats.fingerprint,
        "lora": cfg.lora.model_dump(mode="json"),
    }
    resume = prepare_run_folder(paths, cfg, fresh, identity, resume_from, say)
    manifest = {
        "status": "training",
        "run_name": cfg.run_name,
        "base_model": {"repo_id": base.repo_id, "revision": base.revision, "path": str(base.path)},
        "data": record_data(paths.root, cfg.data, train_stats, eval_stats),  # + <run>/skipped_records.jsonl
        "packages": package_versions(),
        "git_commit": git_commit(),
    }
    atomic_write_json(paths.manifest, manifest)
    say(
        f"training {cfg.run_name}: {train_stats.records} records, {len(train)} rows, {train_stats.tokens} tokens "
        f"({train_stats.supervised_tokens} supervised) on {base.repo_id or base.path}"
        + (f", resuming from {resume.name}" if resume else "")
    )
    model = build_model(base, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    say(f"LoRA r={cfg.lora.r}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    from train.checkpoint import holds_last_step, step_of
    from train.diskspace import preflight

    disk = preflight(cfg, paths, base.path, model, len(train), bool(evals))
    if disk:
        say(disk)
    trainer = build_trainer(model, tokenizer, train, evals, paths, cfg, identity, say)
    try:
        if resume is not None and holds_last_step(resume):  # killed after training: load, don't step past it
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            from transformers.trainer_utils import TrainOutput

            say(f"{resume.name} holds the run's last step: nothing left to train")
            set_peft_model_state_dict(model, load_file(resume / "adapter_model.safetensors"))
            result = TrainOutput(step_of(resume), None, {})
        else:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException as e:
        stop = training_stopped(e, paths, manifest, trainer.state.global_step)
        if stop is e:
            raise
        raise stop from e

    # --- adapter: run folder first, then promoted to models/finetuned/adapters/<run>
    from convert.merge import save_tokenizer
    from train.callbacks import plot_losses, read_metrics
    from train.checkpoint import checkpoint_dirs
    from train.locking import promotion_lock

    staged = paths.root / ".adapter.partial"  # written beside, swapped in whole: never a half adapter
    shutil.rmtree(staged, ignore_errors=True)
    trainer.save_model(str(staged))
    save_tokenizer(tokenizer, staged, base.path / "tokenizer.model")
    atomic_replace_dir(staged, paths.adapter)
    shutil.rmtree(staged)
    with promotion_lock(paths.adapter_out, cfg.run_name):
        atomic_replace_dir(paths.adapter, paths.adapter_out)
    plot = plot_losses(paths.metrics, paths.root / "loss.png")
    losses = [float(r["loss"]) for r in read_metrics(paths.metrics) if "loss" in r]
    manifest["training"] = {
        "global_step": result.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "seconds": round(time.time() - t0, 1),
        "resumed_from": resume.name if resume else None,
        "checkpoints": [p.name for p in checkpoint_dirs(paths.checkpoints)],
    }
    manifest["artifacts"] = {
        "adapter": {"path": str(paths.adapter_out), "files": hash_tree(paths.adapter_out)},
        "metrics": str(paths.metrics),
        "loss_plot": str(plot) if plot else None,
    }
    atomic_write_json(paths.manifest, manifest)
    adapter_bytes = sum(f["size"] for f in manifest["artifacts"]["adapter"]["files"].values())
    say(
        f"trained {result.global_step} steps in {manifest['training']['seconds']} s; "
        + (f"loss {losses[0]:.4g} -> {losses[-1]:.4g}; " if losses else "no loss logged; ")
        + f"adapter: {paths.adapter_out} ({human_size(adapter_bytes)})"
    )
    del trainer, model

    # --- export: merge, GGUF, quantize, verify, promote
    if cfg.export.enabled:
        from convert.pipeline import export_run

        manifest["status"] = "exporting"
        atomic_write_json(paths.manifest, manifest)
        manifest = export_run(cfg, paths, base, manifest, say)
    manifest["status"] = "complete"
    manifest["seconds_total"] = round(time.time() - t0, 1)
    atomic_write_json(paths.manifest, manifest)
    print_summary(paths, cfg, manifest, say)
    return manifest
