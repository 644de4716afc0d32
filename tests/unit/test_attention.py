"""Attention kernels for Gemma 2: flex_attention equals eager on packed batches with the softcap biting; sdpa
and flash attention with packed rows it cannot isolate are refused by the schema, with the reason."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import PreTrainedModel

from core.config import ConfigError, load_config
from tests.support import families
from train.data import collate

VOCAB = 320


def gemma(attn: str, attn_softcap: float | None = 50.0, family: str = "gemma2") -> PreTrainedModel:
    # initializer_range 1.0 makes the raw attention scores exceed the softcap of 50, so it decides the result
    shape = dict(num_hidden_layers=2, vocab_size=VOCAB, initializer_range=1.0, sliding_window=16)
    return families.small_gemma(family, attn_logit_softcapping=attn_softcap, attn_implementation=attn, **shape)


def packed_batch() -> dict:
    g = torch.Generator().manual_seed(5)
    rows = []
    for lengths in ([20, 17, 9], [30, 12], [25]):
        ids: list[int] = []
        for n in lengths:
            ids += [2] + torch.randint(4, VOCAB, (n - 1,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return collate(rows, pad_id=0)


def loss_and_grads(model: PreTrainedModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if "layers.0.self_attn" in n}


@pytest.mark.usefixtures("aot_eager_compile")
@pytest.mark.parametrize("family", families.FAMILIES)
def test_flex_attention_equals_eager_on_a_packed_batch_with_softcap(family):
    """Forward only: torch 2.13's FlexAttention has no backward on CPU (the gpu test below checks gradients).
    Gemma 3: no softcap, a local and a global layer with their own RoPE bases, the window shorter than the rows.
    transformers compiles flex_attention; here through AOTAutograd, so the masks and the softcap score function are
    checked, not inductor's CPU kernel (conftest.aot_eager_compile)."""
    batch = packed_batch()
    assert "position_ids" in batch and "attention_mask" not in batch  # really packed: isolation by positions
    with torch.no_grad():
        ref = gemma("eager", family=family)(**batch).loss
        flex = gemma("flex_attention", family=family)(**batch).loss
        uncapped = gemma("eager", attn_softcap=None, family=family)(**batch).loss
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)
    if family == "gemma2":  # the softcap matters at these weights: without it the loss moves far beyond the tolerance
        assert abs(float(uncapped) - float(ref)) > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention backward)")
def test_flex_attention_gradients_equal_eager_on_cuda():
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed_batch().items()}
    ref_loss, ref_grads = loss_and_grads(gemma("eager").cuda(), batch)
    loss, grads = loss_and_grads(gemma("flex_attention").cuda(), batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-3, rtol=1e-3, msg=name)


def config_with(tmp_path, **sections) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def test_sdpa_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(config_with(tmp_path, model={"attn_implementation": "sdpa"}))
    assert "skips the attention logit softcap" in str(err.value)
    assert "_supports_sdpa = False" in str(err.value)


def test_flash_attention_refuses_packed_rows_it_cannot_isolate(tmp_path):
    bad = {"model": {"attn_implementation": "flash_attention_2"}, "data": {"packing": True}}
    with pytest.raises(ConfigError) as err:
        load_config(config_with(tmp_path, **bad))
    assert "flash_attention_2 cannot keep packed examples apart" in str(err.value)
    ok = dict(bad, training={"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1})
    assert load_config(config_with(tmp_path, **ok)).model.attn_implementation == "flash_attention_2"
    unpacked = {"model": {"attn_implementation": "flash_attention_2"}, "data": {"packing": False}}
    assert load_config(config_with(tmp_path, **unpacked)).data.packing is False
