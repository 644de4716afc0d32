"""What the nightly job keeps: the champion, the previous nightly.keep_champions champions (what `rollback`
returns to), and the nightly.keep_candidates most recent other nightly runs. The rest of each nightly run
is deleted: outputs/<run>/, models/finetuned/{adapters,final_models}/<run>/, models/gguf/.releases/<run>/
and its cached scores. The registry lines stay (they are the history); runs the nightly job did not make
(no outputs/<run>/nightly.json and no registry line) are never touched, nor is anything live.

A folder is first renamed to .<name>.deleting, then removed: a crash mid-way leaves a name no run
resolves, and the next prune finishes it.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

from core.config import NightlySection
from core.errors import LockHeld
from core.locks import hold_lock
from train.nightly.places import RUN_NAME, Places
from train.nightly.promote import live_run
from train.nightly.registry import History

log = logging.getLogger(__name__)

CANDIDATE_FILE = "nightly.json"  # in outputs/<run>/: the fingerprint the candidate trains on


def nightly_runs(places: Places, history: History) -> list[str]:
    """Runs the nightly job made, oldest first: the registry's, then unrecorded candidates (interrupted)."""
    recorded = [r for r in history.runs() if RUN_NAME.match(r)]
    found = sorted(p.parent.name for p in places.outputs.glob(f"*/{CANDIDATE_FILE}"))
    return list(dict.fromkeys(recorded + [r for r in found if r not in recorded]))


def _when(stamp: object) -> datetime:
    try:
        return datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)  # unknown: the oldest


def last_activity(places: Places, history: History, run: str) -> datetime:
    """When the run was last decided on (its latest registry line), or created (outputs/<run>/nightly.json)."""
    times = [_when(r.get("time")) for r in history.records if r.get("run") == run]
    if times:
        return max(times)
    try:
        return _when(json.loads((places.run_folder(run) / CANDIDATE_FILE).read_text()).get("created"))
    except (OSError, ValueError):
        return _when(None)


def kept_runs(places: Places, history: History, cfg: NightlySection) -> set[str]:
    champions = list(dict.fromkeys(c.run for c in reversed(history.champions)))[: 1 + cfg.keep_champions]
    live = live_run(places)
    protected = set(champions) | ({live} if live else set())
    if places.journal.is_file():  # a promotion to finish: keep what it names
        protected.add(json.loads(places.journal.read_text())["run"])
    runs = [run for run in nightly_runs(places, history) if run not in protected]
    others = sorted(runs, key=lambda run: last_activity(places, history, run))
    return protected | set(others[len(others) - cfg.keep_candidates :] if cfg.keep_candidates else [])


def paths_of(places: Places, run: str) -> list[Path]:
    return [
        places.run_folder(run),
        places.final_model(run),
        places.adapter(run),
        places.release(run),
        *places.scores.glob(f"{run}.*.json"),
    ]


def in_use(folder: Path) -> bool:
    """Whether a process holds the run folder's lock (a training run working in it)."""
    if not (folder / ".lock").is_file():
        return False
    try:
        with hold_lock(folder / ".lock", f"run folder {folder}", "nightly prune"):
            return False
    except LockHeld:
        return True


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".{path.name}.deleting")
        path.rename(doomed)
        shutil.rmtree(doomed)
    else:
        path.unlink(missing_ok=True)


def _finish_interrupted(places: Places) -> None:
    parents = [places.outputs, places.final_model("x").parent, places.adapter("x").parent, places.releases]
    for parent in parents:
        for p in parent.glob(".*.deleting") if parent.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)


def prune(places: Places, history: History, cfg: NightlySection, dry_run: bool = False) -> list[Path]:
    """Delete what retention does not keep; return the paths deleted (or that would be, with dry_run)."""
    keep = kept_runs(places, history, cfg)
    if not dry_run:
        _finish_interrupted(places)
    deleted = []
    for run in nightly_runs(places, history):
        if run in keep:
            continue
        doomed = [p for p in paths_of(places, run) if p.exists() or p.is_symlink()]
        if dry_run or not doomed:
            deleted += doomed
            continue
        if in_use(places.run_folder(run)):
            log.warning(f"warning: not deleting {run}: a process holds {places.run_folder(run) / '.lock'}")
            continue
        for p in doomed:
            _delete(p)
        deleted += doomed
    if deleted:
        log.info(f"retention: {'would delete' if dry_run else 'deleted'} " + ", ".join(str(p) for p in deleted))
    return deleted
