"""Held-out records rendered as text, for export verification (and anything else that scores a model on them)."""

from __future__ import annotations

from core.errors import DataError
from core.records.render import RecordProblem, Renderer, RenderOptions
from core.records.sources import read_source


def heldout_texts(tokenizer, paths: list[str], system_message: str, limit: int) -> list[str]:
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
    ok = [(row.where, row.record) for row in rows if row.record is not None]
    opts = RenderOptions(max_seq_length=1 << 30, system_message=system_message)
    rendered = Renderer(tokenizer, opts).render_many([record for _, record in ok], ["auto"] * len(ok))
    texts = []
    for (where, _), result in zip(ok, rendered, strict=True):
        if isinstance(result, RecordProblem):
            problems.append(f"{where}: {result.field}: {result.reason}")
        else:
            texts.append(tokenizer.decode(result.input_ids[1:]))  # without <bos>: the reference adds it
    if problems:
        raise DataError(problems, "in verify.heldout_files")
    return texts
