"""Where the nightly job keeps its state, beside what it manages (docs/nightly.md, "Files").

models/finetuned/registry.jsonl       every decision, appended (train.nightly.registry)
models/finetuned/nightly/.lock        the job lock: one nightly, rollback or prune at a time
models/finetuned/nightly/promotion.json   the promotion in progress (its registry line, written first)
models/finetuned/nightly/scores/      cached scores: <run>.<eval set digest>.json
models/gguf/.releases/<run>/          the GGUF files of every kept champion, immutable
models/gguf/.live -> .releases/<run>  the champion: one symlink, switched by one rename
models/gguf/<name>[.<quant>].gguf -> .live/<name>[.<quant>].gguf   what applications open
outputs/<run>/                        the candidate's run folder; its GGUFs in outputs/<run>/gguf/
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from core.config import Config

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # core.config.Config.run_name: never a path


@dataclass(frozen=True)
class Places:
    outputs: Path
    models: Path
    gguf_dir: Path
    export_name: str  # the live files are <export_name>[.<quant>].gguf

    @classmethod
    def of(cls, cfg: Config) -> Places:
        return cls(Path(cfg.paths.output_dir), Path(cfg.paths.models_dir), Path(cfg.export.gguf_dir), cfg.export.name)

    @property
    def registry(self) -> Path:
        return self.models / "finetuned" / "registry.jsonl"

    @property
    def state(self) -> Path:
        return self.models / "finetuned" / "nightly"

    @property
    def lock(self) -> Path:
        return self.state / ".lock"

    @property
    def journal(self) -> Path:
        return self.state / "promotion.json"

    @property
    def scores(self) -> Path:
        return self.state / "scores"

    @property
    def releases(self) -> Path:
        return self.gguf_dir / ".releases"

    @property
    def live(self) -> Path:
        return self.gguf_dir / ".live"

    def release(self, run: str) -> Path:
        return self.releases / checked(run)

    def run_folder(self, run: str) -> Path:
        return self.outputs / checked(run)

    def candidate_gguf(self, run: str) -> Path:
        """Where a candidate's export puts its verified GGUFs (export.gguf_dir of the candidate's config)."""
        return self.run_folder(run) / "gguf"

    def final_model(self, run: str) -> Path:
        return self.models / "finetuned" / "final_models" / checked(run)

    def adapter(self, run: str) -> Path:
        return self.models / "finetuned" / "adapters" / checked(run)


def checked(run: str) -> str:
    """A run name read from the registry or a folder, refused if it could address anything but one folder."""
    if not RUN_NAME.match(run):
        raise ValueError(f"not a run name: {run!r}")
    return run
