"""Merge a LoRA adapter into its base model and save a complete, convertible HF folder."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.files import atomic_replace_dir
from core.tokenizer import save_tokenizer


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Fold adapter_dir's LoRA weights into base_dir's model and write out_dir (replaced as a whole).

    The merge runs in float32 (exact sums) and the result is saved in the base checkpoint's dtype
    (bfloat16 for google/gemma-2-2b), so the merged folder has the base's size and layout.
    """
    base_config = json.loads((base_dir / "config.json").read_text())
    base_dtype = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    base = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, attn_implementation="eager", use_safetensors=True
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(getattr(torch, base_dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))  # carries the chat template trained with
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        stage = Path(tmp) / "merged"
        merged.save_pretrained(str(stage), safe_serialization=True)
        save_tokenizer(tokenizer, stage, adapter_dir / "tokenizer.model")
        atomic_replace_dir(stage, out_dir)
    return out_dir
