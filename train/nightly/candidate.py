"""Tonight's candidate: trained, exported and verified exactly as `python -m train` does, into its own run
folder with its GGUFs kept there (outputs/<run>/gguf/), then scored with the champion on the same eval set.

Imported only on nights that train (train.nightly.night): torch and transformers take seconds to import,
and an unchanged night exits in less.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.export import gguf_filename
from core.config import Config
from core.errors import RunError
from core.files import atomic_write_json
from core.runfolder import Manifest, RunFolder
from train.nightly.evaluate import EvalSet, load_eval_set, score
from train.nightly.places import Places
from train.run import run as train_run

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    run: str
    files: dict[str, dict[str, Any]]  # live file name -> {quant, size, sha256}, as verified
    sources: dict[str, Path]  # live file name -> the verified file in the run folder
    scores: dict[str, Any]
    champion_scores: dict[str, Any] | None
    eval_set: EvalSet


def candidate_config(cfg: Config, places: Places, run: str) -> Config:
    """The config the candidate trains with: its own run name, and GGUFs kept in its run folder (promotion,
    not the export, makes them live). The base model's GGUF is not part of a nightly candidate."""
    c = cfg.model_copy(deep=True)
    c.run_name = run
    c.export.enabled = True
    c.export.export_base = False
    c.export.gguf_dir = str(places.candidate_gguf(run))
    return c


def build(cfg: Config) -> Manifest:
    """Train (or resume) + export + verify; a candidate already complete is not touched."""
    manifest = RunFolder.of(cfg).read_manifest_or_none()
    if manifest is not None and manifest.status == "complete":
        log.info(f"candidate {cfg.run_name} is already trained, exported and verified; not retrained")
        return manifest
    done = train_run(cfg)
    assert done is not None  # not a dry run
    return done


def verified_files(manifest: Manifest) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    entries = manifest.artifacts.get("gguf", {}).get("finetuned", {})
    files = {Path(e["path"]).name: {"quant": q, "size": e["size"], "sha256": e["sha256"]} for q, e in entries.items()}
    return files, {Path(e["path"]).name: Path(e["path"]) for e in entries.values()}


def jsonable(scores: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf as the strings "nan"/"inf": the registry stays strict JSON, and the gates see no number."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in scores.items()}


def cached_scores(places: Places, run: str, model_dir: Path, gguf: Path, eval_set: EvalSet, cfg: Config) -> dict:
    """A run's scores on this eval set, computed once: <state>/scores/<run>.<eval set digest>.json."""
    path = places.scores / f"{run}.{eval_set.digest[:16]}.json"
    if path.is_file():
        log.info(f"scores of {run} on eval set {eval_set.digest[:16]}: cached ({path})")
        return json.loads(path.read_text())
    for p in (model_dir, gguf):
        if not p.exists():
            raise RunError(
                f"cannot score {run}: {p} is missing.\n  fix: restore it, or make another champion live "
                f"(python -m train.nightly rollback)"
            )
    log.info(f"scoring {run} on {len(eval_set.records)} eval records and {len(eval_set.tasks)} task checks")
    scores = jsonable(score(model_dir, gguf, eval_set, cfg))
    atomic_write_json(path, scores)
    return scores


def build_and_score(cfg: Config, places: Places, run: str, champion: str | None) -> Candidate:
    eval_set = load_eval_set(cfg)  # before training: a broken eval set fails in seconds, not after hours
    candidate_cfg = candidate_config(cfg, places, run)
    manifest = build(candidate_cfg)
    files, sources = verified_files(manifest)
    default = gguf_filename(cfg.export.name, cfg.export.default_quant, cfg.export.default_quant)
    scores = cached_scores(places, run, RunFolder.of(candidate_cfg).merged_out, sources[default], eval_set, cfg)
    champion_scores = None
    if champion is not None:
        model, gguf = places.final_model(champion), places.release(champion) / default
        champion_scores = cached_scores(places, champion, model, gguf, eval_set, cfg)
    return Candidate(run, files, sources, scores, champion_scores, eval_set)
