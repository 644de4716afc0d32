"""The fused lm_head + cross-entropy (train/loss.py) equals the model's own forward + cross-entropy.

On a small Gemma 2 in fp32 with the final softcap (30) active: initializer_range=1.0, as litgpt's
test_against_original_gemma_2 does, makes raw logits far beyond the cap, so a loss that skipped the softcap
could not match. Loss and every LoRA gradient agree within 1e-5, on a padded batch and on a packed one, with
TRL's tiles shrunk so that both the token and the vocabulary dimensions span several tiles.
"""

from __future__ import annotations

import pytest
import torch
import trl.kernels.chunked_logprob as chunked
import trl.trainer.utils as trl_utils
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from core.records.render import IGNORE_INDEX
from tests.support import families
from train.data import collate
from train.loss import enable_fused_lm_head

VOCAB = 384
BOS = 2


def small_gemma(seed: int = 0, softcap: float | None = 30.0, family: str = "gemma2") -> PreTrainedModel:
    shape = dict(num_hidden_layers=2, vocab_size=VOCAB, initializer_range=1.0, final_logit_softcapping=softcap)
    return families.small_gemma(family, seed, attn_implementation="eager", **shape)


def lora(model: PreTrainedModel):
    # init_lora_weights=False: B is random too, so A gets a gradient (with B = 0 it would be zero on both paths)
    cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    torch.manual_seed(1)
    return get_peft_model(model, cfg)


def rows(lengths: list[int], seed: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = [BOS] + torch.randint(4, VOCAB, (n - 1,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]  # a prompt half outside the loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def packed(lengths: list[list[int]]) -> list[dict]:
    out = []
    for i, row in enumerate(lengths):
        parts = rows(row, seed=10 + i)
        out.append({k: sum((p[k] for p in parts), []) for k in ("input_ids", "labels")})
    return out


def loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(out.loss.detach()), grads


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(chunked, "TOKEN_CHUNK_SIZE", 16)
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 100)  # 384 = 3 full chunks + a partial one


@pytest.mark.parametrize("family", families.FAMILIES)
@pytest.mark.parametrize(
    "batch",
    [rows([40, 23, 31]), packed([[20, 17, 9], [30, 12]])],
    ids=["padded", "packed"],
)
def test_fused_loss_and_lora_grads_equal_reference(batch, family, small_tiles):
    """Gemma 3 too: no final softcap, so the fused loss must not apply one (TRL reads it from the config)."""
    inputs = collate(batch, pad_id=0)
    reference = lora(small_gemma(family=family))
    ref_loss, ref_grads = loss_and_grads(reference, inputs)
    base = small_gemma(family=family)
    enable_fused_lm_head(base)
    fused = lora(base)
    out = fused(**inputs)
    assert out.get("logits") is None  # no [B, T, V] tensor came out
    loss, grads = loss_and_grads(fused, inputs)
    assert loss == pytest.approx(ref_loss, abs=1e-5, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
        assert g.abs().sum() > 0, name


def test_the_softcap_decides_the_loss(small_tiles):
    """The check above would be blind if the cap never bit: here it changes the loss by far more than 1e-5."""
    inputs = collate(rows([40, 23]), pad_id=0)
    capped, uncapped = small_gemma(), small_gemma(softcap=None)
    with torch.no_grad():
        raw = uncapped(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        assert raw.abs().max() > 60  # twice the cap: tanh is far from linear there
        assert abs(float(capped(**inputs).loss) - float(uncapped(**inputs).loss)) > 0.1


def test_without_labels_the_model_forward_is_unchanged():
    inputs = collate(rows([12, 9]), pad_id=0)
    inputs.pop("labels")
    plain, patched = small_gemma(), small_gemma()
    enable_fused_lm_head(patched)
    with torch.no_grad():
        torch.testing.assert_close(patched(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)
