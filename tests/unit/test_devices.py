"""Where verification runs: the HF reference's device (verify.device) and llama.cpp's GPU offload, decided on any
machine. The GPU runs themselves are gpu-marked tests in test_reference.py and test_verify.py."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import llama_cpp
import pytest
import torch

import convert.score as score
from convert.reference import _ieee_fp32, reference_device
from core.config import Config, VerifySection, field_affects, load_config
from core.errors import ConfigError, RunError
from tests.conftest import GEMMA_TEMPLATE, TINY_REPO


@pytest.mark.parametrize(
    ("wanted", "cuda", "expected"),
    [("auto", False, "cpu"), ("auto", True, "cuda"), ("cpu", True, "cpu"), ("cuda", True, "cuda")],
)
def test_reference_device_follows_verify_device_and_the_machine(monkeypatch, wanted, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert reference_device(wanted) == torch.device(expected)


def test_reference_on_cuda_without_cuda_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        RunError, match=r"verify.device is cuda but torch sees no usable CUDA device.*verify.device=auto/cpu"
    ):
        reference_device("cuda")
    with pytest.raises(RunError, match="'gpu' is not one of auto, cuda, cpu"):
        reference_device("gpu")


def test_verify_device_is_a_placed_key_of_three_values(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("run_name: r\n")
    assert load_config(config).verify.device == "auto"
    assert load_config(config, ["verify.device=cpu"]).verify.device == "cpu"
    assert field_affects(VerifySection, "device") == "placed"  # a change re-judges nothing
    with pytest.raises(ConfigError, match="verify.device"):
        load_config(config, ["verify.device=gpu"])


def test_cuda_matmuls_are_ieee_inside_the_reference_and_restored_after():
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # as a training script may leave it
    try:
        with _ieee_fp32(torch.device("cuda")):
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        with _ieee_fp32(torch.device("cpu")):  # the CPU path is left exactly as it was
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def test_verification_passes_verify_device_to_the_reference(hf_home: Path, tmp_path: Path, monkeypatch):
    """verify.device=cuda on a machine without CUDA stops verification before the reference loads a layer."""
    from convert.verify import verify_files
    from core.hub import resolve_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tmp_path / "model"
    shutil.copytree(resolve_model(TINY_REPO, hf_home=hf_home).path, model)
    shutil.copyfile(GEMMA_TEMPLATE, model / "chat_template.jinja")  # the prompts are chat-rendered first
    cfg = Config().verify.model_copy(update={"device": "cuda", "min_scored_tokens": 8})
    with pytest.raises(RunError, match="verify.device is cuda"):
        verify_files(model, [("f32", model / "never-opened.gguf")], cfg, [])


# ----------------------------------------------------------------------------- llama.cpp's offload
@pytest.fixture
def offload(monkeypatch):
    """Set what the binding reports; gpu_layers decides afresh (it is cached for the process)."""

    def set_support(supported: bool) -> None:
        monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: supported)
        score.gpu_layers.cache_clear()

    yield set_support
    score.gpu_layers.cache_clear()


@pytest.mark.parametrize(
    ("supported", "layers", "said"), [(True, -1, "every layer on the GPU"), (False, 0, "on the CPU")]
)
def test_gpu_layers_follow_the_binding_and_are_logged_once(offload, caplog, supported, layers, said):
    offload(supported)
    with caplog.at_level(logging.INFO, logger="convert.score"):
        assert score.gpu_layers() == layers
        assert score.gpu_layers() == layers
    assert [r.getMessage() for r in caplog.records if "llama.cpp:" in r.getMessage()] == [
        next(r.getMessage() for r in caplog.records if said in r.getMessage())
    ]


def test_every_gguf_is_opened_with_the_decided_gpu_layers(offload, monkeypatch):
    opened: list[dict] = []

    class FakeLlama:
        def __init__(self, **kwargs):
            opened.append(kwargs)

        def close(self) -> None:
            pass

    monkeypatch.setattr(llama_cpp, "Llama", FakeLlama)
    for supported, layers in ((True, -1), (False, 0)):
        offload(supported)
        with score.GGUF(Path("model.gguf"), vocab_only=True):
            pass
        assert opened[-1]["n_gpu_layers"] == layers
