"""Making a champion live: every live file switches with one rename, and a crash at any point is recovered.

    models/gguf/.releases/<run>/<name>[.<quant>].gguf    each champion's verified files, never modified
    models/gguf/.live -> .releases/<run>                 which release is live
    models/gguf/<name>[.<quant>].gguf -> .live/<name>[.<quant>].gguf

An application opens models/gguf/<name>.gguf as always; the kernel resolves the two links when it opens
the file, so it gets the old champion's file or the new one, whole, and every quant it opens afterwards
comes from the same release. Promotion (the Kubernetes AtomicWriter's `..data` scheme):

    1. journal      models/finetuned/nightly/promotion.json := the registry line of the decision
    2. copy         candidate GGUFs -> .releases/.<run>.XXXX/ (hard links when on the same file system),
                    each re-hashed against the verified hash, fsynced; the folder renamed to .releases/<run>
    3. switch       a new symlink .live.<pid>.tmp -> .releases/<run>, renamed over .live: the one rename
                    that changes what every live name reads
    4. notify       each live name re-created as the same symlink and renamed over itself, so a watcher
                    filtering on the file name sees one rename of it
    5. record       the journal's line appended to the registry (fsynced); the journal removed

Killed before 3, the old champion is live, untouched; killed after 3, the new one is, whole. The next
command of the nightly CLI finds the journal and finishes it (`recover`): it appends the decision when .live
names the journal's run, and otherwise removes the staged release and records the promotion as undone.
`rollback` is the same switch back to a release that is still on disk, after re-hashing its files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from core.errors import DiskSpaceError, RunError
from core.files import atomic_write_json, fsync_dir, sha256_file
from core.locks import promotion_lock
from train.nightly import registry
from train.nightly.places import Places

log = logging.getLogger(__name__)

RELEASES, LIVE = ".releases", ".live"
TMP = "nightly-tmp"  # suffix of this module's temporary link names: .<name>.<pid>.nightly-tmp


def reached(point: str) -> None:
    """A named point of a promotion: before_copy, after_copy, before_switch, between_renames, before_record.

    Does nothing. The crash tests replace it (tests/support/nightly_faults.py) to SIGKILL the process there."""


# ----------------------------------------------------------------------------- the live set


def live_run(places: Places) -> str | None:
    """The run whose release .live names, or None (no champion promoted yet, or .live is not ours)."""
    try:
        target = Path(os.readlink(places.live))
    except OSError:
        return None
    return target.name if target.parent == Path(RELEASES) else None


def release_problems(places: Places, run: str, files: dict[str, dict[str, Any]]) -> list[str]:
    """Why run's release is not exactly the files recorded for it (missing, size or sha256), or []."""
    problems = []
    for name, entry in files.items():
        p = places.release(run) / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            problems.append(f"{p}: not the file recorded (sha256 {entry['sha256'][:12]}...)")
    return problems


def _copy_or_link(src: Path, dst: Path) -> None:
    """A hard link where src and dst share a file system (no second copy of a multi-GB file), else a copy.
    Neither is ever written to in place afterwards: exports replace files by rename, releases are read-only."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(src, dst)


def stage_release(places: Places, run: str, sources: dict[str, Path], files: dict[str, dict[str, Any]]) -> None:
    """.releases/<run>/ holding exactly `files` (taken from `sources`), checked byte for byte, made durable."""
    final = places.release(run)
    if final.is_dir() and not release_problems(places, run, files):
        return  # staged by an earlier attempt, intact
    places.releases.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=places.releases, prefix=f".{run}."))
    try:
        for name, src in sources.items():
            dst = stage / name
            _copy_or_link(src, dst)
            if sha256_file(dst, fsync=True) != files[name]["sha256"]:
                raise RunError(
                    f"{src} is not the file that was verified and scored (sha256 differs); nothing was promoted.\n"
                    f"  fix: delete {places.run_folder(run)} so that the next night rebuilds the candidate"
                )
            os.chmod(dst, 0o444)
        os.chmod(stage, 0o755)
        fsync_dir(stage)
        if final.exists():  # a damaged earlier staging of the same run, never live (recover() checked)
            shutil.rmtree(final)
        os.rename(stage, final)
        fsync_dir(places.releases)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise DiskSpaceError(f"no space left in {places.releases} while copying {run}'s GGUF files") from None
        raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{TMP}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def relink(places: Places, names: list[str]) -> None:
    """Each live name as the symlink .live/<name>, renamed into place (a watcher sees one rename per name);
    links of names the live release no longer has are removed. Regular files of other names stay."""
    for name in names:
        _replace_symlink(places.gguf_dir / name, f"{LIVE}/{name}")
    for p in places.gguf_dir.iterdir():
        if p.is_symlink() and os.readlink(p).startswith(f"{LIVE}/") and not p.exists():
            p.unlink()
    fsync_dir(places.gguf_dir)


def switch(places: Places, run: str, names: list[str]) -> None:
    """Make .releases/<run> live: one rename of the .live symlink, then the names re-linked. Holds the
    promotion lock of the file stem that `python -m train` exports take (models/gguf/.<name>.lock)."""
    with promotion_lock(places.gguf_dir / places.export_name, run):
        tmp = places.gguf_dir / f"{LIVE}.{os.getpid()}.{TMP}"
        tmp.unlink(missing_ok=True)
        os.symlink(f"{RELEASES}/{run}", tmp)
        reached("before_switch")
        os.replace(tmp, places.live)
        fsync_dir(places.gguf_dir)
        reached("between_renames")
        relink(places, names)


def _finish(places: Places, record: dict[str, Any]) -> None:
    reached("before_record")
    registry.append(places.registry, record)
    places.journal.unlink()
    fsync_dir(places.journal.parent)


# ----------------------------------------------------------------------------- promote, roll back, recover


def promote(places: Places, record: dict[str, Any], sources: dict[str, Path]) -> None:
    """Make a candidate live. `record` is its registry line (run, files with sha256 and size, scores, gates);
    it is journaled first and appended to the registry last."""
    run = record["run"]
    atomic_write_json(places.journal, record)
    reached("before_copy")
    stage_release(places, run, sources, record["files"])
    reached("after_copy")
    switch(places, run, list(record["files"]))
    _finish(places, record)


def rollback(places: Places, history: registry.History) -> dict[str, Any]:
    """Make the previous champion live again, byte for byte what was live before it was replaced."""
    current, previous = history.champion, history.previous
    if current is None or previous is None:
        live = f"the only champion is {current.run}" if current else "no champion has been promoted"
        raise RunError(f"no previous champion to roll back to: {live} (registry {places.registry})")
    files = previous.record["files"]
    problems = release_problems(places, previous.run, files)
    if problems:
        raise RunError(
            f"cannot roll back to {previous.run}: its files are not the ones that were live:\n    "
            + "\n    ".join(problems)
            + f"\n  nothing was changed; {current.run} stays live"
        )
    record = registry.stamp(
        {
            "event": "rollback",
            "run": previous.run,
            "from_run": current.run,
            "fingerprint": previous.record["fingerprint"],
            "files": files,
        }
    )
    atomic_write_json(places.journal, record)
    switch(places, previous.run, list(files))
    _finish(places, record)
    return record


def _remove_leftovers(places: Places) -> None:
    """Temporary names of an interrupted promotion: staging folders and link files."""
    for p in places.releases.glob(".*") if places.releases.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in places.gguf_dir.glob(f".*.{TMP}"):
        p.unlink(missing_ok=True)


def recover(places: Places, history: registry.History) -> bool:
    """Finish a promotion or rollback a crash interrupted (its journal is there). True if there was one."""
    if not places.journal.is_file():
        return False
    pending = json.loads(places.journal.read_text())  # written atomically: whole or absent
    run, last = pending["run"], (history.records[-1] if history.records else {})
    if last.get("time") == pending["time"] and last.get("run") == run:
        log.info(f"the interrupted {pending['event']} of {run} was already recorded")
    elif live_run(places) == run:
        relink(places, list(pending["files"]))
        registry.append(places.registry, {**pending, "recovered": registry.now()})
        log.info(f"recovered: the interrupted {pending['event']} of {run} had switched; {run} is live, recorded")
    else:
        if run not in {c.run for c in history.champions}:  # staged for this promotion only
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(places.release(run))
        registry.append(
            places.registry,
            registry.stamp(
                {
                    "event": "promotion_undone",
                    "run": run,
                    "of": pending["event"],
                    "reason": "interrupted before the switch; the champion stayed live",
                }
            ),
        )
        log.info(f"recovered: the interrupted {pending['event']} of {run} had not switched; undone")
    _remove_leftovers(places)
    places.journal.unlink()
    fsync_dir(places.journal.parent)
    return True
