"""Gemma logits in float32 without the model in float32: the verification reference, streamed one decoder layer at a
time through transformers' own layer classes (docs/export-and-verify.md, "The streamed reference"). Files are opened
per read so that mapped pages of the checkpoint do not pile up in the resident set.

Device (verify.device): on CUDA the layer's weights, its buffers and the hidden states live on the GPU, the same
one-layer-at-a-time bound, read from the checkpoint on the CPU and copied over; the logits come back as CPU float32,
so scoring and the gates do not depend on where the reference ran. Matmuls are IEEE float32 there, never TF32.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from core.errors import RunError
from core.hub import model_family

# Disk for the reference's logits kept between files (convert/score.py ReferenceChunks): 4,096 positions at a 256k
# vocabulary. Here, not beside ReferenceChunks, so that training's disk estimate (train/diskspace.py) reads it
# without loading llama.cpp.
SCRATCH_BUDGET = 4 << 30
VOCAB_TILE_BYTES = 64 << 20  # float32 bytes of one output-layer tile: 7,281 rows at hidden 2304
INDEX_FILE = "model.safetensors.index.json"  # transformers' shard index (SAFE_WEIGHTS_INDEX_NAME)
# What a decoder weight is replaced with as it is read: (checkpoint name, tensor) -> tensor (convert.merge.Merge.weight:
# the checkpoint with an adapter added, without writing it). The embedding and output rows are read as stored.
Weights = Callable[[str, torch.Tensor], torch.Tensor]
MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def reference_device(wanted: str = "auto") -> torch.device:
    """verify.device resolved on this machine: auto = CUDA when torch sees a device, else the CPU; cuda = refused
    (RunError) without one rather than hours on the CPU."""
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if wanted not in ("cuda", "auto"):
        raise RunError(f"verify.device: {wanted!r} is not one of auto, cuda, cpu")
    if not torch.cuda.is_available():
        raise RunError(
            f"verify.device is cuda but torch sees no usable CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or '(none)'}): fix the driver (nvidia-smi must work), or set verify.device=auto/cpu"
        )
    return torch.device("cuda")


@contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """float32 matmuls in full precision on CUDA, whatever the process chose: TF32 keeps 10 mantissa bits, an error
    of ~1e-3 relative in the logits, far above the NMSE gate of float files (1e-4 of the variance). The CPU is left
    as it is (its float32 matmuls are IEEE)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


class _Checkpoint:
    """Where each tensor of a safetensors checkpoint lives; reads tensors or row ranges in float32."""

    def __init__(self, model_dir: Path, weights: Weights | None = None):
        self.model_dir, self.weights = model_dir, weights
        index = model_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: model_dir / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(model_dir.glob("*.safetensors")):
                with safe_open(path, framework="pt") as st:
                    self.files.update(dict.fromkeys(st.keys(), path))
        if not self.files:
            raise RunError(f"{model_dir}: no *.safetensors weights; the reference needs a safetensors checkpoint")
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise RunError(f"{index}: names shard files that do not exist: {', '.join(missing)}")
        # *ForCausalLM checkpoints prefix the decoder with "model."; a bare decoder's do not.
        self.prefix = "model." if "model.embed_tokens.weight" in self.files else ""

    def _file(self, name: str) -> Path:
        if name not in self.files:
            raise RunError(
                f"{self.model_dir}: the checkpoint has no tensor {name!r}: not a complete model of its config "
                f"(compare its safetensors with config.json, or re-save it with save_pretrained)"
            )
        return self.files[name]

    def tensors(self, names: list[str], shapes: list[torch.Size], into: list[torch.Tensor] | None = None):
        """The named tensors, which must have `shapes`, in float32: copied into `into` when given (buffers reused
        from one layer to the next spare page faults on ~0.3 GB per layer at the 2B's shapes; on the GPU for CUDA)."""
        out = into or [torch.empty(shape, dtype=torch.float32) for shape in shapes]
        by_file: dict[Path, list[int]] = {}
        for i, name in enumerate(names):
            by_file.setdefault(self._file(name), []).append(i)
        for path, group in by_file.items():
            with safe_open(path, framework="pt") as st:
                for i in group:
                    self._check_shape(names[i], st.get_slice(names[i]).get_shape(), shapes[i])
                    tensor = st.get_tensor(names[i])
                    out[i].copy_(self.weights(names[i], tensor) if self.weights else tensor)
        return out

    def _check_shape(self, name: str, found: list[int], expected: list[int] | torch.Size) -> None:
        if list(found) != list(expected):
            raise RunError(
                f"{self.files[name]}: tensor {name!r} has shape {list(found)}, config.json implies "
                f"{list(expected)}: the weights and config.json of {self.model_dir} are of different models"
            )

    def rows(self, name: str, ids: list[int]) -> torch.Tensor:
        """Rows `ids` of a 2D tensor in float32, read one by one."""
        with safe_open(self._file(name), framework="pt") as st:
            table = st.get_slice(name)
            return torch.cat([table[i : i + 1] for i in ids]).float()

    def shape(self, name: str) -> list[int]:
        with safe_open(self._file(name), framework="pt") as st:
            return list(st.get_slice(name).get_shape())

    def rows_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Rows start.. of a 2D tensor upcast into the float32 buffer `out` (as many as fit); the rows filled."""
        with safe_open(self._file(name), framework="pt") as st:
            rows = st.get_slice(name)[start : start + out.shape[0]]
            return out[: rows.shape[0]].copy_(rows)


def _layer(
    ckpt: _Checkpoint, config, layer_cls: type, index: int, buffers: list[torch.Tensor] | None, device: torch.device
):
    """transformers' decoder layer `index` with its weights in float32 on `device`, read into `buffers` when given
    (the previous layer's, free by now). Built on the meta device: no random initialization to overwrite."""
    with torch.device("meta"):
        layer = layer_cls(config, index)
    expected = layer.state_dict()
    names = [f"{ckpt.prefix}layers.{index}.{key}" for key in expected]
    if buffers is None and device.type != "cpu":  # the first layer's, on the GPU; later layers reuse them
        buffers = [torch.empty(w.shape, dtype=torch.float32, device=device) for w in expected.values()]
    weights = ckpt.tensors(names, [w.shape for w in expected.values()], into=buffers)
    layer.load_state_dict(dict(zip(expected, weights, strict=True)), strict=True, assign=True)
    return layer.eval()


def _decoder(ckpt: _Checkpoint, config, texts_ids: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Final-normed hidden states [tokens, hidden] of every text, computed layer by layer on `device`."""
    # the family's decoder layer class, final norm and rotary embedding (float32, on `device`) as transformers builds
    # them: read off the model built on the meta device (no weights, no memory)
    with torch.device("meta"):
        decoder = AutoModelForCausalLM.from_config(config).model
    layer_cls, rotary = type(decoder.layers[0]), type(decoder.rotary_emb)(config).to(device)
    norm = type(decoder.norm)(config.hidden_size, eps=config.rms_norm_eps).to(device)
    embed = f"{ckpt.prefix}embed_tokens.weight"
    # Gemma's scaled word embedding: the lookup times sqrt(hidden) held as a float32 tensor (not a Python float)
    scale = torch.tensor(config.hidden_size**0.5, dtype=torch.float32)
    hidden = [(ckpt.rows(embed, ids) * scale)[None].to(device) for ids in texts_ids]
    positions = [torch.arange(len(ids), device=device)[None] for ids in texts_ids]  # each text starts at position 0
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    # Gemma 3's rotary embedding takes the layer type (local layers have their own RoPE base); Gemma 1/2's does not
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    cos_sin = {
        (t, kind): rotary(h, p, kind) if per_type else rotary(h, p)
        for kind in set(layer_types)
        for t, (h, p) in enumerate(zip(hidden, positions, strict=True))
    }
    buffers = None
    for index, layer_type in enumerate(layer_types[: config.num_hidden_layers]):
        layer = _layer(ckpt, config, layer_cls, index, buffers, device)
        buffers = [p.data for p in layer.state_dict().values()]
        for t, h in enumerate(hidden):
            mask = MASKS[layer_type](
                config=config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=positions[t]
            )
            embeddings = cos_sin[t, layer_type]
            hidden[t] = layer(h, position_embeddings=embeddings, attention_mask=mask, position_ids=positions[t])
        del layer
    norm.load_state_dict({"weight": ckpt.tensors([f"{ckpt.prefix}norm.weight"], [torch.Size([config.hidden_size])])[0]})
    return [norm(h)[0] for h in hidden]


def _chunk_logits(ckpt: _Checkpoint, config, output: str, hidden: torch.Tensor) -> np.ndarray:
    """Softcapped logits [positions, vocab] of one chunk, the output weight read in float32 tiles."""
    vocab = config.vocab_size
    logits = torch.empty(hidden.shape[0], vocab, dtype=torch.float32, device=hidden.device)
    # one tile buffer for the whole pass: a fresh allocation per tile costs as much as the upcast itself
    tile = torch.empty(max(1, VOCAB_TILE_BYTES // (4 * config.hidden_size)), config.hidden_size, device=hidden.device)
    for start in range(0, vocab, tile.shape[0]):
        weight = ckpt.rows_into(output, start, tile)
        logits[:, start : start + weight.shape[0]] = torch.nn.functional.linear(hidden, weight)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:  # Gemma2ForCausalLM.forward: logits / cap, tanh, * cap (Gemma 1 and 3 have none)
        logits.div_(cap).tanh_().mul_(cap)
    return logits.cpu().numpy()  # the CPU's own tensor there: no copy


class Reference:
    """The reference of one set of texts: the decoder runs once (construction), then `logits_of()` runs the kept
    final hidden states of any positions through the output layer (~1/5 of a forward each time)."""

    def __init__(
        self, model_dir: Path, texts_ids: list[list[int]], device: str = "auto", weights: Weights | None = None
    ):
        model_dir = Path(model_dir)
        self.device = reference_device(device)
        self.texts_ids = [[int(i) for i in ids] for ids in texts_ids]  # lists, tuples or arrays of ids
        if not (model_dir / "config.json").is_file():
            raise RunError(f"{model_dir}: no config.json; the reference needs a Hugging Face model folder")
        model_family(model_dir)
        self.config = AutoConfig.from_pretrained(str(model_dir))
        self.config._attn_implementation = "eager"  # the reference is what HF computes with attn_implementation="eager"
        self.ckpt = _Checkpoint(model_dir, weights)
        vocab = self.config.vocab_size
        for t, ids in enumerate(self.texts_ids):
            if len(ids) == 0:
                raise RunError(f"reference: text {t} has no tokens; every text needs at least one (its <bos>)")
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise RunError(f"reference: text {t} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        prefix = self.ckpt.prefix
        self.output = "lm_head.weight" if not self.config.tie_word_embeddings else f"{prefix}embed_tokens.weight"
        for name in dict.fromkeys([f"{prefix}embed_tokens.weight", self.output]):
            self.ckpt._check_shape(name, self.ckpt.shape(name), [vocab, self.config.hidden_size])
        with torch.inference_mode(), _ieee_fp32(self.device):
            self.hidden = _decoder(self.ckpt, self.config, self.texts_ids, self.device)

    def plan(self, chunk: int) -> list[tuple[int, int, int]]:
        """(text index, start, stop) of consecutive chunks of positions of each text, in order."""
        if chunk < 1:
            raise RunError(f"reference: chunk must be at least 1 position, got {chunk}")
        return [
            (t, start, min(start + chunk, h.shape[0]))
            for t, h in enumerate(self.hidden)
            for start in range(0, h.shape[0], chunk)
        ]

    def logits_of(self, spans: list[tuple[int, int, int]]) -> np.ndarray:
        """float32 logits of several (text, start, stop) spans, their rows one after another: one pass over the
        output weight for all of them (each pass upcasts the whole vocabulary table, whatever the number of rows)."""
        # entered and left here: never held across a caller's yield (thread state)
        with torch.inference_mode(), _ieee_fp32(self.device):
            hidden = torch.cat([self.hidden[t][start:stop] for t, start, stop in spans])
            return _chunk_logits(self.ckpt, self.config, self.output, hidden)
