"""The one typed schema for a run; YAML files and `key=value` overrides are only data for it. Field names are those
of the library each section feeds (PEFT's LoraConfig, transformers' TrainingArguments), so upstream documentation
applies unchanged. Every field carries its documentation: `python -m train --print-defaults` prints it as YAML.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from core.errors import ConfigError
from core.paths import user_path, what_is
from core.quants import FLOAT_TYPES, NEEDS_IMATRIX, QUANTS, QuantType

# What a change to a key does: the one table that resume safety, the complete-run refusal, the nightly fingerprint
# and the base export's reuse read (keys_affecting). A section's fields are of the section's kind unless the field
# says otherwise (Field(json_schema_extra=PLACED)).
Affects = Literal["trained", "exported", "verified", "nightly", "placed"]
#   trained   the adapter's weights: a resume refuses a change; nightly trains again
#   exported  the GGUF files made from them: a complete run re-exports; the base export is redone
#   verified  how an export is judged before it ships (the gates, the scored data)
#   nightly   how the nightly job judges a candidate against the champion
#   placed    where files go, what is logged and kept: never what is trained, shipped or judged
PLACED: dict[str, Any] = {"affects": "placed"}

RESUME: tuple[Affects, ...] = ("trained",)  # a checkpoint is resumed only if none of these changed
REPORTED: tuple[Affects, ...] = ("trained", "exported", "verified")  # a complete run would ignore these: refused
FINGERPRINTED: tuple[Affects, ...] = ("trained", "exported")  # what a nightly candidate is made of
BASE_EXPORT: tuple[Affects, ...] = ("exported",)  # a recorded base export is reused while these are unchanged
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a folder name, never a path


class Section(BaseModel):
    # strict: a YAML `true` is not the integer 1 (training.max_steps=true), `1` is not a boolean, 7 is not a
    # string. YAML gives every type natively (with _Loader's floats such as 1e-4), so lax coercion only hides mistakes.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True, strict=True)
    affects: ClassVar[Affects] = "placed"
    renamed: ClassVar[dict[str, str]] = {}  # an old dotted key -> the new one it is read as

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        for old, new in cls.renamed.items():
            key, name = old.rpartition(".")[2], new.rpartition(".")[2]
            if isinstance(data, dict) and key in data:
                if name in data:
                    raise ValueError(f"{old} and {new} are both set: keep {name} (the new name)")
                data = {(name if k == key else k): v for k, v in data.items()}
        return data


class ModelSection(Section):
    affects: ClassVar[Affects] = "trained"

    name_or_path: str = "google/gemma-2-2b"
    """Hugging Face repo id looked up in the local HF cache (models/.cache/huggingface), or a local folder."""
    revision: str = "main"
    """Branch, tag or 40-hex commit of the repo in the cache; the resolved commit goes into the manifest."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Weights/compute dtype for training. auto = bfloat16 on CUDA, float32 on CPU. Gemma 2 overflows in fp16."""
    attn_implementation: Literal["auto", "eager", "flex_attention", "flash_attention_2", "sdpa"] = "auto"
    """transformers attention kernel; each must apply Gemma 2's attention softcap (50). auto = flex_attention on
    CUDA (softcap in the kernel, no T x T score tensors), eager on CPU. flash_attention_2 needs the flash-attn
    package (>= 2.6) and isolates packed examples only at batch size 1. sdpa is refused: it skips the softcap."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to train. auto = CUDA when usable, else CPU; cuda = stop (exit 2, naming the driver and the CUDA
    version torch was built for) when CUDA is unusable, instead of silently training on the CPU."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4 bits with bitsandbytes (nf4, double quantization, compute in model.dtype).
    Export merges the adapter both into the full-precision base and into the dequantized 4-bit one, and ships the merge
    closer to the model as trained (verify.max_merge_kld)."""
    chat_template: str | None = "gemma"
    """Chat template to train with and ship: a built-in name (core/templates/NAME.jinja), a .jinja path, or
    null to keep the tokenizer's own. google/gemma-2-2b (base) ships none, so the default installs Gemma's."""
    trust_remote_code: bool = False
    """Allow code from the model repo to run. Off: Gemma 2 is native to transformers."""

    @field_validator("attn_implementation")
    @classmethod
    def _softcapping_attention(cls, value: str) -> str:
        if value == "sdpa":
            raise ValueError(
                "model.attn_implementation: sdpa cannot train Gemma 2: it skips the attention logit softcap, and "
                "transformers 5.24 refuses it for Gemma 2 (_supports_sdpa = False); use auto, flex_attention or eager"
            )
        return value


class DataSource(Section):
    """One entry of data.train_files / data.eval_files; a plain string is shorthand for {path: ...}."""

    affects: ClassVar[Affects] = "trained"

    path: str
    """A .jsonl, .json, .parquet or .csv file; a folder of them; a folder written by datasets' save_to_disk; or
    a Hugging Face dataset id (org/name) already in the local cache (nothing is downloaded)."""
    format: Literal["auto", "messages", "prompt_completion", "text"] = "auto"
    """Record format: 'auto' detects it per record from its keys; a declared format makes its fields required."""
    split: str = "train"
    """Split of a DatasetDict, a hub dataset, or a folder with split-named files (datasets' naming conventions)."""
    name: str | None = None
    """Configuration name of a hub dataset that datasets.load_dataset prepared in the cache (its `name`)."""
    revision: str = "main"
    """Branch, tag or commit of a hub dataset snapshot in the cache; the commit goes into the manifest."""
    weight: float = Field(1.0, gt=0)
    """Uses of each training record of this source: 2 repeats every record twice, 0.5 keeps a fixed half
    (picked by content hash, the same records on every run). Eval records are never weighted."""
    max_samples: int | None = Field(None, ge=1)
    """Read only the first N records of this source (file order); later records are not used or validated."""


class DataSection(Section):
    affects: ClassVar[Affects] = "trained"

    train_files: list[DataSource] = Field(default_factory=lambda: ["data/train.jsonl"], validate_default=True)
    """Training data: each entry a path (file, folder, save_to_disk folder, cached hub dataset id) or a mapping
    {path, format, split, name, revision, weight, max_samples}. Formats: {"messages": [...]} (chat, with tool
    calls), {"prompt", "completion"}, {"text"}; docs/data.md shows how each is rendered."""
    eval_files: list[DataSource] = Field(default_factory=list)
    """Held-out data, same forms (never weighted); evaluated every training.eval_steps. Or use eval_fraction."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Hold out this fraction of the training records for eval, by the sha256 of each record's content: a record
    stays on its side when data is appended or reordered, and duplicates land on the same side."""
    max_seq_length: int = Field(1024, ge=16)
    """Tokens per example (TRL calls it max_length). Longer examples are cut at the end and counted; one with no
    supervised token left is an invalid record."""
    system_message: Literal["merge", "keep", "error"] = "merge"
    """Gemma has no system role. 'merge': "<system>\\n\\n<first user message>" (as the gemma template and
    llama.cpp do at inference); 'keep': pass it to the chat template as is; 'error': reject the record."""
    assistant_only_loss: bool = True
    """Chat: the loss covers assistant turns only (content + <end_of_turn>); false trains on the whole text."""
    completion_only_loss: bool = True
    """prompt/completion: the loss covers the completion (+ <eos>) only; false also trains on the prompt."""
    packing: bool = False
    """Pack several examples into each max_seq_length row (whole examples, best fit). Each example attends only
    to itself: positions restart per example and transformers builds a block-diagonal mask from them."""
    max_invalid_fraction: float = Field(0.0, ge=0, le=1)
    """0 (strict): any invalid record stops the run before training. Above 0: skip invalid records while they
    are at most this fraction of all records; each skipped record and its reason goes to
    <run>/skipped_records.jsonl and the count into the manifest."""
    dataset_num_proc: int | None = Field(None, ge=1, json_schema_extra=PLACED)
    """Processes rendering and tokenizing (datasets.map num_proc). null: 1 below 20,000 records, else up to 8
    (CPU count)."""

    @field_validator("train_files", "eval_files", mode="before")
    @classmethod
    def _paths_are_sources(cls, value: Any) -> Any:
        return [{"path": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_serializer("train_files", "eval_files")
    def _sources_as_written(self, sources: list[DataSource]) -> list[Any]:
        # A source with only a path is written back as the path (configs stay as short as the user wrote them).
        return [s.path if s == DataSource(path=s.path) else s.model_dump(exclude_defaults=True) for s in sources]

    @model_validator(mode="after")
    def _data_rules(self) -> DataSection:
        problems = []
        if not self.train_files:
            problems.append("data.train_files: is empty; name at least one file, folder or dataset")
        if self.eval_files and self.eval_fraction:
            problems.append(
                "data.eval_fraction and data.eval_files are both set: hold out by fraction or give eval files, not both"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LoraSection(Section):
    """Passed to peft.LoraConfig as is."""

    affects: ClassVar[Affects] = "trained"

    r: int = Field(16, ge=1)
    """LoRA rank."""
    lora_alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (scale = lora_alpha / r)."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input. 0 is the fast path: PEFT puts an identity there (no mask, no input copy)."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names to adapt. Gemma 2's linear layers (modeling_gemma2.py). Embeddings/lm_head are not
    supported by llama.cpp's LoRA converter, so they are left out."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train (Gemma 2 has none)."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""


class TrainingSection(Section):
    """Passed to transformers.TrainingArguments under the same names."""

    affects: ClassVar[Affects] = "trained"
    # transformers 5.24 renamed gradient_checkpointing (its FutureWarning); configs may keep the old key
    renamed: ClassVar[dict[str, str]] = {"training.gradient_checkpointing": "training.activation_checkpointing"}

    num_train_epochs: float = Field(1.0, gt=0)
    """Epochs over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Total optimizer steps; -1 means derive from num_train_epochs."""
    per_device_train_batch_size: int = Field(4, ge=1)
    """Examples per device per forward pass."""
    per_device_eval_batch_size: int = Field(4, ge=1, json_schema_extra=PLACED)
    """Examples per device per eval forward pass."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Forward passes per optimizer step."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name: linear, cosine, constant, constant_with_warmup, ..."""
    warmup_steps: float = Field(0, ge=0)
    """Warm-up steps; a value below 1 is a fraction of the total steps (transformers 5 semantics)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    optim: str = "adamw_torch"
    """transformers optimizer name (adamw_torch, adamw_torch_fused, paged_adamw_8bit with bitsandbytes, ...)."""
    logging_steps: int = Field(10, ge=1, json_schema_extra=PLACED)
    """Log loss, learning rate and grad norm every N steps (TensorBoard + metrics.jsonl)."""
    save_steps: int = Field(100, ge=1, json_schema_extra=PLACED)
    """Write a checkpoint every N steps."""
    save_total_limit: int | None = Field(3, ge=1, json_schema_extra=PLACED)
    """Keep the newest N committed checkpoints (plus the best by eval loss when evaluating); null keeps all.
    Applied by the pipeline after each commit, not by the Trainer: the newest commit, the one a resume
    needs, is never deleted (docs/operations.md)."""
    eval_steps: int | None = Field(None, ge=1, json_schema_extra=PLACED)
    """Evaluate on data.eval_files every N steps (defaults to logging_steps when eval files are set)."""
    seed: int = 42
    """Seed for model init of LoRA weights, data order and dropout."""
    activation_checkpointing: bool | Literal["offload"] = False
    """Recompute each decoder layer's activations in the backward instead of keeping them (~1/3 more compute,
    a fraction of the activation memory). offload: also keep the layer inputs in pinned host memory, for the
    longest sequences. transformers 5.24's name; the old `gradient_checkpointing` key is read as this one."""
    torch_compile: bool | Literal["layers"] = False
    """torch.compile for training. layers: each decoder layer is compiled on its own (LoRA and checkpointing
    inside); all layers share one graph, compiled on the first step (inductor caches it), and the per-token
    elementwise work (RMSNorm in fp32, GeLU, RoPE, LoRA's adds) is fused. true: the Trainer compiles the whole
    model (TrainingArguments.torch_compile), a larger graph that takes longer to compile. Times: docs/gpu-box.md."""
    torch_compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """Inductor's mode for torch_compile (TrainingArguments.torch_compile_mode). max-autotune-no-cudagraphs also
    times several block sizes for every matmul and for flex attention's kernels on the first step (minutes longer)
    and keeps the fastest (bench: production+autotune). The CUDA-graph modes are not offered: a graph replays fixed
    addresses, and activation checkpointing re-runs each layer in the backward."""
    ddp_find_unused_parameters: bool = False
    """Multi-GPU (DDP, docs/gpu-box.md): search the autograd graph for trainable parameters without a gradient after
    every backward. LoRA trains adapters that every forward uses, so false is right and saves a graph walk per step;
    set true only if DDP reports parameters that did not receive a gradient. Ignored in one process."""
    fused_lm_head: bool | Literal["auto"] = "auto"
    """Cross-entropy fused with lm_head and Gemma's final softcap (TRL's add_fused_lm_head, train/loss.py): the
    [batch, seq, 256k] logits are never materialized (the memory saved: docs/gpu-box.md) and on CUDA only
    supervised positions go through lm_head. Same loss and gradients as the model's own. auto = on with CUDA,
    off on CPU. Not a TrainingArguments field: the pipeline applies it to the model."""
    dataloader_num_workers: int = Field(0, ge=0, json_schema_extra=PLACED)
    """Worker processes for the data loader."""
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"], json_schema_extra=PLACED)
    """Trainer loggers; TensorBoard logs go to <run>/runs. metrics.jsonl is always written."""
    full_determinism: bool = False
    """transformers' full determinism (deterministic algorithms, no TF32): bit-exact reruns on CPU."""

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(
                f"training.max_steps: {value} is neither a step count (>= 1) nor -1 (use num_train_epochs)"
            )
        return value


class ExportSection(Section):
    affects: ClassVar[Affects] = "exported"
    # keep_f32 became keep_float when the float GGUF stopped being f32 (bf16 for a bf16 base)
    renamed: ClassVar[dict[str, str]] = {"export.keep_f32": "export.keep_float"}

    enabled: bool = True
    """After training: merge the adapter, convert to GGUF, quantize, verify and promote."""
    gguf_dir: str = Field("models/gguf", json_schema_extra=PLACED)
    """Where promoted GGUF files go."""
    name: str = "gemma_2b_finetuned"
    """File stem of the fine-tuned GGUF: <name>.gguf is default_quant, other quants are <name>.<quant>.gguf."""
    quants: list[QuantType] = Field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"])
    """GGUF types to produce. A float GGUF (export.float_type) is converted first and the quants are made from it;
    every file is verified against the HF model; the float file is kept only if listed here (or export.keep_float)."""
    default_quant: QuantType = "q4_k_m"
    """The quant an application loads: written as <name>.gguf."""
    token_embedding_type: QuantType | None = "q8_0"
    """Type of token_embd in k-quants (llama.cpp PR 5650: Q8_0 embeddings help Gemma 2B at Q4_K_M); null
    keeps llama.cpp's choice."""
    float_type: Literal["auto", "bf16", "f16", "f32"] = "auto"
    """Type of the float GGUF the converter writes (the source of every quant and their verification reference).
    auto: the float type listed in export.quants if there is one (it ships anyway, so no extra file), else the
    merged model's own dtype (bf16 for Gemma 2 2B: exact, half the bytes of f32)."""
    keep_float: bool = False
    """Keep the float GGUF in the run folder when export.quants does not list it (the 2B's is ~5 GB in bf16).
    The old name keep_f32 is read as this one."""
    imatrix: bool = False
    """Quantize k-quants and IQ quants with an importance matrix computed from the run's own training data
    (llama-imatrix on the float GGUF). Needed for iq3_xxs. Off until measured better at the 2B's size."""
    lora_gguf: bool = True
    """Also ship the adapter as a GGUF (<name>.lora.gguf, convert_lora_to_gguf.py), for llama.cpp on the base GGUF;
    promoted only if base + adapter gives the merged float GGUF's logits (convert/lora_gguf.py)."""
    export_base: bool = True
    """Also export the untouched base model (with the same quants), as <base_name>.gguf, for comparison."""
    base_name: str = "gemma_2b_base"
    """File stem of the base-model GGUF."""

    @field_validator("quants")
    @classmethod
    def _each_quant_once(cls, value: list[str]) -> list[str]:
        twice = sorted({q for q in value if value.count(q) > 1})
        if twice:
            raise ValueError(f"export.quants: {', '.join(twice)} listed more than once; name each type once")
        if not value:
            raise ValueError("export.quants: is empty; name at least the default_quant")
        return value

    @model_validator(mode="after")
    def _imatrix_where_required(self) -> ExportSection:
        needing = [q for q in self.quants if q in NEEDS_IMATRIX]
        if needing and not self.imatrix:
            raise ValueError(
                f"export.quants: {', '.join(needing)} need an importance matrix (llama.cpp refuses them without "
                f"one: the result would be garbage); set export.imatrix=true or pick iq4_xs/q4_k_m instead"
            )
        return self


class VerifySection(Section):
    """Gates every export must pass before it is promoted. Every GGUF, the float one and each quant, is measured
    against the merged HF model (float32, streamed layer by layer): the model that was trained."""

    affects: ClassVar[Affects] = "verified"

    max_nmse: dict[str, float] = Field(default_factory=lambda: {q: QUANTS[q].gate for q in FLOAT_TYPES})
    """Max normalised MSE of last-token logits (MSE / variance of the reference) per float type."""
    min_top1: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(FLOAT_TYPES, 1.0))
    """Min fraction of prompts whose last-token argmax matches the reference, per float type."""
    max_kld: dict[str, float] = Field(default_factory=lambda: {n: q.gate for n, q in QUANTS.items() if not q.is_float})
    """Max mean KL(HF model || quant) over every scored position, per quant type."""
    prompts: list[str] = Field(
        default_factory=lambda: [
            "What is the capital of France?",
            "Write a haiku about GPUs.",
            "Summarise: the backup finished at 02:14 and all snapshots verified.",
        ]
    )
    """User prompts rendered with the chat template; their last-token logits are compared."""
    heldout_files: list[str] = Field(default_factory=list)
    """Held-out data (any data format) scored first; data.eval_files join it. Then the built-in reference texts,
    then (only while short of min_scored_tokens) the training data."""
    max_heldout_records: int = Field(16, ge=0)
    """Cap on held-out records used (each costs a forward pass of every file and of the HF reference)."""
    max_tokens_per_text: int = Field(512, ge=8)
    """Window: longer texts are scored in windows of this many tokens (each starting with <bos>), capped at the
    model's context. Memory does not grow with it: logits are compared 128 positions at a time."""
    min_scored_tokens: int = Field(2048, ge=1)
    """Positions scored per file (the statistical power of mean/p99 KLD and same-top-1). If all the data is
    shorter, verification gates on what there is and the report says it fell short."""
    max_merge_kld: float = Field(0.01, gt=0)
    """Max mean KL(model as trained || merged model): the adapter on its base (for QLoRA, the nf4 base training
    saw) against the merged HF model every GGUF is then verified against. Checked before the merge is written."""
    recommend_max_kld: float = Field(0.02, gt=0)
    """Recommendation budget: verify.md names the smallest file whose mean KLD is within it. 0.02 nats of KL
    is about a 2% rise in perplexity, stricter than q4_k_m's hard gate (0.05)."""
    device: Literal["auto", "cuda", "cpu"] = Field("auto", json_schema_extra=PLACED)
    """Where the HF reference (convert/reference.py) runs, for verification, the adapter GGUF's check and the
    nightly losses. auto = CUDA when torch sees a device, else the CPU; cuda = stop (exit 2) without one. Its
    logits come back to the CPU in float32 (IEEE matmuls on CUDA, never TF32): the measures agree across devices far
    within the gates, so a change re-judges nothing."""
    demo_prompt: str | None = Field(None, json_schema_extra=PLACED)
    """A prompt the summary answers with the base and the fine-tuned GGUF side by side."""
    demo_expected: str | None = Field(None, json_schema_extra=PLACED)
    """The training target for demo_prompt, to show whether the fine-tuned answer matches it."""

    @field_validator("max_nmse", "min_top1", "max_kld", mode="before")
    @classmethod
    def _keep_default_gates(cls, value, info):
        """Setting one gate (verify.max_kld.q4_k_m=0.02) keeps the defaults of the others."""
        if not isinstance(value, dict):
            return value
        return cls.model_fields[info.field_name].get_default(call_default_factory=True) | value

    @field_validator("max_nmse", "min_top1", "max_kld")
    @classmethod
    def _gates_in_range(cls, value: dict[str, float], info) -> dict[str, float]:
        """A gate of 0 or below passes nothing (or, for min_top1, everything): a typo, not a policy."""
        problems = [
            f"verify.{info.field_name}.{q}: unknown type (known: {', '.join(QUANTS)})" for q in value if q not in QUANTS
        ]
        for q, gate in value.items():
            if info.field_name == "min_top1" and not 0 < gate <= 1:
                problems.append(f"verify.min_top1.{q}: {gate} is not a fraction in (0, 1]")
            elif info.field_name != "min_top1" and not gate > 0:
                problems.append(f"verify.{info.field_name}.{q}: {gate} must be above 0 (a gate nothing can pass)")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("prompts")
    @classmethod
    def _some_prompts(cls, value: list[str]) -> list[str]:
        if not value or not all(p.strip() for p in value):
            raise ValueError("verify.prompts: needs at least one non-empty prompt (the NMSE and top-1 gates use them)")
        return value


class NightlySection(Section):
    """`python -m train.nightly`: the fixed eval set, the gates a candidate must pass to replace the champion,
    and what is kept (docs/nightly.md). Not part of what is trained: changing it never triggers retraining."""

    affects: ClassVar[Affects] = "nightly"

    run_prefix: str = Field("nightly", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,60}$", json_schema_extra=PLACED)
    """Candidates are named <run_prefix>-YYYY-MM-DD-<first 8 hex of the fingerprint>."""
    eval_files: list[str] = Field(default_factory=list)
    """Held-out records (any data format) both candidate and champion are scored on; empty: verify.heldout_files.
    Keep them out of data.train_files, and fixed: a changed eval set rescores the champion."""
    max_eval_records: int = Field(64, ge=1)
    """Score the first N eval records (the HF model runs on the CPU in float32, as in verification)."""
    task_checks: str | None = None
    """Optional JSONL file of {"prompt": ..., "expected": ...}: the GGUF's greedy reply (llama.cpp, the file's
    own chat template) must equal `expected` after stripping whitespace. Scored as task_accuracy."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest reply generated for a task check."""
    max_loss_regression: float = Field(0.02, ge=0)
    """Gate against the champion: the candidate's hf_loss and gguf_loss may exceed the champion's by at most
    this fraction (0.02: 2% higher)."""
    max_accuracy_drop: float = Field(0.0, ge=0, le=1)
    """Gate against the champion: task_accuracy may be lower than the champion's by at most this much."""
    max_hf_loss: float | None = Field(None, gt=0)
    """Absolute gate: highest acceptable mean loss (nats per supervised token) of the merged HF model."""
    max_gguf_loss: float | None = Field(None, gt=0)
    """Absolute gate: highest acceptable mean loss of the GGUF that ships (export.default_quant, llama.cpp)."""
    max_quant_gap: float | None = Field(None, ge=0)
    """Absolute gate: highest acceptable gguf_loss - hf_loss, what the shipped quant costs on the eval set."""
    min_task_accuracy: float | None = Field(None, ge=0, le=1)
    """Absolute gate: lowest acceptable share of task checks answered exactly (needs task_checks)."""
    keep_champions: int = Field(2, ge=1, json_schema_extra=PLACED)
    """Previous champions kept besides the live one (their files are what `rollback` makes live again)."""
    keep_candidates: int = Field(3, ge=0, json_schema_extra=PLACED)
    """Most recent other nightly runs (rejected or failed) kept for inspection; older ones are deleted."""


class PathsSection(Section):
    affects: ClassVar[Affects] = "placed"

    output_dir: str = "outputs"
    """Run folders are <output_dir>/<run_name>/."""
    models_dir: str = "models"
    """Promoted artifacts: finetuned/adapters/<run>, finetuned/final_models/<run> (GGUF: export.gguf_dir)."""
    check_free_space: bool = True
    """Before training, estimate what the run and its export will write (checkpoints, adapter, merged model,
    GGUF files) and refuse to start (exit 6) if a file system lacks the space. false skips the check."""


class Config(Section):
    run_name: str = Field("run", pattern=RUN_NAME.pattern, json_schema_extra=PLACED)
    """Names the run folder outputs/<run_name>; the same name addresses the same run on every invocation."""
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    export: ExportSection = Field(default_factory=ExportSection)
    verify: VerifySection = Field(default_factory=VerifySection)
    paths: PathsSection = Field(default_factory=PathsSection)
    nightly: NightlySection = Field(default_factory=NightlySection)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Config:
        problems = []
        if self.export.default_quant not in self.export.quants:
            problems.append(
                f"export.default_quant: '{self.export.default_quant}' is not in export.quants "
                f"{self.export.quants}; add it there or pick one of them"
            )
        for q in self.export.quants:
            if q in FLOAT_TYPES:
                if q not in self.verify.max_nmse or q not in self.verify.min_top1:
                    problems.append(f"verify: no max_nmse/min_top1 gate for export quant '{q}'")
            elif q not in self.verify.max_kld:
                problems.append(f"verify.max_kld: no gate for export quant '{q}'; add e.g. max_kld.{q}=0.05")
        if self.training.eval_steps and not (self.data.eval_files or self.data.eval_fraction):
            problems.append(
                "training.eval_steps is set but data.eval_files is empty and data.eval_fraction is 0: "
                "nothing to evaluate on"
            )
        if self.export.name == self.export.base_name:
            problems.append("export.name and export.base_name are equal: the base export would overwrite yours")
        # flash_attention_2 isolates packed examples only through position_ids varlen, which transformers 5.24
        # detects at batch size 1 (masking_utils): with more rows per batch, packed examples attend to each other.
        batches = (self.training.per_device_train_batch_size, self.training.per_device_eval_batch_size)
        if self.model.attn_implementation == "flash_attention_2" and self.data.packing and max(batches) > 1:
            problems.append(
                "model.attn_implementation: flash_attention_2 cannot keep packed examples apart with more than one "
                f"row per batch (per_device_train_batch_size {batches[0]}, per_device_eval_batch_size {batches[1]}): "
                "set both to 1 (raise max_seq_length instead), or use flex_attention, or data.packing=false"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def field_affects(section: type[Section], name: str) -> Affects:
    """What a change to one field does (the table at the top of this module)."""
    extra = section.model_fields[name].json_schema_extra
    return cast(Affects, extra["affects"]) if isinstance(extra, dict) and "affects" in extra else section.affects


def keys_affecting(cfg: Config, kinds: tuple[Affects, ...]) -> dict[str, Any]:
    """{dotted key: value as JSON} of every key whose change affects one of `kinds`. A mapping's entries are keys of
    their own (verify.max_kld.q4_k_m), so a message names the one that changed."""
    out: dict[str, Any] = {}

    def walk(section: Section, prefix: str) -> None:
        dumped = section.model_dump(mode="json")
        for name in type(section).model_fields:
            value = getattr(section, name)
            if isinstance(value, Section):
                walk(value, f"{prefix}{name}.")
            elif field_affects(type(section), name) in kinds:
                value = dumped[name]
                entries = value.items() if isinstance(value, dict) else [(None, value)]
                out.update({".".join(filter(None, (prefix + name, k))): v for k, v in entries})

    walk(cfg, "")
    return out


def changed_keys(old: Config, new: Config, kinds: tuple[Affects, ...]) -> list[str]:
    """`key: old -> new` for every key of `kinds` that differs between two configs."""
    a, b = keys_affecting(old, kinds), keys_affecting(new, kinds)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _field_names(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        if part.isdigit():  # an index into a list of sections (data.train_files.0.format)
            continue
        field = model.model_fields.get(part)
        ann: Any = field.annotation if field else None
        if getattr(ann, "__origin__", None) is list:
            ann = ann.__args__[0]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        where = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _field_names(Config, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"; did you mean '{'.'.join(loc[:-1] + close)}'?" if close else f"; known keys: {', '.join(known)}"
            lines.append(f"  - {where}: unknown key{hint}")
        elif e["type"] == "value_error":
            lines += [f"  - {part}" for part in str(e["ctx"]["error"]).split("\n")]
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            if got is None:  # `key=` on the command line sets null
                shown = f" (got nothing: give a value, {where}=..., or leave the key out for its default)"
            lines.append(f"  - {where}: {e['msg']}{shown}")
    return "\n".join([f"invalid config {source}: {len(lines)} problem(s)"] + lines)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two YAML 1.2 rules a config needs (PyYAML implements YAML 1.1): a duplicate key
    is an error (1.1 loaders keep the last one silently), and 1e-4 is a float (1.1 needs a dot: 1.0e-4)."""


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = key_node
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),  # YAML 1.2 core schema: 1e-4, 5E3
    list("-+0123456789"),
)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's problem in one line ('duplicate key ...', "expected ',' or ']'"), without its source excerpt."""
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    return f"{problem} ({context})" if problem and context else problem or str(e).splitlines()[0]


def parse_yaml(text: str) -> Any:
    """YAML text as data, by the rules of _Loader (duplicate keys refused, 1e-4 a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (so 1e-4, true, [a, b] work)."""
    key, eq, value = override.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise ConfigError(f"override '{override}' is not of the form dotted.key=value (e.g. training.max_steps=10)")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
    try:
        node[parts[-1]] = parse_yaml(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override '{override}': the value is not valid YAML ({_yaml_problem(e)}).\n"
            f"  fix: close brackets and quotes, e.g. {key}='[a.jsonl, b.jsonl]' (quote the whole override in the shell)"
        ) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply overrides, validate. Raises ConfigError listing every problem."""
    path = Path(path)
    found = what_is(user_path(path))
    if found == "missing":
        raise ConfigError(f"config file not found: {path} (relative to {Path.cwd()}; shipped configs are in configs/)")
    if found != "a file":
        raise ConfigError(f"--config {path}: is {found}, not a YAML config file (shipped configs are in configs/)")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is this the config file?") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}") from None
    if raw is None:
        raise ConfigError(
            f"{path}: holds no settings (only comments or blank); start from `python -m train --print-defaults`"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for o in overrides:
        apply_override(raw, o)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        source = str(path) + (f" with overrides {list(overrides)}" if overrides else "")
        raise ConfigError(_format_errors(e, source)) from None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def commented_defaults(model: type[BaseModel] = Config, indent: int = 0) -> str:
    """The defaults as YAML with each field's documentation above it (for --print-defaults)."""
    out = []
    pad = "  " * indent
    for name, field in model.model_fields.items():
        out += [f"{pad}# {line.strip()}" for line in (field.description or "").splitlines()]
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += [f"{pad}{name}:", commented_defaults(ann, indent + 1)]
        else:
            value = field.get_default(call_default_factory=True)
            dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()
            out.append(pad + dumped[1:-1] if dumped.startswith("{") else pad + dumped)
    return "\n".join(out)
