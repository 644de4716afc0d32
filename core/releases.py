"""Making GGUF files live: publish() is the one writer of models/gguf/ (the layout: docs/architecture.md, "What is
published"). Killed before the switch, the old release is live, untouched; after it, the new one is, whole; a staging
folder left behind has a name no release has (.<release>.*) and the next publish removes it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import DiskSpaceError, RunError
from core.files import Record, append_line, atomic_write_json, differences, fsync_dir, now, read_lines, record_files
from core.locks import promotion_lock

RELEASES, LIVE, RECORD, HISTORY = ".releases", "live", "release.json", "history.jsonl"
TMP = "publish-tmp"  # suffix of temporary link names: .<name>.<pid>.publish-tmp


def reached(point: str) -> None:
    """A named point of a promotion: after_stage, before_switch, between_renames. Does nothing; the crash tests
    replace it to SIGKILL the process there (tests/unit/test_releases.py, the CLI test server's kill_at)."""


@dataclass(frozen=True)
class Release:
    name: str  # the file stem: <name>.gguf, <name>.<quant>.gguf
    id: str  # its folder under .releases/<name>/: the run's name (run.2, ... when a run is promoted again)
    folder: Path
    record: dict[str, Any]  # release.json: run, time, files (a Record), and what the promoter added

    @property
    def run(self) -> str:
        return self.record["run"]

    @property
    def files(self) -> Record:
        return self.record["files"]

    def problems(self) -> list[str]:
        """Why the release's files are not the ones it recorded ([] when they are)."""
        return differences(self.files, self.folder, f"{self.folder / RECORD}")


def releases_dir(gguf_dir: Path, name: str) -> Path:
    return gguf_dir / RELEASES / name


def release(gguf_dir: Path, name: str, release_id: str) -> Release | None:
    folder = releases_dir(gguf_dir, name) / release_id
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return Release(name, release_id, folder, record)


def live(gguf_dir: Path, name: str) -> Release | None:
    """The release of `name` applications open now, or None (never published)."""
    try:
        target = os.readlink(releases_dir(gguf_dir, name) / LIVE)
    except OSError:
        return None
    return release(gguf_dir, name, target)


def release_ids(gguf_dir: Path, name: str) -> list[str]:
    """Every release of `name` on disk (not the live pointer, not a staging folder); [] before the first publish
    (glob, unlike iterdir, finds nothing in a folder that does not exist)."""
    found = releases_dir(gguf_dir, name).glob("*")
    return sorted(p.name for p in found if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


def history(gguf_dir: Path, name: str) -> list[dict[str, Any]]:
    """Every switch of `name`, oldest first: {time, event (publish | rollback), release, run, was, ...}."""
    return read_lines(releases_dir(gguf_dir, name) / HISTORY)


def stack(gguf_dir: Path, name: str) -> list[str]:
    """The release ids that were live, replayed from the history: a publish pushes, a rollback pops. The last is
    live; the one before it is what a rollback makes live again. A switch that a kill left unrecorded (after the
    rename of `live`, before its history line) is replayed from the next line's `was`, or from `live` itself."""
    live_ids: list[str] = []
    for line in history(gguf_dir, name):
        if line.get("was") and live_ids[-1:] != [line["was"]]:
            live_ids.append(line["was"])
        if line["event"] == "rollback" and live_ids:
            live_ids.pop()
        elif line["event"] == "publish":
            live_ids.append(line["release"])
    now = live(gguf_dir, name)
    if now is not None and live_ids[-1:] != [now.id]:
        live_ids.append(now.id)
    return live_ids


def publish(
    gguf_dir: Path,
    name: str,
    run: str,
    files: dict[str, Path] | None = None,
    meta: dict[str, Any] | None = None,
    rollback_to: str | None = None,
) -> Release:
    """Make a set of files live under `name`: `files` ({file name: a finished file}, moved into a new release of
    `run`, with `meta` added to its record), or, for a rollback, the existing release `rollback_to` (its files
    checked against its record first). Under the name's promotion lock: one publisher of a name at a time."""
    with promotion_lock(gguf_dir / name, run):
        if rollback_to is None:
            assert files is not None
            new = _stage(gguf_dir, name, run, files, meta or {})
            event = "publish"
        else:
            found = release(gguf_dir, name, rollback_to)
            problems = found.problems() if found else [f"{releases_dir(gguf_dir, name) / rollback_to}: missing"]
            if found is None or problems:
                raise RunError(
                    f"cannot make {rollback_to} live again: its files are not the ones that were live:\n    "
                    + "\n    ".join(problems)
                )
            new, event = found, "rollback"
        was = live(gguf_dir, name)
        reached("before_switch")
        _switch(gguf_dir, name, new)
        line = {"time": now(), "event": event, "release": new.id, "run": new.run, "was": was.id if was else None}
        line |= {k: new.record[k] for k in ("by", "inputs") if k in new.record}
        append_line(releases_dir(gguf_dir, name) / HISTORY, line)
    return new


def _stage(gguf_dir: Path, name: str, run: str, files: dict[str, Path], meta: dict[str, Any]) -> Release:
    """A new release folder holding `files` (renamed in where they share a file system, else copied), their record
    and `meta`, made durable, renamed into place in one step. Leftovers of interrupted stagings are removed."""
    folder = releases_dir(gguf_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.glob(".*"):  # a staging folder an interrupted publish left
        shutil.rmtree(p, ignore_errors=True)
    taken = {p.name for p in folder.iterdir()}  # run, then run.2, run.3, ... when the run is promoted again
    release_id = next(i for i in (run, *(f"{run}.{n}" for n in range(2, 10_000))) if i not in taken)
    stage = Path(tempfile.mkdtemp(dir=folder, prefix=f".{release_id}."))
    try:
        for file, src in files.items():
            _move(src, stage / file)
        record = {"name": name, "run": run, "time": now(), **meta, "files": record_files(stage, fsync=True)}
        atomic_write_json(stage / RECORD, record)  # fsynced: the release is durable before it is renamed in
        for p in stage.iterdir():
            os.chmod(p, 0o444)  # immutable: an application reading it must never see it change
        os.chmod(stage, 0o755)
        fsync_dir(stage)
        os.rename(stage, folder / release_id)
        fsync_dir(folder)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskSpaceError(f"no space left in {folder} while publishing {run}'s files") from None
        raise
    reached("after_stage")
    return Release(name, release_id, folder / release_id, record)


def _move(src: Path, dst: Path) -> None:
    """A rename on the same file system; across volumes (EXDEV, also between two Docker volumes of one file
    system) a copy, and the source is left to its owner's cleanup."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dst)


def _link(path: Path, target: str) -> None:
    """`path` as a symlink to `target`, made beside it and renamed over it: a watcher sees one rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{TMP}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _switch(gguf_dir: Path, name: str, new: Release) -> None:
    """Point `live` at the release (the one rename that changes what every name reads), then link each of its
    files under its name and remove the links of files it does not have. Regular files of other names stay."""
    _link(releases_dir(gguf_dir, name) / LIVE, new.id)
    fsync_dir(releases_dir(gguf_dir, name))
    reached("between_renames")
    via = f"{RELEASES}/{name}/{LIVE}/"
    for file in new.files:
        _link(gguf_dir / file, via + file)
    for p in gguf_dir.iterdir():
        if p.is_symlink() and os.readlink(p).startswith(via) and not p.exists():
            p.unlink()
    # links a killed publish of this name made and never renamed (another name's are its own publisher's to clean)
    for p in [*gguf_dir.glob(f".{name}.*.{TMP}"), *releases_dir(gguf_dir, name).glob(f".*.{TMP}")]:
        p.unlink(missing_ok=True)
    fsync_dir(gguf_dir)


def discard(gguf_dir: Path, name: str, release_id: str) -> Path | None:
    """Delete a release that is not live (retention); the path deleted, or None when there was none."""
    live_now = live(gguf_dir, name)
    if live_now is not None and live_now.id == release_id:
        raise RunError(f"{release_id} is the live release of {name}: not deleted")
    folder = releases_dir(gguf_dir, name) / release_id
    if not folder.is_dir():
        return None
    doomed = folder.with_name(f".{release_id}.deleting")  # a name no release has, should the removal stop midway
    folder.rename(doomed)
    shutil.rmtree(doomed)
    return folder
