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
from transformers import AutoTokenizer

from core import signals
from core.errors import RunError
from core.files import move_dir_into_place
from core.tokenizer import save_tokenizer

# safetensors' dtype names (the format's spec, safetensors/src/tensor.rs `Dtype`) for what checkpoints hold.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
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


def lora_deltas(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{base weight name: (A, B)} of the adapter, and its scaling."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    used = [name for key, name in UNSUPPORTED.items() if config.get(key)]
    if used:
        raise RunError(f"{adapter_dir}: the streaming merge does not support {', '.join(used)} in the adapter")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))  # small: r x hidden per module
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        target = key.removeprefix(PEFT_PREFIX).replace(".lora_A.weight", ".weight")
        pairs[target] = (a, weights[key.replace(".lora_A.", ".lora_B.")])
    return pairs, scaling


def merged_tensor(base: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None, scaling: float) -> torch.Tensor:
    if lora is None:
        return base
    a, b = lora
    delta = (b.float() @ a.float()) * scaling
    return (base.float() + delta).to(base.dtype)


def _header(views: dict[str, Any], metadata: dict[str, str] | None) -> bytes:
    """The safetensors header of tensors with the dtypes and shapes of `views` (safe_open's slices), in their order."""
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, view in views.items():
        dtype, shape = view.get_dtype(), list(view.get_shape())
        size = math.prod(shape) * torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned (the format pads the header)


def merge_file(src: Path, dst: Path, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> int:
    """Write dst: src's tensors in src's order and dtypes, each with its LoRA delta merged; returns merges done."""
    merged = 0
    with safe_open(src, framework="pt") as st, open(dst, "wb") as out:
        names = st.keys()  # safe_open is no mapping: it has keys() but no iteration
        views = {name: st.get_slice(name) for name in names}
        header = _header(views, st.metadata())
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for name in views:
            lora = deltas.get(name)
            merged += lora is not None
            with signals.deferred():  # a signal inside get_tensor would surface as a ValueError
                tensor = st.get_tensor(name)
            # the tensor's own bytes (a memoryview), not a copy: .tobytes() would double the largest tensor (1.2 GB
            # of embedding at the 2B's shapes)
            out.write(merged_tensor(tensor, lora, scaling).contiguous().view(torch.uint8).numpy().data)
    return merged


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Fold adapter_dir's LoRA weights into base_dir's model and write out_dir (replaced as a whole): every file of
    the base (config, generation config, shard index), merged weights, the adapter folder's tokenizer."""
    deltas, scaling = lora_deltas(adapter_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        stage = Path(tmp) / "merged"
        stage.mkdir()
        merged = 0
        for path in sorted(base_dir.iterdir()):
            if is_tokenizer_file(path):
                continue
            if path.suffix == ".safetensors":
                merged += merge_file(path, stage / path.name, deltas, scaling)
            elif path.is_file():
                shutil.copyfile(path, stage / path.name)
        if merged != len(deltas):
            raise RunError(
                f"{adapter_dir}: {len(deltas) - merged} of {len(deltas)} LoRA modules name no weight of {base_dir}: "
                f"the adapter was not trained on this base model"
            )
        save_tokenizer(AutoTokenizer.from_pretrained(str(adapter_dir)), stage, adapter_dir / "tokenizer.model")
        move_dir_into_place(stage, out_dir)  # a rename: the staging folder is beside out_dir
    return out_dir
