"""Small random models of the Gemma families the training path takes (core.hub FAMILIES), for its unit tests: the
demo model's shapes (scripts/tiny_model.py TINY_CONFIG) in each family's own config class."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, PreTrainedModel

from scripts.tiny_model import TINY_CONFIG

FAMILIES = ["gemma2", "gemma3_text"]


def small_gemma(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A float32 model of `family`, TINY_CONFIG's shape with `overrides`. Gemma 3 has no softcaps (QK-norm
    instead; a softcap override is dropped) and its local layers their own RoPE base, five local to one global."""
    shape = dict(TINY_CONFIG, **overrides)
    if family == "gemma2":
        config = Gemma2Config(**shape)
    else:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            shape.pop(key)
        types = [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(shape["num_hidden_layers"])
        ]
        types[-1] = "full_attention"  # the last layer global, as in every Gemma 3
        config = Gemma3TextConfig(**shape, rope_local_base_freq=10_000.0, layer_types=types)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()
