"""Loading: read every source, render and validate its records, stop on invalid ones (or skip them within
data.max_invalid_fraction), split and weight them, and measure and pack the result."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import datasets

from core.errors import DataError
from core.records.heldout import MAX_TRAINING_RECORDS, HeldOut, heldout_records
from core.records.render import RecordProblem, Rendered, Renderer, RenderOptions
from core.records.sources import SourceRows, read_source
from train.data.describe import SKIPPED_FILE
from train.data.pack import pack
from train.data.split import ValidRecord, split_and_weight
from train.data.stats import DataStats, Example, SourceStats, finish_stats

if TYPE_CHECKING:
    from core.config import Config, DataSection, DataSource


log = logging.getLogger(__name__)

PARALLEL_FROM = 20_000  # records; below this one process renders faster than starting workers


RENDERED_COLUMNS = ("input_ids", "labels", "length", "truncated", "field", "reason")


def _render_batch(batch: dict[str, list], renderer: Renderer) -> dict[str, list]:
    records = [json.loads(r) for r in batch["record"]]
    rows = [
        (r.input_ids, r.labels, r.length, r.truncated, "", "")
        if isinstance(r, Rendered)
        else ([], [], 0, False, r.field, r.reason)  # the same columns either way: a Dataset has one schema
        for r in renderer.render_many(records, batch["format"])
    ]
    return {column: list(values) for column, values in zip(RENDERED_COLUMNS, zip(*rows, strict=True), strict=True)}


def render_records(
    renderer: Renderer, records: list[str], formats: list[str], num_proc: int | None
) -> list[Rendered | RecordProblem]:
    """Through `datasets.map` (batched; in parallel for large inputs)."""
    if not records:
        return []
    if num_proc is None:
        num_proc = 1 if len(records) < PARALLEL_FROM else max(1, min(8, os.cpu_count() or 1))
    if num_proc > 1:
        # Workers are forked: a Rust thread pool used before the fork would be disabled in them, with a warning.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bars = datasets.is_progress_bar_enabled()
    if len(records) < PARALLEL_FROM:  # a bar for a second of work is noise
        datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_dict({"record": records, "format": formats})
        # Our own cache key, so that datasets does not hash the tokenizer (slow) to make one.
        key = hashlib.sha256(repr((renderer.opts, renderer.tokenizer.chat_template, formats)).encode())
        for r in records:
            key.update(r.encode("utf-8", "surrogatepass"))
        out = ds.map(
            _render_batch,
            batched=True,
            batch_size=500,
            num_proc=num_proc if num_proc > 1 else None,
            fn_kwargs={"renderer": renderer},
            remove_columns=["record", "format"],
            new_fingerprint=key.hexdigest()[:32],
            desc="rendering and tokenizing records",
        )
    finally:
        if bars:
            datasets.enable_progress_bars()
    cols = out.to_dict()
    return [
        Rendered(ids, labels, n, cut) if not f else RecordProblem(f, r)
        for ids, labels, n, cut, f, r in zip(*(cols[c] for c in RENDERED_COLUMNS), strict=True)
    ]


class PreparedData(NamedTuple):
    """What the data stage hands on: rows for training (examples, or packed rows) and their statistics; for the
    export, the held-out records verification scores and the first training records' ids (its filler and the
    importance matrix's calibration text), rendered here once."""

    train: list[Example]
    train_stats: DataStats
    evals: list[Example]
    eval_stats: DataStats | None  # None when no eval data is configured
    training_ids: list[list[int]] = []
    heldout: list[HeldOut] = []


class SourceRead(NamedTuple):
    role: str  # train | eval
    source: DataSource
    read: SourceRows


def read_sources(data: DataSection, problems: list[str]) -> list[SourceRead]:
    """Every train source, then every eval source, each cut to its max_samples; file-level problems go to
    `problems`."""
    sources = []
    for role, entries in (("train", data.train_files), ("eval", data.eval_files)):
        for src in entries:
            read = read_source(src.path, src.split, src.name, src.revision, problems)
            if src.max_samples is not None:
                read.rows = read.rows[: src.max_samples]
            sources.append(SourceRead(role, src, read))
    return sources


def check_records(
    renderer: Renderer, sources: list[SourceRead], num_proc: int | None, stats: dict[str, DataStats]
) -> list[ValidRecord]:
    """The valid records; each invalid one is counted and listed in its source's and role's `stats`."""
    readable = [(src.format, row.record) for _, src, read in sources for row in read.rows if row.record is not None]
    records = [json.dumps(record, ensure_ascii=False, default=str) for _, record in readable]
    rendered = iter(render_records(renderer, records, [fmt for fmt, _ in readable], num_proc))
    valid: list[ValidRecord] = []
    for role, src, read in sources:
        s = SourceStats(read.label, role, records=len(read.rows), files=read.files, revision=read.revision)
        stats[role].sources.append(s)
        for row in read.rows:
            if row.record is None:
                assert row.problem is not None, row  # core.records.sources: a row without a record says why
                problem = RecordProblem(*row.problem)
            else:
                result = next(rendered)
                if isinstance(result, Rendered):
                    valid.append(ValidRecord(role, src, s, row.record, result, row.where))
                    continue
                problem = result
            s.invalid += 1
            stats[role].skipped.append({"where": row.where, "field": problem.field, "reason": problem.reason})
    return valid


def stop_on_problems(problems: list[str], stats: dict[str, DataStats], max_invalid_fraction: float) -> None:
    """DataError on any file-level problem or on more invalid records than data.max_invalid_fraction allows."""
    invalid = [f"{s['where']}: {s['field']}: {s['reason']}" for st in stats.values() for s in st.skipped]
    total = sum(s.records for st in stats.values() for s in st.sources)  # read, valid or not
    if not problems and len(invalid) <= max_invalid_fraction * total:
        return
    if max_invalid_fraction and invalid:
        hint = (
            f"{len(invalid)} of {total} records are invalid ({len(invalid) / total:.1%}), more "
            f"than data.max_invalid_fraction={max_invalid_fraction}; nothing was trained"
        )
    elif invalid:
        hint = (
            "nothing was trained. Fix the records, or set data.max_invalid_fraction (e.g. 0.01) to skip "
            "invalid records; each skipped one is listed in the run folder"
        )
    else:
        hint = "nothing was trained"
    raise DataError(problems + invalid, hint)


def load_datasets(tokenizer, data: DataSection) -> PreparedData:
    """DataError lists every problem (file and record level) when the data is unusable."""
    renderer = Renderer(tokenizer, RenderOptions.of(data))
    problems: list[str] = []  # file level: always fatal
    sources = read_sources(data, problems)
    stats = {"train": DataStats("train"), "eval": DataStats("eval")}  # in the order sources are read
    valid = check_records(renderer, sources, data.dataset_num_proc, stats)
    stop_on_problems(problems, stats, data.max_invalid_fraction)
    examples = split_and_weight(valid, data, stats)
    if not examples["train"]:
        raise DataError(
            [f"no training examples left (sources: {', '.join(s.label for s in stats['train'].sources)})"],
            "every record was invalid, held out for eval, or weighted away",
        )
    rows = {}  # what the Trainer gets per role: the examples, or packed rows
    for role in ("train", "eval"):
        finish_stats(stats[role], examples[role])
        rows[role] = pack(examples[role], data.max_seq_length) if data.packing else examples[role]
        stats[role].rows = len(rows[role])
    has_eval = bool(data.eval_files or data.eval_fraction)
    if has_eval and not examples["eval"]:
        raise DataError(
            ["no eval examples: data.eval_fraction held out no record, or the eval files have none"],
            "raise data.eval_fraction, or add eval records",
        )
    training_ids = list(dict.fromkeys(tuple(e.input_ids) for e in examples["train"]))[:MAX_TRAINING_RECORDS]
    evals = stats["eval"] if has_eval else None
    return PreparedData(rows["train"], stats["train"], rows["eval"], evals, [list(ids) for ids in training_ids])


def load_data(tokenizer, cfg: Config, run_root: Path) -> PreparedData:
    """Training and eval rows, and the held-out records; DataError before anything is written."""
    data = load_datasets(tokenizer, cfg.data)
    if cfg.export.enabled:  # read now: bad held-out data fails before training, not after
        data = data._replace(heldout=heldout_records(tokenizer, cfg))
    skipped = len(data.train_stats.skipped) + (len(data.eval_stats.skipped) if data.eval_stats else 0)
    if skipped:
        log.warning(
            f"warning: skipping {skipped} invalid record(s) (data.max_invalid_fraction="
            f"{cfg.data.max_invalid_fraction}); each is listed in {run_root}/{SKIPPED_FILE}"
        )
    return data
