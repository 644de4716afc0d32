"""Data preparation speed: this pipeline's data stage against TRL's own, on the same chat records, in one process.

    python bench/bench_data_prep.py [--records 100000] [--num-proc 2]

Both sides start from the same JSONL file and end with input_ids and labels, loss on assistant turns only:
- ours: train.data.load_datasets (read and validate every record, render with the chat template, tokenize,
  statistics, fingerprint);
- TRL: datasets.load_dataset("json") + SFTTrainer._prepare_dataset with assistant_only_loss=True, TRL's path
  for conversational data (apply_chat_template per record with assistant masks, labels, truncation). TRL needs
  {% generation %} markers for that, so its copy of the gemma template gets them around each assistant turn.
Both use the tiny model's Gemma tokenizer (python -m scripts.tiny_model builds it) and the same num_proc. The
script also compares the two results record by record: identical ids and labels mean the same work was done.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TEMPLATE = ROOT / "train" / "templates" / "gemma.jinja"
ASSISTANT_TURN = "{{- '<start_of_turn>model\\n' + message['content'] | trim + '<end_of_turn>\\n' -}}"
TAGGED_TURN = (
    "{{- '<start_of_turn>model\\n' -}}{% generation %}{{- message['content'] | trim + '<end_of_turn>\\n' -}}"
    "{% endgeneration %}"
)


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Chat records shaped like the demo's: single and multi-turn, system prompts, tool-call traces."""
    demo = [json.loads(line)["messages"] for line in (ROOT / "data" / "demo" / "chat.jsonl").read_text().splitlines()]
    users = [m["content"] for c in demo for m in c if m["role"] == "user"]
    answers = [m["content"] for c in demo for m in c if m["role"] == "assistant" and "<tool_call>" not in m["content"]]
    calls = [m["content"] for c in demo for m in c if m["role"] == "assistant" and "<tool_call>" in m["content"]]
    rng = random.Random(seed)
    records = []
    for i in range(n):
        kind = rng.random()
        msgs = (
            [{"role": "system", "content": "You are Wren, a concise home-lab operations assistant."}]
            if kind < 0.2
            else []
        )
        for _ in range(rng.choice([1, 1, 2, 3]) if kind < 0.85 else 1):
            msgs += [
                {"role": "user", "content": f"{rng.choice(users)} (#{i})"},
                {"role": "assistant", "content": rng.choice(answers)},
            ]
        if kind >= 0.85:  # an agent step: the call, its result, the answer
            msgs[-1:] = [
                {"role": "assistant", "content": rng.choice(calls)},
                {"role": "tool", "content": json.dumps({"ok": True, "took_ms": rng.randint(1, 999)})},
                {"role": "assistant", "content": rng.choice(answers)},
            ]
        records.append({"messages": msgs})
    return records


def tiny_model_path():
    from core.hub import ModelNotFoundError, resolve_model
    from scripts.tiny_model import TINY_REPO_ID

    try:
        return resolve_model(TINY_REPO_ID).path
    except ModelNotFoundError:
        subprocess.run([sys.executable, "-m", "scripts.tiny_model"], cwd=ROOT, check=True)
        return resolve_model(TINY_REPO_ID).path


def run_ours(tok, path: Path, num_proc: int, max_length: int):
    from core.config import DataSection
    from train.data import load_datasets

    t0 = time.perf_counter()
    train, stats, _, _ = load_datasets(
        tok, DataSection(train_files=[str(path)], max_seq_length=max_length, dataset_num_proc=num_proc)
    )[:4]
    return time.perf_counter() - t0, [(e.input_ids, e.labels) for e in train]


def run_trl(tok, model_path: Path, path: Path, num_proc: int, max_length: int, workdir: Path):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(workdir / "trl"),
        assistant_only_loss=True,
        max_length=max_length,
        dataset_num_proc=num_proc,
        report_to=[],
        use_cpu=True,
    )
    model = AutoModelForCausalLM.from_pretrained(str(model_path), attn_implementation="eager")
    one = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=one, processing_class=tok)

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(workdir / "datasets_cache"))
    ds = trainer._prepare_dataset(ds, tok, args, packing=False, formatting_func=None, dataset_name="bench")
    seconds = time.perf_counter() - t0
    cols = ds.select_columns(["input_ids", "labels"]).to_dict()
    return seconds, list(zip(cols["input_ids"], cols["labels"], strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--max-length", type=int, default=1024)
    a = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # TRL's map calls would print bars
    from core.hub import configure_cache_env

    configure_cache_env(ROOT / "models" / ".cache")
    from transformers import AutoTokenizer

    model_path = tiny_model_path()
    template = TEMPLATE.read_text(encoding="utf-8")
    assert template.count(ASSISTANT_TURN) == 1, "the gemma template changed: update ASSISTANT_TURN"
    ours_tok = AutoTokenizer.from_pretrained(str(model_path))
    ours_tok.chat_template = template
    trl_tok = AutoTokenizer.from_pretrained(str(model_path))
    trl_tok.chat_template = template.replace(ASSISTANT_TURN, TAGGED_TURN)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_records(a.records)), encoding="utf-8")
        ours_s, ours = run_ours(ours_tok, path, a.num_proc, a.max_length)
        trl_s, trl = run_trl(trl_tok, model_path, path, a.num_proc, a.max_length, Path(tmp))

    tokens = sum(len(ids) for ids, _ in ours)
    trl_tokens = sum(len(ids) for ids, _ in trl)
    same_ids = sum(o[0] == t[0] for o, t in zip(ours, trl, strict=True)) if len(ours) == len(trl) else 0
    same_labels = sum(o[1] == t[1] for o, t in zip(ours, trl, strict=True)) if len(ours) == len(trl) else 0
    print(
        f"{a.records:,} chat records, {tokens:,} tokens (tiny Gemma tokenizer), num_proc={a.num_proc}, "
        f"max_length={a.max_length}"
    )
    print(f"{'':34}{'seconds':>9}{'records/s':>12}{'tokens/s':>12}")
    for name, s, n, t in (
        ("ours (train.data)", ours_s, len(ours), tokens),
        ("TRL SFTTrainer._prepare_dataset", trl_s, len(trl), trl_tokens),
    ):
        print(f"{name:<34}{s:>9.1f}{n / s:>12,.0f}{t / s:>12,.0f}")
    print(f"ratio: ours is {trl_s / ours_s:.2f}x TRL's speed (TRL seconds / our seconds)")
    print(
        f"agreement: {len(ours):,} vs {len(trl):,} examples; input_ids identical for {same_ids / len(ours):.2%}, "
        f"labels identical for {same_labels / len(ours):.2%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
