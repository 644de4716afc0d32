"""Packing examples into rows, and turning rows into model batches, without cross-example attention (docs/data.md,
"Packing"). Every example starts with its one <bos> (core.records.render guarantees it), so a row's example
boundaries are its <bos> positions: the collator needs only the token ids.
"""

from __future__ import annotations

import bisect

import torch

from core.records.render import IGNORE_INDEX
from train.data.stats import Example


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest bin that still has room (ties: the earliest), so
    the result is deterministic; examples are never split."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []  # distinct remaining capacities, sorted
    by_free: dict[int, list[int]] = {}  # remaining capacity -> bins with it (earliest first)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example of {n} tokens is longer than the packing capacity {capacity}")
        k = bisect.bisect_left(free, n)
        if k < len(free):
            room = free[k]
            b = by_free[room].pop(0)
            if not by_free[room]:
                del by_free[room]
                free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - n
        if left not in by_free:
            bisect.insort(free, left)
            by_free[left] = []
        bisect.insort(by_free[left], b)
    return bins


def pack(examples: list[Example], capacity: int) -> list[Example]:
    """Whole examples concatenated into rows of at most `capacity` tokens (pack_bins)."""
    rows = []
    for members in pack_bins([len(e.input_ids) for e in examples], capacity):
        ids = [t for i in members for t in examples[i].input_ids]
        labels = [t for i in members for t in examples[i].labels]
        rows.append(Example(ids, labels, examples[members[0]].where, len(ids)))
    return rows


def collate(batch: list[dict], pad_id: int, width: int | None = None) -> dict:
    """Rows -> a model batch, padded on the right to `width` (train.trainer.static_width) or the longest row. If any
    row holds several examples: position_ids restarting at every <bos>, no attention_mask, and use_cache=False
    (transformers builds per-example masks only without a KV cache: docs/data.md, "Packing")."""
    bos = batch[0]["input_ids"][0]
    if any(not b["input_ids"] or b["input_ids"][0] != bos for b in batch):
        raise ValueError("collate: every row must start with the same <bos> token")
    longest = max(len(b["input_ids"]) for b in batch)
    if width is not None and longest > width:
        raise ValueError(f"collate: a row of {longest} tokens does not fit the fixed width {width}")
    width = width or longest
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.tensor([len(b["input_ids"]) for b in batch])
    for i, b in enumerate(batch):
        ids[i, : lengths[i]] = torch.tensor(b["input_ids"])
        labels[i, : lengths[i]] = torch.tensor(b["labels"])
    columns = torch.arange(width).expand(len(batch), width)
    real = columns < lengths[:, None]
    starts = (ids == bos) & real
    if int(starts.sum()) == len(batch):
        return {"input_ids": ids, "labels": labels, "attention_mask": real.long()}
    starts |= columns == lengths[:, None]  # the padding tail, if any, is a sequence of its own
    last_start = torch.cummax(torch.where(starts, columns, torch.zeros_like(columns)), dim=1).values
    return {"input_ids": ids, "labels": labels, "position_ids": columns - last_start, "use_cache": False}
