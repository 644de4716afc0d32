"""The HF Trainer a run fits with, and what it leaves: a resumable folder when it stops, an adapter when it ends."""

from __future__ import annotations

import logging
import os
import shutil
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import TrainOutput

from core.config import Config
from core.files import atomic_replace_dir
from core.runfolder import Manifest, RunFolder
from core.tokenizer import save_tokenizer
from train.callbacks import CommitCheckpoints, MetricsJsonl, NonFiniteGuard, StopOnSignal
from train.checkpoint import holds_last_step, step_of
from train.data import Example, collate
from train.model import compute_dtype, uses_cuda
from train.stopped import training_stopped

log = logging.getLogger(__name__)


def training_callbacks(folder: RunFolder, cfg: Config, identity: dict) -> list[TrainerCallback]:
    """The run's callbacks, in order: NonFiniteGuard sees a step before it is applied; StopOnSignal must be last."""
    return [
        MetricsJsonl(folder.metrics),
        CommitCheckpoints(identity, cfg.training.save_total_limit),
        NonFiniteGuard(),
        StopOnSignal(),
    ]


def _dataset(examples: list[Example]) -> Dataset:
    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})


def training_arguments(cfg: Config, folder: RunFolder, evaluating: bool) -> TrainingArguments:
    """The TrainingArguments of a run; building them validates optim, lr_scheduler_type and report_to (the dry
    run builds them too, so a name transformers does not know fails before anything is written)."""
    t = cfg.training
    return TrainingArguments(
        output_dir=str(folder.checkpoints),
        **t.model_dump(exclude={"eval_steps", "save_total_limit", "fused_lm_head", "activation_checkpointing"}),
        save_total_limit=None,  # retention is CommitCheckpoints' job: it only counts committed checkpoints
        eval_strategy="steps" if evaluating else "no",
        eval_steps=(t.eval_steps or t.logging_steps) if evaluating else None,
        bf16=compute_dtype(cfg) == torch.bfloat16,
        use_cpu=not uses_cuda(cfg),
        data_seed=t.seed,
        remove_unused_columns=False,  # our dataset is already input_ids/labels
        logging_nan_inf_filter=False,  # a NaN must show in the logs, never be hidden
        # transformers 5.24's names (gradient_checkpointing* still work, with a FutureWarning on every run)
        activation_checkpointing=bool(t.activation_checkpointing),
        activation_checkpointing_kwargs={"use_reentrant": False, "offload": t.activation_checkpointing == "offload"}
        if t.activation_checkpointing
        else None,
    )


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
    args = training_arguments(cfg, folder, bool(evals))
    return Trainer(
        model=model,
        args=args,
        train_dataset=_dataset(train),
        eval_dataset=_dataset(evals) if evals else None,
        data_collator=partial(collate, pad_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=training_callbacks(folder, cfg, identity),
    )


def fit(trainer: Trainer, resume: Path | None, folder: RunFolder, manifest: Manifest) -> TrainOutput:
    """Train (or resume) to the end. An early stop leaves the folder resumable and is re-raised with its exit code."""
    try:
        if resume is not None and holds_last_step(resume):  # killed after training: load, don't step past it
            log.info(f"{resume.name} holds the run's last step: nothing left to train")
            set_peft_model_state_dict(trainer.model, load_file(resume / "adapter_model.safetensors"))
            return TrainOutput(step_of(resume) or 0, None, {})  # type: ignore[arg-type]  # nothing trained in this process
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException as e:
        stop = training_stopped(e, folder, manifest, trainer.state.global_step)
        if stop is e:
            raise
        raise stop from e


def save_adapter(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, base_dir: Path, folder: RunFolder) -> None:
    """The final adapter (and tokenizer) to <run>/adapter, swapped in whole. Promotion to models/ is the export's
    last step (convert.pipeline), or run()'s when export is off: the run folder's copy is what the manifest vouches
    for."""
    staged = folder.root / ".adapter.partial"
    shutil.rmtree(staged, ignore_errors=True)
    trainer.save_model(str(staged))
    # The Trainer's pickled TrainingArguments: no consumer of an adapter needs it (every checkpoint keeps one).
    (staged / "training_args.bin").unlink(missing_ok=True)
    save_tokenizer(tokenizer, staged, base_dir / "tokenizer.model")
    atomic_replace_dir(staged, folder.adapter)
    shutil.rmtree(staged)
