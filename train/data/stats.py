"""Examples as training sees them, and what is measured about a set of them: counts, lengths, supervision and
the fingerprint of the data as trained on."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

import numpy as np

from core.records.render import IGNORE_INDEX


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


def finish_stats(st: DataStats, examples: list[Example]) -> None:
    """Fill in what is measured on the final examples of one role (after the split and the weights)."""
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


def fingerprint(examples: list[Example]) -> str:
    """sha256 of the data as trained on: every example's token ids and labels, in order; file names and
    formatting of the sources do not enter it."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(len(ex.input_ids).to_bytes(4, "little"))
        h.update(array("i", ex.input_ids).tobytes())  # int32, native order (little-endian on x86 and ARM)
        h.update(array("i", ex.labels).tobytes())
    return h.hexdigest()
