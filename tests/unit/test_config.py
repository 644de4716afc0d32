"""The config schema: shipped configs validate, mistakes are reported all at once with suggestions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import Config, ConfigError, apply_override, commented_defaults, load_config
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates_and_documents_its_command(path: Path):
    cfg = load_config(path)
    assert cfg.run_name
    first_lines = path.read_text().splitlines()[:4]
    assert any("python -m train --config configs/" + path.name in line or "make demo" in line for line in first_lines)


def test_production_config_is_gemma_2b_bf16_offline_ready():
    cfg = load_config(Path("configs/gemma2b_lora.yaml"))
    assert cfg.model.name_or_path == "google/gemma-2-2b"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.model.attn_implementation == "auto"  # flex_attention on CUDA (train/device.py)
    assert cfg.model.device == "cuda" and cfg.training.activation_checkpointing is True
    # the measured fast path (docs/gpu-box.md): compiled decoder layers, no LoRA dropout
    assert cfg.training.torch_compile == "layers" and cfg.lora.lora_dropout == 0.0
    assert cfg.export.name == "gemma_2b_finetuned" and cfg.export.base_name == "gemma_2b_base"
    assert {"f16", "q8_0", "q4_k_m"} <= set(cfg.export.quants)


def test_every_problem_reported_at_once_with_suggestions(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"traning": {}, "lora": {"rank": 4, "r": 0}, "training": {"lerning_rate": 1}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "traning: unknown key; did you mean 'training'?" in msg
    assert "training.lerning_rate: unknown key; did you mean 'training.learning_rate'?" in msg
    assert "lora.rank: unknown key" in msg
    assert "lora.r: Input should be greater than or equal to 1" in msg


def test_cross_field_rules(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"export": {"quants": ["f16", "q6_k"], "default_quant": "q8_0", "name": "same", "base_name": "same"}}
        )
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert "export.default_quant: 'q8_0' is not in export.quants ['f16', 'q6_k']; add it there" in msg
    assert "export.name and export.base_name are equal" in msg


def test_overrides_are_typed_and_validated(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: a\n")
    cfg = load_config(path, ["training.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]", "run_name=b"])
    assert cfg.training.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.run_name == "b"
    with pytest.raises(ConfigError, match="did you mean 'training.max_steps'"):
        load_config(path, ["training.max_step=3"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_override({}, "training.max_steps")


def test_run_name_cannot_escape_the_output_folder(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: ../elsewhere\n")
    with pytest.raises(ConfigError, match="run_name"):
        load_config(path)


def test_print_defaults_is_valid_yaml_documenting_every_field():
    text = commented_defaults()
    assert Config.model_validate(yaml.safe_load(text)) == Config()
    for section in ("model", "data", "lora", "training", "export", "verify", "paths"):
        for name in getattr(Config(), section).__class__.model_fields:
            assert f"{name}:" in text
    assert text.count("# ") >= 40  # every field carries its documentation line(s)


def test_missing_and_malformed_files_are_clear(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_setting_one_gate_keeps_the_other_defaults(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: a\n")
    cfg = load_config(path, ["verify.max_kld.q4_k_m=0.02"])
    assert cfg.verify.max_kld["q4_k_m"] == 0.02
    assert cfg.verify.max_kld["q8_0"] == Config().verify.max_kld["q8_0"] == 1e-3
