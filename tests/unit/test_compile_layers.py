"""training.torch_compile: layers (train.model.compile_layers) on a real tiny Gemma 2 with LoRA, on CPU.

Each decoder layer is compiled in place and nothing else is; with activation checkpointing on, one forward and
backward through the compiled model gives the loss and the LoRA gradients of the eager model built from the same
seed, and dynamo captures one graph that all four layers share (parameters are graph inputs). The config accepts
true/false/layers, and only true reaches TrainingArguments.torch_compile (the Trainer would compile the whole model).
Compiled through AOTAutograd without kernel generation (conftest.aot_eager_compile).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._dynamo
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch._dynamo.utils import counters

from core.config import ConfigError, load_config
from core.errors import RunError
from core.runfolder import RunFolder
from scripts.tiny_model import TINY_CONFIG
from tests.support import families
from train.model import compile_layers
from train.trainer import training_arguments

VOCAB = 512
LAYERS = TINY_CONFIG["num_hidden_layers"]
SEQ = 24  # longer than the sliding window (16): the sliding layers' mask differs from the full layers'
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

pytestmark = pytest.mark.usefixtures("aot_eager_compile")


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """No compiled code or counts carried into or out of a test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def tiny_lora_gemma(seed: int = 0, layers: int = LAYERS, family: str = "gemma2") -> PeftModel:
    shape = dict(vocab_size=VOCAB, sliding_window=16, num_hidden_layers=layers, attn_implementation="eager")
    model = families.small_gemma(family, seed, **shape)
    # init_lora_weights=False: B is random too, so A gets a gradient (with B = 0 it would be zero on both paths)
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=TARGETS
    )
    return get_peft_model(model, lora)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : SEQ // 3] = -100  # a prompt outside the loss
    return {"input_ids": ids, "labels": labels}


def lora_grads_after_step(model: PeftModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward + backward with activation checkpointing the way the Trainer sets it up."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    loss = model(**batch()).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(("family", "layer"), [("gemma2", "Gemma2DecoderLayer"), ("gemma3_text", "Gemma3DecoderLayer")])
def test_compile_layers_compiles_each_decoder_layer_and_nothing_else(family, layer):
    model = tiny_lora_gemma(family=family)
    layers = list(model.get_base_model().model.layers)
    assert compile_layers(model) == LAYERS
    compiled = [m for m in model.modules() if m._compiled_call_impl is not None]
    assert [id(m) for m in compiled] == [id(m) for m in layers]
    assert {type(m).__name__ for m in compiled} == {layer}
    # compiled in place: the adapter's keys (checkpoints, resume, export) are the eager model's, no _orig_mod.
    eager_keys = list(get_peft_model_state_dict(tiny_lora_gemma(family=family)))
    assert list(get_peft_model_state_dict(model)) == eager_keys and len(eager_keys) == 2 * 7 * LAYERS


def test_compiled_layers_with_checkpointing_match_eager_in_one_shared_graph():
    eager_loss, eager_grads = lora_grads_after_step(tiny_lora_gemma())

    model = tiny_lora_gemma()
    compile_layers(model)
    loss, grads = lora_grads_after_step(model)

    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # 4 layers, one graph, no recompiles
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    assert len(grads) == LAYERS * len(TARGETS) * 2  # lora_A and lora_B of every target
    worst = max((grads[n] - eager_grads[n]).abs().max().item() for n in grads)
    assert worst < 1e-5, worst
    assert all(g.abs().max() > 0 for g in grads.values())  # every adapter matrix got a real gradient


def test_a_model_without_decoder_layer_classes_is_refused():
    model = tiny_lora_gemma(layers=1)
    model.get_base_model()._no_split_modules = None  # this instance only; the class keeps its list
    with pytest.raises(RunError, match=r"training.torch_compile=layers: Gemma2ForCausalLM names no decoder layer"):
        compile_layers(model)
    assert not any(m._compiled_call_impl is not None for m in model.modules())


def test_config_accepts_layers_and_only_true_compiles_in_the_trainer(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(f"run_name: t\npaths: {{output_dir: {tmp_path / 'out'}, models_dir: {tmp_path / 'models'}}}\n")
    assert load_config(path).training.torch_compile is False
    with pytest.raises(ConfigError, match="training.torch_compile"):
        load_config(path, ["training.torch_compile=fast"])

    layers = load_config(path, ["training.torch_compile=layers", "training.report_to=[]"])
    whole = load_config(path, ["training.torch_compile=true", "training.report_to=[]"])
    assert layers.training.torch_compile == "layers"
    assert whole.training.torch_compile is True
    assert training_arguments(layers, RunFolder.of(layers), evaluating=False).torch_compile is False
    assert training_arguments(whole, RunFolder.of(whole), evaluating=False).torch_compile is True


def test_compile_mode_reaches_the_layers_or_the_trainer_never_both(tmp_path: Path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(f"run_name: t\npaths: {{output_dir: {tmp_path / 'out'}, models_dir: {tmp_path / 'models'}}}\n")
    autotune = "training.torch_compile_mode=max-autotune-no-cudagraphs"
    with pytest.raises(ConfigError, match="training.torch_compile_mode"):
        load_config(path, ["training.torch_compile_mode=reduce-overhead"])  # CUDA graphs: not offered

    # a mode alone turns TrainingArguments' whole-model compile on: it must only reach the Trainer with true
    for value, trainer_compiles in (("layers", False), ("false", False), ("true", True)):
        cfg = load_config(path, [f"training.torch_compile={value}", autotune, "training.report_to=[]"])
        args = training_arguments(cfg, RunFolder.of(cfg), evaluating=False)
        assert args.torch_compile is trainer_compiles, value
        assert args.torch_compile_mode == ("max-autotune-no-cudagraphs" if trainer_compiles else None), value

    modes: list[str] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw["mode"]))
    assert compile_layers(tiny_lora_gemma(), "max-autotune-no-cudagraphs") == LAYERS
    assert modes == ["max-autotune-no-cudagraphs"] * LAYERS
