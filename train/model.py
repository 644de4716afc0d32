"""The tokenizer and the LoRA model a run trains, built from the resolved base model and the config."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)

from core.config import Config
from core.errors import RunError
from core.hub import ResolvedModel
from core.records.render import TEMPLATES
from train.device import Placement
from train.loss import enable_fused_lm_head, fused_lm_head_enabled

log = logging.getLogger(__name__)


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


def uses_cuda(cfg: Config) -> bool:
    """Whether the run trains on CUDA (model.device auto or cuda, and a usable device; train.device checks cuda)."""
    return cfg.model.device != "cpu" and torch.cuda.is_available()


def compute_dtype(cfg: Config, cuda: bool) -> torch.dtype:
    """model.dtype on CUDA (`cuda`) or the CPU: auto is bfloat16 on CUDA, float32 on the CPU."""
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, cfg.model.dtype)


def quantization(cfg: Config, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """model.load_in_4bit: QLoRA's recipe (Dettmers et al. 2023), which bitsandbytes 0.50.2 runs on CPU too
    (tests/cli/test_gpu_path.py trains with it)."""
    if not cfg.model.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def build_model(base: ResolvedModel, cfg: Config, where: Placement) -> PeftModel:
    # get_peft_model draws LoRA's A matrices from torch's RNG, and the Trainer seeds only in its
    # __init__, later: without this every process starts from a different adapter.
    set_seed(cfg.training.seed)
    dtype = compute_dtype(cfg, where.cuda)
    quant = quantization(cfg, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(base.path),
        dtype=dtype,
        attn_implementation=where.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,  # never unpickle weights (a .bin-only model fails here, by design)
        quantization_config=quant,
        # bitsandbytes quantizes while loading onto the device it is placed on; each rank on its own GPU
        device_map={"": int(os.environ.get("LOCAL_RANK", "0")) if where.cuda else "cpu"} if quant else None,
    )
    if fused_lm_head_enabled(cfg, where.cuda):
        enable_fused_lm_head(model)  # before PEFT wraps it (TRL's requirement)
    peft_model = with_lora(model, cfg)
    if cfg.training.torch_compile == "layers":
        n = compile_layers(peft_model, cfg.training.torch_compile_mode)
        log.info(f"torch.compile: {n} decoder layers, one graph; the first training step compiles it (about a minute)")
    return peft_model


def compile_layers(model: PeftModel, mode: str = "default") -> int:
    """torch.compile each decoder layer in place, the way torchtitan compiles its blocks: activation checkpointing
    wraps the compiled call (it calls nn.Module.__call__), and since parameters are graph inputs every layer reuses
    one graph; the embedding, the masks and the loss stay eager. Returns the number of layers compiled."""
    blocks = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise RunError(
            f"training.torch_compile=layers: {type(model.get_base_model()).__name__} names no decoder layer class "
            "(_no_split_modules).\n  fix: torch_compile: true compiles the whole model instead"
        )
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)


def with_lora(model: PreTrainedModel, cfg: Config) -> PeftModel:
    lora = LoraConfig(task_type="CAUSAL_LM", **cfg.lora.model_dump())
    with warnings.catch_warnings():
        # PEFT 0.21.2 reads model.is_gradient_checkpointing, which transformers 5.24 deprecates with a FutureWarning
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)
