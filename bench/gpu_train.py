"""The production trainer against TRL's SFTTrainer defaults on a Gemma-2-2B-shaped model: speed, memory, MFU.

    python bench/gpu_train.py                       # the default variants, one process each (~7 min on an H100 or H200)
    python bench/gpu_train.py --cap-gb 16           # the same, as if the card had 16 GiB (an OOM is a result)
    python bench/gpu_train.py --variants production,trl --steps 30
    python bench/gpu_train.py --tiny                # small shapes on the CPU: checks the script, measures nothing

What runs, each variant in its own process, on the same seeded random model (google/gemma-2-2b's config.json
shapes: 26 layers, hidden 2304, 8 heads / 4 KV heads of 256, vocab 256000, softcaps 50 and 30) saved once as
bf16 safetensors, and on the same long-tailed chat records (a JSONL file, user turns 10-80 words, assistant
turns log-normal around 150 words, cut to fit max_seq_length):

- production: train.model.build_model + train.trainer.build_trainer with configs/gemma2b_lora.yaml, i.e. the code
  `python -m train` runs (compiled decoder layers, flex attention on rows of max_seq_length packed with whole
  examples, fused lm_head + cross-entropy, activation checkpointing, LoRA without dropout, fused AdamW, loss on
  assistant turns only). Modifiers change one config key each and combine, e.g. production+nocompile+dropout:
    +unpacked        data.packing=false (one example a row; the shipped config packs)
    +qlora           model.load_in_4bit=true (nf4 base, bitsandbytes)
    +eager           model.attn_implementation=eager (what flex attention buys)
    +compile         training.torch_compile=true (the Trainer compiles the whole model)
    +compile-layers  training.torch_compile=layers (each decoder layer compiled, one shared graph; the default)
    +nocompile       training.torch_compile=false (eager layers: what compiling buys)
    +autotune        training.torch_compile_mode=max-autotune-no-cudagraphs (block sizes timed on the first step)
    +nodrop          lora.lora_dropout=0 (PEFT skips the dropout and its copy of every LoRA input; the default)
    +dropout         lora.lora_dropout=0.05
    +nockpt          training.activation_checkpointing=false (no recompute: speed at the cost of memory)
    +offload         training.activation_checkpointing=offload (layer inputs in pinned host memory)
- trl: trl.SFTTrainer with SFTConfig's defaults (the model loaded by TRL from the path, default attention,
  gradient checkpointing, fused AdamW, loss on every token), with the same batch size, sequence length and LoRA.
  A weak opponent: fp32 weights under autocast and eager attention.
- trl-tuned: SFTTrainer as TRL's docs tune it (docs "Reducing memory usage", "Speeding up training"): the model
  in bf16, liger-kernel's fused layers and loss (use_liger_kernel, when liger-kernel is installed: it needs
  Triton), packing with padding_free rows (best-fit packing, position ids restarting per example), gradient
  checkpointing, loss on the assistant turns only, and the best attention transformers 5.24 offers Gemma 2 without
  a compiled package: flex_attention (sdpa is refused for Gemma 2; flash_attention_2 needs the flash-attn build).
Every variant: batch 4 (per device) x max_seq_length 2048, gradient_accumulation_steps=1, the first --warmup
steps not timed (compilation, autotuning), then --steps timed steps.

Reported per variant: real tokens/s (non-padding tokens), supervised tokens/s (tokens with a label), median step
time, peak allocated and reserved GPU memory over training, and MFU:

    FLOPs/step = sum over rows of 4 * N_body * real_tokens + 4 * V * H * head_positions + 12 * L * H_q * d * pairs
    N_body = the decoder layers' matmul parameters (q,k,v,o,gate,up,down); V*H = lm_head; head_positions = the
    positions that go through lm_head (all real tokens, or the supervised ones for the fused head);
    pairs = causal (query, key) pairs within each example (T <= sliding window: no windowing).
    4 = forward (2) + input gradients (2): the frozen base has no weight gradients; LoRA's own FLOPs (<1%) and the
    recomputation of activation checkpointing get no credit.  MFU = FLOPs/s / the card's dense bf16 peak.

An OOM (real, or past --cap-gb through torch.cuda.set_per_process_memory_fraction) is reported as a result.
Results go to <workdir>/results.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.tiny_model import GEMMA_2_2B_CONFIG  # noqa: E402 (the repository root is on the path from here)

GEMMA_2_2B = GEMMA_2_2B_CONFIG
TINY = dict(
    vocab_size=4096,  # the tiny tokenizer's ids must fit
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    query_pre_attn_scalar=32,
)
MODIFIERS = {  # production+NAME: the config overrides of each modifier
    "unpacked": ["data.packing=false"],
    "qlora": ["model.load_in_4bit=true"],
    "eager": ["model.attn_implementation=eager"],
    "compile": ["training.torch_compile=true"],
    "compile-layers": ["training.torch_compile=layers"],
    "nocompile": ["training.torch_compile=false"],
    "autotune": ["training.torch_compile_mode=max-autotune-no-cudagraphs"],
    "nodrop": ["lora.lora_dropout=0"],
    "dropout": ["lora.lora_dropout=0.05"],
    "nockpt": ["training.activation_checkpointing=false"],
    "offload": ["training.activation_checkpointing=offload"],
}
# The default run: at full rows (every row max_seq_length: peak memory, MFU), then on long-tailed data (speed).
DEFAULT_RUN = (
    "production@full",
    "trl@full",
    "trl-tuned@full",
    "production+nocompile@full",
    "production+qlora@full",
    "production",
    "trl",
)  # each compiled variant's first step compiles (about a minute)
# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts, no sparsity), TFLOP/s.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "A10": 125.0}
WORDS = """the model reads a file and writes the answer to disk when the job runs every night on the box with one
card while the agent loop asks for the next tool call and checks that the volume is mounted read only before it
starts training again from the last committed checkpoint of yesterday""".split()  # noqa: SIM905 (prose reads better)


# --------------------------------------------------------------------------------------------- preparation
def build_model(model_dir: Path, tokenizer_dir: Path, tiny: bool) -> None:
    """The seeded random model, saved as bf16 safetensors with the tokenizer (its own process: run_child)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    shape = dict(GEMMA_2_2B, **(TINY if tiny else {}))
    if len(tok) > shape["vocab_size"]:
        raise SystemExit(f"the tokenizer has {len(tok)} tokens, more than the model's vocabulary {shape['vocab_size']}")
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2ForCausalLM(Gemma2Config(**shape)).to(torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(str(model_dir))
    for extra in ("tokenizer.model",):  # the SentencePiece model, for the tokenizer's slow path
        if (tokenizer_dir / extra).is_file() and not (model_dir / extra).exists():
            shutil.copy(tokenizer_dir / extra, model_dir / extra)


def write_records(path: Path, tokenizer_dir: Path, n: int, max_tokens: int, full: bool = False, seed: int = 0) -> None:
    """Long-tailed chat records that fit max_tokens after the Gemma template (a word is about a token or two);
    full: every record fills max_tokens (minus a few words), the worst case for memory."""
    from transformers import AutoTokenizer

    from core.records.render import TEMPLATES

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = (TEMPLATES / "gemma.jinja").read_text()
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            user = " ".join(rng.choices(WORDS, k=rng.randint(10, max(10, min(80, max_tokens // 8)))))
            k = 2 * max_tokens if full else max(5, int(rng.lognormvariate(math.log(150), 1.0)))
            words = rng.choices(WORDS, k=k)
            while True:
                messages = [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(words)}]
                ids = tok.apply_chat_template(messages, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) else ids
                if len(ids) <= max_tokens:
                    break
                words = words[: int(len(words) * max_tokens / len(ids) * (0.99 if full else 0.95))]
            f.write(json.dumps({"messages": messages}) + "\n")


# --------------------------------------------------------------------------------------------- measurement
class StepLog:
    """What each step saw (from the collator) and how long it took (from callbacks)."""

    def __init__(self, pad_id: int, cuda: bool):
        self.pad_id, self.cuda = pad_id, cuda
        self.batches: list[dict] = []
        self.times: list[float] = []
        self._t0 = 0.0

    def wrap(self, collator):
        def collate(features):
            batch = collator(features)
            self.batches.append(batch_stats(batch, self.pad_id))
            return batch

        return collate

    def callback(self):
        from transformers import TrainerCallback

        log = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                log._sync()
                log._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                log._sync()
                log.times.append(time.perf_counter() - log._t0)

        return Timer()

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def profiler_callback(start: int, steps: int, out: Path):
    """torch.profiler over `steps` steps from step `start`: how busy the GPU was (the union of its kernels' time
    over the wall), the kernel time by kind (matmul, attention, fused and eager elementwise, copies) and the top
    operators by device time, written to `out` and printed."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == start:
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == start + steps:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                kernels = [
                    (e.name, e.time_range.start, e.time_range.end)
                    for e in self.prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA
                ]
                text = profile_summary(kernels, wall, steps)
                text += "\n" + self.prof.key_averages().table(
                    sort_by="self_device_time_total", row_limit=40, max_name_column_width=70
                )
                out.write_text(text)
                print(text, flush=True)
                self.prof = None

    return Profile()


def memory_callback(start: int, steps: int, out: Path):
    """The CUDA caching allocator's history (alloc/free events with Python stacks) over `steps` steps from step
    `start`: the peak within them and what was alive at it (peak_report), written to `out` and printed."""
    import torch
    from transformers import TrainerCallback

    class MemoryProfile(TrainerCallback):
        baseline = -1

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == start:
                torch.cuda.synchronize()
                self.baseline = torch.cuda.memory_allocated()
                torch.cuda.memory._record_memory_history(stacks="python", max_entries=4_000_000)

        def on_step_end(self, args, state, control, **kwargs):
            if self.baseline >= 0 and state.global_step == start + steps:
                torch.cuda.synchronize()
                try:  # the source line behind inductor's generated code, where this torch can say it
                    snapshot = torch.cuda.memory._snapshot(augment_with_fx_traces=True)
                except TypeError:
                    snapshot = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                trace = snapshot["device_traces"][torch.cuda.current_device()]
                text = peak_report(trace, self.baseline, steps)
                out.write_text(text)
                print(text, flush=True)
                self.baseline = -1

    return MemoryProfile()


def allocation_site(frames: list[dict]) -> str:
    """Where an allocation came from: the innermost frame outside torch itself (frames are innermost first); for
    inductor's generated code, the model source it was traced from, when the snapshot carries it."""
    for frame in frames:
        name = frame.get("filename", "")
        if "/torch/" in name and "torchinductor" not in name:
            continue
        traced = frame.get("fx_original_trace") or ""
        sources = [line.strip() for line in traced.splitlines() if line.strip().startswith("File ")]
        if sources:  # 'File "/.../modeling_gemma2.py", line 81, in forward'
            path, _, rest = sources[-1][len('File "') :].partition('", line ')
            return f"compiled: {Path(path).name}:{rest.replace(', in ', ' ')}"
        return f"{Path(name).name}:{frame.get('line', '?')} {frame.get('name', '?')}"
    return "no Python frame outside torch (eager autograd backward, allocator internals)"


def peak_report(trace: list[dict], baseline: int, steps: int, top: int = 25) -> str:
    """The peak of allocated bytes over a CUDA allocator trace that began with `baseline` bytes allocated, and the
    allocations made within the trace that were alive at that peak, grouped by allocation_site, largest first."""
    current = peak = baseline
    peak_at = -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            current += event["size"]
        elif event["action"] == "free_completed":
            current -= event["size"]
        else:
            continue
        if current > peak:
            peak, peak_at = current, i
    live: dict[int, dict] = {}
    for event in trace[: peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    sites: dict[str, list[int]] = {}
    for event in live.values():
        count_bytes = sites.setdefault(allocation_site(event.get("frames", [])), [0, 0])
        count_bytes[0] += 1
        count_bytes[1] += event["size"]
    mib = 2**20
    lines = [
        f"memory over {steps} steps: peak {peak / 2**30:.2f} GiB allocated; {baseline / 2**30:.2f} GiB were allocated "
        f"before them (weights, optimizer state, what lives between steps); "
        f"{sum(b for _, b in sites.values()) / 2**30:.2f} GiB allocated within them and alive at the peak:"
    ]
    for site, (count, size) in sorted(sites.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {size / mib:9.1f} MiB  {count:5d} x  {site}")
    return "\n".join(lines)


KERNEL_KINDS = (  # first match wins; names of cuBLAS/CUTLASS, flex attention's and inductor's Triton kernels
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_")),
    ("attention", ("flex", "attention", "triton_tem")),
    ("fused (inductor/triton)", ("triton_",)),
    ("copy/fill", ("memcpy", "memset", "copy", "fill")),
    ("elementwise/reduce (eager)", ("elementwise", "vectorized", "reduce", "unrolled", "index", "dropout")),
)


def profile_summary(kernels: list[tuple[str, float, float]], wall: float, steps: int) -> str:
    """Busy time (union of kernel intervals, microseconds in) over wall seconds, and time by kernel kind."""
    busy, end = 0.0, float("-inf")
    for _, a, b in sorted(kernels, key=lambda k: k[1]):
        if b > end:
            busy += b - max(a, end)
            end = b
    by_kind: dict[str, list[float]] = {}
    for name, a, b in kernels:
        low = name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in low for key in keys)), "other")
        by_kind.setdefault(kind, []).append(b - a)
    lines = [
        f"profile of {steps} steps: wall {wall:.3f} s, GPU busy {busy / 1e6:.3f} s ({busy / 1e6 / wall:.0%}), "
        f"{len(kernels) / steps:,.0f} kernels a step"
    ]
    total = sum(sum(v) for v in by_kind.values()) or 1.0
    for kind, times in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        t = sum(times)
        per_step = f"{t / 1e3 / steps:8.1f} ms/step {t / total:6.1%}  {len(times) / steps:7,.0f} kernels"
        lines.append(f"  {kind:28s} {per_step}")
    return "\n".join(lines)


def batch_stats(batch: dict, pad_id: int) -> dict:
    """Real tokens, supervised tokens, slots (rows x padded length) and causal pairs of one batch."""
    ids = batch["input_ids"]
    labels = batch.get("labels")
    supervised = int((labels[:, 1:] != -100).sum()) if labels is not None else 0
    pairs = 0
    real = 0
    for r in range(ids.shape[0]):
        if batch.get("attention_mask") is not None:
            lengths = [int(batch["attention_mask"][r].sum())]
        elif batch.get("position_ids") is not None:  # packed: sequences restart at position 0
            pos = batch["position_ids"][r].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            row = ids[r].tolist()
            lengths = [sum(t != pad_id for t in row[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
        else:
            lengths = [int((ids[r] != pad_id).sum())]
        real += sum(lengths)
        pairs += sum(n * (n + 1) // 2 for n in lengths)
    return {"real": real, "supervised": supervised, "slots": int(ids.numel()), "pairs": pairs}


def flops_per_step(stats: dict, shape: dict, fused_head: bool) -> float:
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    n_body = layers * (h * q + 2 * h * kv + q * h + 3 * h * shape["intermediate_size"])
    head_positions = stats["supervised"] if fused_head else stats["real"]
    return (
        4 * n_body * stats["real"]
        + 4 * shape["vocab_size"] * h * head_positions
        + 12 * layers * q * stats["pairs"]  # QK^T and AV: 2 x 2 FLOPs per pair and head dim, x3 with backward
    )


def summarize(log: StepLog, warmup: int, steps: int, shape: dict, fused_head: bool, peak_tflops: float | None) -> dict:
    times = log.times[warmup : warmup + steps]  # a profiled variant's extra steps come after these
    stats = log.batches[warmup : warmup + len(times)]
    if not times:
        return {"error": "no timed step"}
    total_t = sum(times)
    total = {k: sum(s[k] for s in stats) for k in ("real", "supervised", "slots", "pairs")}
    flops = sum(flops_per_step(s, shape, fused_head) for s in stats)
    return {
        "timed_steps": len(times),
        "tokens_per_s": total["real"] / total_t,
        "supervised_tokens_per_s": total["supervised"] / total_t,
        "padding": 1 - total["real"] / total["slots"],
        "median_step_s": statistics.median(times),
        "tflops": flops / total_t / 1e12,
        "mfu": flops / total_t / 1e12 / peak_tflops if peak_tflops else None,
    }


# --------------------------------------------------------------------------------------------- the variants
def production_trainer(variant: str, args, log: StepLog):
    """The production code path: train.model.build_model and train.trainer.build_trainer on the bench's data."""
    from core.config import load_config
    from core.hub import resolve_model
    from core.runfolder import RunFolder
    from train.data import load_data
    from train.device import placement
    from train.loss import fused_lm_head_enabled
    from train.model import build_model as build_lora_model
    from train.model import load_tokenizer
    from train.trainer import build_trainer

    overrides = [
        f"model.name_or_path={args.model_dir}",
        f"data.train_files=[{args.data}]",
        f"data.max_seq_length={args.seq}",
        f"training.per_device_train_batch_size={args.batch}",
        "training.gradient_accumulation_steps=1",
        f"training.max_steps={total_steps(args)}",
        "training.logging_steps=1",
        "training.save_steps=100000",
        "training.report_to=[]",
        "export.enabled=false",
    ]
    if args.tiny:
        overrides += ["model.device=cpu", "model.dtype=float32"]
    for modifier in modifiers(variant):
        overrides += MODIFIERS[modifier]
    cfg = load_config(ROOT / "configs" / "gemma2b_lora.yaml", overrides)
    folder = RunFolder.of(cfg)
    folder.root.mkdir(parents=True, exist_ok=True)
    where = placement(cfg)
    base = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(base, cfg)
    data = load_data(tokenizer, cfg, folder.root)
    model = build_lora_model(base, cfg, where)
    trainer = build_trainer(model, tokenizer, data.train, [], folder, cfg, identity={})
    trainer.data_collator = log.wrap(trainer.data_collator)
    trainer.add_callback(log.callback())
    info = {"attention": where.attn_implementation, "fused_lm_head": fused_lm_head_enabled(cfg, where.cuda)}
    return trainer, info


def trl_trainer(args, log: StepLog, tuned: bool = False):
    """TRL's SFTTrainer with SFTConfig's defaults (only what must match is set: shapes, steps, LoRA, logging), or
    tuned as TRL's docs recommend (the module docstring's trl-tuned)."""
    import importlib.util

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from core.config import load_config
    from core.hub import resolve_model
    from train.model import load_tokenizer

    cfg = load_config(ROOT / "configs" / "gemma2b_lora.yaml", [f"model.name_or_path={args.model_dir}"])
    tokenizer = load_tokenizer(resolve_model(str(args.model_dir)), cfg)  # the same chat template
    tuning = {}
    if tuned:
        cuda = torch.cuda.is_available() and not args.tiny
        tuning = {
            "model_init_kwargs": {
                "dtype": torch.bfloat16 if cuda else torch.float32,
                "attn_implementation": "flex_attention" if cuda else "eager",
            },
            "use_liger_kernel": cuda and importlib.util.find_spec("liger_kernel") is not None,
            "packing": True,
            "padding_free": True,
            "gradient_checkpointing": True,
            "assistant_only_loss": False,  # the bench's records carry no generation markers; loss as TRL's default
        }
    sft = SFTConfig(
        output_dir="trl-out",
        per_device_train_batch_size=args.batch,
        max_length=args.seq,
        max_steps=total_steps(args),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        **({"use_cpu": True, "bf16": False} if args.tiny else {}),
        **tuning,
    )
    trainer = SFTTrainer(
        model=str(args.model_dir),
        args=sft,
        train_dataset=load_dataset("json", data_files=str(args.data), split="train"),
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **cfg.lora.model_dump()),
    )
    trainer.data_collator = log.wrap(trainer.data_collator)
    trainer.add_callback(log.callback())
    attn = getattr(trainer.model.config, "_attn_implementation", "?")
    return trainer, {"attention": attn, "fused_lm_head": bool(tuning.get("use_liger_kernel"))}


PROFILED_STEPS = 3  # --profile, --memory-profile: this many steps after the timed ones, profiled and not timed


def profiled(args, which: str = "profile") -> bool:
    """Whether this variant is named in --profile (which="profile") or --memory-profile ("memory_profile")."""
    import torch

    named = (getattr(args, which) or "").split(",")
    return torch.cuda.is_available() and not args.tiny and args.variant in named


def total_steps(args) -> int:
    extra = profiled(args) or profiled(args, "memory_profile")
    return args.warmup + args.steps + (PROFILED_STEPS if extra else 0)


def run_variant(args) -> dict:
    """One variant in this process: train warmup + steps, measure, return the result row."""
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    result: dict = {"variant": args.variant, "cap_gb": args.cap_gb}
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        if args.cap_gb:
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total))
    log = StepLog(pad_id=0, cuda=cuda)
    if args.variant.removesuffix("@full") in ("trl", "trl-tuned"):
        trainer, info = trl_trainer(args, log, tuned=args.variant.startswith("trl-tuned"))
    else:
        trainer, info = production_trainer(args.variant, args, log)
    result.update(info)
    if profiled(args):
        out = args.workdir / f"profile-{slug(args.variant)}.txt"
        trainer.add_callback(profiler_callback(args.warmup + args.steps, PROFILED_STEPS, out))
    if profiled(args, "memory_profile"):
        out = args.workdir / f"memory-{slug(args.variant)}.txt"
        trainer.add_callback(memory_callback(args.warmup + args.steps, PROFILED_STEPS, out))
    if cuda:
        torch.cuda.synchronize()
        result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    except torch.OutOfMemoryError as e:
        result["oom"] = f"at step {len(log.times) + 1}: {str(e).splitlines()[0][:160]}"
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    shape = dict(GEMMA_2_2B, **(TINY if args.tiny else {}))
    if "oom" not in result:
        result.update(summarize(log, args.warmup, args.steps, shape, info["fused_lm_head"], args.peak_tflops))
    # the loss of the last timed step: a profiled variant trains PROFILED_STEPS more, which must not move it
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    result["last_loss"] = losses.get(args.warmup + args.steps)
    return result


# --------------------------------------------------------------------------------------------- the driver
def card() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return name, peak


def child(args, name: str, *extra: str, timeout: float) -> tuple[int, str]:
    """This script in a fresh process (--variant / --build-model); (exit code, last lines of its output)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    cmd += ["--workdir", str(args.workdir), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--cap-gb", str(args.cap_gb)] if args.cap_gb else []
    cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    cmd += ["--profile", args.profile] if args.profile else []
    cmd += ["--memory-profile", args.memory_profile] if args.memory_profile else []
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(args.workdir / "inductor"))
    logf = args.workdir / f"{name}.log"
    with logf.open("w") as out:
        try:
            rc = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    lines = logf.read_text(errors="replace").splitlines()
    return rc, "\n".join(lines[-8:])


def table(rows: list[dict]) -> str:
    head = (
        "| variant | attention | tokens/s | supervised/s | padding | step (median) | peak alloc | peak reserved "
        "| TFLOP/s | MFU | last loss |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r or "oom" in r:
            why = f"OOM {r['oom']}" if "oom" in r else f"error: {r['error']}"
            mem = f"{r.get('peak_allocated_gib', float('nan')):.1f} GiB" if "peak_allocated_gib" in r else "-"
            out.append(f"| {r['variant']} | {r.get('attention', '-')} | {why} | | | | {mem} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        loss = f"{r['last_loss']:.3f}" if r.get("last_loss") is not None else "-"
        alloc = f"{r['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in r else "-"
        reserved = f"{r['peak_reserved_gib']:.1f} GiB" if "peak_reserved_gib" in r else "-"
        out.append(
            f"| {r['variant']} | {r['attention']} | {r['tokens_per_s']:,.0f} | {r['supervised_tokens_per_s']:,.0f} "
            f"| {r['padding']:.0%} | {r['median_step_s'] * 1000:.0f} ms | {alloc} | {reserved} | {r['tflops']:.0f} "
            f"| {mfu} | {loss} |"
        )
    return "\n".join(out)


def ratios(rows: list[dict]) -> list[str]:
    """Each production variant against TRL on the same data (NAME against trl, NAME@full against trl@full)."""
    by = {r["variant"]: r for r in rows if "tokens_per_s" in r}
    lines = []
    for name, r in by.items():
        if name.startswith("trl"):
            continue
        for trl in ("trl", "trl-tuned"):  # both baselines: TRL's defaults, and TRL as its docs tune it
            ref = by.get(f"{trl}@full" if name.endswith("@full") else trl)
            if ref is None:
                continue
            line = f"{name} vs {ref['variant']}: {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x tokens/s"
            if "peak_allocated_gib" in r and "peak_allocated_gib" in ref:
                line += f", {r['peak_allocated_gib'] / ref['peak_allocated_gib']:.2f}x peak allocated memory"
            lines.append(line)
    return lines


def write_results(args, card_name: str, rows: list[dict]) -> None:
    results = {"card": card_name, "peak_tflops": args.peak_tflops, "cap_gb": args.cap_gb, "rows": rows}
    results |= {"batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup}
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))


def drive(args) -> int:
    args.workdir.mkdir(parents=True, exist_ok=True)
    name, peak = card()
    if name == "cpu" and not args.tiny:
        print("no CUDA device: run with --tiny for a CPU self-check of the script", file=sys.stderr)
        return 2
    args.peak_tflops = args.peak_tflops or peak
    model_dir = args.workdir / ("model-tiny" if args.tiny else "model")
    t0 = time.time()
    if not (model_dir / "config.json").is_file():
        print(f"building the random model in {model_dir} ...", flush=True)
        rc, tail = child(args, "build-model", "--build-model", "--tokenizer", str(args.tokenizer), timeout=900)
        if rc != 0:
            print(f"building the model failed (exit {rc}):\n{tail}", file=sys.stderr)
            return 1
    for full in (False, True):
        data = data_file(args.workdir, full)
        if not data.is_file():
            write_records(data, model_dir, n=args.records, max_tokens=args.seq, full=full)
    print(
        f"model and data ready in {time.time() - t0:.0f} s; card: {name}, peak {args.peak_tflops} TFLOP/s", flush=True
    )
    rows = []
    started = time.time()
    for variant in args.variants:
        left = args.budget_s - (time.time() - started)
        if left < 60:
            rows.append({"variant": variant, "error": "skipped: --budget-s spent"})
            continue
        t1 = time.time()
        timeout = min(args.variant_timeout_s, left)
        rc, tail = child(args, slug(variant), "--variant", variant, timeout=timeout)
        out = args.workdir / f"result-{slug(variant)}.json"
        if rc == 0 and out.is_file():
            rows.append(json.loads(out.read_text()))
        else:
            why = (
                [line for line in tail.splitlines() if "Error" in line or "error" in line] or tail.splitlines() or [""]
            )
            rows.append({"variant": variant, "error": f"exit {rc}: {why[-1].strip()}"[:200]})
        print(f"{variant}: {time.time() - t1:.0f} s", flush=True)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        write_results(args, name, rows)
    write_results(args, name, rows)
    print(f"\n{name}; batch {args.batch} x {args.seq}; {args.steps} timed steps after {args.warmup} warm-up")
    if args.cap_gb:
        print(f"memory capped at {args.cap_gb} GiB (torch.cuda.set_per_process_memory_fraction)")
    print(table(rows))
    print("\n".join(ratios(rows)))
    return 0 if all("error" not in r for r in rows) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_RUN),
        help="comma-separated, run in order; NAME on long-tailed data, NAME@full on full rows; NAME is trl, "
        f"trl-tuned or production[+MODIFIER...] (modifiers: {', '.join(MODIFIERS)})",
    )
    p.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--batch", type=int, default=4, help="per-device batch (rows)")
    p.add_argument("--seq", type=int, default=2048, help="max_seq_length")
    p.add_argument("--records", type=int, default=600)
    p.add_argument("--cap-gb", type=float, default=None, help="emulate a card with this many GiB (16, 24)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not known")
    p.add_argument("--budget-s", type=float, default=480, help="start no variant after this many seconds")
    p.add_argument("--variant-timeout-s", type=float, default=240)
    p.add_argument("--workdir", type=Path, default=Path("outputs/gpu-bench"))
    p.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder (default: the tiny model's)")
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU: checks the script, measures nothing")
    p.add_argument(
        "--profile",
        metavar="VARIANT[,VARIANT]",
        help=f"torch.profiler over {PROFILED_STEPS} steps after the timed ones of these variants (GPU)",
    )
    p.add_argument(
        "--memory-profile",
        metavar="VARIANT[,VARIANT]",
        help=f"CUDA allocator history over {PROFILED_STEPS} steps after the timed ones: the peak and, grouped by the "
        "code that allocated it, what was alive at it (GPU)",
    )
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--build-model", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if not known_variant(v)]
    if unknown:
        p.error(
            f"unknown variant(s) {unknown}; known: production[+MODIFIER...], trl, trl-tuned, each with an optional "
            f"@full (modifiers: {', '.join(MODIFIERS)})"
        )
    if args.tiny:
        args.seq = min(args.seq, 256)
        args.variants = [v for v in args.variants if "qlora" not in modifiers(v)]
    args.model_dir = args.workdir / ("model-tiny" if args.tiny else "model")
    if args.variant:
        args.data = data_file(args.workdir, args.variant.endswith("@full"))
    return args


def modifiers(variant: str) -> list[str]:
    """production+compile-layers+nodrop@full -> ["compile-layers", "nodrop"]."""
    return variant.removesuffix("@full").split("+")[1:]


def known_variant(variant: str) -> bool:
    base = variant.removesuffix("@full").split("+")[0]
    mods = modifiers(variant)
    if base in ("trl", "trl-tuned"):
        return not mods
    return base == "production" and all(m in MODIFIERS for m in mods)


def slug(variant: str) -> str:
    """A file name for the variant's log and result: production+nodrop@full -> production-nodrop-full."""
    return variant.replace("+", "-").replace("@", "-")


def data_file(workdir: Path, full: bool) -> Path:
    return workdir / ("records-full.jsonl" if full else "records.jsonl")


def default_tokenizer() -> Path:
    from core.hub import resolve_model
    from scripts.tiny_model import TINY_REPO_ID

    return resolve_model(TINY_REPO_ID).path


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.build_model:
        build_model(args.model_dir, args.tokenizer, args.tiny)
        return 0
    if args.variant:
        os.chdir(args.workdir)  # the production variant's outputs/<run> lands in the workdir
        result = run_variant(args)
        (args.workdir / f"result-{slug(args.variant)}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return 0
    args.tokenizer = (args.tokenizer or default_tokenizer()).resolve()
    return drive(args)


if __name__ == "__main__":
    raise SystemExit(main())
