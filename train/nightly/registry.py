"""models/finetuned/registry.jsonl: every nightly decision, one JSON object per line.

A line is appended with O_APPEND and fsynced before the command reports the decision, so a decision that
was reported is on disk. A crash during the append can leave a torn last line; readers skip a line that
does not parse (with a warning) and the next append starts on a new line. The registry is the only
history: which run is live and since when, what `rollback` returns to, and what retention keeps are all
replayed from it.

    {"event": "night", "decision": "promoted" | "rejected" | "unchanged" | "failed", "run", "fingerprint", ...}
    {"event": "rollback", "run": <live again>, "from_run": <was live>, "files": {...}}
    {"event": "promotion_undone", "run", "reason"}      an interrupted promotion that had not switched
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.files import fsync_dir

log = logging.getLogger(__name__)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def stamp(record: dict[str, Any]) -> dict[str, Any]:
    """The record with when and where it was decided first."""
    return {"time": now(), "host": socket.gethostname(), **record}


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one line and make it durable (the file, and its folder entry when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # a crash cut the last line: start a new one
        os.write(fd, (b"\n" if torn else b"") + json.dumps(record, ensure_ascii=False).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning(f"warning: {path}:{i} is not a complete JSON line (a crash during an append?); skipped")
    return records


@dataclass
class Champion:
    record: dict[str, Any]  # the promoted night's record: run, fingerprint, scores, files
    live_since: str

    @property
    def run(self) -> str:
        return self.record["run"]


@dataclass
class History:
    """The registry replayed: promotions push a champion, rollbacks pop one."""

    records: list[dict[str, Any]]
    champions: list[Champion] = field(default_factory=list)  # the last is live
    rolled_back: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprint -> rollback record

    @property
    def champion(self) -> Champion | None:
        return self.champions[-1] if self.champions else None

    @property
    def previous(self) -> Champion | None:
        return self.champions[-2] if len(self.champions) > 1 else None

    def nights(self, n: int) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == "night"][-n:]

    def events(self, n: int) -> list[dict[str, Any]]:
        """The last n lines: nights, rollbacks, undone promotions."""
        return self.records[-n:]

    def runs(self) -> list[str]:
        """Every run the registry names, oldest first, each once."""
        return list(dict.fromkeys(r["run"] for r in self.records if r.get("run")))


def replay(records: list[dict[str, Any]]) -> History:
    h = History(records)
    for r in records:
        if r.get("event") == "night" and r.get("decision") == "promoted":
            h.champions.append(Champion(r, r["time"]))
            h.rolled_back.pop(r["fingerprint"], None)
        elif r.get("event") == "rollback" and h.champions:
            gone = h.champions.pop()
            h.rolled_back[gone.record["fingerprint"]] = r
            if h.champions:
                h.champions[-1].live_since = r["time"]
    return h


def load(path: Path) -> History:
    return replay(read_records(path))
