"""The streaming merge against PEFT's own merge_and_unload, byte for byte, in float32 and bfloat16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from convert.merge import Merge, merge_adapter, nf4_roundtrip, nf4_weights
from convert.reference import Reference
from convert.score import CHUNK
from convert.verify import DEQUANTIZED, W16, VerificationFailed, verify_merge, write_reports
from core.config import Config
from core.errors import RunError
from core.hub import resolve_model
from core.tokenizer import save_tokenizer
from tests.conftest import TINY_REPO


def make_base_and_adapter(hf_home: Path, tok, tmp_path: Path, dtype: torch.dtype, rslora: bool) -> tuple[Path, Path]:
    src = resolve_model(TINY_REPO, hf_home=hf_home).path
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
    model.save_pretrained(str(base_dir))
    save_tokenizer(tok, base_dir, src / "tokenizer.model")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["q_proj", "v_proj", "down_proj"])
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), lora)
    with torch.no_grad():  # PEFT starts B at zero: give every module a real delta
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(str(adapter_dir))
    save_tokenizer(tok, adapter_dir, src / "tokenizer.model")
    return base_dir, adapter_dir


def peft_merged(base_dir: Path, adapter_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What convert.merge did before: the whole model in fp32, merge_and_unload, cast to the base dtype."""
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().to(dtype)
    return {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}  # tied: not in the files


@pytest.mark.parametrize(("dtype", "rslora"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_streaming_merge_equals_peft_bit_for_bit(hf_home, tok, tmp_path, dtype, rslora):
    base_dir, adapter_dir = make_base_and_adapter(hf_home, tok, tmp_path, dtype, rslora)
    out = merge_adapter(base_dir, adapter_dir, tmp_path / "merged")
    ours = load_file(str(out / "model.safetensors"))
    reference = peft_merged(base_dir, adapter_dir, dtype)
    assert sorted(ours) == sorted(reference)
    changed = 0
    for name, tensor in reference.items():
        assert ours[name].dtype == dtype
        assert torch.equal(ours[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
        changed += not torch.equal(ours[name], load_file(str(base_dir / "model.safetensors"))[name])
    assert changed == 4 * 3  # every targeted module of every layer, and nothing else
    assert (out / "tokenizer.model").is_file() and json.loads((out / "config.json").read_text())["num_hidden_layers"]
    merged_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)  # loads as a model
    assert merged_model.config.num_hidden_layers == 4


def test_an_adapter_of_another_model_is_refused(hf_home, tok, tmp_path):
    base_dir, adapter_dir = make_base_and_adapter(hf_home, tok, tmp_path, torch.float32, False)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    renamed = {k.replace("layers.0.", "layers.9."): v for k, v in weights.items()}
    from safetensors.torch import save_file

    save_file(renamed, str(adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(RunError, match="LoRA modules name no weight"):
        merge_adapter(base_dir, adapter_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_dora_is_refused(hf_home, tok, tmp_path):
    base_dir, adapter_dir = make_base_and_adapter(hf_home, tok, tmp_path, torch.float32, False)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(RunError, match="does not support DoRA"):
        merge_adapter(base_dir, adapter_dir, tmp_path / "merged")


# ----------------------------------------------------------------------------- the merge check
def qlora_model(base_dir: Path, adapter_dir: Path):
    """The model as QLoRA trains it: the base loaded in nf4 by transformers and bitsandbytes, the adapter on top."""
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir),
        dtype=torch.float32,
        quantization_config=quant,
        device_map={"": "cpu"},
        attn_implementation="eager",
    )
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def test_the_nf4_round_trip_is_the_base_qlora_trains_on(hf_home, tok, tmp_path):
    """nf4_weights names exactly the weights bitsandbytes loading quantizes, nf4_roundtrip gives their values, and the
    reference with the adapter added that way computes what the QLoRA model computes."""
    import bitsandbytes.functional as bnb

    base_dir, adapter_dir = make_base_and_adapter(hf_home, tok, tmp_path, torch.bfloat16, False)
    model = qlora_model(base_dir, adapter_dir)
    stored = load_file(str(base_dir / "model.safetensors"))
    quantized = {
        f"{name.removeprefix('base_model.model.').replace('.base_layer', '')}.weight": m
        for name, m in model.named_modules()
        if type(m).__name__ == "Linear4bit"
    }
    assert set(quantized) == nf4_weights(base_dir)
    for name, m in quantized.items():
        loaded = bnb.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        assert torch.equal(loaded, nf4_roundtrip(stored[name])), name

    trained = Merge(adapter_dir, nf4_weights(base_dir))
    ids = tok("The backup finished at 02:14 and every snapshot verified.")["input_ids"]
    reference = Reference(base_dir, [ids], "cpu", lambda n, t: trained.weight(n, t, torch.float32))
    ours = torch.from_numpy(reference.logits_of(reference.plan(CHUNK)))
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].float()
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_the_merge_check_ships_the_merge_closest_to_the_model_as_trained(hf_home, tok, tmp_path):
    base_dir, adapter_dir = make_base_and_adapter(hf_home, tok, tmp_path, torch.bfloat16, False)
    verify = Config().verify.model_copy(update={"min_scored_tokens": 64, "device": "cpu"})

    check = verify_merge(base_dir, adapter_dir, False, verify, [], [])
    [lora] = check.reports
    assert check.nf4 == frozenset() and lora.path == f"merged into {W16}" and lora.passed
    assert 0 < lora.measures["kld"] < 1e-4  # bf16 rounding of the merged weights, nothing more
    assert lora.measures["positions"] >= 64

    check = verify_merge(base_dir, adapter_dir, True, verify, [], [])
    w16, dequantized = check.reports
    assert check.nf4 == nf4_weights(base_dir)  # shipped: the dequantized 4-bit base, which QLoRA trained on
    assert dequantized.gates and dequantized.passed and not w16.gates and "not shipped" in w16.notes[0]
    assert dequantized.measures["kld"] < lora.measures["kld"] * 10 < w16.measures["kld"]

    strict = verify.model_copy(update={"max_merge_kld": 1e-12})
    failed = verify_merge(base_dir, adapter_dir, True, strict, [], []).reports
    assert not failed[1].passed and failed[1].failures()[0].startswith("kld ")
    # what the export writes and says when the merge fails its gate (convert.export._merge: nothing merged yet)
    error = VerificationFailed(failed)
    assert f"merged into {DEQUANTIZED} [merge]: failed kld = " in str(error) and W16 not in str(error)
    written = write_reports(tmp_path, {"": error.reports}, strict, passed=False)
    assert written["passed"] is False and written["files"] == [] and written["recommended"] == {}
    assert [m["passed"] for m in written["merge"]] == [True, False]  # the way not shipped has no gate
    md = (tmp_path / "verify.md").read_text()
    assert f"| merged into {DEQUANTIZED} | merge |" in md and "| kld <= 1e-12 | FAIL: kld = " in md
    assert "- merge: kld <= 1e-12 against the model as trained" in md
    merge = Merge(adapter_dir, check.nf4)
    out = merge_adapter(base_dir, adapter_dir, tmp_path / "merged", check.nf4)
    for name, tensor in load_file(str(out / "model.safetensors")).items():
        assert torch.equal(tensor, merge.weight(name, load_file(str(base_dir / "model.safetensors"))[name]))
    # the verification of the merged GGUFs reuses the check's reference of the shipped way (verify_files' merge):
    # the folder as written gives the same logits, bit for bit
    plan = check.reference.plan(CHUNK)
    written = Reference(out, [s.ids for s in check.scored.sequences], "cpu")
    assert torch.equal(torch.from_numpy(written.logits_of(plan)), torch.from_numpy(check.reference.logits_of(plan)))
