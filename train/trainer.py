"""The HF Trainer a run fits with, and what it leaves: a resumable folder when it stops, an adapter when it ends."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import TrainOutput

from core import signals
from core.config import Config
from core.errors import DiskSpaceError, NonFiniteLoss, Preempted, RunError, RunStopped, resume_command
from core.files import atomic_replace_dir, human_size
from core.log import on_terminal
from core.runfolder import Manifest, RunFolder
from core.signals import Interrupted
from core.tokenizer import save_tokenizer
from train import distributed
from train.callbacks import CommitCheckpoints, IntervalsOfThisRun, MetricsJsonl, NonFiniteGuard, StopOnSignal
from train.checkpoint import holds_last_step, newest_committed, remove_partial, step_of
from train.data import Example, collate
from train.diskspace import free_bytes, is_disk_full
from train.model import compute_dtype, uses_cuda

log = logging.getLogger(__name__)


def training_callbacks(folder: RunFolder, cfg: Config, identity: dict) -> list[TrainerCallback]:
    """The run's callbacks, in order: NonFiniteGuard sees a step before it is applied; StopOnSignal must be last."""
    return [
        IntervalsOfThisRun(),
        MetricsJsonl(folder.metrics),
        CommitCheckpoints(identity, cfg.training.save_total_limit),
        NonFiniteGuard(),
        StopOnSignal(),
    ]


def _dataset(examples: list[Example]) -> Dataset:
    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})


def training_arguments(cfg: Config, folder: RunFolder, evaluating: bool) -> TrainingArguments:
    """The TrainingArguments of a run; building them validates optim, lr_scheduler_type and report_to (the dry
    run builds them too)."""
    t = cfg.training
    bf16 = compute_dtype(cfg, uses_cuda(cfg)) == torch.bfloat16
    _check_launcher(cfg, bf16)
    # The training section is TrainingArguments' keys (fused_lm_head aside), these set the run's way:
    ours = dict(
        output_dir=str(folder.checkpoints),
        # "layers" is applied to the model (train.model.compile_layers); a mode alone would turn the Trainer's on
        torch_compile=t.torch_compile is True,
        torch_compile_mode=t.torch_compile_mode if t.torch_compile is True else None,
        save_total_limit=None,  # retention is CommitCheckpoints' job: it only counts committed checkpoints
        eval_strategy="steps" if evaluating else "no",
        eval_steps=(t.eval_steps or t.logging_steps) if evaluating else None,
        bf16=bf16,
        use_cpu=not uses_cuda(cfg),
        data_seed=t.seed,
        remove_unused_columns=False,  # our dataset is already input_ids/labels
        logging_nan_inf_filter=False,  # a NaN must show in the logs, never be hidden
        disable_tqdm=not on_terminal(),  # in a file or pipe the Trainer prints each logged step's line instead
        # transformers 5.24's names (gradient_checkpointing* still work, with a FutureWarning on every run)
        activation_checkpointing=bool(t.activation_checkpointing),
        activation_checkpointing_kwargs={"use_reentrant": False, "offload": t.activation_checkpointing == "offload"}
        if t.activation_checkpointing
        else None,
    )
    return TrainingArguments(**(t.model_dump(exclude={"fused_lm_head"}) | ours))


def _check_launcher(cfg: Config, bf16: bool) -> None:
    """What `accelerate launch` passes through the environment and the run cannot honour, refused before anything
    loads (docs/gpu-box.md): TrainingArguments would take its mixed_precision over the run's config when bf16 is
    off (a float32 run silently autocast), and FSDP's sharded checkpoints would fail their first commit."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise RunError(
            "FSDP (accelerate launch with configs/accelerate/fsdp2.yaml) cannot commit checkpoints yet: they are "
            "sharded (pytorch_model_fsdp_0/, optimizer_0/) and train/checkpoint.py verifies adapter_model.safetensors "
            "and optimizer.pt.\n  fix: use configs/accelerate/ddp.yaml (LoRA on Gemma 2 2B fits one GPU per process; "
            "docs/gpu-box.md)"
        )
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    ours = "bf16" if bf16 else "no"
    if asked not in ("no", ours):
        raise RunError(
            f"the launcher asks for mixed_precision {asked} (accelerate config or --mixed_precision), but model.dtype "
            f"{cfg.model.dtype} trains with {'bf16' if bf16 else 'no mixed precision'}.\n"
            f"  fix: set mixed_precision: {ours} in the accelerate config file (configs/accelerate/), or model.dtype"
        )


def static_width(model: PeftModel, cfg: Config) -> int | None:
    """Flex attention recompiles for every new batch shape (docs/gpu-box.md): every batch gets max_seq_length
    columns instead, and compiles once."""
    return cfg.data.max_seq_length if model.config._attn_implementation == "flex_attention" else None


def build_trainer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    evals: list[Example],
    folder: RunFolder,
    cfg: Config,
    identity: dict,
) -> Trainer:
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder.root / "runs")
    return Trainer(
        model=model,
        args=training_arguments(cfg, folder, bool(evals)),
        train_dataset=_dataset(train),
        eval_dataset=_dataset(evals) if evals else None,
        data_collator=partial(collate, pad_id=tokenizer.pad_token_id, width=static_width(model, cfg)),
        processing_class=tokenizer,
        callbacks=training_callbacks(folder, cfg, identity),
    )


def fit(trainer: Trainer, resume: Path | None, folder: RunFolder, manifest: Manifest) -> TrainOutput:
    """Train (or resume) to the end. An early stop leaves the folder resumable (rank 0 records it) and is re-raised
    with its exit code. A stop every rank raises at the same step waits for rank 0's record; any other error is one
    rank's own: it leaves at once and the launcher stops the rest."""
    try:
        if resume is not None and holds_last_step(resume):  # killed after training: load, don't step past it
            log.info(f"{resume.name} holds the run's last step: nothing left to train")
            set_peft_model_state_dict(trainer.model, load_file(resume / "adapter_model.safetensors"))
            return TrainOutput(step_of(resume) or 0, None, {})  # type: ignore[arg-type]  # nothing trained in this process
        with signals.handled(), signals.deferred():  # StopOnSignal stops at a step's end, with a checkpoint
            return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException as e:
        stop = training_stopped(e, folder, manifest, trainer.state.global_step) if distributed.is_main() else e
        if isinstance(e, (Preempted, NonFiniteLoss)):  # raised by every rank at the same step
            distributed.barrier()
        if stop is e:
            raise
        raise stop from e


def _reason(e: BaseException) -> str:
    """Why training stopped, as the manifest says it: the signal's name for a stop that a signal asked for."""
    if isinstance(e, (Preempted, Interrupted)):
        return signal.Signals(e.signum).name
    return "SIGINT" if isinstance(e, KeyboardInterrupt) else type(e).__name__


def training_stopped(e: BaseException, folder: RunFolder, manifest: Manifest, step: int) -> BaseException:
    """Leave the run folder resumable after training ended early; return the exception to raise. The checkpoint
    being written when it failed is removed (uncommitted, so incomplete), the manifest records where and why
    training stopped, and a full disk becomes DiskSpaceError (exit 6)."""
    disk_full = isinstance(e, Exception) and not isinstance(e, RunStopped) and is_disk_full(e, folder.checkpoints)
    partial = remove_partial(folder.checkpoints, step)
    last = newest_committed(folder.checkpoints)
    manifest.status = "interrupted" if isinstance(e, (Preempted, KeyboardInterrupt)) else "failed"
    manifest.stopped = {
        "after_step": step,
        "reason": "disk full" if disk_full else _reason(e),
        "error": str(e).splitlines()[0] if str(e) else "",
        "last_committed_checkpoint": last.name if last else None,
        "removed_partial_checkpoint": partial.name if partial else None,
        **({"non_finite": e.details} if isinstance(e, NonFiniteLoss) else {}),
    }
    with contextlib.suppress(OSError):  # the disk may still be full; the checkpoints are what matter
        folder.write_manifest(manifest)
    if isinstance(e, (BackendCompilerFailed, InductorError)):
        return _compile_failed(e, last.name if last else None)
    if not disk_full:
        return e
    return DiskSpaceError(
        f"the disk filled up during training after step {step}: {e}\n  "
        + (f"removed the partial {partial}; " if partial else "")
        + (
            f"the last committed checkpoint, {last.name}, is intact and a rerun resumes from it.\n"
            if last
            else "no checkpoint had been committed yet.\n"
        )
        + f"  fix: free space at {folder.root} ({human_size(free_bytes(folder.root))} free now), then "
        f"{resume_command()}"
    )


def _compile_failed(e: BaseException, last: str | None) -> RunError:
    """torch.compile (training.torch_compile) could not build its kernels: an environment problem, not a bug."""
    cause = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return RunError(
        f"torch.compile failed while building the training step's kernels: {cause}\n"
        "  fix: inductor needs a working C/C++ compiler (gcc, g++; the CXX variable names another) and, on CUDA, "
        "Triton; or set training.torch_compile: false to train without compiling (slower). "
        + (f"Then {resume_command()} resumes from {last}." if last else "No checkpoint had been committed yet.")
    )


def save_adapter(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, base_dir: Path, folder: RunFolder) -> None:
    """The final adapter (and tokenizer) to <run>/adapter, swapped in whole: the copy the manifest vouches for.
    Every rank calls it (under FSDP the adapter's shards are gathered for the save); rank 0 alone writes."""
    staged = folder.root / ".adapter.partial"
    main = distributed.is_main()
    if main:
        shutil.rmtree(staged, ignore_errors=True)
    distributed.barrier()
    if getattr(trainer, "is_fsdp_enabled", False):  # checkpoints may be sharded; the adapter is one file
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(staged))
    if main:
        # The Trainer's pickled TrainingArguments: no consumer of an adapter needs it (every checkpoint keeps one).
        (staged / "training_args.bin").unlink(missing_ok=True)
        save_tokenizer(tokenizer, staged, base_dir / "tokenizer.model")
        atomic_replace_dir(staged, folder.adapter)
        shutil.rmtree(staged)
    distributed.barrier()
