"""Training data you can trust: sources -> validated, rendered examples (load) -> eval split and weights (split)
-> statistics and fingerprint (stats, describe) -> optional packing (pack). docs/data.md describes the formats, how
they render and how to debug a dataset.
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
