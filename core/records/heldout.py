"""Records rendered for scoring rather than training (the held-out set, the scored set's filler, the importance
matrix's calibration text), once per run and handed on as token ids: nothing downstream tokenizes them again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from core.config import Config
from core.errors import DataError
from core.records.render import RecordProblem, Renderer, RenderOptions
from core.records.sources import read_source

# Training records read for the importance matrix and to fill the scored set (rendering is seconds; the imatrix
# keeps its own token budget, the scored set stops at verify.min_scored_tokens).
MAX_TRAINING_RECORDS = 512


@dataclass(frozen=True)
class HeldOut:
    where: str  # file:line
    ids: list[int]  # starting with <bos>
    labels: list[int]  # IGNORE_INDEX where training puts no loss

    @property
    def key(self) -> str:
        """What was scored, as a key: the same record rendered by the same tokenizer and template has the same one,
        so scores computed once (verification) are found again (the nightly job)."""
        return hashlib.sha256(repr((self.ids, self.labels)).encode()).hexdigest()[:16]


def render_records(tokenizer, cfg: Config, paths: list[str], limit: int, what: str) -> list[HeldOut]:
    """The first `limit` records of `paths`, rendered as training renders them (chat template, loss masks) but never
    cut (scoring windows long texts instead). DataError on any problem: scoring silently fewer records would change
    what a gate compares."""
    problems: list[str] = []
    rows = [row for path in paths for row in read_source(path, problems=problems).rows][:limit]
    problems += [f"{row.where}: {row.problem[0]}: {row.problem[1]}" for row in rows if row.problem]
    ok = [(row.where, row.record) for row in rows if row.record is not None]
    opts = RenderOptions.of(cfg.data, max_seq_length=1 << 30)  # never cut
    rendered = Renderer(tokenizer, opts).render_many([record for _, record in ok], ["auto"] * len(ok))
    out = []
    for (where, _), result in zip(ok, rendered, strict=True):
        if isinstance(result, RecordProblem):
            problems.append(f"{where}: {result.field}: {result.reason}")
        else:
            out.append(HeldOut(where, result.input_ids, result.labels))
    if problems:
        raise DataError(problems, f"in {what}")
    return out


def heldout_records(tokenizer, cfg: Config, limit: int | None = None) -> list[HeldOut]:
    """The held-out set: the first records of verify.heldout_files, then data.eval_files."""
    paths = list(cfg.verify.heldout_files) + [s.path for s in cfg.data.eval_files]
    n = cfg.verify.max_heldout_records if limit is None else limit
    return render_records(tokenizer, cfg, paths, n, "verify.heldout_files / data.eval_files")
