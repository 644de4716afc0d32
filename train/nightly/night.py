"""One night, top to bottom (run_night; docs/nightly.md draws it), and the other verbs: status, rollback, prune.
The champion is whatever release of export.name is live, whoever published it; every decision is appended to the
registry before it is reported.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

from convert.export import publish_run
from convert.ggufs import gguf_filename
from convert.verify import file_report
from core import releases
from core.config import Config
from core.errors import PipelineError, Preempted, RunError, exit_status
from core.files import append_line, atomic_write_json, jsonable, now, read_lines
from core.gates import summary
from core.locks import publisher_lock
from core.runfolder import Layout, Manifest
from train.nightly.inputs import NightInputs, night_inputs
from train.nightly.report import status_json, status_text, write_report
from train.nightly.retention import BY, CANDIDATE_FILE, prune, registry
from train.nightly.scores import EvalSet, eval_paths, gates, load_eval_set, score_model
from train.run import run as train_run

log = logging.getLogger(__name__)

EXIT_REJECTED = 7  # the candidate failed a gate; the champion stays live (docs/nightly.md)


class GateRejected(PipelineError):
    """Tonight's candidate is worse than the gates allow: it was recorded, not promoted."""

    exit_code = EXIT_REJECTED

    def cli_message(self) -> str:  # the job worked; the model did not pass
        return f"rejected: {self}"


@contextmanager
def job_lock(cfg: Config, layout: Layout, verb: str) -> Iterator[None]:
    """export.name's publisher lock, exclusive: no other nightly verb and no `python -m train` of the same name
    meanwhile. A publication a crash left unrecorded is recorded."""
    with publisher_lock(layout.gguf_dir, cfg.export.name, f"nightly {verb}", exclusive=True):
        live = releases.live(layout.gguf_dir, cfg.export.name)
        decided = (live.record.get("nightly") if live else None) or {}
        if decided and not any(r.get("time") == decided["time"] for r in read_lines(layout.registry)):
            append_line(layout.registry, decided | {"recovered": now()})
            log.info(f"recovered: {decided['run']} had been published when the job stopped; recorded")
        yield


def stamp(cfg: Config, record: dict[str, Any]) -> dict[str, Any]:
    """A registry line: when, where, and which name's night (one registry serves every name under models/)."""
    return {"time": now(), "host": socket.gethostname(), "name": cfg.export.name, **record}


# ----------------------------------------------------------------------------- one night


def unchanged(cfg: Config, layout: Layout, fp: NightInputs) -> str | None:
    """Why tonight need not train, or None: the live model, or one rolled back, was trained on the same."""
    live = releases.live(layout.gguf_dir, cfg.export.name)
    if live is not None and live.record.get("inputs") == fp.digest:
        return f"unchanged since {live.run}: same data, config, base model and code (inputs {fp.short})"
    history = releases.history(layout.gguf_dir, cfg.export.name)
    inputs_of = {h["release"]: h.get("inputs") for h in history if h["event"] == "publish"}
    rolled_back: dict[str, dict[str, Any]] = {}
    for h in history:
        if h["event"] == "publish":
            rolled_back.pop(h.get("inputs") or "", None)
        elif was := inputs_of.get(h["was"]):
            rolled_back[was] = h
    back = rolled_back.get(fp.digest)
    if back is not None:
        return (
            f"unchanged since {back['was']}, which was rolled back at {back['time']}: not trained or promoted again "
            f"until the data, config, base model or code change (inputs {fp.short})"
        )
    return None


def candidate_name(cfg: Config, layout: Layout, fp: NightInputs, today: date) -> str:
    """<prefix>-YYYY-MM-DD-<fp>; an earlier candidate of the same inputs is resumed under its own name."""
    for folder in sorted(layout.outputs.glob(f"{cfg.nightly.run_prefix}-*-{fp.short}"), reverse=True):
        meta = folder / CANDIDATE_FILE
        if meta.is_file() and json.loads(meta.read_text()).get("inputs") == fp.digest:
            return folder.name
    return f"{cfg.nightly.run_prefix}-{today:%Y-%m-%d}-{fp.short}"


def candidate_config(cfg: Config, run: str) -> Config:
    """The candidate's config: no base export (the base does not change with the data), and the eval set first in
    its verification's held-out set, so that the scores are read from its verification, not computed again."""
    c = cfg.model_copy(deep=True)
    c.run_name = run
    c.export.enabled = True
    c.export.export_base = False
    c.verify.heldout_files = list(dict.fromkeys([*eval_paths(cfg), *cfg.verify.heldout_files]))
    c.verify.max_heldout_records = max(cfg.verify.max_heldout_records, cfg.nightly.max_eval_records)
    return c


def scores_of(layout: Layout, run: str, model_dir: Path, gguf: Path, eval_set: EvalSet, cfg: Config) -> dict:
    """A run's scores on this eval set, computed once: <nightly state>/scores/<run>.<eval set digest>.json."""
    path = layout.nightly / "scores" / f"{run}.{eval_set.digest[:16]}.json"
    if path.is_file():
        log.info(f"scores of {run} on eval set {eval_set.digest[:16]}: cached ({path})")
        return json.loads(path.read_text())
    for p in (model_dir, gguf):
        if not p.exists():
            raise RunError(
                f"cannot score {run}: {p} is missing.\n  fix: restore it, or make another model live "
                f"(python -m train.nightly rollback)"
            )
    default = gguf_filename(cfg.export.name, cfg.export.default_quant, cfg.export.default_quant)
    log.info(f"scoring {run} on the eval set ({len(eval_set.tasks)} task checks)")
    scores = jsonable(score_model(model_dir, gguf, eval_set, cfg, file_report(layout.run(run).root, default)))
    atomic_write_json(path, scores)
    return scores


def build(c: Config) -> Manifest:
    """Train (or resume) + export + verify the candidate; one already exported is not touched."""
    manifest = Layout.of(c).run(c.run_name).read_manifest_or_none()
    if manifest is not None and manifest.status in ("exported", "complete"):
        log.info(f"candidate {c.run_name} is already trained, exported and verified; not retrained")
        return manifest
    done = train_run(c, publish=False)
    assert done is not None  # not a dry run
    return done


def decide(cfg: Config, layout: Layout, run: str, fp: NightInputs) -> tuple[dict[str, Any], Manifest, Config]:
    """The registry line of the decision (not yet written), the candidate's manifest and config."""
    eval_set = load_eval_set(cfg)  # before training: a broken eval set fails in seconds, not after hours
    c = candidate_config(cfg, run)
    manifest = build(c)
    tuned = manifest.artifacts["gguf"]["finetuned"]["files"]
    default = tuned[cfg.export.default_quant]
    scores = scores_of(layout, run, Path(manifest.artifacts["merged"]["path"]), Path(default["path"]), eval_set, cfg)
    champion = releases.live(layout.gguf_dir, cfg.export.name)
    champion_scores = None
    if champion is not None and champion.run != run:
        gguf = champion.folder / default["file"]
        champion_scores = scores_of(layout, champion.run, layout.final_model(champion.run), gguf, eval_set, cfg)
    checks = gates(scores, champion_scores, cfg.nightly, bool(eval_set.tasks))
    passed = all(g.passed for g in checks)
    champion_night = (champion.record.get("nightly") if champion else None) or {}
    line = {
        "event": "night",
        "decision": "promoted" if passed else "rejected",
        "run": run,
        "inputs": fp.digest,
        "inputs_parts": fp.part_digests,
        "changed": fp.changed_since(champion_night.get("inputs_parts")),
        "champion_before": champion.run if champion else None,
        "eval_set": eval_set.digest[:16],
        "scores": {"candidate": scores, "champion": champion_scores},
        "gates": [g.to_json() for g in checks],
        "reason": summary(checks),
        "files": {e["file"]: {"quant": q, "size": e["size"], "sha256": e["sha256"]} for q, e in tuned.items()},
        "exit_code": 0 if passed else EXIT_REJECTED,
    }
    return stamp(cfg, line), manifest, c


def train_and_decide(cfg: Config, layout: Layout, fp: NightInputs, today: date) -> dict[str, Any]:
    """Tonight's candidate built, scored, gated, and published or recorded as rejected; any failure recorded."""
    run = candidate_name(cfg, layout, fp, today)
    champion = releases.live(layout.gguf_dir, cfg.export.name)
    log.info(f"tonight's candidate: {run}" + (f" (the live model: {champion.run})" if champion else " (none is live)"))
    meta = layout.run(run).root / CANDIDATE_FILE
    if not meta.is_file():
        atomic_write_json(meta, {"inputs": fp.digest, "name": cfg.export.name, "parts": fp.parts, "created": now()})
    try:
        record, manifest, c = decide(cfg, layout, run, fp)
        if record["decision"] == "promoted":
            publish_run(c, layout.run(run), manifest, BY, {"inputs": fp.digest, "nightly": record})
            releases.reached("before_record")
        append_line(layout.registry, record)
    except BaseException as e:
        live = releases.live(layout.gguf_dir, cfg.export.name)
        if live is None or live.run != run:  # a failure after the switch is recorded by job_lock next time
            code, message = exit_status(e) or (1, f"{type(e).__name__}: {e}")
            decision = "interrupted" if isinstance(e, (Preempted, KeyboardInterrupt)) else "failed"  # rerun resumes
            line = {"event": "night", "decision": decision, "run": run, "inputs": fp.digest, "exit_code": code}
            append_line(layout.registry, stamp(cfg, line | {"reason": message.splitlines()[0]}))
        raise
    return record


def run_night(cfg: Config, today: date) -> int:
    layout = Layout.of(cfg)
    with job_lock(cfg, layout, "run"):
        fp = night_inputs(cfg)
        why = unchanged(cfg, layout, fp)
        if why is not None:
            live = releases.live(layout.gguf_dir, cfg.export.name)
            line = {"event": "night", "decision": "unchanged", "inputs": fp.digest, "champion": live and live.run}
            append_line(layout.registry, stamp(cfg, line | {"reason": why, "exit_code": 0}))
            log.info(why)
            return 0
        record = train_and_decide(cfg, layout, fp, today)
        report = write_report(layout.run(record["run"]).root, record, registry(layout, cfg.export.name))
        prune(cfg, layout)
    run = record["run"]
    if record["decision"] != "promoted":
        stays = f"{layout.gguf_dir / cfg.export.name}.gguf stays {record['champion_before']}'s"
        raise GateRejected(f"{run}: {record['reason']}; {stays} (report: {report})")
    log.info(f"promoted: {run}: {record['reason']} (report: {report})")
    default = gguf_filename(cfg.export.name, cfg.export.default_quant, cfg.export.default_quant)
    log.info(f"live: {layout.gguf_dir / default} is now {run}'s")
    return 0


# ----------------------------------------------------------------------------- the other verbs


def show_status(cfg: Config, as_json: bool, nights: int) -> int:
    layout = Layout.of(cfg)
    if as_json:
        print(json.dumps(status_json(cfg, layout, nights), indent=2))
    else:
        log.info(status_text(cfg, layout, nights))
    return 0


def roll_back(cfg: Config) -> int:
    """Make the model that was live before the current one live again, byte for byte, and record it."""
    layout = Layout.of(cfg)
    with job_lock(cfg, layout, "rollback"):
        live_ids = releases.stack(layout.gguf_dir, cfg.export.name)
        if len(live_ids) < 2:
            only = f"the only model published is {live_ids[-1]}" if live_ids else "nothing has been published"
            raise RunError(f"no previous model to roll back to: {only} ({layout.gguf_dir}/{cfg.export.name}.gguf)")
        current = live_ids[-1]
        back = releases.publish(layout.gguf_dir, cfg.export.name, "rollback", rollback_to=live_ids[-2])
        append_line(layout.registry, stamp(cfg, {"event": "rollback", "run": back.run, "from_run": current}))
    log.info(f"rolled back: {back.run} is live again (was {current}); recorded in {layout.registry}")
    return 0


def run_prune(cfg: Config, dry_run: bool) -> int:
    layout = Layout.of(cfg)
    with job_lock(cfg, layout, "prune"):
        deleted = prune(cfg, layout, dry_run=dry_run)
    if not deleted:
        log.info("retention: nothing to delete")
    return 0
