"""The export stage of a run: merge the adapter, export fine-tuned and base GGUFs, verify, record.

Used by `python -m train` after training and by `python -m convert export` on a trained run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from convert.export import (
    ExportResult,
    export_gguf,
    file_entries,
    gguf_filename,
    provenance_metadata,
    write_reports,
)
from convert.llamacpp import version_info
from convert.merge import merge_adapter
from convert.verify import VerificationFailed
from core.config import Config
from core.files import atomic_write_json, hash_tree, sha256_file
from core.hub import ResolvedModel
from core.locks import promotion_lock
from core.records.heldout import heldout_texts
from core.runfolder import Manifest, RunFolder
from core.tokenizer import save_tokenizer

log = logging.getLogger(__name__)


def prepare_base_folder(base_dir: Path, adapter_dir: Path, dest: Path) -> Path:
    """The base weights with the tokenizer the run trained with (chat template included).

    google/gemma-2-2b ships no chat template; exporting the base with the run's tokenizer makes the
    base GGUF comparable with the fine-tuned one (same template, same stop token). Weight files are
    symlinked, not copied.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for p in base_dir.iterdir():
        if p.name.startswith("tokenizer") or p.name in ("special_tokens_map.json", "chat_template.jinja"):
            continue
        link = dest / p.name
        link.unlink(missing_ok=True)
        link.symlink_to(p.resolve())
    save_tokenizer(AutoTokenizer.from_pretrained(str(adapter_dir)), dest, adapter_dir / "tokenizer.model")
    return dest


def _base_export_is_current(cfg, base, sidecar: Path) -> dict | None:
    """The recorded base export, if it was made from this base revision and llama.cpp release and its
    files are intact (a nightly job then skips re-exporting the base)."""
    if not sidecar.is_file():
        return None
    record = json.loads(sidecar.read_text())
    want = {
        "base_revision": base.revision,
        "llama_cpp": version_info(),
        "quants": list(cfg.export.quants),
        "default_quant": cfg.export.default_quant,
        "token_embedding_type": cfg.export.token_embedding_type,
    }
    if any(record.get(k) != v for k, v in want.items()):
        return None
    for entry in record["files"].values():
        p = Path(entry["path"])
        if not p.is_file() or p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            return None
    return record


def export_run(cfg: Config, paths: RunFolder, base: ResolvedModel, manifest: Manifest) -> Manifest:
    """Merge + export + verify for a trained run; updates and returns the manifest.

    Raises VerificationFailed (after writing verify.json/md and the manifest) if any gate fails.
    """
    log.info(f"merging adapter into {base.repo_id or base.path}")
    with promotion_lock(paths.merged_out, cfg.run_name):  # replaced as a whole (atomic_replace_dir)
        merge_adapter(base.path, paths.adapter_out, paths.merged_out)
    manifest.artifacts["merged"] = {"path": str(paths.merged_out), "files": hash_tree(paths.merged_out)}
    tokenizer = AutoTokenizer.from_pretrained(str(paths.merged_out))
    texts = heldout_texts(tokenizer, cfg.verify.heldout_files, cfg.data.system_message, cfg.verify.max_heldout_records)
    export_dir = paths.export_dir
    llama = version_info()
    manifest.llama_cpp = llama
    results: list[ExportResult] = []
    try:
        log.info(f"exporting fine-tuned model as {cfg.export.name} ({', '.join(cfg.export.quants)})")
        adapter_sha = sha256_file(paths.adapter_out / "adapter_model.safetensors")
        results.append(
            export_gguf(
                paths.merged_out,
                cfg.export.name,
                cfg.export,
                cfg.verify,
                export_dir / cfg.export.name,
                provenance_metadata(cfg, base, {"finetune.adapter_sha256": adapter_sha}),
                texts,
            )
        )
        manifest.artifacts["gguf"] = {"finetuned": file_entries(results[0])}
        if cfg.export.export_base:
            sidecar = Path(cfg.export.gguf_dir) / f"{cfg.export.base_name}.export.json"
            current = _base_export_is_current(cfg, base, sidecar)
            if current:
                log.info(f"base GGUF {cfg.export.base_name} is current for revision {base.revision}; not re-exported")
                manifest.artifacts["gguf"]["base"] = current["files"]
            else:
                log.info(f"exporting base model as {cfg.export.base_name}")
                with tempfile.TemporaryDirectory(dir=export_dir) as tmp:
                    folder = prepare_base_folder(base.path, paths.adapter_out, Path(tmp) / "base")
                    base_result = export_gguf(
                        folder,
                        cfg.export.base_name,
                        cfg.export,
                        cfg.verify,
                        export_dir / cfg.export.base_name,
                        provenance_metadata(cfg, base, {}),
                        texts,
                    )
                results.append(base_result)
                entries = file_entries(base_result)
                manifest.artifacts["gguf"]["base"] = entries
                with promotion_lock(Path(cfg.export.gguf_dir) / cfg.export.base_name, cfg.run_name):
                    atomic_write_json(
                        sidecar,
                        {
                            "base_revision": base.revision,
                            "llama_cpp": llama,
                            "quants": list(cfg.export.quants),
                            "default_quant": cfg.export.default_quant,
                            "token_embedding_type": cfg.export.token_embedding_type,
                            "files": entries,
                        },
                    )
    except VerificationFailed as e:
        write_reports(paths.root, [r for x in results for r in x.reports] + e.reports, failed=True)
        manifest.status = "export_failed"
        manifest.verification = {"passed": False, "report": str(paths.verify_md)}
        paths.write_manifest(manifest)
        raise
    write_reports(paths.root, results)
    manifest.verification = {
        "passed": True,
        "report": str(paths.verify_md),
        "files": {Path(r.path).name: r.measures for x in results for r in x.reports},
    }
    manifest.default_gguf = str(
        Path(cfg.export.gguf_dir) / gguf_filename(cfg.export.name, cfg.export.default_quant, cfg.export.default_quant)
    )
    return manifest
