"""Packing: whole examples into rows, and a packed batch's loss equal to the same examples unpacked.

The equality is the proof that no packed example attends to its neighbour (a leak changes the logits of
every token after the boundary), measured on the tiny Gemma 2 (eager attention, softcapping, sliding window
of 64 tokens) in fp32 with examples longer than the window.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import DataSection
from core.records.render import IGNORE_INDEX
from tests.conftest import ROOT, TINY_REPO
from train.data import collate, load_datasets, pack
from train.data.pack import pack_bins


def test_best_fit_decreasing_bins():
    assert pack_bins([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]
    lengths = [(i * 37) % 61 + 3 for i in range(500)]
    bins = pack_bins(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))  # every example exactly once
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= sum(lengths) / 128 * 1.05 + 1  # nearly full rows
    with pytest.raises(ValueError, match="longer than the packing capacity"):
        pack_bins([9], 8)


def test_collate_restarts_positions_at_each_example():
    rows = [
        {"input_ids": [2, 10, 11, 2, 12], "labels": [-100, 10, 11, -100, 12]},
        {"input_ids": [2, 13, 14], "labels": [-100, 13, 14]},
    ]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 10, 11, 2, 12], [2, 13, 14, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 10, 11, -100, 12], [-100, 13, 14, -100, -100]]
    # the padding tail restarts too: a sequence of its own, which no real token can see
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert "attention_mask" not in batch and batch["use_cache"] is False
    plain = collate([rows[1], {"input_ids": [2, 15], "labels": [-100, 15]}], pad_id=0)
    assert set(plain) == {"input_ids", "labels", "attention_mask"}
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collate_to_a_fixed_width_for_compiled_attention():
    """Flex attention recompiles for every new batch shape: with a width, every batch has it, packed or not."""
    rows = [
        {"input_ids": [2, 10, 11, 2, 12], "labels": [-100, 10, 11, -100, 12]},
        {"input_ids": [2, 13, 14], "labels": [-100, 13, 14]},
    ]
    packed = collate(rows, pad_id=0, width=8)
    assert packed["input_ids"].shape == packed["labels"].shape == (2, 8)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert packed["labels"][:, 5:].eq(IGNORE_INDEX).all()
    plain = collate(rows[1:], pad_id=0, width=8)
    assert plain["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="does not fit the fixed width 4"):
        collate(rows, pad_id=0, width=4)


def test_static_width_only_for_flex_attention():
    from types import SimpleNamespace

    from train.trainer import static_width

    cfg = SimpleNamespace(data=SimpleNamespace(max_seq_length=2048))
    for attn, width in (("flex_attention", 2048), ("eager", None)):
        model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn))
        assert static_width(model, cfg) == width  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny(hf_home: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.hub import resolve_model

    path = resolve_model(TINY_REPO, hf_home=hf_home).path
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = (ROOT / "core" / "templates" / "gemma.jinja").read_text(encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    model.train()  # as the Trainer calls it (Gemma 2 has no dropout; the config's use_cache stays True)
    assert model.config.sliding_window == 64 and model.config.use_cache
    return tok, model


def examples(tok, tmp_path: Path):
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "chat.jsonl").read_text().splitlines()]
    convs = [r["messages"] for r in rows[:24]]
    # three conversations of 90-150 tokens: longer than the 64-token sliding window
    for k in (3, 4, 5):
        convs.append([m for c in convs[k * 2 : k * 2 + k] for m in c if m["role"] != "system"])
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    train, stats, _, _ = load_datasets(tok, DataSection(train_files=[str(path)], max_seq_length=256))[:4]
    assert max(len(e.input_ids) for e in train) > 64 and stats.truncated == 0
    return train


def loss(model, rows, **drop) -> float:
    import torch

    batch = collate([{"input_ids": r.input_ids, "labels": r.labels} for r in rows], pad_id=0)
    for key in drop:
        batch.pop(key)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_packed_loss_equals_unpacked_loss(tiny, tmp_path: Path):
    tok, model = tiny
    exs = examples(tok, tmp_path)
    rows = pack(exs, 256)
    assert len(rows) < len(exs) / 3  # really packed: several examples per row
    assert sum(r.input_ids.count(tok.bos_token_id) for r in rows) == len(exs)
    assert sorted(t for r in rows for t in r.labels if t != IGNORE_INDEX) == sorted(
        t for e in exs for t in e.labels if t != IGNORE_INDEX
    )
    unpacked = loss(model, exs)
    packed = loss(model, rows)
    assert abs(packed - unpacked) < 1e-5, (packed, unpacked)

    # Controls, so this test can fail: the same packed rows leak across examples without restarted
    # positions, or with a KV cache (transformers then skips the packed-sequence mask).
    assert abs(loss(model, rows, position_ids=True) - unpacked) > 1e-3
    assert abs(loss(model, rows, use_cache=True) - unpacked) > 1e-3
