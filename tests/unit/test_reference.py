"""The streamed verification reference against transformers' Gemma 2 (eager, float32) on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import convert.reference as reference
from convert.reference import Reference
from convert.score import ReferenceChunks
from core.errors import InvalidInput, RunError
from core.hub import resolve_model
from tests.conftest import TINY_REPO

# Around the tiny model's sliding window (64) and across the chunk size used below (48).
TEXT_LENGTHS = (1, 7, 64, 65, 150)
CHUNK = 48


@pytest.fixture(scope="module")
def tiny_dir(hf_home: Path) -> Path:
    return resolve_model(TINY_REPO, hf_home=hf_home).path  # the hub cache: files are symlinks to blobs


def reference_logits(model_dir: Path, texts: list[list[int]], chunk: int = 256) -> ReferenceChunks:
    """The reference's logits chunk by chunk, as verification reads them (no scratch file)."""
    return ReferenceChunks(Reference(model_dir, texts), chunk, None)


def make_texts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [[2] + torch.randint(0, vocab, (n - 1,), generator=g).tolist() for n in TEXT_LENGTHS]


def hf_logits(model_dir: Path, texts: list[list[int]]) -> list[np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return [model.eval()(torch.tensor([ids])).logits[0].numpy() for ids in texts]


def streamed(model_dir: Path, texts: list[list[int]]) -> tuple[list[tuple[int, int]], list[np.ndarray]]:
    """(text index, positions) of every chunk in order, and each text's logits put back together."""
    order, parts = [], [[] for _ in texts]
    for t, logits in reference_logits(model_dir, texts, chunk=CHUNK):
        assert not torch.is_inference_mode_enabled()  # the generator must not leak its mode into the caller
        assert logits.dtype == np.float32
        order.append((t, logits.shape[0]))
        parts[t].append(logits)
    return order, [np.concatenate(p) for p in parts]


def assert_matches_transformers(model_dir: Path, vocab: int) -> None:
    texts = make_texts(vocab)
    order, ours = streamed(model_dir, texts)
    expected = [(t, min(CHUNK, n - s)) for t, n in enumerate(TEXT_LENGTHS) for s in range(0, n, CHUNK)]
    assert order == expected
    for t, ref in enumerate(hf_logits(model_dir, texts)):
        assert ours[t].shape == ref.shape == (TEXT_LENGTHS[t], vocab)
        assert np.abs(ours[t] - ref).max() <= 1e-5, f"text {t}"


def test_equals_transformers_fp32_with_vocabulary_tiles(tiny_dir, monkeypatch):
    # 100-row tiles: the 768-token output layer is read in 8 tiles, the last one partial
    monkeypatch.setattr(reference, "VOCAB_TILE_BYTES", 100 * 4 * 256)
    assert_matches_transformers(tiny_dir, vocab=768)


def test_equals_transformers_on_a_sharded_bf16_checkpoint(tiny_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"), max_shard_size="400KB")
    assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 1
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    assert_matches_transformers(tmp_path / "bf16", vocab=768)


@pytest.mark.parametrize("family", ["gemma3_text", "gemma"])
def test_equals_transformers_for_gemma_3_and_gemma_1(family, tmp_path):
    """The same streamed arithmetic with the other families' layers: Gemma 3 (QK-norm, a RoPE base for its local
    layers and one for its global layers, no softcaps) and Gemma 1 (no sliding window). Random tiny models whose
    sliding window (8) is shorter than most texts, so that local and global layers differ."""
    from transformers import Gemma3TextConfig, GemmaConfig

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.5,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if family == "gemma":
        config = GemmaConfig(**common)
    else:
        config = Gemma3TextConfig(
            **common,
            sliding_window=8,
            query_pre_attn_scalar=16,
            rope_local_base_freq=10.0,
            rope_theta=1e4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / family))
    assert json.loads((tmp_path / family / "config.json").read_text())["model_type"] == family
    assert_matches_transformers(tmp_path / family, vocab=300)


def test_reads_whole_tensors_one_layer_at_a_time(tiny_dir, monkeypatch):
    reads: list[list[str]] = []
    original = reference._Checkpoint.tensors

    def spy(self, names, shapes, into=None):
        reads.append(list(names))
        return original(self, names, shapes, into)

    monkeypatch.setattr(reference._Checkpoint, "tensors", spy)
    list(reference_logits(tiny_dir, make_texts(768)[:2]))
    groups = [{n.split(".")[2] if n.startswith("model.layers.") else n for n in names} for names in reads]
    assert groups == [{"0"}, {"1"}, {"2"}, {"3"}, {"model.norm.weight"}]  # whole tensors: one layer per read
    assert all(len(names) == 11 for names in reads[:4])  # 4 norms, q k v o, gate up down: in one read


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # follows the hub cache's symlinks
    return dst


def test_bad_inputs_are_clear_errors(tiny_dir, tmp_path):
    with pytest.raises(RunError, match=r"text 1 has token ids outside the vocabulary \[0, 768\): \[768\]"):
        reference_logits(tiny_dir, [[2, 5], [2, 768]])
    with pytest.raises(RunError, match="text 0 has no tokens"):
        reference_logits(tiny_dir, [[]])
    with pytest.raises(RunError, match="no config.json"):
        reference_logits(tmp_path, [[2]])

    other = copy_model(tiny_dir, tmp_path / "llama")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(InvalidInput, match=r"model_type 'llama' is not supported; this pipeline .* Gemma 2 \(gemma2\)"):
        reference_logits(other, [[2]])

    for key, value, message in [
        ("vocab_size", 700, r"'model.embed_tokens.weight' has shape \[768, 256\], config.json implies \[700, 256\]"),
        ("intermediate_size", 384, r"'model.layers.0.mlp.gate_proj.weight' has shape \[512, 256\], .* \[384, 256\]"),
    ]:
        mismatched = copy_model(tiny_dir, tmp_path / key)
        (mismatched / "config.json").write_text(json.dumps(config | {key: value}))
        with pytest.raises(RunError, match=message + ": the weights and config.json .* are of different models"):
            list(reference_logits(mismatched, [[2, 9]]))

    incomplete = copy_model(tiny_dir, tmp_path / "incomplete")
    weights = load_file(str(incomplete / "model.safetensors"))
    del weights["model.layers.3.mlp.up_proj.weight"]
    save_file(weights, str(incomplete / "model.safetensors"))
    with pytest.raises(RunError, match="has no tensor 'model.layers.3.mlp.up_proj.weight': not a complete"):
        list(reference_logits(incomplete, [[2, 9]]))

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_dir)).save_pretrained(str(sharded), max_shard_size="400KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(RunError, match=r"model.safetensors.index.json: names shard files that do not exist"):
        reference_logits(sharded, [[2]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (verify.device=cuda)")
def test_cuda_reference_equals_the_cpu_one(tiny_dir):
    """The same streamed reference on CUDA: layers and hidden states on the GPU, logits back as CPU float32 arrays,
    equal to the CPU's up to float32 summation order (IEEE matmuls on CUDA, not TF32)."""
    texts = make_texts(768)
    cpu, cuda = (Reference(tiny_dir, texts, device) for device in ("cpu", "cuda"))
    assert cuda.device.type == "cuda" and cuda.hidden[0].device.type == "cuda"
    plan = cpu.plan(CHUNK)
    assert cuda.plan(CHUNK) == plan
    got, want = cuda.logits_of(plan), cpu.logits_of(plan)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
