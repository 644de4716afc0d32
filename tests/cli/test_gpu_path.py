"""The CUDA path's switches through the real CLI on the CPU: the dry run's memory plan, model.device=cuda
failing fast without CUDA, the fused lm_head's loss curve, and a torch.compile that cannot build its kernels.
QLoRA (bitsandbytes' CPU backend) with activation checkpointing trains in tests/cli/test_data_cli.py's tolerant
packed run (one short run for both)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import GOLDEN_RUN, cli_env, golden_config, small_config


def test_dry_run_plans_memory_for_a_named_card(cli, tmp_path):
    small_config(tmp_path)
    r = cli.run("train", ["--config", "config.yaml", "--dry-run", "--gpu-memory", "0.1GiB"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "GPU memory of one training step (meta-device trace, 4 x 128 tokens, attention flex_attention" in out
    assert "--gpu-memory (0.1 GiB): does NOT fit" in out  # the CUDA context alone is 0.5 GiB
    assert out.index("turn first: training.activation_checkpointing=true") < out.index("load_in_4bit=true")
    assert not (tmp_path / "outputs").exists()
    bad = cli.run("train", ["--config", "config.yaml", "--dry-run", "--gpu-memory", "lots"], tmp_path)
    assert bad.returncode == 2 and "is not a size such as 24GiB" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without CUDA")
def test_device_cuda_without_cuda_stops_with_versions(cli, tmp_path):
    small_config(tmp_path, model={"device": "cuda"})
    r = cli.run("train", ["--config", "config.yaml"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "model.device is cuda but CUDA is unusable" in r.stderr
    assert f"torch {torch.__version__} is built for CUDA" in r.stderr and "driver:" in r.stderr
    assert not (tmp_path / "outputs" / "t" / "checkpoints").exists()


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fused_lm_head_run_has_the_reference_loss_curve(golden: Path, cli, tmp_path: Path):
    """The golden run's first five steps again with the fused head, through the Trainer, in micro-batches of 4 with
    gradient accumulation 2 where the golden run took batches of 8: the same updates, so the same losses and
    gradient norms in fp32 (measured: 6e-7 on the loss). Steps 1-5 are all in the warmup, which max_steps does not
    change; the golden run logged their mean loss and step 5's gradient norm."""
    training = {
        "max_steps": 5,
        "logging_steps": 1,
        "fused_lm_head": True,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
    }
    cfg = golden_config(training=training, export={"enabled": False})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = cli.run("train", ["--config", "config.yaml"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    fused = [row for row in logged(tmp_path / "outputs" / GOLDEN_RUN) if "loss" in row]
    reference = next(row for row in logged(golden / "outputs" / GOLDEN_RUN) if "loss" in row)
    assert [row["step"] for row in fused] == [1, 2, 3, 4, 5] and reference["step"] == 5
    assert sum(row["loss"] for row in fused) / 5 == pytest.approx(reference["loss"], abs=1e-5)
    assert fused[-1]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
    assert [row["learning_rate"] for row in fused] == pytest.approx([0.0, 7.5e-4, 1.5e-3, 2.25e-3, 3e-3])


def test_a_compiler_that_cannot_build_kernels_is_a_clear_error(hf_home, tmp_path):
    """training.torch_compile on a box where inductor cannot build its kernels (here: no C++ compiler, a fresh
    kernel cache so nothing built earlier is reused): exit 2 naming the cause and the switch, no traceback, and
    the manifest says where training stopped. A process of its own: inductor reads CXX when it is imported, which
    the CLI server has done for every command. It fails at the first step: no training."""
    small_config(tmp_path, training={"torch_compile": "layers", "max_steps": 2, "report_to": []})
    env = cli_env(hf_home) | {"CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    r = subprocess.run(
        [sys.executable, "-m", "train", "--config", "config.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "torch.compile failed while building the training step's kernels: InvalidCxxCompiler" in r.stderr
    assert "training.torch_compile: false" in r.stderr and "Traceback" not in r.stderr
    manifest = json.loads((tmp_path / "outputs" / "t" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stopped"]["after_step"] == 0
