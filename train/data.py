"""Training data you can trust: sources -> validated, rendered examples -> rows for the Trainer.

    read every source (data_sources: files, folders, save_to_disk, cached hub datasets; `file:line` kept)
 -> render and validate every record (data_render, through datasets.map; the chat template is the model's)
 -> stop on any invalid record, or skip them within data.max_invalid_fraction (listed, never silent)
 -> eval split by content hash (data.eval_fraction) or explicit eval files; per-source weights
 -> statistics, fingerprint, the first example as the loss sees it (--dry-run prints them)
 -> optional packing (data_pack), isolating examples from each other

docs/data.md describes the formats, how they render and how to debug a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.artifacts import atomic_write_text
from train.data_pack import collate, pack_bins
from train.data_render import IGNORE_INDEX, RecordProblem, Rendered, Renderer, RenderOptions
from train.data_sources import read_source

if TYPE_CHECKING:
    from train.config import DataSection

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Example",
    "DataStats",
    "load_datasets",
    "collate",
    "fingerprint",
    "show_example",
    "heldout_texts",
    "record_data",
]

PARALLEL_FROM = 20_000  # records; below this one process renders faster than starting workers
SKIPPED_FILE = "skipped_records.jsonl"


class DataError(ValueError):
    """Invalid training data; `problems` holds one `file:line: field: reason` line each."""

    def __init__(self, problems: list[str], hint: str = ""):
        self.problems = problems
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        tail = f"\n  {hint}" if hint else ""
        super().__init__(f"{len(problems)} data problem(s):\n  " + "\n  ".join(shown) + more + tail)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str  # file:line of the record (packed rows: of their first example)
    length: int = 0  # tokens before truncation
    truncated: bool = False


@dataclass
class SourceStats:
    label: str
    role: str  # train | eval
    records: int = 0  # records read (after max_samples)
    invalid: int = 0
    held_out: int = 0  # training records moved to eval by data.eval_fraction
    examples: int = 0  # examples contributed (after weight)
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256
    revision: str | None = None


@dataclass
class DataStats:
    role: str  # train | eval
    sources: list[SourceStats] = field(default_factory=list)
    records: int = 0  # valid records used
    examples: int = 0
    tokens: int = 0  # after truncation
    supervised_tokens: int = 0
    truncated: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)  # before truncation
    duplicates: int = 0  # records whose content repeats an earlier record's
    overlap: int = 0  # eval: records whose content is also in the training data
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"where", "field", "reason"}
    fingerprint: str = ""
    rows: int = 0  # rows the Trainer gets (fewer than examples when packing)
    sample: Example | None = None


# ----------------------------------------------------------------------------- rendering through datasets


def _render_batch(batch: dict[str, list], renderer: Renderer) -> dict[str, list]:
    records = [json.loads(r) for r in batch["record"]]
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": [], "field": [], "reason": []}
    for result in renderer.render_many(records, batch["format"]):
        ok = isinstance(result, Rendered)
        out["input_ids"].append(result.input_ids if ok else [])
        out["labels"].append(result.labels if ok else [])
        out["length"].append(result.length if ok else 0)
        out["truncated"].append(result.truncated if ok else False)
        out["field"].append("" if ok else result.field)
        out["reason"].append("" if ok else result.reason)
    return out


def render_records(
    renderer: Renderer, records: list[str], formats: list[str], num_proc: int | None
) -> list[Rendered | RecordProblem]:
    """Render JSON-encoded records with `datasets.map` (batched; in parallel for large inputs)."""
    import datasets

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
        for ids, labels, n, cut, f, r in zip(
            cols["input_ids"],
            cols["labels"],
            cols["length"],
            cols["truncated"],
            cols["field"],
            cols["reason"],
            strict=True,
        )
    ]


# ----------------------------------------------------------------------------- the whole data stage


def content_digest(record: dict[str, Any]) -> bytes:
    """sha256 of what a record teaches (its messages/prompt/completion/text, canonical JSON): metadata such as
    ids or tags does not move a record between train and eval."""
    content = {k: record[k] for k in ("messages", "prompt", "completion", "text") if k in record} or record
    return hashlib.sha256(
        json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode(
            "utf-8", "surrogatepass"
        )
    ).digest()


def unit_interval(digest: bytes) -> float:
    """8 bytes of a digest as a number in [0, 1): a stable, uniform draw per record."""
    return int.from_bytes(digest[:8], "big") / 2.0**64


def load_datasets(tokenizer, data: DataSection) -> tuple[list[Example], DataStats, list[Example], DataStats | None]:
    """Read, validate and render every source of `data` (config.DataSection).

    Returns (train rows, train stats, eval rows, eval stats or None). Rows are examples, or packed rows with
    data.packing. Raises DataError listing every problem (file and record level) when the data is unusable.
    """
    opts = RenderOptions(
        max_seq_length=data.max_seq_length,
        system_message=data.system_message,
        assistant_only_loss=data.assistant_only_loss,
        completion_only_loss=data.completion_only_loss,
    )
    renderer = Renderer(tokenizer, opts)
    problems: list[str] = []  # file level: always fatal
    sources = []
    for role, entries in (("train", data.train_files), ("eval", data.eval_files)):
        for src in entries:
            read = read_source(src.path, src.split, src.name, src.revision, problems)
            if src.max_samples is not None:
                read.rows = read.rows[: src.max_samples]
            sources.append((role, src, read))

    records, formats = [], []
    for _, src, read in sources:
        for row in read.rows:
            if row.record is not None:
                records.append(json.dumps(row.record, ensure_ascii=False, default=str))
                formats.append(src.format)
    rendered = iter(render_records(renderer, records, formats, data.dataset_num_proc))

    stats = {"train": DataStats("train"), "eval": DataStats("eval")}
    valid = []  # (role, source config, source stats, record, rendered, where)
    invalid_lines = []
    total = 0
    for role, src, read in sources:
        s = SourceStats(read.label, role, records=len(read.rows), files=read.files, revision=read.revision)
        stats[role].sources.append(s)
        total += len(read.rows)
        for row in read.rows:
            result = next(rendered) if row.record is not None else RecordProblem(*row.problem)
            if isinstance(result, RecordProblem):
                s.invalid += 1
                stats[role].skipped.append({"where": row.where, "field": result.field, "reason": result.reason})
                invalid_lines.append(f"{row.where}: {result.field}: {result.reason}")
            else:
                valid.append((role, src, s, row.record, result, row.where))

    allowed = data.max_invalid_fraction * total
    if problems or len(invalid_lines) > allowed:
        if data.max_invalid_fraction and invalid_lines:
            hint = (
                f"{len(invalid_lines)} of {total} records are invalid ({len(invalid_lines) / total:.1%}), more "
                f"than data.max_invalid_fraction={data.max_invalid_fraction}; nothing was trained"
            )
        elif invalid_lines:
            hint = (
                "nothing was trained. Fix the records, or set data.max_invalid_fraction (e.g. 0.01) to skip "
                "invalid records; each skipped one is listed in the run folder"
            )
        else:
            hint = "nothing was trained"
        raise DataError(problems + invalid_lines, hint)

    examples: dict[str, list[Example]] = {"train": [], "eval": []}
    seen: dict[str, set[bytes]] = {"train": set(), "eval": set()}
    for role, src, s, record, r, where in valid:
        digest = content_digest(record)
        if role == "train" and data.eval_fraction and unit_interval(digest) < data.eval_fraction:
            role = "eval"
            s.held_out += 1
        stats[role].records += 1
        stats[role].duplicates += digest in seen[role]
        seen[role].add(digest)
        copies = 1
        if role == "train":  # weight: whole copies, plus a fixed share (by content hash) for the fraction
            copies = int(src.weight) + (unit_interval(digest[8:]) < src.weight - int(src.weight))
        ex = Example(r.input_ids, r.labels, where, r.length, r.truncated)
        examples[role] += [ex] * copies
        if s.role == role:
            s.examples += copies
    stats["eval"].overlap = len(seen["eval"] & seen["train"])

    if not examples["train"]:
        raise DataError(
            [f"no training examples left (sources: {', '.join(s.label for s in stats['train'].sources)})"],
            "every record was invalid, held out for eval, or weighted away",
        )
    rows = {}
    for role in ("train", "eval"):
        st, exs = stats[role], examples[role]
        finish_stats(st, exs)
        rows[role] = pack(exs, data.max_seq_length) if data.packing else exs
        st.rows = len(rows[role])
    has_eval = bool(data.eval_files or data.eval_fraction)
    if has_eval and not examples["eval"]:
        raise DataError(
            ["no eval examples: data.eval_fraction held out no record, or the eval files have none"],
            "raise data.eval_fraction, or add eval records",
        )
    return rows["train"], stats["train"], rows["eval"], stats["eval"] if has_eval else None


def finish_stats(st: DataStats, examples: list[Example]) -> None:
    import numpy as np

    st.examples = len(examples)
    st.tokens = sum(len(e.input_ids) for e in examples)
    st.supervised_tokens = sum(len(e.labels) - e.labels.count(IGNORE_INDEX) for e in examples)
    st.truncated = sum(e.truncated for e in examples)
    if examples:
        lengths = np.array([e.length for e in examples])
        st.length_percentiles = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
        st.length_percentiles["max"] = int(lengths.max())
        st.sample = examples[0]
    st.fingerprint = fingerprint(examples)


def pack(examples: list[Example], capacity: int) -> list[Example]:
    """Whole examples concatenated into rows of at most `capacity` tokens (data_pack.pack_bins)."""
    rows = []
    for members in pack_bins([len(e.input_ids) for e in examples], capacity):
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids += examples[i].input_ids
            labels += examples[i].labels
        rows.append(Example(ids, labels, examples[members[0]].where, len(ids)))
    return rows


def fingerprint(examples: list[Example]) -> str:
    """sha256 of the data as trained on: every example's token ids and labels, in order; file names and
    formatting of the sources do not enter it."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(len(ex.input_ids).to_bytes(4, "little"))
        h.update(array("i", ex.input_ids).tobytes())  # int32, native order (little-endian on x86 and ARM)
        h.update(array("i", ex.labels).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- showing and recording


def show_example(tokenizer, ex: Example) -> str:
    """The example as text with the supervised spans in [[...]] (for --dry-run and debugging)."""
    out, run, inside = [], [], False
    for tok, label in zip(ex.input_ids, ex.labels, strict=True):
        sup = label != IGNORE_INDEX
        if sup != inside and run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if inside else text)
            run = []
        inside = sup
        run.append(tok)
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if inside else text)
    return "".join(out)


def describe_data(data: DataSection, train: DataStats, evals: DataStats | None, root: Path) -> list[str]:
    """The data part of the --dry-run plan: per-source counts, lengths, supervision, skips, fingerprint."""
    lines = []
    for st in (train, evals):
        for s in st.sources if st else []:
            notes = [
                f"{s.invalid} invalid, skipped" if s.invalid else "",
                f"{s.held_out} held out for eval" if s.held_out else "",
            ]
            notes = "; ".join(n for n in notes if n)
            lines.append(
                f"    {s.role:<5} {s.label}: {s.records} records"
                + (f" ({notes})" if notes else "")
                + f" -> {s.examples} examples"
                + (f" @ {s.revision[:12]}" if s.revision else "")
            )
    for st in (train, evals):
        if not st:
            continue
        p = st.length_percentiles
        lines.append(
            f"    {st.role}: {st.examples} examples from {st.records} records, {st.tokens:,} tokens, "
            f"{st.supervised_tokens:,} supervised ({st.supervised_tokens / max(st.tokens, 1):.1%}), "
            f"{st.truncated} truncated to max_seq_length={data.max_seq_length}"
        )
        if p:
            lines.append(
                f"      tokens per example before truncation: p50 {p['p50']}, p90 {p['p90']}, "
                f"p99 {p['p99']}, max {p['max']}"
            )
        if st.duplicates:
            lines.append(f"      {st.duplicates} records repeat an earlier record's content exactly")
        if st.overlap:
            lines.append(
                f"      {st.overlap} eval records also appear in the training data: eval loss will "
                f"look better than it is"
            )
        if data.packing and st.rows:
            lines.append(
                f"      packed into {st.rows} rows of at most {data.max_seq_length} tokens "
                f"({st.tokens / (st.rows * data.max_seq_length):.0%} full)"
            )
    if data.eval_fraction:
        lines.append(
            f"    eval split: records whose content hash falls below eval_fraction={data.eval_fraction} "
            f"(sha256; appended data never moves an old record)"
        )
    skipped = train.skipped + (evals.skipped if evals else [])
    if skipped:
        lines.append(
            f"    {len(skipped)} invalid records would be skipped (data.max_invalid_fraction="
            f"{data.max_invalid_fraction}); a run lists them in {root / SKIPPED_FILE}:"
        )
        lines += [f"      {s['where']}: {s['field']}: {s['reason']}" for s in skipped[:10]]
        if len(skipped) > 10:
            lines.append(f"      ... and {len(skipped) - 10} more")
    lines.append(f"    fingerprint (sha256 of the rendered training examples): {train.fingerprint}")
    return lines


def record_data(root: Path, data: DataSection, train: DataStats, evals: DataStats | None) -> dict:
    """Write <run>/skipped_records.jsonl (when records were skipped) and return the manifest's data entry."""
    skipped = train.skipped + (evals.skipped if evals else [])
    skipped_path = None
    if skipped:
        skipped_path = root / SKIPPED_FILE
        atomic_write_text(skipped_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))

    def files(st: DataStats | None) -> dict[str, str]:
        return {f: h for s in st.sources for f, h in s.files.items()} if st else {}

    def summary(st: DataStats) -> dict:
        return {
            "records": st.records,
            "examples": st.examples,
            "rows": st.rows,
            "tokens": st.tokens,
            "supervised_tokens": st.supervised_tokens,
            "truncated": st.truncated,
            "length_percentiles": st.length_percentiles,
            "duplicates": st.duplicates,
            "skipped": len(st.skipped),
            "fingerprint": st.fingerprint,
        }

    sources = [
        {
            "source": s.label,
            "role": s.role,
            "records": s.records,
            "invalid": s.invalid,
            "held_out": s.held_out,
            "examples": s.examples,
            "revision": s.revision,
        }
        for st in (train, evals)
        if st
        for s in st.sources
    ]
    entry = {
        "train_files": files(train),
        "eval_files": files(evals),
        "sources": sources,
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
        "skipped_file": str(skipped_path) if skipped_path else None,
    }
    return entry


def heldout_texts(tokenizer, paths: list[str], data: DataSection, limit: int) -> list[str]:
    """Rendered text (without <bos>) of the first `limit` records of `paths`, for export verification.

    Raises DataError on any problem: verification on silently fewer texts would be a silent drop."""
    problems: list[str] = []
    rows = []
    for path in paths:
        rows += read_source(path, problems=problems).rows
    rows = rows[:limit]
    for row in rows:
        if row.problem:
            problems.append(f"{row.where}: {row.problem[0]}: {row.problem[1]}")
    ok = [row for row in rows if row.record is not None]
    opts = RenderOptions(max_seq_length=1 << 30, system_message=data.system_message)
    texts = []
    for row, result in zip(
        ok, Renderer(tokenizer, opts).render_many([r.record for r in ok], ["auto"] * len(ok)), strict=True
    ):
        if isinstance(result, RecordProblem):
            problems.append(f"{row.where}: {result.field}: {result.reason}")
        else:
            texts.append(tokenizer.decode(result.input_ids[1:]))  # without <bos>: the reference adds it
    if problems:
        raise DataError(problems, "in verify.heldout_files")
    return texts
