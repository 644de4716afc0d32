"""Writing artifacts so that a reader never sees half a file; hashing and sizing them."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def sha256_file(path: Path, fsync: bool = False) -> str:
    """sha256 of a file; with fsync, its data is forced to disk first (fsync works on a read-only descriptor
    on Linux), so a record of the hash never outlives the bytes it describes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _publish_mode(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give finished artifacts the mode the umask gives."""
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def now() -> str:
    """The local time as every record, lock and history line writes it (ISO 8601 with its UTC offset)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new or renamed files) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a temporary file beside path, fsync it, give it the usual mode and rename it over path (then fsync the
    folder): readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _publish_mode(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def publish_tree(folder: Path) -> None:
    """Every file and folder under `folder` (itself included) gets the mode the umask gives new files: what
    libraries wrote through mkstemp (safetensors, 0600) must be readable by whoever loads a promoted artifact."""
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            _publish_mode(p, directory=p.is_dir())


def _swap_in(stage: Path, dst: Path) -> None:
    """Rename the finished folder `stage` (beside dst) to dst. An interruption between the two renames leaves
    dst absent and the previous version at .<name>.old beside it, never a mix of both."""
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    stage.rename(dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def atomic_replace_dir(src: Path, dst: Path, ignore: tuple[str, ...] = ()) -> None:
    """Copy folder src to dst as a whole (without files matching `ignore`): staged beside dst, then swapped in."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    try:
        shutil.copytree(src, stage, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*ignore) if ignore else None)
        publish_tree(stage)
        _swap_in(stage, dst)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def move_dir_into_place(src: Path, dst: Path) -> None:
    """Move a finished folder to dst as a whole: one rename on the same file system, else a staged copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    publish_tree(src)
    stage = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    try:
        stage.rmdir()
        src.rename(stage)  # beside dst first, so the swap below is two renames in one folder
    except OSError as e:
        # Another volume: EXDEV. st_dev cannot tell beforehand: two Docker volumes (bind mounts) of one
        # file system share it, and the kernel still refuses a rename across mount points.
        if e.errno != errno.EXDEV:
            raise
        atomic_replace_dir(src, dst)  # copied beside dst, then swapped in
        shutil.rmtree(src)
        return
    try:
        _swap_in(stage, dst)
    except BaseException:
        if stage.exists() and not src.exists():
            stage.rename(src)
        raise


# What a run folder, a checkpoint or a release vouches for: {path: {"size": bytes, "sha256": hex}}, paths relative
# to the folder they were recorded in. Written into manifests, commit records and release records as JSON.
Record = dict[str, dict[str, Any]]


def record_files(folder: Path, fsync: bool = False, skip: Callable[[Path], bool] | None = None) -> Record:
    """The record of every file under folder (but those `skip` names); with fsync, each is forced to disk first."""
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p, fsync=fsync)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not (skip and skip(p))
    }


def differences(recorded: Record, folder: Path, record: str = "the record", exact: bool = False) -> list[str]:
    """Why the files under folder are not the recorded ones, one line each; [] when they are. Sizes are compared
    before anything is hashed (a truncated file costs no read). exact: a file the record does not name differs too."""
    problems = []
    for name, entry in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, {record} says {entry['size']} (truncated?)")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: content differs from {record} (sha256 mismatch)")
    if exact and folder.is_dir():
        present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        problems += [f"{folder / name}: not in {record}" for name in sorted(present - recorded.keys())]
    return problems


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf as the strings "nan"/"inf": JSON has no literal for them, and a reader must see no number."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and make it durable (the file, and its folder entry when the file is new). A crash
    during an append can leave a torn last line: the next append starts on a new line, and read_lines skips it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (b"\n" if torn else b"") + json.dumps(record, ensure_ascii=False).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file append_line wrote; a line that does not parse (torn by a crash) is skipped."""
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            if line.strip():
                log.warning(f"warning: {path}:{i} is not a complete JSON line (a crash during an append?); skipped")
    return out


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
