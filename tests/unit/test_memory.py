"""The dry run's "will it fit?" estimate (train/memory.py), checked against steps measured on the CPU.

The measurement runs the real step (real tensors, the model's own attention mask, TRL's fused head when on)
under the same storage tracker; the estimate traces the meta device with stand-ins for the fused head. They
must agree within 10% (measured: within 2%), and the estimate must move the way the knobs say.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config

from core.config import Config
from scripts.tiny_model import TINY_CONFIG
from tests.support import families
from train.device import Placement
from train.loss import enable_fused_lm_head
from train.memory import PeakMemory, describe, estimate_step_memory

SHAPE = dict(TINY_CONFIG, vocab_size=8192, num_hidden_layers=2)
BATCH, SEQ = 2, 256


def config(**training) -> Config:
    return Config.model_validate(
        {
            "model": {"dtype": "float32", "device": "cpu", "attn_implementation": "eager"},
            "lora": {"r": 8, "lora_dropout": 0.0},
            "training": {"per_device_train_batch_size": BATCH, "fused_lm_head": False, **training},
            "data": {"max_seq_length": SEQ},
        }
    )


def small(family: str):
    return families.small_gemma(family, vocab_size=8192, num_hidden_layers=2, attn_implementation="eager")


def measured_peak(cfg: Config, family: str = "gemma2") -> int:
    model = small(family)
    if cfg.training.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.training.fused_lm_head is True:
        enable_fused_lm_head(model)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **cfg.lora.model_dump()))
    model.train()
    ids = torch.randint(4, SHAPE["vocab_size"], (BATCH, SEQ))
    params = [*model.parameters(), *model.buffers()]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with PeakMemory(params) as mem:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss.backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return mem.peak + weights + 8 * trainable


CASES = {
    "plain": {},
    "fused": {"fused_lm_head": True},
    "checkpointing": {"activation_checkpointing": True},
    "fused+checkpointing": {"fused_lm_head": True, "activation_checkpointing": True},
}


# every case on Gemma 2; Gemma 3 (its own layers, QK-norm, no softcaps) at both ends
MEASURED = [("gemma2", n) for n in CASES] + [("gemma3_text", "plain"), ("gemma3_text", "fused+checkpointing")]


@pytest.mark.parametrize(("family", "name"), MEASURED)
def test_estimate_within_10_percent_of_the_measured_cpu_peak(family, name):
    cfg = config(**CASES[name])
    estimate = estimate_step_memory(small(family).config, cfg, Placement(False, "eager")).peak
    measured = measured_peak(cfg, family)
    assert 0.9 * measured <= estimate <= 1.1 * measured, (family, name, estimate, measured)


def test_estimate_moves_with_the_knobs():
    """On the CUDA profile (Triton folds tiles in place), at a vocabulary wider than TRL's 32768-wide tile: below
    it the tile costs more than the logits it replaces."""
    cuda, wide = Placement(True, "eager"), Gemma2Config(**dict(SHAPE, vocab_size=131072))
    peak = {n: estimate_step_memory(wide, config(**t), cuda).peak for n, t in CASES.items()}
    assert peak["fused"] < 0.7 * peak["plain"]  # the logits are most of this step
    assert peak["checkpointing"] < peak["plain"]
    assert peak["fused+checkpointing"] < min(peak["fused"], peak["checkpointing"])
    small = estimate_step_memory(Gemma2Config(**SHAPE), config(), cuda, batch=1, seq=128)
    large = estimate_step_memory(Gemma2Config(**SHAPE), config(), cuda, batch=2, seq=256)
    assert 3 < (large.peak - small.weights) / (small.peak - small.weights) < 5  # ~linear in tokens (plus T^2)


def test_advice_names_the_knob_to_turn_first():
    est = estimate_step_memory(Gemma2Config(**SHAPE), config(), Placement(False, "eager"))
    lines = "\n".join(describe(est, card=est.total // 2, card_name="half card"))
    assert "does NOT fit" in lines
    assert lines.index("training.fused_lm_head=true") < lines.index("per_device_train_batch_size")
    assert "big (" in "\n".join(describe(est, card=est.total * 2, card_name="big"))
    assert "NOT" not in "\n".join(describe(est, card=est.total * 2, card_name="big"))
