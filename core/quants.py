"""The GGUF types this pipeline exports: one table, from which the config's choices and every lookup derive. Names
are `llama-quantize`'s, lower-cased; the enums are gguf-py's, so the numbers are those of the pinned llama.cpp.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType


@dataclass(frozen=True)
class Quant:
    name: str
    file_type: LlamaFileType  # general.file_type of the GGUF; the ftype llama_model_quantize is asked for
    tensor_type: GGMLQuantizationType  # what the bulk of the 2D weights become
    is_float: bool  # converted by convert_hf_to_gguf.py and gated on logits; the rest are quantized, gated on KLD
    gate: float  # default gate: max NMSE of last-token logits (float types) or max mean KLD (quantized types)
    mix_bits: float | None = None  # k-quant mixes keep some tensors at a higher type; llama.cpp's measured average
    needs_imatrix: bool = False  # llama_model_quantize refuses it without an importance matrix (export.imatrix)

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight: the mix's measured average, or the tensor type's block size (gguf-py's GGML_QUANT_SIZES)."""
        if self.mix_bits is not None:
            return self.mix_bits
        block, size = GGML_QUANT_SIZES[self.tensor_type]
        return size * 8 / block


T, F = GGMLQuantizationType, LlamaFileType
# Gates: float types from the usual bound for a faithful conversion (normalized MSE < 1e-4, llama.cpp's own
# conversion checks; bf16 rounds harder). KLD gates grow with the bits removed; q4_k_m's 0.05 is the level at
# which llama.cpp's perplexity tables still call Q4_K_M "balanced" for Gemma 2B (PR 5650). The *_m/_s mixes'
# averages are llama.cpp's (llama_tensor_get_type keeps attn_v/ffn_down of some layers higher), rounded up.
# IQ types: iq4_xs quantizes without an importance matrix; iq3_xxs (and iq2_*, iq1_*) are refused without one
# (llama-quant.cpp tensor_requires_imatrix: "The result will be garbage"). Their gates follow the bits:
# iq4_xs sits with the 4-bit k-quants (4.25 bpw), iq3_xxs at ~3 bpw loses clearly more.
QUANTS: dict[str, Quant] = {
    q.name: q
    for q in (
        Quant("f32", F.ALL_F32, T.F32, True, 1e-4),
        Quant("f16", F.MOSTLY_F16, T.F16, True, 1e-4),
        Quant("bf16", F.MOSTLY_BF16, T.BF16, True, 1e-3),
        Quant("q8_0", F.MOSTLY_Q8_0, T.Q8_0, False, 1e-3),
        Quant("q6_k", F.MOSTLY_Q6_K, T.Q6_K, False, 5e-3),
        Quant("q5_k_m", F.MOSTLY_Q5_K_M, T.Q5_K, False, 1e-2, mix_bits=5.75),
        Quant("q5_k_s", F.MOSTLY_Q5_K_S, T.Q5_K, False, 1e-2, mix_bits=5.5),
        Quant("q5_0", F.MOSTLY_Q5_0, T.Q5_0, False, 1e-2),
        Quant("q4_k_m", F.MOSTLY_Q4_K_M, T.Q4_K, False, 0.05, mix_bits=4.9),
        Quant("q4_k_s", F.MOSTLY_Q4_K_S, T.Q4_K, False, 0.05, mix_bits=4.6),
        Quant("iq4_xs", F.MOSTLY_IQ4_XS, T.IQ4_XS, False, 0.05),
        Quant("q4_0", F.MOSTLY_Q4_0, T.Q4_0, False, 0.1),
        Quant("iq3_xxs", F.MOSTLY_IQ3_XXS, T.IQ3_XXS, False, 0.2, needs_imatrix=True),
    )
}
del T, F

FLOAT_TYPES = tuple(name for name, q in QUANTS.items() if q.is_float)
NEEDS_IMATRIX = tuple(name for name, q in QUANTS.items() if q.needs_imatrix)

# safetensors dtype names -> the float GGUF type that holds them exactly (export.float_type: auto)
FLOAT_OF_DTYPE = {"BF16": "bf16", "F16": "f16", "F32": "f32"}

if TYPE_CHECKING:
    QuantType = str
else:  # the config schema's choices: exactly the table's names
    QuantType = Literal[tuple(QUANTS)]


def quant_of_file_type(file_type: int) -> str | None:
    """Our name for a GGUF's general.file_type, or None for a type this pipeline does not export."""
    return next((name for name, q in QUANTS.items() if q.file_type == file_type), None)


def checkpoint_dtype(model_dir: Path) -> str:
    """The safetensors dtype holding most of a checkpoint's parameters ("BF16", "F16", "F32", ...), from the file
    headers only (an 8-byte length, then JSON: safetensors' format), so nothing is loaded."""
    params: Counter[str] = Counter()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                params[entry["dtype"]] += math.prod(entry["shape"])
    if not params:
        raise ValueError(f"{model_dir}: no *.safetensors weights to read a dtype from")
    return params.most_common(1)[0][0]


def float_gguf_type(float_type: str, quants: list[str], model_dir: Path) -> str:
    """The float GGUF an export converts to (export.float_type; auto: see ExportSection.float_type)."""
    if float_type != "auto":
        return float_type
    listed = next((q for q in quants if QUANTS[q].is_float), None)
    # an F64 checkpoint, say: f32 is the widest GGUF float type
    return listed or FLOAT_OF_DTYPE.get(checkpoint_dtype(model_dir), "f32")
