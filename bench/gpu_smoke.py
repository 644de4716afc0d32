"""GPU smoke test: a Gemma-2-2B-shaped model with random weights, trained a few dozen LoRA steps with
the production config's settings; prints tokens/s and peak GPU memory. Needs no download.

    python bench/gpu_smoke.py [--steps 30] [--config configs/gemma2b_lora.yaml]
    python bench/gpu_smoke.py --tiny --steps 3     # a CPU self-check of the script itself

The shapes are google/gemma-2-2b's (its config.json: 26 layers, hidden 2304, 8 heads, 4 KV heads,
head_dim 256); the weights are random, so the loss is
meaningless but the memory and speed of a step are those of the real model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GEMMA_2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    max_position_embeddings=8192,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
)


def main() -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from core.config import load_config
    from train.device import placement

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gemma2b_lora.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU: checks the script, measures nothing")
    args = p.parse_args()
    cfg = load_config(args.config)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("no CUDA device: run with --tiny for a CPU self-check", file=sys.stderr)
        return 2
    shape = dict(GEMMA_2_2B)
    if args.tiny:
        shape.update(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            query_pre_attn_scalar=64,
        )
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    attn = placement(
        cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": "auto"})})
    ).attn_implementation
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2ForCausalLM(Gemma2Config(**shape, attn_implementation=attn)).to(dtype)
    if cfg.training.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **cfg.lora.model_dump()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.training.learning_rate)
    batch = cfg.training.per_device_train_batch_size
    seq = 64 if args.tiny else cfg.data.max_seq_length
    ids = torch.randint(4, shape["vocab_size"], (batch, seq), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} {times[-1]:.3f} s", flush=True)
    steady = times[min(3, len(times) - 1) :]  # skip warm-up steps
    tok_s = batch * seq / (sum(steady) / len(steady))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    name = torch.cuda.get_device_name() if cuda else "cpu (tiny self-check)"
    print(
        f"device {name}; batch {batch} x {seq} tokens, LoRA r={cfg.lora.r}, "
        f"activation_checkpointing={cfg.training.activation_checkpointing}, attn={attn}"
    )
    print(f"tokens/s {tok_s:,.0f}; step {sum(steady) / len(steady):.3f} s; peak GPU memory {peak:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
