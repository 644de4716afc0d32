"""Reading data sources (docs/data.md, "Sources": nothing is downloaded) into records, each with the place it came
from for error messages: `file:line` in text formats, parsed here for that reason, `file:row N` in those read through
`datasets` (Parquet, Arrow, hub datasets).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants as hf_constants
from datasets.data_files import DataFilesDict, get_data_patterns

from core.files import sha256_file
from core.hub import cached_snapshot, repo_folder_name
from core.paths import user_path, what_is

JSON_TYPES: dict[type, str] = {str: "string", list: "array", dict: "object"}  # besides null, boolean, number
UNDECODABLE = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8, in text decoded with surrogateescape


@dataclass
class Row:
    """One record, or the reason it could not be read."""

    where: str  # file:line (text formats) or file:row N (Parquet, Arrow, hub datasets)
    record: dict[str, Any] | None = None
    problem: tuple[str, str] | None = None  # (field, reason) when the record is unreadable


@dataclass
class SourceRows:
    label: str  # the source as the user wrote it
    rows: list[Row] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # every file read -> sha256
    revision: str | None = None  # hub snapshot commit, when the source is a hub dataset


def json_type(value: Any) -> str:
    """JSON's name for a Python value's type, for messages about records."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return JSON_TYPES.get(type(value), type(value).__name__)


def json_error(e: json.JSONDecodeError) -> str:
    """json's message with its column; "Unterminated string starting at" reads on into the column."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def object_row(record: Any, where: str, field: str) -> Row:
    if isinstance(record, dict):
        return Row(where, record)
    return Row(where, problem=(field, f"expected a JSON object, got {json_type(record)}"))


# ----------------------------------------------------------------------------- text formats


def read_jsonl(path: Path, label: str, problems: list[str]) -> list[Row]:
    """JSON Lines: one object per line; blank lines are skipped (they are not records)."""
    raw = path.read_bytes()
    if not raw.strip():
        problems.append(f"{label}: file is empty")
        return []
    lines = raw.split(b"\n")
    return [jsonl_row(line, f"{label}:{n}", n == len(lines)) for n, line in enumerate(lines, 1) if line.strip()]


def jsonl_row(line: bytes, where: str, last: bool) -> Row:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        reason = f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); re-encode the file as UTF-8"
        return Row(where, problem=("(line)", reason))
    except json.JSONDecodeError as e:
        # The last line without its newline: the typical end of a file whose writer was interrupted.
        cut = " (the line looks cut off: an interrupted write?)" if last else ""
        return Row(where, problem=("(line)", f"invalid JSON: {json_error(e)}{cut}"))
    return object_row(record, where, "(line)")


def read_json(path: Path, label: str, problems: list[str]) -> list[Row]:
    """A JSON array of records (line numbers are where each record starts), or JSON Lines in a .json file."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    start = len(text) - len(text.lstrip())
    if start == len(text):
        problems.append(f"{label}: file is empty")
        return []
    if text[start] == "{":  # JSON Lines named .json (datasets accepts these too)
        return read_jsonl(path, label, problems)
    if text[start] != "[":
        problems.append(
            f"{label}: expected a JSON array of records (or one object per line), found {text[start]!r} at the start"
        )
        return []
    return read_json_array(text, start + 1, label, problems)


@dataclass
class LineCounter:
    """Line numbers of positions in a text, counting only the newlines since the last position asked about
    (positions only move forward): one pass over the file however many records it holds."""

    text: str
    line: int = 1
    counted: int = 0  # newlines before this position are in `line`

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.counted, pos)
        self.counted = pos
        return self.line


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_json_array(text: str, pos: int, label: str, problems: list[str]) -> list[Row]:
    """The elements of the JSON array whose '[' is just before `pos`, one by one, so each keeps its line."""
    decoder = json.JSONDecoder()
    lines = LineCounter(text)
    rows: list[Row] = []
    pos = _skip_whitespace(text, pos)
    if text[pos : pos + 1] == "]":
        problems.append(f"{label}: the JSON array is empty")
        return []
    while True:
        where = f"{label}:{lines.at(pos)}"
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # A broken array cannot be resynchronised: everything after is unreadable, so the file is rejected.
            problems.append(
                f"{label}:{e.lineno}: (file): invalid JSON: {json_error(e)}; "
                f"the rest of the array cannot be read (JSON Lines can skip one bad line, arrays cannot)"
            )
            return rows
        if UNDECODABLE.search(text, pos, end):
            reason = "not UTF-8 (an invalid byte in this record); re-encode the file as UTF-8"
            rows.append(Row(where, problem=("(record)", reason)))
        else:
            rows.append(object_row(record, where, "(record)"))
        pos = _skip_whitespace(text, end)
        after = text[pos : pos + 1]  # "" at the end of the text
        if after == ",":
            pos = _skip_whitespace(text, pos + 1)
            continue
        if after != "]":
            problems.append(
                f"{label}:{lines.at(pos)}: (file): invalid JSON: expected ',' or ']' after the record at "
                f"{where}; the rest of the array cannot be read"
            )
        return rows


def read_csv(path: Path, label: str, problems: list[str]) -> list[Row]:
    """CSV with a header row; a `messages` column holds the conversation as JSON text."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if not text.strip():
        problems.append(f"{label}: file is empty")
        return []
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
    rows = []
    try:
        header = reader.fieldnames or []
        last = reader.line_num
        for values in reader:
            where = f"{label}:{last + 1}"
            last = reader.line_num
            extra = values.pop("\0extra", None)
            if extra is not None:
                reason = f"{len(header) + len(extra)} fields but the header has {len(header)}"
                rows.append(Row(where, problem=("(line)", reason)))
                continue
            if any(v is not None and UNDECODABLE.search(v) for v in values.values()):
                rows.append(Row(where, problem=("(line)", "not UTF-8; re-encode the file as UTF-8")))
                continue
            # CSV cannot tell an empty cell from a missing value: both are absent (a "text" column left empty
            # in a prompt/completion row must not make the row look like text).
            record: dict[str, Any] = {k: v for k, v in values.items() if v != ""}
            rows.append(_with_parsed_messages(record, where, "the cell"))
    except csv.Error as e:
        problems.append(f"{label}:{reader.line_num}: (file): CSV error: {e}")
    if not rows and not problems:
        problems.append(f"{label}: no records (only a header row)")
    return rows


# ----------------------------------------------------------------------------- datasets-backed formats


def _with_parsed_messages(record: dict[str, Any], where: str, what: str) -> Row:
    """The record as a Row, its `messages` parsed when stored as JSON text (CSV cells, common exports)."""
    if isinstance(record.get("messages"), str):
        try:
            record["messages"] = json.loads(record["messages"])
        except json.JSONDecodeError as e:
            return Row(where, problem=("messages", f"{what} is not valid JSON: {json_error(e)}"))
    return Row(where, record)


def rows_of_dataset(ds, label: str) -> list[Row]:
    """Rows of a `datasets.Dataset`; `messages` stored as JSON text (a common export) is parsed."""
    records = ds.to_list() if len(ds) else []
    return [_with_parsed_messages(record, f"{label}:row {i}", "the value") for i, record in enumerate(records, 1)]


def read_parquet(path: Path, label: str, problems: list[str]) -> list[Row]:
    try:
        ds = datasets.Dataset.from_parquet(str(path))
    except Exception as e:  # pyarrow raises several types for a damaged file
        problems.append(f"{label}: cannot read as Parquet: {type(e).__name__}: {str(e).splitlines()[0]}")
        return []
    if len(ds) == 0:
        problems.append(f"{label}: file is empty (0 rows)")
    return rows_of_dataset(ds, label)


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}
DATA_SUFFIXES = tuple(READERS)


def read_file(path: Path, label: str, problems: list[str]) -> list[Row]:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        problems.append(
            f"{label}: unsupported file type '{path.suffix}' "
            f"(supported: {', '.join(DATA_SUFFIXES)}, a folder, or a dataset id)"
        )
        return []
    try:
        return reader(path, label, problems)
    except OSError as e:
        problems.append(f"{label}: cannot read: {e.strerror}")
        return []


def split_files(folder: Path, split: str, label: str, problems: list[str]) -> list[Path]:
    """The data files of `split` in a folder, by `datasets`' naming conventions."""
    try:
        patterns = get_data_patterns(str(folder))
        found = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    except Exception:  # EmptyDatasetError / FileNotFoundError: no data file at all
        found = {}
    by_split = {
        s: sorted(Path(f) for f in files if Path(f).suffix.lower() in DATA_SUFFIXES) for s, files in found.items()
    }
    by_split = {s: files for s, files in by_split.items() if files}
    if not by_split:
        problems.append(f"{label}: no data files ({', '.join(DATA_SUFFIXES)}) in this folder")
        return []
    if split not in by_split:
        problems.append(
            f"{label}: no files for split '{split}' (found splits: {', '.join(sorted(by_split))}); "
            f"set the source's split"
        )
        return []
    return by_split[split]


def read_folder(folder: Path, label: str, split: str, out: SourceRows, problems: list[str]) -> None:
    if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
        read_saved_dataset(folder, label, split, out, problems)
        return
    for path in split_files(folder, split, label, problems):
        # datasets lists the files as absolute paths under the absolute folder it was given (links kept)
        file_label = str(Path(label) / os.path.relpath(path, folder))
        out.rows += read_file(path, file_label, problems)
        out.files[file_label] = sha256_file(path)


def read_saved_dataset(folder: Path, label: str, split: str, out: SourceRows, problems: list[str]) -> None:
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        problems.append(f"{label}: cannot load with datasets.load_from_disk: {type(e).__name__}: {e}")
        return
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            problems.append(
                f"{label}: no split '{split}' in this DatasetDict (splits: {', '.join(ds)}); set the source's split"
            )
            return
        ds, label = ds[split], f"{label}[{split}]"
    out.rows += rows_of_dataset(ds, label)
    out.files |= {f["filename"]: sha256_file(Path(f["filename"])) for f in ds.cache_files}
    if len(ds) == 0:
        problems.append(f"{label}: the dataset has 0 rows")


def read_hub(repo_id: str, name: str | None, split: str, revision: str, out: SourceRows, problems: list[str]) -> None:
    # a snapshot from `hf download --repo-type dataset`; hf_constants' attribute, not a name imported from it: the
    # cache huggingface_hub uses now (tests repoint it)
    snapshot = cached_snapshot(Path(hf_constants.HF_HUB_CACHE) / repo_folder_name(repo_id, "dataset"), revision)
    if snapshot is not None and name is None:
        folder, out.revision = snapshot
        read_folder(folder, repo_id, split, out, problems)
        return
    try:  # a dataset load_dataset prepared before: HF_HUB_OFFLINE makes this read the datasets cache only
        ds = datasets.load_dataset(repo_id, name, split=split)
    except Exception as e:
        problems.append(
            f"{repo_id}: not a local file or folder, and not a dataset in the local cache "
            f"({hf_constants.HF_HUB_CACHE} or {datasets.config.HF_DATASETS_CACHE}): "
            f"{type(e).__name__}: {str(e).splitlines()[0]}. "
            f"On a connected machine: hf download --repo-type dataset {repo_id} (then copy the cache), "
            f"or fix the path (relative paths start at {Path.cwd()})"
        )
        return
    label = f"{repo_id}[{split}]" if name is None else f"{repo_id}/{name}[{split}]"
    out.rows += rows_of_dataset(ds, label)
    out.files |= {f["filename"]: sha256_file(Path(f["filename"])) for f in ds.cache_files}


def read_source(
    path: str, split: str = "train", name: str | None = None, revision: str = "main", problems: list[str] | None = None
) -> SourceRows:
    """Every record of one source, in order. Problems that make the source unusable go to `problems`."""
    problems = [] if problems is None else problems
    out = SourceRows(label=path)
    p = user_path(path)  # relative paths start at the working directory, once, here
    found = what_is(p)
    if found in ("a file", "an empty file"):  # an empty file is reported by its reader, with its format
        out.rows = read_file(p, path, problems)
        out.files[path] = sha256_file(p)
    elif found == "a folder":
        read_folder(p, path, split, out, problems)
    elif (
        found == "missing"
        and path.count("/") == 1
        and not path.startswith((".", "/", "~"))
        and not path.endswith("/")  # data/my_folder/ is a folder that is missing, not a dataset id
        and not p.suffix
    ):
        read_hub(path, name, split, revision, out, problems)
    elif found == "missing":
        problems.append(f"{path}: file not found (relative paths start at {Path.cwd()})")
    else:
        problems.append(
            f"{path}: is {found}, not a data file or folder; point the source at a .jsonl/.json/.csv/.parquet file"
        )
    return out
