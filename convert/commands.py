"""The verbs of `python -m convert` that load models: export a trained run, verify GGUF files (convert/inputs.py
checks their inputs first; `info` lives there)."""

from __future__ import annotations

import logging

from transformers import AutoTokenizer

from convert.inputs import VerifyInputs
from convert.pipeline import export_run, vouched_adapter
from convert.summary import print_summary
from convert.verify import to_json, to_table, verify_files
from core.config import Config
from core.errors import EXIT_VERIFICATION
from core.files import atomic_write_json
from core.hub import resolve_model
from core.records.heldout import heldout_texts
from core.runfolder import RunFolder

log = logging.getLogger(__name__)


def cmd_export(cfg: Config) -> int:
    paths = RunFolder.of(cfg)
    base = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    with paths.locked():  # not while `train` writes it
        manifest = vouched_adapter(paths)  # only what the run folder vouches for may be promoted
        manifest.status = "exporting"
        paths.write_manifest(manifest)
        manifest = export_run(cfg, paths, base, manifest)
        manifest.status = "complete"
        paths.write_manifest(manifest)
    print_summary(paths, cfg, manifest)
    return 0


def cmd_verify(inputs: VerifyInputs) -> int:
    cfg, model, files, report = inputs.cfg, inputs.model, inputs.files, inputs.report
    texts = []
    if cfg.verify.heldout_files:
        tokenizer = AutoTokenizer.from_pretrained(str(model))
        texts = heldout_texts(
            tokenizer, cfg.verify.heldout_files, cfg.data.system_message, cfg.verify.max_heldout_records
        )
    reports = verify_files(model, files, cfg.verify, texts)
    log.info(to_table(reports))
    if report:
        atomic_write_json(report, to_json(reports))
    failed = [r for r in reports if not r.passed]
    for r in failed:
        log.error(f"FAILED {r.path} [{r.quant}]: " + "; ".join(r.failures()))
    return EXIT_VERIFICATION if failed else 0
