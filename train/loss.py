"""The training loss without the [batch, seq, vocab] logits: cross-entropy fused with lm_head and Gemma's softcap.

Gemma 2's 256k vocabulary makes the logits (softcapped in bf16, their fp32 log-softmax saved for backward, two fp32
gradient buffers) most of a step's memory: docs/gpu-box.md, "Will it fit?". TRL 1.16's `add_fused_lm_head` projects
the hidden states through lm_head in tiles (4096 tokens x 32768 vocab), folds each tile into an online log-sum-exp
and recomputes the tiles in backward, so no [tokens, vocab] tensor ever exists. It reads `final_logit_softcapping`
from the config (Gemma 2: 30) and applies it inside the tile, in fp32. On CUDA (Triton) only positions with a
supervised next token go through lm_head; elsewhere every position does, still in tiles.

Chosen over liger-kernel and Cut Cross-Entropy because it is the one that runs here: both need Triton (GPU) and
CCE's Gemma 2 patch once skipped the softcap (its issue 48). tests/unit/test_fused_loss.py checks loss and LoRA
gradients against the model's own forward + cross-entropy at 1e-5 (fp32, softcap active).
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
    """Patch `model` (before PEFT wraps it) so that a forward with labels returns the fused loss and no logits.

    TRL's patch computes the fused loss only when called with `fused_lm_head=True`; the Trainer calls the model
    with the batch alone, so this wrapper asks for it whenever labels are given. A forward without labels
    (generation, verification) is the model's own.
    """
    add_fused_lm_head(model)
    fused = model.forward

    @functools.wraps(type(model).forward)  # the Trainer reads the signature (it accepts num_items_in_batch)
    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        return fused(*args, fused_lm_head=labels is not None, **kwargs)

    model.forward = types.MethodType(forward, model)
