"""The data stage through the real CLI (forks of the CLI server): malformed data stops the run before training,
--dry-run shows what the model will be trained on, and a tolerant run lists every skipped record in the run folder and
manifest (one short run that is also the CPU proof of QLoRA with activation checkpointing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.config import DataSection
from tests.conftest import DEMO_DATA, ROOT, small_config
from train.data import DataError, load_datasets

FIXTURES = ROOT / "tests" / "fixtures" / "data"
# Each malformed fixture and the one problem it must produce (max_seq_length=128, as in small_config).
MALFORMED = {
    "truncated_line.jsonl": "2: (line): invalid JSON: Unterminated string starting at column 100 (the line looks "
    "cut off: an interrupted write?)",
    "wrong_types.jsonl": "2: messages[0].content: must be a string, got number",
    "empty_assistant.jsonl": "1: messages[1].content: assistant message is empty",
    "wrong_role_order.jsonl": "3: messages[1].role: two consecutive user messages at index 0 and 1",
    "not_utf8.jsonl": "2: (line): not UTF-8 (byte 0xe9 at column 47); re-encode the file as UTF-8",
    "overlong_prompt.jsonl": "1: (record): no supervised token left after truncation to max_seq_length=128 (the "
    "example has 444 tokens, the first supervised one is token 435); shorten the prompt or "
    "raise data.max_seq_length",
    "empty.jsonl": " file is empty",
}


def expected_problem(name: str) -> str:
    return f"{FIXTURES / name}:{MALFORMED[name]}"


@pytest.mark.parametrize("name", MALFORMED)
def test_each_malformed_fixture_is_one_clear_problem(tok, name: str):
    with pytest.raises(DataError) as err:
        load_datasets(tok, DataSection(train_files=[str(FIXTURES / name)], max_seq_length=128))
    assert err.value.problems == [expected_problem(name)]


def test_malformed_data_exits_non_zero_and_trains_nothing(cli, tmp_path: Path):
    names = sorted(MALFORMED)
    cfg = small_config(
        tmp_path, data={"train_files": [str(FIXTURES / n) for n in names] + [str(DEMO_DATA)], "max_seq_length": 128}
    )
    res = cli.run("train", ["--config", str(cfg)], tmp_path)  # a real run, not --dry-run
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stderr.splitlines()
    assert lines[0] == f"error: {len(names)} data problem(s):"
    assert lines[1 : 1 + len(names)] == [f"  {expected_problem(n)}" for n in names]
    assert "Traceback" not in res.stderr
    # no run folder claims a trained model: at most the run's lock file exists, no manifest, no adapter
    run = tmp_path / "outputs" / "t"
    assert not run.exists() or {p.name for p in run.iterdir()} <= {".lock"}
    assert not (tmp_path / "models" / "finetuned").exists()


def test_dry_run_shows_counts_lengths_truncation_supervision_and_the_marked_example(tok, cli, tmp_path: Path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Disk?"}, {"role": "assistant", "content": "61% used."}]})
        + "\n"
    )
    texts = [f"Backup {i} finished." for i in range(6)] + ["A long log line. " * 12] * 2
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + '{"text": 7}\n')
    cfg = small_config(
        tmp_path,
        data={
            "train_files": [str(chat), {"path": str(docs), "format": "text"}],
            "max_seq_length": 32,
            "max_invalid_fraction": 0.2,
        },
    )
    res = cli.run("train", ["--config", str(cfg), "--dry-run"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout

    # the numbers, computed independently from the tokenizer
    rendered = "<bos><start_of_turn>user\nDisk?<end_of_turn>\n<start_of_turn>model\n61% used.<end_of_turn>\n"
    chat_len = len(tok(rendered, add_special_tokens=False)["input_ids"])
    chat_sup = len(tok("61% used.<end_of_turn>\n", add_special_tokens=False)["input_ids"])
    text_lens = [len(tok(t, add_special_tokens=False)["input_ids"]) + 2 for t in texts]  # + <bos>, <eos>
    lengths = [chat_len, *text_lens]
    tokens = sum(min(n, 32) for n in lengths)
    supervised = chat_sup + sum(min(n, 32) - 1 for n in text_lens)  # text: all but <bos>
    assert sum(n > 32 for n in lengths) == 2
    p = {q: int(np.percentile(lengths, q)) for q in (50, 90, 99)}
    assert f"    train {chat}: 1 records -> 1 examples\n" in out
    assert f"    train {docs}: 9 records (1 invalid, skipped) -> 8 examples\n" in out
    assert (
        f"    train: 9 examples from 9 records, {tokens:,} tokens, {supervised:,} supervised "
        f"({supervised / tokens:.1%}), 2 truncated to max_seq_length=32\n"
    ) in out
    assert (
        f"      tokens per example before truncation: p50 {p[50]}, p90 {p[90]}, p99 {p[99]}, max {max(lengths)}\n"
    ) in out
    assert "      1 records repeat an earlier record's content exactly\n" in out
    assert (
        f"    1 invalid records would be skipped (data.max_invalid_fraction=0.2); a run lists them in "
        f"{tmp_path / 'outputs' / 't' / 'skipped_records.jsonl'}:\n"
        f"      {docs}:9: text: must be a string, got number\n"
    ) in out
    assert (
        "--- first training example, as tokens decoded ([[...]] is what the loss sees)\n"
        "<bos><start_of_turn>user\nDisk?<end_of_turn>\n<start_of_turn>model\n[[61% used.<end_of_turn>\n]]\n"
    ) in out
    assert not (tmp_path / "outputs").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_tolerant_packed_qlora_run_records_skips_split_and_fingerprint(tok, cli, tmp_path: Path):
    """One short run for two proofs: a tolerant, packed run with an eval split records what it skipped and what it
    trained on; and it trains QLoRA (bitsandbytes' CPU backend) with activation checkpointing, without warnings."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{"text": "fine"}\n{"prompt": "p"}\n')
    data = {
        "train_files": [str(DEMO_DATA), str(bad)],
        "max_seq_length": 128,
        "packing": True,
        "eval_fraction": 0.1,
        "max_invalid_fraction": 0.01,
    }
    training = {"max_steps": 4, "save_steps": 4, "activation_checkpointing": True}
    cfg = small_config(tmp_path, data=data, model={"load_in_4bit": True}, training=training)
    res = cli.run("train", ["--config", str(cfg)], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "FutureWarning" not in out  # gradient_checkpointing*'s deprecation, PEFT's included
    assert max(len(line) for line in out.split("\n")) <= 300  # a file: no progress bar redrawn on one line
    run = tmp_path / "outputs" / "t"
    skipped = [json.loads(line) for line in (run / "skipped_records.jsonl").read_text().splitlines()]
    assert skipped == [
        {"where": f"{bad}:1", "field": "messages", "reason": "is empty"},
        {"where": f"{bad}:3", "field": "completion", "reason": "missing"},
    ]

    m = json.loads((run / "manifest.json").read_text())["data"]
    prepared = load_datasets(tok, DataSection(**data))  # the same data, prepared in this process
    train, evals = prepared.train_stats, prepared.eval_stats
    assert m["skipped_records"] == 2 and m["skipped_file"] == str(run / "skipped_records.jsonl")
    assert m["fingerprint"] == train.fingerprint and m["train"]["fingerprint"] == train.fingerprint
    demo, extra = m["sources"][0], m["sources"][1]
    assert (demo["records"], demo["invalid"], extra["records"], extra["invalid"]) == (300, 0, 3, 2)
    assert m["eval"]["records"] == demo["held_out"] + extra["held_out"] == evals.records > 0
    assert m["train"]["records"] + m["eval"]["records"] == 301
    assert m["train"]["rows"] < m["train"]["examples"] / 2  # packed
    assert m["train_files"] == {str(DEMO_DATA): m["train_files"][str(DEMO_DATA)], str(bad): m["train_files"][str(bad)]}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert [r["step"] for r in metrics if "loss" in r] == [2, 4] and all(0 < x < 20 for x in losses)
    assert [r["step"] for r in metrics if "eval_loss" in r] == [2, 4]
    adapter = tmp_path / "models" / "finetuned" / "adapters" / "t"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and (adapter / "adapter_model.safetensors").is_file()
