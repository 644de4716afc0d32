"""A night's inputs, as one sha256: the data, the config, the base model, the code. The same inputs as the live
model's: nothing to train tonight.

Computed in seconds, before anything heavy is imported, so that an unchanged night exits at once:

    data    sha256 of every training and eval source file (a folder: each file under it; a cached hub
            dataset: its id and the snapshot commit its revision resolves to). The rendered-token fingerprint
            the manifest records (train.data) would need the tokenizer and a pass over every record
            (minutes on large data); it is fully determined by these bytes, the config, the base revision
            (the tokenizer) and the code, all of which are in here.
    config  the keys that shape the trained weights and the exported files (core.config.FINGERPRINTED): not
            where files go, not how a model is judged (gates and retention decide about a model, they are not
            inputs to it)
    base    the base model's repo id and resolved commit (a local folder: the sha256 of its files)
    code    the tracked package versions, the llama.cpp release and commit, the project's git commit
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.llamacpp import version_info
from core.config import FINGERPRINTED, Config, keys_affecting
from core.files import sha256_file
from core.hub import default_hf_home, resolve_model
from core.provenance import git_commit, package_versions


@dataclass(frozen=True)
class NightInputs:
    digest: str  # sha256 over the four parts
    parts: dict[str, Any]  # data, config, base, code
    part_digests: dict[str, str]  # sha256 per part: what changed since another night's

    @property
    def short(self) -> str:
        return self.digest[:8]

    def changed_since(self, other: dict[str, str] | None) -> list[str]:
        """The parts that differ from another night's part digests (all, when it has none)."""
        return [k for k, v in self.part_digests.items() if (other or {}).get(k) != v]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _hub_dataset(repo_id: str, revision: str) -> str:
    """`repo@commit` of a dataset in the local HF cache (refs/<revision>), or `repo@revision` when unresolved."""
    ref = default_hf_home() / "hub" / ("datasets--" + repo_id.replace("/", "--")) / "refs" / revision
    return f"{repo_id}@{ref.read_text().strip() if ref.is_file() else revision}"


def source_hash(path: str, revision: str = "main") -> str | dict[str, str]:
    """sha256 of a file; {relative path: sha256} of a folder's files; the resolved commit of a hub dataset."""
    p = Path(path).expanduser()
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return {str(f.relative_to(p)): sha256_file(f) for f in sorted(p.rglob("*")) if f.is_file()}
    return _hub_dataset(path, revision)


def data_part(cfg: Config) -> dict[str, Any]:
    sources = [*cfg.data.train_files, *cfg.data.eval_files]
    return {s.path: source_hash(s.path, s.revision) for s in sources}


def config_part(cfg: Config) -> dict[str, Any]:
    return keys_affecting(cfg, FINGERPRINTED)


def base_part(cfg: Config) -> dict[str, Any]:
    base = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    if base.repo_id is None:  # a local folder has no commit: its bytes are its identity
        return {"path": str(base.path), "files": source_hash(str(base.path))}
    return {"repo_id": base.repo_id, "revision": base.revision}


def code_part() -> dict[str, Any]:
    return {"packages": package_versions(), "llama_cpp": version_info(), "git_commit": git_commit()}


def night_inputs(cfg: Config) -> NightInputs:
    parts = {"data": data_part(cfg), "config": config_part(cfg), "base": base_part(cfg), "code": code_part()}
    part_digests = {k: _digest(v) for k, v in parts.items()}
    return NightInputs(_digest(part_digests), parts, part_digests)
