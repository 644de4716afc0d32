"""The eval split, per-source weights and caps, and the fingerprint: deterministic, and stable as data grows."""

from __future__ import annotations

import json
import random
from pathlib import Path

from core.config import DataSection
from tests.conftest import ROOT
from train.data import load_datasets


def write(path: Path, texts: list[str], meta: bool = False) -> str:
    rows = [{"text": t} | ({"id": i, "source": "nightly"} if meta else {}) for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def texts_of(tok, examples) -> list[str]:
    return [tok.decode(e.input_ids[1:-1]) for e in examples]  # without <bos> and <eos>


def split(tok, *sources, **data) -> tuple[list[str], list[str], object]:
    data = {"max_seq_length": 64, **data}
    train, stats, evals, _ = load_datasets(tok, DataSection(train_files=list(sources), **data))[:4]
    return texts_of(tok, train), texts_of(tok, evals), stats


def test_eval_split_never_moves_an_old_record_when_data_is_appended(tok, tmp_path: Path):
    old = [f"record number {i}" for i in range(300)]
    train1, eval1, stats1 = split(tok, write(tmp_path / "d.jsonl", old), eval_fraction=0.2)
    assert set(train1).isdisjoint(eval1) and set(train1) | set(eval1) == set(old)
    assert 40 <= len(eval1) <= 80 and stats1.sources[0].held_out == len(eval1)  # ~20% of 300

    # the nightly job appends 200 records, reorders the file and adds metadata: old records stay put
    new = [f"new record {i}" for i in range(200)]
    grown = old + new
    random.Random(0).shuffle(grown)
    train2, eval2, _ = split(tok, write(tmp_path / "d.jsonl", grown, meta=True), eval_fraction=0.2)
    assert set(eval2) & set(old) == set(eval1)
    assert set(train2) & set(old) == set(train1)
    assert set(eval2) & set(new)  # new records do land in eval too


def test_duplicates_land_on_one_side_and_are_counted(tok, tmp_path: Path):
    texts = [f"r{i}" for i in range(100)] * 2
    train, evals, stats = split(tok, write(tmp_path / "dup.jsonl", texts), eval_fraction=0.3)
    assert set(train).isdisjoint(evals)
    assert stats.duplicates == len(set(train))
    assert len(train) == 2 * len(set(train))


def test_explicit_eval_files_report_overlap_with_training(tok, tmp_path: Path):
    a = write(tmp_path / "a.jsonl", ["x", "y", "z"])
    b = write(tmp_path / "b.jsonl", ["y", "w"])
    _, _, evals, eval_stats = load_datasets(tok, DataSection(train_files=[a], eval_files=[b], max_seq_length=64))[:4]
    assert texts_of(tok, evals) == ["y", "w"] and eval_stats.overlap == 1


def test_weights_and_sample_caps(tok, tmp_path: Path):
    texts = [f"item {i}" for i in range(200)]
    path = write(tmp_path / "w.jsonl", texts)
    twice, _, _ = split(tok, {"path": path, "weight": 2})
    assert sorted(twice) == sorted(texts * 2)
    half, _, stats = split(tok, {"path": path, "weight": 0.5})
    assert 70 <= len(half) <= 130 and len(set(half)) == len(half) and stats.sources[0].examples == len(half)
    assert split(tok, {"path": path, "weight": 0.5})[0] == half  # the same half on every run
    one_and_half, _, _ = split(tok, {"path": path, "weight": 1.5})
    assert sorted(one_and_half) == sorted(texts + half)
    # appending never changes which old records the fraction keeps
    grown = write(tmp_path / "w.jsonl", texts + [f"more {i}" for i in range(100)])
    assert set(split(tok, {"path": grown, "weight": 0.5})[0]) & set(texts) == set(half)
    # max_samples: the first N records; records after the cap are not read, so not validated either
    (tmp_path / "w.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:5]) + "not json\n")
    capped, _, stats = split(tok, {"path": str(tmp_path / "w.jsonl"), "max_samples": 5})
    assert capped == texts[:5] and stats.sources[0].records == 5


def test_fingerprint_follows_the_rendered_data_not_the_files(tok, tmp_path: Path):
    texts = [f"line {i} " * 4 for i in range(20)]
    fp = split(tok, write(tmp_path / "a.jsonl", texts))[2].fingerprint
    assert split(tok, write(tmp_path / "b.jsonl", texts, meta=True))[2].fingerprint == fp  # path, metadata
    assert split(tok, write(tmp_path / "c.jsonl", texts[:-1] + ["line 99 "]))[2].fingerprint != fp
    assert split(tok, write(tmp_path / "d.jsonl", texts), max_seq_length=16)[2].fingerprint != fp  # truncation
    # the same records rendered with another loss mask are other training data
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    fp_chat = split(tok, str(chat))[2].fingerprint
    assert split(tok, str(chat), assistant_only_loss=False)[2].fingerprint != fp_chat


def test_parallel_rendering_gives_the_same_examples(tok, tmp_path: Path):
    rows = (ROOT / "data" / "demo" / "chat.jsonl").read_text().splitlines()[:60]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(rows) + "\n")
    one = load_datasets(tok, DataSection(train_files=[str(path)], max_seq_length=64, dataset_num_proc=1))
    two = load_datasets(tok, DataSection(train_files=[str(path)], max_seq_length=64, dataset_num_proc=2))
    assert [(e.input_ids, e.labels, e.where) for e in one[0]] == [(e.input_ids, e.labels, e.where) for e in two[0]]
    assert one[1].fingerprint == two[1].fingerprint and one[1].records == 60
