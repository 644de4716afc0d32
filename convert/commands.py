"""The verbs of `python -m convert` that load models: export a trained run, verify GGUF files (convert/__main__.py
checks their inputs first; `info` needs no model and lives there)."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer

from convert.export import export_run, publish_run, scored_inputs, vouched_adapter
from convert.summary import print_summary
from convert.verify import to_json, to_table, verify_files
from core.config import Config
from core.errors import EXIT_VERIFICATION
from core.files import atomic_write_json
from core.hub import resolve_model
from core.locks import publisher_lock
from core.records.heldout import heldout_records
from core.runfolder import RunFolder

log = logging.getLogger(__name__)


def cmd_export(cfg: Config) -> int:
    paths = RunFolder.of(cfg)
    base = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    vouched_adapter(paths)  # before the lock: a run that never trained gets no folder (and no .lock) made for it
    gguf_dir = Path(cfg.export.gguf_dir)
    with paths.locked(), publisher_lock(gguf_dir, cfg.export.name, cfg.run_name, exclusive=False):
        manifest = vouched_adapter(paths)  # only what the run folder vouches for may be published
        manifest.status = "exporting"
        paths.write_manifest(manifest)
        heldout, training = scored_inputs(cfg, AutoTokenizer.from_pretrained(str(paths.adapter)))
        manifest = export_run(cfg, paths, base, manifest, heldout, training)
        manifest = publish_run(cfg, paths, manifest)
    print_summary(paths, cfg, manifest)
    return 0


def cmd_verify(cfg: Config, model: Path, files: list[tuple[str, Path]], report: Path | None) -> int:
    heldout = heldout_records(AutoTokenizer.from_pretrained(str(model)), cfg)
    reports = verify_files(model, files, cfg.verify, heldout)
    log.info(to_table(reports))
    if report:
        atomic_write_json(report, to_json(reports))
    failed = [r for r in reports if not r.passed]
    for r in failed:
        log.error(f"FAILED {r.path} [{r.quant}]: " + "; ".join(r.failures()))
    return EXIT_VERIFICATION if failed else 0
