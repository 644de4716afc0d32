"""Where an artifact came from: package versions and the project's git commit, recorded in every manifest."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

# Packages whose versions decide what a run produces; recorded in every manifest.
TRACKED_PACKAGES = [
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "sentencepiece",
    "gguf",
    "llama_cpp_python",
    "bitsandbytes",
    "numpy",
    "pydantic",
]


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """Commit of the project checkout (with '+dirty' when it has local changes), or None outside git."""

    def git(*args: str) -> str:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")
