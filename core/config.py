"""The one typed schema for a run. YAML files and `key=value` overrides are only data for it.

Field names are the names of the library each section feeds (PEFT's LoraConfig, transformers'
TrainingArguments), so upstream documentation applies unchanged. Every field carries its documentation;
`python -m train --print-defaults` renders them as a commented YAML file.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from core.errors import ConfigError
from core.quants import FLOAT_TYPES, QUANTS, QuantType


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelSection(Section):
    name_or_path: str = "google/gemma-2-2b"
    """Hugging Face repo id looked up in the local HF cache (models/.cache/huggingface), or a local folder."""
    revision: str = "main"
    """Branch, tag or 40-hex commit of the repo in the cache; the resolved commit goes into the manifest."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Weights/compute dtype for training. auto = bfloat16 on CUDA, float32 on CPU. Gemma 2 overflows in fp16."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "eager"
    """transformers attention kernel. Gemma 2 needs softcapping, which SDPA skips: keep eager (or FA >= 2.6)."""
    chat_template: str | None = "gemma"
    """Chat template to train with and ship: a built-in name (core/templates/NAME.jinja), a .jinja path, or
    null to keep the tokenizer's own. google/gemma-2-2b (base) ships none, so the default installs Gemma's."""
    trust_remote_code: bool = False
    """Allow code from the model repo to run. Off: Gemma 2 is native to transformers."""


class DataSource(Section):
    """One entry of data.train_files / data.eval_files; a plain string is shorthand for {path: ...}."""

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
    dataset_num_proc: int | None = Field(None, ge=1)
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

    r: int = Field(16, ge=1)
    """LoRA rank."""
    lora_alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (scale = lora_alpha / r)."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
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

    num_train_epochs: float = Field(1.0, gt=0)
    """Epochs over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Total optimizer steps; -1 means derive from num_train_epochs."""
    per_device_train_batch_size: int = Field(4, ge=1)
    """Examples per device per forward pass."""
    per_device_eval_batch_size: int = Field(4, ge=1)
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
    logging_steps: int = Field(10, ge=1)
    """Log loss, learning rate and grad norm every N steps (TensorBoard + metrics.jsonl)."""
    save_steps: int = Field(100, ge=1)
    """Write a checkpoint every N steps."""
    save_total_limit: int | None = Field(3, ge=1)
    """Keep the newest N committed checkpoints (plus the best by eval loss when evaluating); null keeps all.
    Applied by the pipeline after each commit, not by the Trainer: the newest commit, the one a resume
    needs, is never deleted (docs/operations.md)."""
    eval_steps: int | None = Field(None, ge=1)
    """Evaluate on data.eval_files every N steps (defaults to logging_steps when eval files are set)."""
    seed: int = 42
    """Seed for model init of LoRA weights, data order and dropout."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory."""
    dataloader_num_workers: int = Field(0, ge=0)
    """Worker processes for the data loader."""
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    """Trainer loggers; TensorBoard logs go to <run>/runs. metrics.jsonl is always written."""
    full_determinism: bool = False
    """transformers' full determinism (deterministic algorithms, no TF32): bit-exact reruns on CPU."""


class ExportSection(Section):
    enabled: bool = True
    """After training: merge the adapter, convert to GGUF, quantize, verify and promote."""
    gguf_dir: str = "models/gguf"
    """Where promoted GGUF files go."""
    name: str = "gemma_2b_finetuned"
    """File stem of the fine-tuned GGUF: <name>.gguf is default_quant, other quants are <name>.<quant>.gguf."""
    quants: list[QuantType] = Field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"])
    """GGUF types to produce. An f32 GGUF is always converted first (the reference for quantizing)."""
    default_quant: QuantType = "q4_k_m"
    """The quant an application loads: written as <name>.gguf."""
    token_embedding_type: QuantType | None = "q8_0"
    """Type of token_embd in k-quants (llama.cpp PR 5650: Q8_0 embeddings help Gemma 2B at Q4_K_M); null
    keeps llama.cpp's choice."""
    keep_f32: bool = False
    """Keep the f32 intermediate GGUF in the run folder (the 2B's is ~10 GB)."""
    export_base: bool = True
    """Also export the untouched base model (with the same quants), as <base_name>.gguf, for comparison."""
    base_name: str = "gemma_2b_base"
    """File stem of the base-model GGUF."""


class VerifySection(Section):
    """Gates every export must pass before it is promoted. Measured against the merged HF model (fp32)."""

    max_nmse: dict[str, float] = Field(default_factory=lambda: {q: QUANTS[q].gate for q in FLOAT_TYPES})
    """Max normalised MSE of last-token logits (MSE / variance of the reference) per float type."""
    min_top1: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(FLOAT_TYPES, 1.0))
    """Min fraction of prompts whose last-token argmax matches the reference, per float type."""
    max_kld: dict[str, float] = Field(default_factory=lambda: {n: q.gate for n, q in QUANTS.items() if not q.is_float})
    """Max mean KL(reference || quant) over every position of the verification texts, per quant type."""
    prompts: list[str] = Field(
        default_factory=lambda: [
            "What is the capital of France?",
            "Write a haiku about GPUs.",
            "Summarise: the backup finished at 02:14 and all snapshots verified.",
        ]
    )
    """User prompts rendered with the chat template; their last-token logits are compared."""
    heldout_files: list[str] = Field(default_factory=list)
    """Extra held-out data (any data format) whose rendered text joins the KL/top-1 measurement."""
    max_heldout_records: int = Field(16, ge=0)
    """Cap on held-out records used (verification runs the HF model on CPU)."""
    max_tokens_per_text: int = Field(256, ge=8)
    """Held-out texts are cut to this many tokens. The reference keeps fp32 logits for every position:
    with Gemma's 256k vocab that is ~1 MB per token, so records x tokens bounds verification memory."""
    demo_prompt: str | None = None
    """A prompt the summary answers with the base and the fine-tuned GGUF side by side."""
    demo_expected: str | None = None
    """The training target for demo_prompt, to show whether the fine-tuned answer matches it."""

    @field_validator("max_nmse", "min_top1", "max_kld", mode="before")
    @classmethod
    def _keep_default_gates(cls, value, info):
        """Setting one gate (verify.max_kld.q4_k_m=0.02) keeps the defaults of the others."""
        if not isinstance(value, dict):
            return value
        return cls.model_fields[info.field_name].get_default(call_default_factory=True) | value


class PathsSection(Section):
    output_dir: str = "outputs"
    """Run folders are <output_dir>/<run_name>/."""
    models_dir: str = "models"
    """Promoted artifacts: finetuned/adapters/<run>, finetuned/final_models/<run> (GGUF: export.gguf_dir)."""
    check_free_space: bool = True
    """Before training, estimate what the run and its export will write (checkpoints, adapter, merged model,
    GGUF files) and refuse to start (exit 6) if a file system lacks the space. false skips the check."""


class Config(Section):
    run_name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    """Names the run folder outputs/<run_name>; the same name addresses the same run on every invocation."""
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    export: ExportSection = Field(default_factory=ExportSection)
    verify: VerifySection = Field(default_factory=VerifySection)
    paths: PathsSection = Field(default_factory=PathsSection)

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
        if problems:
            raise ValueError("\n".join(problems))
        return self


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
            for part in str(e["ctx"]["error"]).split("\n"):
                lines.append(f"  - {part}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {where}: {e['msg']}{shown}")
    return "\n".join([f"invalid config {source}: {len(lines)} problem(s)"] + lines)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (so 1e-4, true, [a, b] work)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form dotted.key=value (e.g. training.max_steps=10)")
    key, value = override.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply overrides, validate. Raises ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (shipped configs are in configs/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
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
        for line in (field.description or "").splitlines():
            out.append(f"{pad}# {line.strip()}")
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(f"{pad}{name}:")
            out.append(commented_defaults(ann, indent + 1))
        else:
            value = field.get_default(call_default_factory=True)
            dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()
            out.append(pad + dumped[1:-1] if dumped.startswith("{") else pad + dumped)
    return "\n".join(out)
