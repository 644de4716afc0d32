"""Training data you can trust: sources -> validated, rendered examples -> rows for the Trainer.

    read every source (core.records.sources: files, folders, save_to_disk, cached hub datasets; `file:line` kept)
 -> render and validate every record (core.records.render, through datasets.map; the chat template is the model's)
 -> stop on any invalid record, or skip them within data.max_invalid_fraction (listed, never silent)   (load)
 -> eval split by content hash (data.eval_fraction) or explicit eval files; per-source weights        (split)
 -> statistics, fingerprint, the first example as the loss sees it (--dry-run prints them)  (stats, describe)
 -> optional packing, isolating examples from each other                                               (pack)

docs/data.md describes the formats, how they render and how to debug a dataset.
"""

from core.errors import DataError
from train.data.describe import describe_data, record_data, show_example
from train.data.load import PreparedData, load_data, load_datasets
from train.data.pack import collate, pack
from train.data.stats import Example

__all__ = [
    "DataError",
    "Example",
    "PreparedData",
    "collate",
    "describe_data",
    "load_data",
    "load_datasets",
    "pack",
    "record_data",
    "show_example",
]
