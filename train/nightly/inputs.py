"""A night's inputs, as one sha256 over four parts (docs/nightly.md, 'What "unchanged" means'), computed in seconds
before anything heavy is imported, so that an unchanged night exits at once.
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
from core.hub import default_hf_home, hub_cache_dir, repo_folder_name, resolve_model
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


def source_hash(path: str, revision: str = "main") -> str | dict[str, str]:
    """sha256 of a file; {relative path: sha256} of a folder's files; a hub dataset's `repo@commit` as the local HF
    cache resolves its revision (refs/<revision>), or `repo@revision` when it does not."""
    p = Path(path).expanduser()
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return {str(f.relative_to(p)): sha256_file(f) for f in sorted(p.rglob("*")) if f.is_file()}
    ref = hub_cache_dir(default_hf_home()) / repo_folder_name(path, "dataset") / "refs" / revision
    return f"{path}@{ref.read_text().strip() if ref.is_file() else revision}"


def config_part(cfg: Config) -> dict[str, Any]:
    return keys_affecting(cfg, FINGERPRINTED)


def night_inputs(cfg: Config) -> NightInputs:
    base = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    parts = {
        "data": {s.path: source_hash(s.path, s.revision) for s in [*cfg.data.train_files, *cfg.data.eval_files]},
        "config": config_part(cfg),
        # a local folder has no commit: its bytes are its identity
        "base": {"repo_id": base.repo_id, "revision": base.revision}
        if base.repo_id is not None
        else {"path": str(base.path), "files": source_hash(str(base.path))},
        "code": {"packages": package_versions(), "llama_cpp": version_info(), "git_commit": git_commit()},
    }
    part_digests = {k: _digest(v) for k, v in parts.items()}
    return NightInputs(_digest(part_digests), parts, part_digests)
