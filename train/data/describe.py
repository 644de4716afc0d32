"""Showing and recording the data: the --dry-run plan's data part, an example as the loss sees it, and the run
manifest's data entry with <run>/skipped_records.jsonl."""

from __future__ import annotations

import json
from dataclasses import fields
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from core.files import atomic_write_text
from core.records.render import IGNORE_INDEX
from train.data.stats import DataStats, Example, SourceStats

if TYPE_CHECKING:
    from core.config import DataSection

SKIPPED_FILE = "skipped_records.jsonl"


def show_example(tokenizer, ex: Example) -> str:
    """The example as text with the supervised spans in [[...]] (for --dry-run and debugging)."""
    spans = groupby(zip(ex.input_ids, ex.labels, strict=True), key=lambda token: token[1] != IGNORE_INDEX)
    texts = [(supervised, tokenizer.decode([t for t, _ in span])) for supervised, span in spans]
    return "".join(f"[[{text}]]" if supervised else text for supervised, text in texts)


def _roles(train: DataStats, evals: DataStats | None) -> list[DataStats]:
    return [train] if evals is None else [train, evals]


def source_lines(st: DataStats) -> list[str]:
    lines = []
    for s in st.sources:
        notes = [
            f"{s.invalid} invalid, skipped" if s.invalid else "",
            f"{s.held_out} held out for eval" if s.held_out else "",
        ]
        note = "; ".join(n for n in notes if n)
        lines.append(
            f"    {s.role:<5} {s.label}: {s.records} records"
            + (f" ({note})" if note else "")
            + f" -> {s.examples} examples"
            + (f" @ {s.revision[:12]}" if s.revision else "")
        )
    return lines


def role_lines(st: DataStats, data: DataSection) -> list[str]:
    lines = [
        f"    {st.role}: {st.examples} examples from {st.records} records, {st.tokens:,} tokens, "
        f"{st.supervised_tokens:,} supervised ({st.supervised_tokens / max(st.tokens, 1):.1%}), "
        f"{st.truncated} truncated to max_seq_length={data.max_seq_length}"
    ]
    p = st.length_percentiles
    if p:
        lines.append(
            f"      tokens per example before truncation: p50 {p['p50']}, p90 {p['p90']}, "
            f"p99 {p['p99']}, max {p['max']}"
        )
    if st.duplicates:
        lines.append(f"      {st.duplicates} records repeat an earlier record's content exactly")
    if st.overlap:
        lines.append(
            f"      {st.overlap} eval records also appear in the training data: eval loss will look better than it is"
        )
    if data.packing and st.rows:
        lines.append(
            f"      packed into {st.rows} rows of at most {data.max_seq_length} tokens "
            f"({st.tokens / (st.rows * data.max_seq_length):.0%} full)"
        )
    return lines


def skipped_lines(skipped: list[dict[str, str]], data: DataSection, root: Path) -> list[str]:
    if not skipped:
        return []
    lines = [
        f"    {len(skipped)} invalid records would be skipped (data.max_invalid_fraction="
        f"{data.max_invalid_fraction}); a run lists them in {root / SKIPPED_FILE}:"
    ]
    lines += [f"      {s['where']}: {s['field']}: {s['reason']}" for s in skipped[:10]]
    if len(skipped) > 10:
        lines.append(f"      ... and {len(skipped) - 10} more")
    return lines


def describe_data(data: DataSection, train: DataStats, evals: DataStats | None, root: Path) -> list[str]:
    """The data part of the --dry-run plan."""
    roles = _roles(train, evals)
    lines = [line for st in roles for line in source_lines(st)]
    lines += [line for st in roles for line in role_lines(st, data)]
    if data.eval_fraction:
        lines.append(
            f"    eval split: records whose content hash falls below eval_fraction={data.eval_fraction} "
            f"(sha256; appended data never moves an old record)"
        )
    lines += skipped_lines([s for st in roles for s in st.skipped], data, root)
    lines.append(f"    fingerprint (sha256 of the rendered training examples): {train.fingerprint}")
    return lines


def record_data(root: Path, data: DataSection, train: DataStats, evals: DataStats | None) -> dict:
    """Write <run>/skipped_records.jsonl (when records were skipped) and return the manifest's data entry."""
    skipped = [s for st in _roles(train, evals) for s in st.skipped]
    if skipped:
        atomic_write_text(root / SKIPPED_FILE, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))

    def files(st: DataStats | None) -> dict[str, str]:
        return {f: h for s in st.sources for f, h in s.files.items()} if st else {}

    # Every figure of the stats under its own name, but what is recorded apart (files, sources, the eval's overlap,
    # the skipped records' count), implied (role; label as "source") or no figure (the sample).
    def figures(stats: DataStats | SourceStats, leave_out: tuple[str, ...]) -> dict:
        return {f.name: getattr(stats, f.name) for f in fields(stats) if f.name not in leave_out}

    def summary(st: DataStats) -> dict:
        return figures(st, ("role", "sources", "overlap", "skipped", "sample")) | {"skipped": len(st.skipped)}

    return {
        "train_files": files(train),
        "eval_files": files(evals),
        "sources": [
            {"source": s.label} | figures(s, ("label", "files")) for st in _roles(train, evals) for s in st.sources
        ],
        "train_records": train.records,
        "train_tokens": train.tokens,
        "supervised_tokens": train.supervised_tokens,
        "truncated": train.truncated,
        "fingerprint": train.fingerprint,
        "train": summary(train),
        "eval": summary(evals) | {"overlap_with_train": evals.overlap} if evals else None,
        "eval_split": (
            f"sha256 content hash < {data.eval_fraction}"
            if data.eval_fraction
            else "eval_files"
            if data.eval_files
            else None
        ),
        "packing": data.packing,
        "skipped_records": len(skipped),
        "skipped_file": str(root / SKIPPED_FILE) if skipped else None,
    }
