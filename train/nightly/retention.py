"""What the nightly job keeps and deletes (docs/nightly.md, "Retention"). A folder is first renamed to
.<name>.deleting, then removed: a crash midway leaves a name no run resolves, and the next prune finishes it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from core import releases
from core.config import Config
from core.errors import LockHeld
from core.files import read_lines
from core.locks import hold_lock
from core.runfolder import RUN_NAME, Layout

log = logging.getLogger(__name__)

CANDIDATE_FILE = "nightly.json"  # in outputs/<run>/: the inputs the candidate trains on
BY = "python -m train.nightly"  # the publisher its releases record


def registry(layout: Layout, name: str) -> list[dict]:
    """The registry's lines about export.name's nights (one registry serves every name under models/)."""
    return [r for r in read_lines(layout.registry) if r.get("name", name) == name]


def nightly_runs(layout: Layout, name: str) -> list[str]:
    """Runs the nightly job made, oldest first: the registry's, then unrecorded candidates (interrupted)."""
    recorded = [r["run"] for r in registry(layout, name) if r.get("event") == "night" and r.get("run")]
    found = []
    for meta in sorted(layout.outputs.glob(f"*/{CANDIDATE_FILE}")):
        try:
            if json.loads(meta.read_text()).get("name", name) == name:
                found.append(meta.parent.name)
        except (OSError, ValueError):
            found.append(meta.parent.name)  # unreadable: an interrupted write of ours
    return [r for r in dict.fromkeys(recorded + found) if RUN_NAME.match(r)]


def last_activity(layout: Layout, run: str) -> str:
    """When the run was last decided on (its latest registry line), or created (outputs/<run>/nightly.json)."""
    times = [r["time"] for r in read_lines(layout.registry) if r.get("run") == run and r.get("time")]
    if times:
        return max(times)
    try:
        return json.loads((layout.run(run).root / CANDIDATE_FILE).read_text()).get("created") or ""
    except (OSError, ValueError):
        return ""  # unknown: the oldest


def kept(cfg: Config, layout: Layout) -> tuple[set[str], set[str]]:
    """(releases kept, runs kept)."""
    stack = list(dict.fromkeys(reversed(releases.stack(layout.gguf_dir, cfg.export.name))))
    live = releases.live(layout.gguf_dir, cfg.export.name)
    kept_releases = set(stack[: 1 + cfg.nightly.keep_champions]) | ({live.id} if live else set())
    found = (releases.release(layout.gguf_dir, cfg.export.name, i) for i in kept_releases)
    kept_runs = {r.run for r in found if r is not None}
    others = sorted(
        (r for r in nightly_runs(layout, cfg.export.name) if r not in kept_runs), key=lambda r: last_activity(layout, r)
    )
    recent = others[len(others) - cfg.nightly.keep_candidates :] if cfg.nightly.keep_candidates else []
    return kept_releases, kept_runs | set(recent)


def doomed(cfg: Config, layout: Layout) -> dict[Path, str]:
    """What retention deletes, each path with its run."""
    kept_releases, kept_runs = kept(cfg, layout)
    paths: dict[Path, str] = {}
    for run in nightly_runs(layout, cfg.export.name):
        if run not in kept_runs:
            scores = sorted((layout.nightly / "scores").glob(f"{run}.*.json"))
            paths |= dict.fromkeys([layout.run(run).root, layout.final_model(run), layout.adapter(run), *scores], run)
    for release_id in releases.release_ids(layout.gguf_dir, cfg.export.name):
        found = releases.release(layout.gguf_dir, cfg.export.name, release_id)
        if found is not None and found.id not in kept_releases and found.record.get("by") == BY:
            paths[found.folder] = found.run
    return {p: run for p, run in paths.items() if p.exists()}


def in_use(folder: Path) -> bool:
    """Whether a process holds the run folder's lock (a training run working in it)."""
    if not (folder / ".lock").is_file():
        return False
    try:
        with hold_lock(folder / ".lock", f"run folder {folder}", "nightly prune"):
            return False
    except LockHeld:
        return True


def prune(cfg: Config, layout: Layout, dry_run: bool = False) -> list[Path]:
    """Delete what retention does not keep; return the paths deleted (or that would be, with dry_run)."""
    paths = doomed(cfg, layout)
    if dry_run:
        if paths:
            log.info("retention: would delete " + ", ".join(str(p) for p in paths))
        return list(paths)
    for parent in {p.parent for p in paths}:  # what an interrupted prune left
        for p in parent.glob(".*.deleting"):
            shutil.rmtree(p, ignore_errors=True)
    busy = {run for run in set(paths.values()) if in_use(layout.run(run).root)}
    for run in busy:
        log.warning(f"warning: not deleting {run}: a process holds {layout.run(run).root / '.lock'}")
    deleted = [p for p, run in paths.items() if run not in busy]
    for p in deleted:
        if p.parent.parent == layout.gguf_dir / releases.RELEASES:
            releases.discard(layout.gguf_dir, cfg.export.name, p.name)
        elif p.is_dir():
            gone = p.with_name(f".{p.name}.deleting")
            p.rename(gone)
            shutil.rmtree(gone)
        else:
            p.unlink()
    if deleted:
        log.info("retention: deleted " + ", ".join(str(p) for p in deleted))
    return deleted
