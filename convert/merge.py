"""Merge a LoRA adapter into its base model and save a complete, convertible HF folder, one tensor at a time.

PEFT's merge_and_unload holds the whole model (in float32 for an exact sum: ~10 GB for Gemma 2 2B); this streams
each base tensor from the safetensors, adds PEFT's delta (W + (B @ A) * scaling) in float32, and writes it in the
base's dtype. tests/unit/test_merge.py checks the bytes equal PEFT's.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from core import signals
from core.errors import RunError
from core.files import move_dir_into_place
from core.tokenizer import save_tokenizer

# Bytes per element of safetensors' dtype names (the format's spec, safetensors/src/tensor.rs `Dtype`) for what
# checkpoints hold.
DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2}
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size, which transformers' BitsAndBytesConfig leaves at its default
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors
# Adapter features that change the arithmetic above; a merge must refuse them rather than merge wrongly.
UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "fan_in_fan_out": "fan_in_fan_out",
    "lora_bias": "lora_bias",
}


def is_tokenizer_file(path: Path) -> bool:
    """A file of an HF folder that the run's tokenizer replaces (it carries the chat template the run trained with)."""
    return path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "chat_template.jinja")


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """A weight as QLoRA trains on it, in float32: quantized the way transformers loads it with model.load_in_4bit
    (bitsandbytes nf4 in blocks of 64, the blocks' absmax quantized again: double quantization), then dequantized.
    tests/unit/test_merge.py checks it equals the weights of a model loaded that way."""
    import bitsandbytes.functional as bnb  # noqa: PLC0415 (only QLoRA runs need it)

    packed, state = bnb.quantize_4bit(weight.float(), blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")
    return bnb.dequantize_4bit(packed, state).float()


def nf4_weights(model_dir: Path) -> frozenset[str]:
    """Checkpoint names of the weights QLoRA's loading puts in nf4: every nn.Linear's but the output layer's
    (transformers keeps the output embedding in full precision; Gemma's embedding is no Linear)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    output = model.get_output_embeddings()
    return frozenset(
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not output
    )


class Merge:
    """The adapter added to base weights, tensor by tensor. nf4: names of base weights taken as their nf4 round trip
    (the dequantized 4-bit base a QLoRA adapter was trained on) rather than as stored (the full-precision base)."""

    def __init__(self, adapter_dir: Path, nf4: frozenset[str] = frozenset()):
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        used = [name for key, name in UNSUPPORTED.items() if config.get(key)]
        if used:
            raise RunError(f"{adapter_dir}: the streaming merge does not support {', '.join(used)} in the adapter")
        r, alpha = config["r"], config["lora_alpha"]
        self.scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))  # small: r x hidden per module
        self.deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # base weight name -> (A, B)
        for key, a in weights.items():
            if ".lora_A." in key:
                target = key.removeprefix(PEFT_PREFIX).replace(".lora_A.weight", ".weight")
                self.deltas[target] = (a, weights[key.replace(".lora_A.", ".lora_B.")])
        self.nf4 = nf4

    def weight(self, name: str, base: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Base tensor `name` with its LoRA delta, W + (B @ A) * scaling summed in float32, as `dtype` (default: the
        base's own: what is written). float32 without rounding is the model as trained."""
        lora = self.deltas.get(name)
        if lora is None and name not in self.nf4:
            return base if dtype is None else base.to(dtype)
        weight = nf4_roundtrip(base) if name in self.nf4 else base.float()
        if lora is not None:
            a, b = lora
            weight = weight + (b.float() @ a.float()) * self.scaling
        return weight.to(dtype or base.dtype)


def _header(views: dict[str, Any], metadata: dict[str, str] | None) -> bytes:
    """The safetensors header of tensors with the dtypes and shapes of `views` (safe_open's slices), in their order."""
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, view in views.items():
        dtype, shape = view.get_dtype(), list(view.get_shape())
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned (the format pads the header)


def merge_file(src: Path, dst: Path, merge: Merge) -> int:
    """Write dst: src's tensors in src's order and dtypes, each with its LoRA delta merged; returns merges done."""
    merged = 0
    with safe_open(src, framework="pt") as st, open(dst, "wb") as out:
        names = st.keys()  # safe_open is no mapping: it has keys() but no iteration
        views = {name: st.get_slice(name) for name in names}
        header = _header(views, st.metadata())
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for name in views:
            merged += name in merge.deltas
            with signals.deferred():  # a signal inside get_tensor would surface as a ValueError
                tensor = st.get_tensor(name)
            # the tensor's own bytes (a memoryview), not a copy: .tobytes() would double the largest tensor (1.2 GB
            # of embedding at the 2B's shapes)
            out.write(merge.weight(name, tensor).contiguous().view(torch.uint8).numpy().data)
    return merged


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, nf4: frozenset[str] = frozenset()) -> Path:
    """Fold adapter_dir's LoRA weights into base_dir's model and write out_dir (replaced as a whole): every file of
    the base (config, generation config, shard index), merged weights, the adapter folder's tokenizer. nf4: base
    weights merged into as their nf4 round trip (Merge)."""
    merge = Merge(adapter_dir, nf4)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        stage = Path(tmp) / "merged"
        stage.mkdir()
        merged = 0
        for path in sorted(base_dir.iterdir()):
            if is_tokenizer_file(path):
                continue
            if path.suffix == ".safetensors":
                merged += merge_file(path, stage / path.name, merge)
            elif path.is_file():
                shutil.copyfile(path, stage / path.name)
        if merged != len(merge.deltas):
            missing = len(merge.deltas) - merged
            raise RunError(
                f"{adapter_dir}: {missing} of {len(merge.deltas)} LoRA modules name no weight of {base_dir}: "
                f"the adapter was not trained on this base model"
            )
        save_tokenizer(AutoTokenizer.from_pretrained(str(adapter_dir)), stage, adapter_dir / "tokenizer.model")
        move_dir_into_place(stage, out_dir)  # a rename: the staging folder is beside out_dir
    return out_dir
