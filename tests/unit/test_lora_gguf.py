"""The adapter GGUF on the base GGUF gives the merged HF model's logits (or, without a base GGUF, the merged GGUF
minus the adapter gives the base model's), or it is not kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from convert.llamacpp import convert_hf_to_gguf, read_metadata
from convert.lora_gguf import LORA_MAX_KLD, export_lora_gguf
from convert.merge import merge_adapter
from core.tokenizer import save_tokenizer
from tests.conftest import DEMO_HELDOUT


def make_adapter(base_dir: Path, tok, out: Path, rslora: bool) -> Path:
    """A LoRA on every linear layer of the base with a real (non-zero) delta."""
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, use_rslora=rslora, target_modules="all-linear")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), lora)
    with torch.no_grad():  # PEFT starts B at zero: give every module a delta that moves the logits
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(str(out))
    save_tokenizer(tok, out, base_dir / "tokenizer.model")
    return out


def heldout_ids(tok) -> list[list[int]]:
    rows = [json.loads(line) for line in DEMO_HELDOUT.read_text().splitlines() if line.strip()]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("rslora, with_base_gguf", [(False, True), (True, False)])
def test_adapter_gguf_reproduces_the_merged_model(tiny_gguf, tok, tmp_path, rslora, with_base_gguf):
    """On the base GGUF (base + adapter vs the merged HF model), or without (merged GGUF - adapter vs the HF base)."""
    base_dir, base_gguf = tiny_gguf  # the tiny model in float32, its f32 GGUF
    adapter_dir = make_adapter(base_dir, tok, tmp_path / "adapter", rslora)
    merged_gguf = tmp_path / "merged.f32.gguf"  # what the check runs without a base GGUF, unread with one
    merged_dir = merge_adapter(base_dir, adapter_dir, tmp_path / "merged")
    if not with_base_gguf:
        convert_hf_to_gguf(merged_dir, merged_gguf, "f32")
    out = tmp_path / "export" / "m.lora.gguf"
    report = export_lora_gguf(
        adapter_dir,
        base_dir,
        merged_dir,
        merged_gguf,
        "f32",
        out,
        heldout_ids(tok),
        tmp_path / "log",
        base_gguf=base_gguf if with_base_gguf else None,
        keys={"finetune.run_name": "lora-test"},
    )
    print(report.describe())
    assert report.passed, report.describe()
    assert ("base GGUF + adapter" if with_base_gguf else "merged GGUF - adapter") in report.describe()
    assert report.measures["kld"] < LORA_MAX_KLD["f32"] / 10 and report.measures["top1"] == 1.0
    assert report.measures["positions"] > 500
    meta = read_metadata(out)
    assert (meta["general.type"], meta["adapter.type"], report.quant) == ("adapter", "lora", "f32")
    assert meta["finetune.run_name"] == "lora-test", "the run's provenance, as the model GGUFs carry it"
    # only the adapter is left: no base GGUF converted for the check, and the staged adapter folder is gone
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.lora.gguf"]


@pytest.mark.parametrize("with_base_gguf", [True, False])
def test_an_adapter_that_does_not_reproduce_the_merged_model_is_not_kept(tiny_gguf, tok, tmp_path, with_base_gguf):
    base_dir, base_gguf = tiny_gguf  # the tiny model in float32, its f32 GGUF
    adapter_dir = make_adapter(base_dir, tok, tmp_path / "adapter", rslora=False)
    out = tmp_path / "export" / "m.lora.gguf"
    # "merged" = the base itself: what a converter that dropped the adapter's delta would verify against
    report = export_lora_gguf(
        adapter_dir,
        base_dir,
        base_dir,
        base_gguf,
        "f32",
        out,
        heldout_ids(tok),
        None,
        base_gguf=base_gguf if with_base_gguf else None,
    )
    assert not report.passed
    assert report.measures["kld"] > 10 * max(LORA_MAX_KLD.values()), report.describe()
    assert not out.exists() and base_gguf.exists()
