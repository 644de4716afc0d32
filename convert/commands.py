"""The verbs of `python -m convert`: export a trained run, verify GGUF files, show a GGUF's metadata."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoTokenizer

from convert.llamacpp import read_metadata
from convert.pipeline import export_run
from convert.summary import print_summary
from convert.verify import to_json, to_table, verify_files
from core.config import Config, load_config
from core.errors import EXIT_VERIFICATION, RunError
from core.hub import resolve_model
from core.quants import QUANTS, quant_of_file_type
from core.records.heldout import heldout_texts
from core.runfolder import Manifest, RunFolder

log = logging.getLogger(__name__)


def quant_of(path: Path) -> str:
    """Our quant name for a GGUF, from its general.file_type (llama_ftype)."""
    ftype = read_metadata(path).get("general.file_type", 0)  # absent means all-f32
    quant = quant_of_file_type(ftype) if isinstance(ftype, int) else None
    if quant is None:
        raise RunError(f"{path}: file type {ftype} is not one this pipeline exports ({', '.join(QUANTS)})")
    return quant


def cmd_export(args) -> int:
    cfg = load_config(args.config, args.overrides)
    paths = RunFolder.of(cfg)
    if not (paths.adapter_out / "adapter_model.safetensors").is_file():
        raise RunError(
            f"no trained adapter at {paths.adapter_out}: train first (python -m train --config {args.config})"
        )
    base = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    with paths.locked():  # not while `train` writes it
        manifest = paths.read_manifest() or Manifest(status="exporting", run_name=cfg.run_name)
        manifest = export_run(cfg, paths, base, manifest)
        manifest.status = "complete"
        paths.write_manifest(manifest)
    print_summary(paths, cfg, manifest)
    return 0


def cmd_verify(args) -> int:
    cfg = load_config(args.config) if args.config else Config()
    files = [(quant_of(Path(p)), Path(p)) for p in args.gguf]
    texts = []
    if cfg.verify.heldout_files:
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        texts = heldout_texts(
            tokenizer, cfg.verify.heldout_files, cfg.data.system_message, cfg.verify.max_heldout_records
        )
    reports = verify_files(Path(args.model), files, cfg.verify, texts)
    log.info(to_table(reports))
    if args.report:
        Path(args.report).write_text(json.dumps(to_json(reports), indent=2) + "\n")
    failed = [r for r in reports if not r.passed]
    for r in failed:
        log.error(f"FAILED {r.path} [{r.quant}]: " + "; ".join(r.failures()))
    return EXIT_VERIFICATION if failed else 0


def cmd_info(args) -> int:
    for key, value in read_metadata(Path(args.gguf)).items():
        log.info(f"{key}: {value}")
    return 0


COMMANDS = {"export": cmd_export, "verify": cmd_verify, "info": cmd_info}
