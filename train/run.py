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
    sha256_file,
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

    @classmethod
    def of(cls, cfg: Config) -> RunPaths:
        models = Path(cfg.paths.models_dir)
        return cls(Path(cfg.paths.output_dir) / cfg.run_name,
                   models / "finetuned" / "adapters" / cfg.run_name,
                   models / "finetuned" / "final_models" / cfg.run_name)


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
    from train.data import load_examples

    train, train_stats = load_examples(tokenizer, cfg.data.train_files, cfg.data.max_seq_length, cfg.data.system_message)
    evals, eval_stats = ([], None)
    if cfg.data.eval_files:
        evals, eval_stats = load_examples(tokenizer, cfg.data.eval_files, cfg.data.max_seq_length,
                                          cfg.data.system_message)
    return train, train_stats, evals, eval_stats


# ----------------------------------------------------------------------------- model and trainer


def compute_dtype(cfg: Config):
    import torch

    if cfg.model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.model.dtype)


def build_model(base: ResolvedModel, cfg: Config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(base.path), dtype=compute_dtype(cfg), attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    lora = LoraConfig(task_type="CAUSAL_LM", **cfg.lora.model_dump())
    return get_peft_model(model, lora)


def build_trainer(model, tokenizer, train, evals, paths: RunPaths, cfg: Config):
    import os

    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from train.callbacks import MetricsJsonl
    from train.data import collate

    def to_dataset(examples):
        return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(paths.root / "runs")
    t = cfg.training
    args = TrainingArguments(
        output_dir=str(paths.checkpoints),
        **t.model_dump(exclude={"eval_steps"}),
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
        callbacks=[MetricsJsonl(paths.metrics)],
    )


def latest_checkpoint(folder: Path) -> Path | None:
    steps = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


# ----------------------------------------------------------------------------- the run


def prepare_run_folder(paths: RunPaths, cfg: Config, fresh: bool) -> Path | None:
    """Create or reuse the run folder; return the checkpoint to resume from, if any."""
    if fresh and paths.root.exists():
        shutil.rmtree(paths.root)
    resume = None
    if paths.config.is_file():
        from train.config import load_config

        before = load_config(paths.config)
        training_keys = ("model", "data", "lora", "training")
        changed = [k for k in training_keys if getattr(before, k) != getattr(cfg, k)]
        if changed:
            raise RunError(
                f"{paths.root} holds an unfinished run started with a different config "
                f"(sections changed: {', '.join(changed)}).\n"
                f"  fix: use another run_name (e.g. run_name={cfg.run_name}-2), or pass --fresh to discard it"
            )
        resume = latest_checkpoint(paths.checkpoints)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config, to_yaml(cfg))
    return resume


def run(cfg: Config, *, dry_run: bool = False, fresh: bool = False, say=print) -> dict:
    """Train (or resume), export and verify; return the manifest."""
    from train.data import fingerprint, show_example
    from train.report import describe_plan, finished_summary, manifest_status, print_summary

    paths = RunPaths.of(cfg)
    if not fresh and not dry_run and manifest_status(paths.manifest) == "complete":
        return finished_summary(paths, cfg, say)

    # --- resolve: model, tokenizer, data (everything that can fail fast fails here)
    base = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    tokenizer = load_tokenizer(base, cfg)
    train, train_stats, evals, eval_stats = load_data(tokenizer, cfg)
    if dry_run:
        say(describe_plan(cfg, paths, base, train_stats, eval_stats, show_example(tokenizer, train[0])))
        return {}

    # --- train
    t0 = time.time()
    resume = prepare_run_folder(paths, cfg, fresh)
    manifest = {
        "status": "training",
        "run_name": cfg.run_name,
        "base_model": {"repo_id": base.repo_id, "revision": base.revision, "path": str(base.path)},
        "data": {
            "train_files": {f: sha256_file(Path(f)) for f in cfg.data.train_files},
            "eval_files": {f: sha256_file(Path(f)) for f in cfg.data.eval_files},
            "train_records": train_stats.records,
            "train_tokens": train_stats.tokens,
            "supervised_tokens": train_stats.supervised_tokens,
            "truncated": train_stats.truncated,
            "fingerprint": fingerprint(train),
        },
        "packages": package_versions(),
        "git_commit": git_commit(),
    }
    atomic_write_json(paths.manifest, manifest)
    say(f"training {cfg.run_name}: {train_stats.records} examples, {train_stats.tokens} tokens "
        f"({train_stats.supervised_tokens} supervised) on {base.repo_id or base.path}"
        + (f", resuming from {resume.name}" if resume else ""))
    model = build_model(base, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    say(f"LoRA r={cfg.lora.r}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    trainer = build_trainer(model, tokenizer, train, evals, paths, cfg)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    # --- adapter: run folder first, then promoted to models/finetuned/adapters/<run>
    from convert.merge import save_tokenizer
    from train.callbacks import plot_losses, read_metrics

    trainer.save_model(str(paths.adapter))
    save_tokenizer(tokenizer, paths.adapter, base.path / "tokenizer.model")
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
    }
    manifest["artifacts"] = {
        "adapter": {"path": str(paths.adapter_out), "files": hash_tree(paths.adapter_out)},
        "metrics": str(paths.metrics),
        "loss_plot": str(plot) if plot else None,
    }
    atomic_write_json(paths.manifest, manifest)
    say(f"trained {result.global_step} steps in {manifest['training']['seconds']} s; "
        f"loss {manifest['training']['first_logged_loss']} -> {manifest['training']['last_logged_loss']}; "
        f"adapter: {paths.adapter_out} ({human_size(sum(f['size'] for f in manifest['artifacts']['adapter']['files'].values()))})")
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
