"""The CUDA path's switches through the real CLI on the CPU: the dry run's memory plan, model.device=cuda
failing fast without CUDA, QLoRA (bitsandbytes' CPU backend) and activation checkpointing without warnings, and
a torch.compile that cannot build its kernels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import cli_env, run_cli, small_config


def test_dry_run_plans_memory_for_a_named_card(hf_home, tmp_path):
    small_config(tmp_path)
    r = run_cli("train", ["--config", "config.yaml", "--dry-run", "--gpu-memory", "0.1GiB"], tmp_path, hf_home)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "GPU memory of one training step (meta-device trace, 4 x 128 tokens, attention flex_attention" in out
    assert "--gpu-memory (0.1 GiB): does NOT fit" in out  # the CUDA context alone is 0.5 GiB
    assert out.index("turn first: training.activation_checkpointing=true") < out.index("load_in_4bit=true")
    assert not (tmp_path / "outputs").exists()
    bad = run_cli("train", ["--config", "config.yaml", "--dry-run", "--gpu-memory", "lots"], tmp_path, hf_home)
    assert bad.returncode == 2 and "is not a size such as 24GiB" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without CUDA")
def test_device_cuda_without_cuda_stops_with_versions(hf_home, tmp_path):
    small_config(tmp_path, model={"device": "cuda"})
    r = run_cli("train", ["--config", "config.yaml"], tmp_path, hf_home)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "model.device is cuda but CUDA is unusable" in r.stderr
    assert f"torch {torch.__version__} is built for CUDA" in r.stderr and "driver:" in r.stderr
    assert not (tmp_path / "outputs" / "t" / "checkpoints").exists()


@pytest.mark.slow
def test_qlora_with_activation_checkpointing_trains_on_cpu_without_warnings(hf_home, tmp_path):
    pytest.importorskip("bitsandbytes")
    training = {"max_steps": 2, "logging_steps": 1, "save_steps": 2, "activation_checkpointing": True}
    small_config(tmp_path, model={"load_in_4bit": True}, training=training)
    r = run_cli("train", ["--config", "config.yaml"], tmp_path, hf_home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FutureWarning" not in r.stdout + r.stderr  # gradient_checkpointing*'s deprecation, PEFT's included
    rows = [json.loads(line) for line in (tmp_path / "outputs" / "t" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    adapter = tmp_path / "models" / "finetuned" / "adapters" / "t"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and (adapter / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_fused_lm_head_run_has_the_reference_loss_curve(hf_home, tmp_path):
    """The same run with and without the fused head (through the Trainer, gradient accumulation included):
    per-step loss and gradient norm agree in fp32 (measured: 1e-6)."""
    curves = {}
    for fused in (False, True):
        work = tmp_path / f"fused-{fused}"
        work.mkdir()
        training = {"max_steps": 4, "logging_steps": 1, "gradient_accumulation_steps": 2, "fused_lm_head": fused}
        small_config(work, training=training)
        r = run_cli("train", ["--config", "config.yaml"], work, hf_home)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(line) for line in (work / "outputs" / "t" / "metrics.jsonl").read_text().splitlines()]
        curves[fused] = [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
    assert len(curves[True]) == 4
    for (loss, norm), (ref_loss, ref_norm) in zip(curves[True], curves[False], strict=True):
        assert loss == pytest.approx(ref_loss, abs=1e-5) and norm == pytest.approx(ref_norm, rel=1e-4)


def test_a_compiler_that_cannot_build_kernels_is_a_clear_error(hf_home, tmp_path):
    """training.torch_compile on a box where inductor cannot build its kernels (here: no C++ compiler, a fresh
    kernel cache so nothing built earlier is reused): exit 2 naming the cause and the switch, no traceback, and
    the manifest says where training stopped."""
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
