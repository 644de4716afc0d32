"""Where a config's files live (Layout), a run folder, outputs/<run_name>/ (RunFolder), and its contract,
manifest.json (docs/architecture.md, "The manifest"): every CLI reads and writes a run's state only through these.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from core.config import RUN_NAME, Config
from core.errors import RunError
from core.files import atomic_write_json
from core.locks import hold_lock

Status = Literal["training", "interrupted", "failed", "exporting", "export_failed", "exported", "complete"]
# What may be exported and published: the adapter is final and the manifest vouches for it.
TRAINED = ("exporting", "export_failed", "exported", "complete")


class Manifest(BaseModel):
    """manifest.json: only the fields a run has reached are written (a field set to None is written as null)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    status: Status
    run_name: str
    base_model: dict[str, Any] | None = None  # repo_id, revision, path
    data: dict[str, Any] | None = None  # sources with sha256, counts, fingerprint (train/data)
    packages: dict[str, str | None] | None = None
    git_commit: str | None = None
    stopped: dict[str, Any] | None = None  # where and why training stopped early
    training: dict[str, Any] | None = None  # steps, losses, seconds, resumed_from, checkpoints
    artifacts: dict[str, Any] = {}  # adapter, merged, gguf: {path, files: {name: {size, sha256}}}; lora_gguf
    llama_cpp: dict[str, str] | None = None
    verification: dict[str, Any] | None = None
    default_gguf: str | None = None
    seconds_total: float | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


@dataclass(frozen=True)
class Layout:
    """Where a config's files live: run folders, promoted adapters and merged models, the nightly job's registry
    (its decisions) and folder (its lock and cached scores), and the GGUF releases (core/releases.py)."""

    outputs: Path
    models: Path
    gguf_dir: Path

    @classmethod
    def of(cls, cfg: Config) -> Layout:
        return cls(Path(cfg.paths.output_dir), Path(cfg.paths.models_dir), Path(cfg.export.gguf_dir))

    def run(self, run_name: str) -> RunFolder:
        if not RUN_NAME.match(run_name):  # a name read from a registry or a folder: never a path
            raise RunError(f"not a run name: {run_name!r}")
        return RunFolder(self.outputs / run_name, self.adapter(run_name), self.final_model(run_name), run_name)

    def adapter(self, run_name: str) -> Path:
        return self.models / "finetuned" / "adapters" / run_name

    def final_model(self, run_name: str) -> Path:
        return self.models / "finetuned" / "final_models" / run_name

    @property
    def registry(self) -> Path:
        return self.models / "finetuned" / "registry.jsonl"

    @property
    def nightly(self) -> Path:
        return self.models / "finetuned" / "nightly"


class _InRun:
    """A path in the run folder, by name: RunFolder.manifest is <root>/manifest.json."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, folder: RunFolder, owner: type) -> Path:
        return folder.root / self.name


@dataclass(frozen=True)
class RunFolder:
    root: Path  # outputs/<run>
    adapter_out: Path  # models/finetuned/adapters/<run>
    merged_out: Path  # models/finetuned/final_models/<run>
    run_name: str

    @classmethod
    def of(cls, cfg: Config) -> RunFolder:
        return Layout.of(cfg).run(cfg.run_name)

    # what the run folder holds (docs/architecture.md, "The run folder")
    config = _InRun("config.yaml")
    manifest = _InRun("manifest.json")
    checkpoints = _InRun("checkpoints")
    adapter = _InRun("adapter")
    metrics = _InRun("metrics.jsonl")
    export_dir = _InRun("export")
    verify_md = _InRun("verify.md")
    lock_file = _InRun(".lock")

    def locked(self) -> AbstractContextManager[None]:
        """Hold the run folder's lock (exit 75 for a second process; kept when --fresh empties the folder)."""
        return hold_lock(self.lock_file, f"run folder {self.root}", self.run_name)

    def read_manifest(self) -> Manifest | None:
        """The run's manifest, or None when the run has not written one yet."""
        if not self.manifest.is_file():
            return None
        try:
            return Manifest.model_validate(json.loads(self.manifest.read_text()))
        except (OSError, ValueError, ValidationError) as e:
            first = str(e).splitlines()[0]
            raise RunError(
                f"{self.manifest} is unreadable ({first}).\n"
                f"  fix: pass --fresh to start the run over, or restore the file"
            ) from None

    def read_manifest_or_none(self) -> Manifest | None:
        """The manifest, or None when there is none or it is unreadable (a run that never got far)."""
        try:
            return self.read_manifest()
        except RunError:
            return None

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_json(self.manifest, manifest.to_json())
