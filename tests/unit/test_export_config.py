"""The export section's float type, its renamed key and the quants that need an importance matrix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from core.config import ConfigError, load_config
from core.quants import QUANTS, checkpoint_dtype, float_gguf_type


def _checkpoint(folder: Path, dtypes: dict[str, torch.dtype]) -> Path:
    folder.mkdir()
    # the big tensor decides: a bf16 checkpoint with f32 norms is a bf16 checkpoint
    tensors = {name: torch.zeros(64 if i == 0 else 4, dtype=dt) for i, (name, dt) in enumerate(dtypes.items())}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_auto_float_type_is_a_listed_float_else_the_checkpoint_dtype(tmp_path: Path):
    bf16 = _checkpoint(tmp_path / "bf16", {"w": torch.bfloat16, "norm": torch.float32})
    f16 = _checkpoint(tmp_path / "f16", {"w": torch.float16})
    assert checkpoint_dtype(bf16) == "BF16" and checkpoint_dtype(f16) == "F16"
    assert float_gguf_type("auto", ["q8_0", "q4_k_m"], bf16) == "bf16"  # exact, half of f32
    assert float_gguf_type("auto", ["q8_0", "q4_k_m"], f16) == "f16"
    assert float_gguf_type("auto", ["q8_0", "f16", "f32"], bf16) == "f16"  # shipped anyway: no extra file
    assert float_gguf_type("f32", ["f16", "q8_0"], bf16) == "f32"  # as configured


def _load(tmp_path: Path, export: dict):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"export": export}))
    return load_config(path)


def test_keep_f32_is_read_as_keep_float(tmp_path: Path):
    assert _load(tmp_path, {"keep_f32": True}).export.keep_float is True
    with pytest.raises(ConfigError, match="keep keep_float"):
        _load(tmp_path, {"keep_f32": True, "keep_float": False})


def test_quants_that_need_an_importance_matrix_are_refused_without_one(tmp_path: Path):
    assert [q for q, spec in QUANTS.items() if spec.needs_imatrix] == ["iq3_xxs"]
    with pytest.raises(ConfigError, match="iq3_xxs need an importance matrix.*export.imatrix=true"):
        _load(tmp_path, {"quants": ["f16", "iq3_xxs"], "default_quant": "f16"})
    cfg = _load(tmp_path, {"quants": ["f16", "iq3_xxs", "iq4_xs"], "default_quant": "iq4_xs", "imatrix": True})
    assert cfg.verify.max_kld["iq4_xs"] == 0.05 and cfg.verify.max_kld["iq3_xxs"] == 0.2
    # iq4_xs, q6_k, q5_k_m quantize without one
    assert _load(tmp_path, {"quants": ["q6_k", "q5_k_m", "iq4_xs"], "default_quant": "q6_k"}).export.imatrix is False
