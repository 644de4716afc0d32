"""Will it fit? Peak GPU memory of one training step at the configured shapes, traced on the meta device
(docs/gpu-box.md): the LoRA model built from config.json, one forward + backward under a dispatch mode that tracks
every tensor storage alive. AdamW's moments and the CUDA context are added analytically. Not modelled: allocator
fragmentation, NCCL buffers, torch.compile workspaces; with activation_checkpointing=offload the layer inputs
are counted as if kept on the GPU (an upper bound).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig

from core.config import Config
from core.files import human_size
from train.device import Placement
from train.loss import fused_lm_head_enabled
from train.model import compute_dtype, with_lora

GiB = 1 << 30
# trl 1.16: chunked_logprob.TOKEN_CHUNK_SIZE, utils._CHUNKED_LOGPROB_CHUNK_SIZE
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768
CPU_FOLD_TEMPORARIES = 8  # trl 1.16 _backward_tile at its peak: tile.float(), tanh, z, log_p, p, grad, products
CUDA_CONTEXT = GiB // 2  # CUDA context + cuBLAS workspace on recent drivers, before any tensor
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64 / 4 + 4 / (64 * 256)  # 4 bits + fp8 absmax per 64 + fp32 per 256 blocks


class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage alive, and the most at any point, for storages created inside the mode; never those
    of `known` tensors (the parameters, counted apart) nor views of them (`t()` returns a weight's storage again)."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in known}
        self.live: dict[int, weakref.finalize] = {}
        self.current = self.peak = 0

    def _freed(self, key: int, size: int) -> None:
        self.current -= size
        self.live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in self.known:
                    size = storage.nbytes()
                    self.live[key] = weakref.finalize(storage, self._freed, key, size)
                    self.current += size
                    self.peak = max(self.peak, self.current)
        return out


class _FusedAttention(torch.autograd.Function):
    """Flash/flex attention, which never builds T x T scores: what its backward keeps (q, k, v, out, lse)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # [B, T, H, D], as transformers returns
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(module, query, key, value, attention_mask, **kwargs):
    return _FusedAttention.apply(query, key, value), None


AttentionInterface.register("memory_estimate_fused", _fused_attention)


def _one_tile(hidden: torch.Tensor, vocab: int, triton: bool) -> None:
    """Allocate, and free, what one tile of the fused head holds at once: [min(N, 4096), 32768] in the compute dtype
    and, without Triton (CPU), the CPU_FOLD_TEMPORARIES fp32 copies of it that torch ops fold it with."""
    n, width = min(hidden.shape[0], TRL_TOKEN_TILE), min(vocab, TRL_VOCAB_TILE)
    held = [hidden.new_empty(n, TRL_VOCAB_TILE)]
    held += [] if triton else [hidden.new_empty(n, width, dtype=torch.float32) for _ in range(CPU_FOLD_TEMPORARIES)]


class _FusedHead(torch.autograd.Function):
    """Memory of TRL's ChunkedLogProbFunction (train/loss.py), which cannot run on meta tensors (it asks autocast
    about the device). Forward and backward each hold one tile at a time; forward keeps fp32 per-token statistics,
    backward accumulates the hidden-state gradient in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, triton):
        stats = [hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(7)]  # running max, sums...
        _one_tile(hidden, weight.shape[0], triton)
        log_z = stats[0] + stats[1]
        del stats
        ctx.save_for_backward(hidden, weight, log_z)
        ctx.triton = triton
        return log_z - 1

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, _ = ctx.saved_tensors
        grad_hidden = hidden.new_empty(hidden.shape, dtype=torch.float32)
        _one_tile(hidden, weight.shape[0], ctx.triton)
        return grad_hidden.to(hidden.dtype), None, None


@dataclass
class MemoryEstimate:
    batch: int
    seq: int
    fused_lm_head: bool
    attn_implementation: str
    weights: int
    optimizer: int
    peak: int  # tensors at the step's peak, weights and optimizer state included, CUDA context excluded

    @property
    def total(self) -> int:
        return self.peak + CUDA_CONTEXT


def _weight_bytes(model: torch.nn.Module, quantized: bool) -> tuple[int, int]:
    """(all parameter bytes, trainable parameter count); QLoRA's frozen linear weights at nf4 size."""
    total = trainable = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
        if quantized and not p.requires_grad and p.dim() == 2 and "embed_tokens" not in name:
            total += int(p.numel() * NF4_BYTES_PER_WEIGHT)
        else:
            total += p.numel() * p.element_size()
    return total, trainable


def _step_loss(model, ids: torch.Tensor, fused: bool, triton: bool) -> torch.Tensor:
    mask = torch.ones_like(ids)  # a padded batch (packed rows carry position_ids instead: the same sizes)
    if fused:
        causal_lm = model.get_base_model()
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        head = causal_lm.get_output_embeddings()
        return _FusedHead.apply(hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, triton).sum()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    if out.logits.dtype != torch.float32:
        out.logits.float()  # accelerate's autocast wrapper returns outputs in fp32: a transient copy of the logits
    return out.loss


def estimate_step_memory(
    model_config: PretrainedConfig, cfg: Config, where: Placement, batch: int | None = None, seq: int | None = None
) -> MemoryEstimate:
    """Peak tensor memory of one training step (forward, backward, AdamW state) at batch x seq tokens."""
    batch = batch or cfg.training.per_device_train_batch_size
    seq = seq or cfg.data.max_seq_length
    fused = fused_lm_head_enabled(cfg, where.cuda)
    attn = "eager" if where.attn_implementation == "eager" else "memory_estimate_fused"
    with torch.device("meta"):  # the LoRA model as the run builds it, without weights
        dtype = compute_dtype(cfg, where.cuda)  # where: the planned card's, which need not be in this machine
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation=attn)
    if cfg.training.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = with_lora(model, cfg)
    model.train()
    weights, trainable = _weight_bytes(model, cfg.model.load_in_4bit)
    optimizer = 2 * 4 * trainable  # AdamW exp_avg + exp_avg_sq, fp32 like the LoRA weights
    ids = torch.randint(4, model_config.vocab_size, (batch, seq), device="meta")
    with PeakMemory([*model.parameters(), *model.buffers()]) as mem:
        _step_loss(model, ids, fused, triton=where.cuda).backward()
    return MemoryEstimate(
        batch, seq, fused, where.attn_implementation, weights, optimizer, mem.peak + weights + optimizer
    )


def describe(est: MemoryEstimate, card: int | None, card_name: str) -> list[str]:
    """The dry run's lines: the estimate, whether it fits the card, and which knob to turn first when not."""
    lines = [
        f"--- GPU memory of one training step (meta-device trace, {est.batch} x {est.seq} tokens, "
        f"attention {est.attn_implementation}, fused lm_head {'on' if est.fused_lm_head else 'off'})",
        f"    weights {human_size(est.weights)}, AdamW state {human_size(est.optimizer)}, "
        f"peak tensors {human_size(est.peak)}; with the CUDA context ~{est.total / GiB:.1f} GiB",
    ]
    if card is None:
        return [*lines, "    no GPU detected and no --gpu-memory given: pass --gpu-memory 24GiB to check a card"]
    fits = est.total <= card * 0.95
    lines.append(f"    {card_name} ({card / GiB:.1f} GiB): {'fits' if fits else 'does NOT fit'}")
    if fits:
        return lines
    knobs = []
    if not est.fused_lm_head:
        knobs.append("training.fused_lm_head=true (the 256k-vocab logits are most of the step)")
    if est.attn_implementation == "eager":
        knobs.append("model.attn_implementation=flex_attention (no T x T attention scores)")
    knobs += [
        "training.activation_checkpointing=true",
        f"training.per_device_train_batch_size={max(1, est.batch // 2)} with gradient_accumulation_steps doubled",
        "model.load_in_4bit=true (QLoRA: the frozen weights in nf4)",
        "data.max_seq_length (cut the longest examples)",
    ]
    return lines + [f"    turn first: {knob}" for knob in knobs]


def memory_plan(model_dir: Path, cfg: Config, where: Placement, gpu_memory: int | None) -> list[str]:
    """The dry run's memory section, for --gpu-memory or the detected card."""
    model_config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=cfg.model.trust_remote_code)
    card = (gpu_memory, "--gpu-memory") if gpu_memory else None
    if card is None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        card = (props.total_memory, props.name)
    if not where.cuda and card is None:
        return ["--- GPU memory: training on the CPU (model.device); pass --gpu-memory 24GiB to plan for a card"]
    est = estimate_step_memory(model_config, cfg, where)
    return describe(est, card[0] if card else None, card[1] if card else "")
