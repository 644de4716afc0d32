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

from core import signals
from core.config import Config
from core.errors import NonFiniteLoss, Preempted, RunError
from core.files import atomic_replace_dir
from core.log import on_terminal
from core.runfolder import Manifest, RunFolder
from core.tokenizer import save_tokenizer
from train import distributed
from train.callbacks import CommitCheckpoints, IntervalsOfThisRun, MetricsJsonl, NonFiniteGuard, StopOnSignal
from train.checkpoint import holds_last_step, step_of
from train.data import Example, collate
from train.model import compute_dtype, uses_cuda
from train.stopped import training_stopped

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
    run builds them too, so a name transformers does not know fails before anything is written)."""
    t = cfg.training
    bf16 = compute_dtype(cfg) == torch.bfloat16
    _check_launcher(cfg, bf16)
    return TrainingArguments(
        output_dir=str(folder.checkpoints),
        **t.model_dump(
            exclude={
                "eval_steps",
                "save_total_limit",
                "fused_lm_head",
                "activation_checkpointing",
                "torch_compile",
                "torch_compile_mode",
            }
        ),
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


def _check_launcher(cfg: Config, bf16: bool) -> None:
    """What `accelerate launch` passes through the environment and the run cannot honour, refused before anything
    loads (the dry run checks it too).

    - mixed_precision (ACCELERATE_MIXED_PRECISION): TrainingArguments would take it over the run's config when
      bf16 is off, so a float32 run would silently train under bf16 autocast. The run's config decides.
    - FSDP (ACCELERATE_USE_FSDP): its checkpoints hold sharded model and optimizer state (pytorch_model_fsdp_0/,
      optimizer_0/) instead of adapter_model.safetensors and optimizer.pt, which the commit protocol
      (train/checkpoint.py) requires before a checkpoint counts; the first save would fail after the model loaded.
    """
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
    """Flex attention is a compiled kernel that recompiles for every new batch shape (measured on an H100: 40 s a
    step on long-tailed data); every batch then gets max_seq_length columns, and compiles once. data.packing fills
    those columns with examples instead of padding."""
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
    args = training_arguments(cfg, folder, bool(evals))
    return Trainer(
        model=model,
        args=args,
        train_dataset=_dataset(train),
        eval_dataset=_dataset(evals) if evals else None,
        data_collator=partial(collate, pad_id=tokenizer.pad_token_id, width=static_width(model, cfg)),
        processing_class=tokenizer,
        callbacks=training_callbacks(folder, cfg, identity),
    )


def fit(trainer: Trainer, resume: Path | None, folder: RunFolder, manifest: Manifest) -> TrainOutput:
    """Train (or resume) to the end. An early stop leaves the folder resumable and is re-raised with its exit code.

    Under several ranks rank 0 records the stop. A signal or a non-finite loss stops every rank at the same step
    (train/callbacks.py): the others wait until rank 0 has recorded it. Any other error is one rank's own: it
    leaves at once and the launcher stops the rest."""
    try:
        if resume is not None and holds_last_step(resume):  # killed after training: load, don't step past it
            log.info(f"{resume.name} holds the run's last step: nothing left to train")
            set_peft_model_state_dict(trainer.model, load_file(resume / "adapter_model.safetensors"))
            return TrainOutput(step_of(resume) or 0, None, {})  # type: ignore[arg-type]  # nothing trained in this process
        with signals.handled(), signals.deferred():  # StopOnSignal stops at a step's end, with a checkpoint
            return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException as e:
        together = isinstance(e, (Preempted, NonFiniteLoss))  # raised by every rank at the same step
        if not distributed.is_main():
            if together:
                distributed.barrier()
            raise
        stop = training_stopped(e, folder, manifest, trainer.state.global_step)
        if together:
            distributed.barrier()
        if stop is e:
            raise
        raise stop from e


def save_adapter(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, base_dir: Path, folder: RunFolder) -> None:
    """The final adapter (and tokenizer) to <run>/adapter, swapped in whole. Promotion to models/ is the export's
    last step (convert.pipeline), or run()'s when export is off: the run folder's copy is what the manifest vouches
    for.

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
