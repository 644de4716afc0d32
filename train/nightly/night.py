"""One night, top to bottom: lock -> recover -> fingerprint -> (unchanged: exit 0) -> candidate -> gates ->
promote or reject -> report -> retention. And the other verbs: status, rollback, prune.

Every decision is appended to the registry before it is reported; the job lock makes the nightly job,
`rollback` and `prune` exclusive (a second one exits 75 naming the holder).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

from core.config import Config
from core.errors import PipelineError, Preempted, exit_status
from core.files import atomic_write_json
from core.locks import hold_lock
from train.nightly import promote, registry
from train.nightly.fingerprint import Fingerprint, fingerprint
from train.nightly.gates import as_records, evaluate_gates, summary
from train.nightly.places import Places
from train.nightly.report import status_json, status_text, write_report
from train.nightly.retention import CANDIDATE_FILE, prune

log = logging.getLogger(__name__)

EXIT_REJECTED = 7  # the candidate failed a gate; the champion stays live (docs/nightly.md)


class GateRejected(PipelineError):
    """Tonight's candidate is worse than the gates allow: it was recorded, not promoted."""

    exit_code = EXIT_REJECTED

    def cli_message(self) -> str:  # the job worked; the model did not pass
        return f"rejected: {self}"


@contextmanager
def job_lock(places: Places, verb: str) -> Iterator[registry.History]:
    """The nightly job's lock, with any interrupted promotion finished first; yields the registry replayed."""
    with hold_lock(places.lock, f"the nightly job of {places.models}", f"nightly {verb}"):
        history = registry.load(places.registry)
        if promote.recover(places, history):
            history = registry.load(places.registry)
        yield history


# ----------------------------------------------------------------------------- one night


def unchanged(history: registry.History, fp: Fingerprint) -> str | None:
    """Why tonight need not train, or None: the champion, or a champion rolled back, was trained on the same."""
    champion = history.champion
    if champion is not None and champion.record["fingerprint"] == fp.digest:
        return f"unchanged since {champion.run}: same data, config, base model and code (fingerprint {fp.short})"
    back = history.rolled_back.get(fp.digest)
    if back is not None:
        return (
            f"unchanged since {back['from_run']}, which was rolled back at {back['time']}: not trained or promoted "
            f"again until the data, config, base model or code change (fingerprint {fp.short})"
        )
    return None


def candidate_name(cfg: Config, places: Places, fp: Fingerprint, today: date) -> str:
    """<prefix>-YYYY-MM-DD-<fp>; an earlier candidate of the same fingerprint is resumed under its own name."""
    for folder in sorted(places.outputs.glob(f"{cfg.nightly.run_prefix}-*-{fp.short}"), reverse=True):
        meta = folder / CANDIDATE_FILE
        if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fp.digest:
            return folder.name
    return f"{cfg.nightly.run_prefix}-{today:%Y-%m-%d}-{fp.short}"


def candidate_stage():
    """train.nightly.candidate, imported when a night trains: it imports torch and transformers (seconds)."""
    from train.nightly import candidate  # noqa: PLC0415 (an unchanged night exits before this import)

    return candidate


def decide(cfg: Config, places: Places, run: str, fp: Fingerprint, history: registry.History) -> dict[str, Any]:
    """Build and score the candidate, apply the gates: the registry line of the decision (not yet written)."""
    champion = history.champion
    stage = candidate_stage()
    c = stage.build_and_score(cfg, places, run, champion.run if champion else None)
    gates = evaluate_gates(c.scores, c.champion_scores, cfg.nightly, bool(c.eval_set.tasks))
    passed = all(g.passed for g in gates)
    return registry.stamp(
        {
            "event": "night",
            "decision": "promoted" if passed else "rejected",
            "run": run,
            "fingerprint": fp.digest,
            "fingerprint_parts": fp.part_digests,
            "changed": fp.changed_since(champion.record.get("fingerprint_parts") if champion else None),
            "champion_before": champion.run if champion else None,
            "eval_set": c.eval_set.digest[:16],
            "scores": {"candidate": c.scores, "champion": c.champion_scores},
            "gates": as_records(gates),
            "reason": summary(gates),
            "files": c.files,
            "sources": {name: str(p) for name, p in c.sources.items()},
            "exit_code": 0 if passed else EXIT_REJECTED,
        }
    )


def _failed(places: Places, run: str, fp: Fingerprint, e: BaseException) -> None:
    code, message = exit_status(e) or (1, f"{type(e).__name__}: {e}")
    decision = "interrupted" if isinstance(e, (Preempted, KeyboardInterrupt)) else "failed"  # rerun resumes
    record = {"event": "night", "decision": decision, "run": run, "fingerprint": fp.digest, "exit_code": code}
    registry.append(places.registry, registry.stamp(record | {"reason": message.splitlines()[0]}))


def train_and_decide(
    cfg: Config, places: Places, fp: Fingerprint, history: registry.History, today: date
) -> dict[str, Any]:
    """Tonight's candidate built, scored, gated, and promoted or recorded as rejected; any failure recorded."""
    run = candidate_name(cfg, places, fp, today)
    if history.champion is None:
        log.info(f"tonight's candidate: {run} (no champion yet)")
    else:
        changed = fp.changed_since(history.champion.record.get("fingerprint_parts"))
        log.info(
            f"tonight's candidate: {run} (changed since the champion {history.champion.run}: {', '.join(changed)})"
        )
    meta = places.run_folder(run) / CANDIDATE_FILE
    if not meta.is_file():
        atomic_write_json(meta, {"fingerprint": fp.digest, "parts": fp.parts, "created": registry.now()})
    try:
        record = decide(cfg, places, run, fp, history)
        if record["decision"] == "promoted":
            promote.promote(places, record, {name: Path(p) for name, p in record["sources"].items()})
        else:
            registry.append(places.registry, record)
    except BaseException as e:
        if places.journal.is_file():  # a promotion that raised: finish it (switched) or undo it, now
            promote.recover(places, registry.load(places.registry))
        if promote.live_run(places) != run:
            _failed(places, run, fp, e)
        raise
    return record


def run_night(cfg: Config, today: date) -> int:
    places = Places.of(cfg)
    with job_lock(places, "run") as history:
        fp = fingerprint(cfg)
        why = unchanged(history, fp)
        if why is not None:
            champion = history.champion.run if history.champion else None
            skipped = {"event": "night", "decision": "unchanged", "fingerprint": fp.digest, "champion": champion}
            registry.append(places.registry, registry.stamp(skipped | {"reason": why, "exit_code": 0}))
            log.info(why)
            return 0
        record = train_and_decide(cfg, places, fp, history, today)
        run = record["run"]
        history = registry.load(places.registry)
        report = write_report(places.run_folder(run), record, history)
        prune(places, history, cfg.nightly)
    if record["decision"] != "promoted":
        raise GateRejected(f"{run}: {record['reason']}; {record['champion_before']} stays live (report: {report})")
    log.info(f"promoted: {run}: {record['reason']} (report: {report})")
    log.info(f"live: {places.gguf_dir / next(iter(record['files']))} is now {run}")
    return 0


# ----------------------------------------------------------------------------- the other verbs


def show_status(cfg: Config, as_json: bool, nights: int) -> int:
    places = Places.of(cfg)
    history = registry.load(places.registry)
    if as_json:
        print(json.dumps(status_json(places, history, nights), indent=2))
    else:
        log.info(status_text(places, history, nights))
    return 0


def roll_back(cfg: Config) -> int:
    places = Places.of(cfg)
    with job_lock(places, "rollback") as history:
        record = promote.rollback(places, history)
    log.info(f"rolled back: {record['run']} is live again (was {record['from_run']}); recorded in {places.registry}")
    return 0


def run_prune(cfg: Config, dry_run: bool) -> int:
    places = Places.of(cfg)
    with job_lock(places, "prune") as history:
        deleted = prune(places, history, cfg.nightly, dry_run=dry_run)
    if not deleted:
        log.info("retention: nothing to delete")
    return 0
