"""The training loss without the [batch, seq, vocab] logits, which Gemma 2's 256k vocabulary makes most of a step's
memory (docs/gpu-box.md, "Will it fit?"): TRL 1.16's `add_fused_lm_head` projects through lm_head in tiles, folds
them into an online log-sum-exp with the final softcap applied inside, in fp32, and recomputes them in backward.

Chosen over liger-kernel and Cut Cross-Entropy because it is the one that runs here: both need Triton (GPU) and
CCE's Gemma 2 patch once skipped the softcap (its issue 48).
"""

from __future__ import annotations

import functools
import types

from transformers import PreTrainedModel
from trl.trainer.utils import add_fused_lm_head

from core.config import Config


def fused_lm_head_enabled(cfg: Config, cuda: bool) -> bool:
    """training.fused_lm_head: auto is on with CUDA and off on CPU (where the existing runs stay bit-identical)."""
    choice = cfg.training.fused_lm_head
    return cuda if choice == "auto" else bool(choice)


def enable_fused_lm_head(model: PreTrainedModel) -> None:
    """Patch `model` (before PEFT wraps it) so that a forward with labels returns the fused loss and no logits:
    TRL's patch needs `fused_lm_head=True`, which the Trainer does not pass. A forward without labels (generation,
    verification) is the model's own."""
    add_fused_lm_head(model)
    fused = model.forward

    @functools.wraps(type(model).forward)  # the Trainer reads the signature (it accepts num_items_in_batch)
    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        return fused(*args, fused_lm_head=labels is not None, **kwargs)

    model.forward = types.MethodType(forward, model)
