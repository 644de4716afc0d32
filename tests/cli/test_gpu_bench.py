"""bench/gpu_train.py's own logic on the CPU (--tiny): each variant in its own process, the production trainer and
TRL's SFTTrainer on the same data, a table and results.json. The measurements themselves need a GPU.

The driver runs in this process (`main(argv)`, what `python bench/gpu_train.py` calls), with the environment a user
gives it; the model build and the variants run in the child processes it starts, as they do on a GPU box. The
production variant runs with eager layers (+nocompile): on the CPU inductor spends a minute compiling the tiny
layers, and compiled layers are checked against eager ones in tests/unit/test_compile_layers.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import bench_module, cli_env


@pytest.fixture(scope="module")
def bench():
    return bench_module("gpu_train")


@pytest.fixture
def user_env(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's environment as a CLI test's (cli_env): the tiny model's HF cache, offline; children inherit it."""
    env = cli_env(hf_home)
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.slow
@pytest.mark.usefixtures("user_env")
def test_tiny_bench_runs_production_and_trl_side_by_side(bench, tmp_path: Path, capsys: pytest.CaptureFixture):
    work = tmp_path / "bench"
    args = ["--tiny", "--variants", "production+nocompile,trl@full", "--steps", "2", "--warmup", "1", "--records", "24"]
    assert bench.main([*args, "--seq", "96", "--workdir", str(work)]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert (work / "build-model.log").is_file(), "the model is built in a child process"
    results = json.loads((work / "results.json").read_text())
    rows = {row["variant"]: row for row in results["rows"]}
    assert set(rows) == {"production+nocompile", "trl@full"}
    for row in rows.values():
        assert row["timed_steps"] == 2 and row["tokens_per_s"] > 0 and row["median_step_s"] > 0
        assert row["supervised_tokens_per_s"] <= row["tokens_per_s"]
        assert 0 < row["last_loss"] < 20
    # the production trainer supervises assistant turns only; TRL's defaults supervise every token
    production = rows["production+nocompile"]
    assert production["supervised_tokens_per_s"] < production["tokens_per_s"]
    assert "| production+nocompile | eager |" in out and "vs trl@full" not in out  # long-tailed vs full rows: no ratio
    assert not [p for p in (work / "inductor").rglob("*") if p.is_file()], "inductor compiled nothing"
    full = [json.loads(line) for line in (work / "records-full.jsonl").read_text().splitlines()]
    assert len(full) == 24 and all(m["messages"][1]["role"] == "assistant" for m in full)


@pytest.mark.usefixtures("user_env")
def test_bench_refuses_unknown_variants_and_cpu_without_tiny(bench, tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as refused:
        bench.main(["--variants", "production+nocompile+dropout@full,fast,production+fast,trl+nodrop"])
    assert refused.value.code == 2
    assert "unknown variant(s) ['fast', 'production+fast', 'trl+nodrop']" in capsys.readouterr().err  # TRL: no modifier
    if not torch.cuda.is_available():
        assert bench.main(["--workdir", str(tmp_path / "w")]) == 2
        assert "no CUDA device: run with --tiny" in capsys.readouterr().err
