"""The tokenizer and the LoRA model a run trains, built from the resolved base model and the config."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, set_seed

from core.config import Config
from core.errors import RunError
from core.hub import ResolvedModel
from core.records.render import TEMPLATES


def chat_template_text(spec: str) -> str:
    """model.chat_template: a built-in name (core/templates/NAME.jinja) or a .jinja path."""
    path = Path(spec) if spec.endswith(".jinja") else TEMPLATES / f"{spec}.jinja"
    if not path.is_file():
        known = ", ".join(p.stem for p in TEMPLATES.glob("*.jinja"))
        raise RunError(f"model.chat_template: no template '{spec}' (built-in: {known}; or give a .jinja path)")
    return path.read_text(encoding="utf-8")


def load_tokenizer(base: ResolvedModel, cfg: Config) -> PreTrainedTokenizerBase:
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


def compute_dtype(cfg: Config) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.model.dtype)


def build_model(base: ResolvedModel, cfg: Config) -> PeftModel:
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
