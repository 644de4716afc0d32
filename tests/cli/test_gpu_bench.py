"""bench/gpu_train.py's own logic on the CPU (--tiny): each variant in its own process, the production trainer and
TRL's SFTTrainer on the same data, a table and results.json. The measurements themselves need a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli_env

BENCH = ROOT / "bench" / "gpu_train.py"


@pytest.mark.slow
def test_tiny_bench_runs_production_and_trl_side_by_side(hf_home, tmp_path):
    work = tmp_path / "bench"
    args = ["--tiny", "--variants", "production,trl@full", "--steps", "2", "--warmup", "1", "--records", "24"]
    r = subprocess.run(
        [sys.executable, str(BENCH), *args, "--seq", "96", "--workdir", str(work)],
        cwd=tmp_path,
        env=cli_env(hf_home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((work / "results.json").read_text())
    rows = {row["variant"]: row for row in results["rows"]}
    assert set(rows) == {"production", "trl@full"}
    for row in rows.values():
        assert row["timed_steps"] == 2 and row["tokens_per_s"] > 0 and row["median_step_s"] > 0
        assert row["supervised_tokens_per_s"] <= row["tokens_per_s"]
        assert 0 < row["last_loss"] < 20
    # the production trainer supervises assistant turns only; TRL's defaults supervise every token
    assert rows["production"]["supervised_tokens_per_s"] < rows["production"]["tokens_per_s"]
    assert "| production | eager |" in r.stdout and "production vs trl@full" not in r.stdout
    full = [json.loads(line) for line in (work / "records-full.jsonl").read_text().splitlines()]
    assert len(full) == 24 and all(m["messages"][1]["role"] == "assistant" for m in full)


def test_bench_refuses_unknown_variants_and_cpu_without_tiny(hf_home, tmp_path):
    bad = subprocess.run(
        [sys.executable, str(BENCH), "--variants", "production+nocompile+dropout@full,fast,production+fast,trl+nodrop"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "unknown variant(s) ['fast', 'production+fast', 'trl+nodrop']" in bad.stderr  # TRL takes no modifier
    import torch

    if not torch.cuda.is_available():
        r = subprocess.run(
            [sys.executable, str(BENCH), "--workdir", str(tmp_path / "w")],
            env=cli_env(hf_home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and "no CUDA device: run with --tiny" in r.stderr
