"""The GGUF types this pipeline exports: one table, from which the config's choices and every lookup derive.

Names are llama.cpp's `llama-quantize` names, lower-cased. File types and tensor types are gguf-py's enums
(`gguf.LlamaFileType` mirrors llama.h `enum llama_ftype`; `gguf.GGMLQuantizationType` mirrors ggml.h
`enum ggml_type`), so the numbers are those of the pinned llama.cpp release.
"""

from __future__ import annotations

from dataclasses import dataclass
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
        Quant("q4_0", F.MOSTLY_Q4_0, T.Q4_0, False, 0.1),
    )
}
del T, F

FLOAT_TYPES = tuple(name for name, q in QUANTS.items() if q.is_float)

if TYPE_CHECKING:
    QuantType = str
else:  # the config schema's choices: exactly the table's names
    QuantType = Literal[tuple(QUANTS)]


def quant_of_file_type(file_type: int) -> str | None:
    """Our name for a GGUF's general.file_type, or None for a type this pipeline does not export."""
    return next((name for name, q in QUANTS.items() if q.file_type == file_type), None)
