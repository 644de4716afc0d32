"""Sources: the same records as JSONL, JSON, CSV, Parquet, a folder, a save_to_disk dataset and a cached hub
dataset render to the same examples; text formats keep exact line numbers for their errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from core.config import DataSection
from tests.conftest import small_config
from train.data import DataError, load_datasets

RECORDS = [
    {
        "messages": [
            {"role": "system", "content": "You are Wren."},
            {"role": "user", "content": "Disk?"},
            {"role": "assistant", "content": "61% used."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Restart nginx"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "restart_service", "arguments": '{"service": "nginx"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'},
            {"role": "assistant", "content": "Restarted."},
        ]
    },
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"text": "Backups run nightly at 02:00."},
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "GPU temp?"},
            {"role": "assistant", "content": "64 C."},
        ]
    },
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["messages", "prompt", "completion", "text"])
        w.writeheader()
        for r in records:
            w.writerow({k: json.dumps(v) if k == "messages" else v for k, v in r.items()})
    return path


def fingerprint_of(tok, *sources, records: int = len(RECORDS)) -> str:
    stats = load_datasets(tok, DataSection(train_files=list(sources), max_seq_length=256)).train_stats
    assert stats.records == records
    return stats.fingerprint


def test_every_format_renders_the_same_examples(tok, tmp_path: Path):
    import datasets
    import pandas as pd

    expected = fingerprint_of(tok, str(write_jsonl(tmp_path / "r.jsonl", RECORDS)))
    (tmp_path / "r.json").write_text(json.dumps(RECORDS, indent=2))
    assert fingerprint_of(tok, str(tmp_path / "r.json")) == expected
    assert fingerprint_of(tok, str(write_csv(tmp_path / "r.csv", RECORDS))) == expected
    # Parquet holds one schema for all rows: absent fields come back as nulls, which are not data
    table = datasets.Dataset.from_pandas(pd.DataFrame(RECORDS))  # from_list would keep only the first row's keys
    table.to_parquet(str(tmp_path / "r.parquet"))
    assert fingerprint_of(tok, str(tmp_path / "r.parquet")) == expected
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    assert fingerprint_of(tok, {"path": str(tmp_path / "saved"), "split": "train"}) == expected
    # a folder: datasets' split conventions pick train-*.jsonl and leave test.jsonl alone
    write_jsonl(tmp_path / "folder" / "data" / "train-00000.jsonl", RECORDS[:2])
    write_jsonl(tmp_path / "folder" / "data" / "train-00001.jsonl", RECORDS[2:])
    write_jsonl(tmp_path / "folder" / "data" / "test.jsonl", [{"text": "held out"}])
    (tmp_path / "folder" / "README.md").write_text("# a dataset card is not data")
    assert fingerprint_of(tok, str(tmp_path / "folder")) == expected
    test_split = DataSection(train_files=[{"path": str(tmp_path / "folder"), "split": "test"}], max_seq_length=64)
    stats = load_datasets(tok, test_split).train_stats
    assert stats.records == 1
    assert list(stats.sources[0].files) == [str(tmp_path / "folder" / "data" / "test.jsonl")]


def test_json_array_and_csv_errors_name_the_line_the_record_starts_on(tok, tmp_path: Path):
    bad = [RECORDS[3], {"text": 5}, RECORDS[2], {"prompt": "p"}]
    (tmp_path / "a.json").write_text(json.dumps(bad, indent=2))  # records start on lines 2, 5, 8, 12
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["prompt", "completion"], ["multi\nline\nprompt", "ok"], ["p", ""], ["p", '["x"']])
    with pytest.raises(DataError) as err:
        load_datasets(
            tok, DataSection(train_files=[str(tmp_path / "a.json"), str(tmp_path / "a.csv")], max_seq_length=64)
        )
    assert err.value.problems == [
        f"{tmp_path / 'a.json'}:5: text: must be a string, got number",
        f"{tmp_path / 'a.json'}:12: completion: missing",
        f"{tmp_path / 'a.csv'}:5: completion: missing",  # the quoted cell of the first row spans lines 2-4
    ]


def test_broken_json_array_is_rejected_as_a_whole(tok, tmp_path: Path):
    (tmp_path / "b.json").write_text('[\n  {"text": "a"},\n  {"text": "b"\n  {"text": "c"}\n]\n')
    with pytest.raises(DataError) as err:
        load_datasets(tok, DataSection(train_files=[str(tmp_path / "b.json")], max_seq_length=64))
    assert err.value.problems == [
        f"{tmp_path / 'b.json'}:4: (file): invalid JSON: Expecting ',' delimiter at column 3; the rest of the "
        f"array cannot be read (JSON Lines can skip one bad line, arrays cannot)"
    ]


def _prepared_hub_cache(datasets_cache: Path, repo: str, records_file: Path) -> None:
    """What `datasets.load_dataset(repo)` leaves in HF_DATASETS_CACHE on a connected machine: prepared Arrow
    files under <org>___<name>/<config>/<version>/<hash>/ (the layout datasets' offline cache lookup reads)."""
    import datasets

    scratch = datasets_cache.parent / "scratch"
    datasets.load_dataset("json", data_files=str(records_file), split="train", cache_dir=str(scratch))
    built = next(p for p in scratch.glob("json/*/*/*") if p.is_dir())
    org, name = repo.split("/")
    dest = datasets_cache / f"{org}___{name}" / "default" / "0.0.0" / built.name
    shutil.copytree(built, dest)
    for arrow in dest.glob("json-*.arrow"):
        arrow.rename(dest / arrow.name.replace("json-", f"{name}-"))
    info = json.loads((dest / "dataset_info.json").read_text())
    info.update(builder_name=name, config_name="default", dataset_name=name)
    (dest / "dataset_info.json").write_text(json.dumps(info))
    shutil.rmtree(scratch)


def test_cached_hub_datasets_offline_through_the_cli(tok, hf_home: Path, cli, tmp_path: Path):
    # A snapshot as `hf download --repo-type dataset acme/wren-chats` stores it, and a dataset that
    # datasets.load_dataset prepared earlier; both are read with HF_HUB_OFFLINE=1.
    commit = "c0ffee" + "0" * 34
    repo = hf_home / "hub" / "datasets--acme--wren-chats"
    write_jsonl(repo / "snapshots" / commit / "data" / "train.jsonl", RECORDS)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    _prepared_hub_cache(hf_home / "datasets", "acme/prepared-chats", write_jsonl(tmp_path / "p.jsonl", RECORDS[:3]))

    cfg = small_config(
        tmp_path, data={"train_files": ["acme/wren-chats", "acme/prepared-chats"], "max_seq_length": 256}
    )
    res = cli.run("train", ["--config", str(cfg), "--dry-run"], tmp_path)  # the CLI server's HF_HOME is hf_home
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"    train acme/wren-chats: 5 records -> 5 examples @ {commit[:12]}\n" in res.stdout
    assert "    train acme/prepared-chats: 3 records -> 3 examples\n" in res.stdout
    expected = fingerprint_of(tok, str(write_jsonl(tmp_path / "all.jsonl", RECORDS + RECORDS[:3])), records=8)
    assert f"fingerprint (sha256 of the rendered training examples): {expected}" in res.stdout


def test_a_dataset_that_is_not_cached_is_a_clear_error(tok, tmp_path: Path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    with pytest.raises(DataError) as err:
        load_datasets(tok, DataSection(train_files=["acme/not-cached"]))
    (problem,) = err.value.problems
    assert problem.startswith(
        f"acme/not-cached: not a local file or folder, and not a dataset in the local cache "
        f"({tmp_path / 'hub'} or {tmp_path / 'datasets'}): ConnectionError: "
    )
    assert problem.endswith(
        "On a connected machine: hf download --repo-type dataset acme/not-cached (then copy the "
        f"cache), or fix the path (relative paths start at {Path.cwd()})"
    )
