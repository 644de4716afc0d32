"""Which records train and which evaluate (data.eval_fraction), and how many copies of each train (a source's
weight): both decided by a hash of the record's content, so the same record always lands the same way and
appending data never moves an old record."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, NamedTuple

from core.records.render import Rendered
from train.data.stats import DataStats, Example, SourceStats

if TYPE_CHECKING:
    from core.config import DataSection, DataSource


class ValidRecord(NamedTuple):
    """A record that rendered, with the source it came from."""

    role: str  # train | eval: the source's role, before the eval split
    source: DataSource
    stats: SourceStats  # of its source
    record: dict[str, Any]
    rendered: Rendered
    where: str  # file:line


def content_digest(record: dict[str, Any]) -> bytes:
    """Of what a record teaches: metadata such as ids or tags does not move a record between train and eval."""
    content = {k: record[k] for k in ("messages", "prompt", "completion", "text") if k in record} or record
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def unit_interval(digest: bytes) -> float:
    """8 bytes of a digest as a number in [0, 1): a stable, uniform draw per record."""
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_and_weight(
    valid: list[ValidRecord], data: DataSection, stats: dict[str, DataStats]
) -> dict[str, list[Example]]:
    """Examples per role; a training record appears int(weight) times, plus once for a share of them (by content
    hash) as large as the weight's fraction. Counts into `stats`."""
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
        if role == "train":  # the second 8 bytes: a draw independent of the eval split's
            copies = int(src.weight) + (unit_interval(digest[8:]) < src.weight - int(src.weight))
        ex = Example(r.input_ids, r.labels, where, r.length, r.truncated)
        examples[role] += [ex] * copies
        if s.role == role:
            s.examples += copies
    stats["eval"].overlap = len(seen["eval"] & seen["train"])
    return examples
