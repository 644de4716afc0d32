"""Scoring one model on the nightly's fixed eval set, the same way for the candidate and the champion.

    hf_loss    mean cross-entropy (nats) over the supervised tokens of the eval records (the tokens training
               puts a loss on: assistant turns, completions), through the merged HF model in float32
    gguf_loss  the same tokens through llama.cpp on the GGUF that ships (export.default_quant): what an
               application gets, quantization included
    quant_gap  gguf_loss - hf_loss
    task_accuracy  share of task checks (prompt -> expected) the GGUF answers exactly, greedy, with its own
               chat template (optional: nightly.task_checks)

Perplexities are exp(loss). Each record is rendered with the scored model's own tokenizer and chat
template, exactly as training renders it (core.records.render), and cut at data.max_seq_length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.llamacpp import native_output_to
from core.config import Config
from core.errors import DataError
from core.files import sha256_file
from core.records.render import IGNORE_INDEX, RecordProblem, Rendered, Renderer, RenderOptions
from core.records.sources import read_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    records: list[dict[str, Any]]  # the first nightly.max_eval_records held-out records, as read
    tasks: list[tuple[str, str]]  # (prompt, expected)
    digest: str  # sha256 over the files and every setting that changes a score: the cache key


def eval_files(cfg: Config) -> list[str]:
    return list(cfg.nightly.eval_files or cfg.verify.heldout_files)


def eval_set_digest(cfg: Config) -> str:
    """What the scores depend on besides the model: eval file bytes, task checks, and the scoring settings."""
    files = eval_files(cfg) + ([cfg.nightly.task_checks] if cfg.nightly.task_checks else [])
    settings = {
        "files": {f: sha256_file(Path(f)) if Path(f).is_file() else f for f in files},
        "max_eval_records": cfg.nightly.max_eval_records,
        "max_new_tokens": cfg.nightly.max_new_tokens,
        "render": render_options(cfg).__dict__,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def render_options(cfg: Config) -> RenderOptions:
    return RenderOptions(
        max_seq_length=cfg.data.max_seq_length,
        system_message=cfg.data.system_message,
        assistant_only_loss=cfg.data.assistant_only_loss,
        completion_only_loss=cfg.data.completion_only_loss,
    )


def read_tasks(path: Path) -> list[tuple[str, str]]:
    problems, tasks = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(f"{path}:{i}: not JSON ({e})")
            continue
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("expected"), str)):
            problems.append(f'{path}:{i}: expected {{"prompt": "...", "expected": "..."}} with two strings')
            continue
        tasks.append((row["prompt"], row["expected"]))
    if problems:
        raise DataError(problems, "in nightly.task_checks")
    return tasks


def load_eval_set(cfg: Config) -> EvalSet:
    """The held-out records and task checks; DataError if any is unreadable (a smaller eval set would
    silently change what the gate compares)."""
    files = eval_files(cfg)
    if not files:
        raise DataError(
            ["nightly.eval_files and verify.heldout_files are both empty"],
            "the gate needs a fixed held-out set: set nightly.eval_files (records kept out of data.train_files)",
        )
    problems: list[str] = []
    rows = [row for f in files for row in read_source(f, problems=problems).rows][: cfg.nightly.max_eval_records]
    problems += [f"{r.where}: {r.problem[0]}: {r.problem[1]}" for r in rows if r.problem]
    if problems:
        raise DataError(problems, "in nightly.eval_files")
    tasks = read_tasks(Path(cfg.nightly.task_checks)) if cfg.nightly.task_checks else []
    return EvalSet([r.record for r in rows if r.record is not None], tasks, eval_set_digest(cfg))


def render(model_dir: Path, eval_set: EvalSet, cfg: Config) -> list[Rendered]:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    results = Renderer(tokenizer, render_options(cfg)).render_many(eval_set.records, ["auto"] * len(eval_set.records))
    problems = [
        f"eval record {i}: {r.field}: {r.reason}" for i, r in enumerate(results) if isinstance(r, RecordProblem)
    ]
    if problems:
        raise DataError(problems, "in nightly.eval_files")
    return [r for r in results if isinstance(r, Rendered)]


def nll(logits: np.ndarray, labels: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of the supervised next tokens, and their count. logits[i] predicts
    token i + 1 (the causal shift training applies)."""
    targets = np.asarray(labels[1:])
    keep = targets != IGNORE_INDEX
    x = logits[:-1][keep].astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    log_probs = x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(int(keep.sum())), targets[keep]].sum()), int(keep.sum())


def hf_loss(model_dir: Path, examples: list[Rendered]) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager", device_map=device
    ).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex.input_ids], device=device)).logits[0].float().cpu().numpy()
            s, n = nll(logits, ex.labels)
            total, count = total + s, count + n
    return total / count if count else math.nan


def gguf_scores(gguf: Path, examples: list[Rendered], tasks: list[tuple[str, str]], max_new: int) -> dict[str, Any]:
    """gguf_loss over the same tokens, and the task checks answered greedily with the file's chat template."""
    n_ctx = max([len(ex.input_ids) for ex in examples] + [256]) + max_new + 8
    with native_output_to(None):
        llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False, seed=0
        )
    try:
        total, count = 0.0, 0
        for ex in examples:
            llm.reset()
            llm.eval(ex.input_ids)
            s, n = nll(np.array(llm.scores[: len(ex.input_ids)], dtype=np.float32), ex.labels)
            total, count = total + s, count + n
        failures = []
        for prompt, expected in tasks:
            llm.reset()
            out: Any = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_new
            )
            choice = out["choices"][0]
            got = choice["message"]["content"] or ""
            if choice["finish_reason"] != "stop" or got.strip() != expected.strip():
                failures.append({"prompt": prompt, "expected": expected, "got": got})
    finally:
        llm.close()
    scores: dict[str, Any] = {"gguf_loss": total / count if count else math.nan, "tokens": count}
    if tasks:
        scores |= {"task_accuracy": 1 - len(failures) / len(tasks), "tasks": len(tasks), "task_failures": failures}
    return scores


def score(model_dir: Path, gguf: Path, eval_set: EvalSet, cfg: Config) -> dict[str, Any]:
    """Every metric of one model (merged HF folder + its default-quant GGUF) on the eval set."""
    examples = render(model_dir, eval_set, cfg)
    scores: dict[str, Any] = {"hf_loss": hf_loss(model_dir, examples)}
    scores |= gguf_scores(gguf, examples, eval_set.tasks, cfg.nightly.max_new_tokens)
    scores["quant_gap"] = scores["gguf_loss"] - scores["hf_loss"]
    scores["hf_perplexity"] = math.exp(min(scores["hf_loss"], 700))
    scores["gguf_perplexity"] = math.exp(min(scores["gguf_loss"], 700))
    scores |= {"records": len(examples), "eval_set": eval_set.digest[:16], "gguf": gguf.name}
    return scores
