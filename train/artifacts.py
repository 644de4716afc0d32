"""Writing artifacts so that a reader never sees half a file, and recording where they came from."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give finished artifacts the usual mode."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new or renamed files) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _staged_file(dst: Path) -> Iterator[Path]:
    """Yield a temporary path beside dst; when the block succeeds, fsync it, give it the usual mode and
    rename it over dst (then fsync the folder): readers see the old file or the new one, never half."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish_mode(tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with _staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_copy_file(src: Path, dst: Path) -> None:
    with _staged_file(dst) as tmp:
        shutil.copyfile(src, tmp)


def atomic_replace_dir(src: Path, dst: Path) -> None:
    """Copy folder src to dst as a whole: staged beside dst, then swapped in by rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    try:
        shutil.copytree(src, stage, dirs_exist_ok=True)
        _publish_mode(stage, directory=True)
        old = dst.with_name(f".{dst.name}.old")
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
            dst.rename(old)
        stage.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def hash_tree(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} for every file under folder."""
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(folder: Path | None = None) -> str | None:
    """Commit of the project checkout (with '+dirty' when it has local changes), or None outside git."""
    folder = folder or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
