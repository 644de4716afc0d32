"""What the nightly job compares: one model's scores on the fixed eval set (docs/nightly.md defines each metric),
and the gates a candidate must pass. Both losses are convert/score.py's, on the eval records rendered as
verification renders its held-out set: read from the candidate's verify.json, or scored now for a model no
verification scored on these records (a champion, when the eval set changed).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from convert.score import GGUF, Sequence, losses, mean_loss, windows
from core.config import Config, NightlySection
from core.errors import DataError
from core.files import sha256_file
from core.gates import Gate, at_least, at_most, check
from core.records.heldout import HeldOut, render_records
from core.records.sources import read_source

LOSSES = ("hf_loss", "gguf_loss")


@dataclass(frozen=True)
class EvalSet:
    paths: list[str]  # nightly.eval_files, or verify.heldout_files
    limit: int  # nightly.max_eval_records
    tasks: list[tuple[str, str]]  # (prompt, expected)
    digest: str  # sha256 over the files and every setting that changes a score: the cache key


def eval_paths(cfg: Config) -> list[str]:
    return list(cfg.nightly.eval_files or cfg.verify.heldout_files)


def load_eval_set(cfg: Config) -> EvalSet:
    """The eval set, its records read (rendering needs the scored model's tokenizer) so that a broken file fails in
    seconds, before training. DataError if any record is unreadable: a smaller set would change what is compared."""
    paths = eval_paths(cfg)
    if not paths:
        raise DataError(
            ["nightly.eval_files and verify.heldout_files are both empty"],
            "the gate needs a fixed held-out set: set nightly.eval_files (records kept out of data.train_files)",
        )
    problems: list[str] = []
    rows = [row for p in paths for row in read_source(p, problems=problems).rows][: cfg.nightly.max_eval_records]
    problems += [f"{r.where}: {r.problem[0]}: {r.problem[1]}" for r in rows if r.problem]
    if problems:
        raise DataError(problems, "in nightly.eval_files")
    tasks = read_tasks(Path(cfg.nightly.task_checks)) if cfg.nightly.task_checks else []
    files = paths + ([cfg.nightly.task_checks] if cfg.nightly.task_checks else [])
    settings = {
        "files": {f: sha256_file(Path(f)) if Path(f).is_file() else f for f in files},
        "max_eval_records": cfg.nightly.max_eval_records,
        "max_new_tokens": cfg.nightly.max_new_tokens,
        "render": [cfg.data.system_message, cfg.data.assistant_only_loss, cfg.data.completion_only_loss],
        "window": cfg.verify.max_tokens_per_text,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return EvalSet(paths, cfg.nightly.max_eval_records, tasks, digest)


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


def score_model(
    model_dir: Path, gguf: Path, eval_set: EvalSet, cfg: Config, verified: dict[str, Any] | None
) -> dict[str, Any]:
    """Every metric of one model (its merged HF folder and the GGUF that ships) on the eval set. `verified`: the
    report of that GGUF in the model's verify.json, whose per-record losses are used when they cover the eval set."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    records: list[HeldOut] = render_records(tokenizer, cfg, eval_set.paths, eval_set.limit, "nightly.eval_files")
    keys = [r.key for r in records]
    tuned = (verified or {}).get("losses", {})
    hf = (verified or {}).get("reference_losses", {})
    if any(k not in tuned or k not in hf for k in keys):  # not scored by a verification: score them now
        window = min(cfg.verify.max_tokens_per_text, AutoConfig.from_pretrained(str(model_dir)).max_position_embeddings)
        bos = tokenizer.bos_token_id
        sequences = [w for r in records for w in windows(Sequence(r.ids, r.labels, r.key), bos, window)]
        tuned, hf = losses(model_dir, gguf, sequences, window, cfg.verify.device)
    scores: dict[str, Any] = {"hf_loss": mean_loss(hf, keys), "gguf_loss": mean_loss(tuned, keys)}
    scores["quant_gap"] = scores["gguf_loss"] - scores["hf_loss"]
    scores |= {f"{k[:-5]}_perplexity": math.exp(min(scores[k], 700)) for k in LOSSES}
    if eval_set.tasks:
        scores |= task_checks(gguf, eval_set.tasks, cfg.nightly.max_new_tokens)
    return scores | {"records": len(records), "eval_set": eval_set.digest[:16], "gguf": gguf.name}


def task_checks(gguf: Path, tasks: list[tuple[str, str]], max_new: int) -> dict[str, Any]:
    """The task checks answered greedily by the GGUF with its own chat template; exact after stripping whitespace."""
    failures = []
    with GGUF(gguf, 512 + max_new) as g:
        for prompt, expected in tasks:
            got, stopped = g.reply(prompt, max_new)
            if not stopped or got.strip() != expected.strip():
                failures.append({"prompt": prompt, "expected": expected, "got": got})
    return {"task_accuracy": 1 - len(failures) / len(tasks), "tasks": len(tasks), "task_failures": failures}


def gates(candidate: dict[str, Any], champion: dict[str, Any] | None, n: NightlySection, tasks: bool) -> list[Gate]:
    """Every metric measured and finite, the absolute limits that are set, and no worse than the champion by more
    than the margins. NaN or missing never passes."""
    required = [*LOSSES, *(["task_accuracy"] if tasks else [])]
    out = [check(f"{m} measured and finite", math.isfinite(number(candidate.get(m)))) for m in required]
    absolute = [
        ("hf_loss", n.max_hf_loss, at_most),
        ("gguf_loss", n.max_gguf_loss, at_most),
        ("quant_gap", n.max_quant_gap, at_most),
        ("task_accuracy", n.min_task_accuracy, at_least),
    ]
    for metric, limit, gate in absolute:
        if limit is not None:
            out.append(gate(f"{metric} {'<=' if gate is at_most else '>='} {limit:g}", candidate.get(metric), limit))
    if champion is None:
        return out
    # "No worse than the champion" needs the champion's figure: one it lacks (not measured, NaN) is not compared,
    # else a champion with a NaN could never be replaced; the candidate's own are gated above.
    for metric in LOSSES:
        best = number(champion.get(metric))
        if math.isfinite(best):
            limit = best * (1 + n.max_loss_regression)
            out.append(at_most(f"{metric} <= champion + {n.max_loss_regression:.0%}", candidate.get(metric), limit))
    best = number(champion.get("task_accuracy"))
    if tasks and math.isfinite(best):
        name = f"task_accuracy >= champion - {n.max_accuracy_drop:g}"
        out.append(at_least(name, candidate.get("task_accuracy"), best - n.max_accuracy_drop))
    return out


def number(x: Any) -> float:
    """A score as a float; NaN for what is no number (missing, None, the string "nan" a registry line holds)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan
