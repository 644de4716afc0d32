"""The export stage of a run: merge the adapter, export fine-tuned and base GGUFs, verify, record.

Used by `python -m train` after training and by `python -m convert export` on a trained run.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from convert.export import (
    ExportResult,
    export_gguf,
    file_entries,
    gguf_filename,
    promote_ggufs,
    provenance_metadata,
    write_reports,
)
from convert.llamacpp import version_info
from convert.lora_gguf import LoraReport, export_run_lora, promote_lora
from convert.merge import merge_adapter
from convert.modelfile import write_modelfiles
from convert.verify import VerificationFailed, recommend
from core.config import Config
from core.errors import PipelineError, RunError
from core.files import (
    atomic_replace_dir,
    atomic_write_json,
    differences,
    move_dir_into_place,
    record_files,
    sha256_file,
)
from core.hub import ResolvedModel
from core.locks import promotion_lock
from core.records.heldout import heldout_texts
from core.runfolder import Manifest, RunFolder
from core.tokenizer import save_tokenizer

log = logging.getLogger(__name__)

# Training records read for the importance matrix and to fill the scored set (rendering is seconds; the
# imatrix keeps its own token budget, the scored set stops at verify.min_scored_tokens).
MAX_TRAINING_RECORDS = 512


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
        "float_type": cfg.export.float_type,
        "imatrix": cfg.export.imatrix,
    }
    if any(record.get(k) != v for k, v in want.items()):
        return None
    for entry in record["files"].values():
        p = Path(entry["path"])
        if not p.is_file() or p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            return None
    return record


def vouched_adapter(paths: RunFolder) -> Manifest:
    """The run's manifest, if it vouches for the adapter in the run folder: training finished (status exporting,
    export_failed or complete) and every adapter file has the sha256 recorded when training ended.

    Only then may the adapter be exported and promoted: models/finetuned/adapters/<run> may hold an older run's
    adapter (a --fresh run interrupted mid-training), and the run folder is the only witness of what was trained."""
    manifest = paths.read_manifest()
    status = manifest.status if manifest else "no manifest"
    if manifest is None or manifest.status not in ("exporting", "export_failed", "complete"):
        raise RunError(
            f"{paths.root} has no finished training to export (status: {status}).\n"
            f"  fix: run the training to its end first (python -m train --config ...); it exports by itself"
        )
    recorded = (manifest.artifacts.get("adapter") or {}).get("files") or {}
    changed = differences(recorded, paths.adapter, str(paths.manifest), exact=True) if recorded else ["no record"]
    if changed:
        raise RunError(
            f"{paths.adapter} is not the adapter {paths.manifest} records ({'; '.join(changed)}); "
            f"refusing to export an adapter the run cannot vouch for.\n"
            f"  fix: run the training again (python -m train --config ...; add --fresh to start over)"
        )
    return manifest


def promote_adapter(paths: RunFolder) -> None:
    """The run folder's adapter to models/finetuned/adapters/<run>, swapped in whole."""
    with promotion_lock(paths.adapter_out, paths.run_name):
        atomic_replace_dir(paths.adapter, paths.adapter_out)


def verification_texts(cfg: Config, tokenizer) -> tuple[list[str], list[str]]:
    """(held-out texts, training texts): verify.heldout_files and data.eval_files, scored in full; the training
    data, the importance matrix's calibration text and the filler of verify.min_scored_tokens."""
    heldout_paths = list(cfg.verify.heldout_files) + [s.path for s in cfg.data.eval_files]
    heldout = heldout_texts(tokenizer, heldout_paths, cfg.data.system_message, cfg.verify.max_heldout_records)
    try:
        training = heldout_texts(
            tokenizer, [s.path for s in cfg.data.train_files], cfg.data.system_message, MAX_TRAINING_RECORDS
        )
    except PipelineError as e:  # training skipped invalid records (data.max_invalid_fraction); filler is optional
        log.warning(f"  training data not used for verification/calibration: {str(e).splitlines()[0]}")
        training = []
    return heldout, training


def _export_base(
    cfg: Config, paths: RunFolder, base: ResolvedModel, texts: list[str], training: list[str]
) -> ExportResult | None:
    """The base model's GGUFs, unless the recorded base export is current (then None)."""
    folder = paths.export_dir / "base_model"  # a fixed name: the console shows no temporary folders
    shutil.rmtree(folder, ignore_errors=True)
    log.info(f"exporting base model as {cfg.export.base_name}")
    try:
        prepare_base_folder(base.path, paths.adapter, folder)
        return export_gguf(
            folder,
            cfg.export.base_name,
            cfg.export,
            cfg.verify,
            paths.export_dir / cfg.export.base_name,
            provenance_metadata(cfg, base, {}),
            texts,
            training,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _promote(cfg: Config, paths: RunFolder, staged_merged: Path, results: list[ExportResult], sidecar: dict | None):
    """models/ changes here and only here, after every gate passed: adapter, merged model, fine-tuned GGUFs, base
    GGUFs. Stopped before the first rename, models/ is as it was; stopped later, each target is whole (old or new)
    and the manifest still says `exporting`, so the same command exports and promotes again."""
    promote_adapter(paths)
    with promotion_lock(paths.merged_out, cfg.run_name):
        move_dir_into_place(staged_merged, paths.merged_out)
    for result in results:
        promote_ggufs(result, cfg.export, cfg.run_name)
    if sidecar is not None:
        sidecar["files"] = file_entries(results[-1])
        target = Path(cfg.export.gguf_dir) / cfg.export.base_name
        with promotion_lock(target, cfg.run_name):
            atomic_write_json(target.with_name(f"{cfg.export.base_name}.export.json"), sidecar)


def _promote_lora_and_modelfiles(
    cfg: Config, results: list[ExportResult], lora: LoraReport | None, tokenizer
) -> dict | None:
    """After _promote: the verified adapter GGUF, and an Ollama Modelfile next to every promoted GGUF. Returns the
    manifest's record of the adapter GGUF (None when export.lora_gguf is off): where it went, or why it did not."""
    promoted = promote_lora(lora, Path(cfg.export.gguf_dir), cfg.export.name, cfg.run_name)
    for result in results:
        write_modelfiles(result.files.values(), tokenizer)
    if lora is None:
        return None
    return {
        "path": str(promoted) if promoted else None,
        "size": promoted.stat().st_size if promoted else None,
        "type": lora.outtype,
        "passed": lora.passed,
        "check": lora.against,
        "measures": lora.measures,
        "summary": lora.describe(),
    }


def export_run(cfg: Config, paths: RunFolder, base: ResolvedModel, manifest: Manifest) -> Manifest:
    """Merge + export + verify a trained run in its run folder, then promote; updates and returns the manifest.

    Raises VerificationFailed (after writing verify.json/md and the manifest) if any gate fails: nothing is promoted.
    """
    staged_merged = paths.export_dir / "merged"
    llama = version_info()
    manifest.llama_cpp = llama
    results: list[ExportResult] = []
    try:
        log.info(f"merging adapter into {base.repo_id or base.path}")
        merge_adapter(base.path, paths.adapter, staged_merged)
        tokenizer = AutoTokenizer.from_pretrained(str(staged_merged))
        texts, training = verification_texts(cfg, tokenizer)
        log.info(f"exporting fine-tuned model as {cfg.export.name} ({', '.join(cfg.export.quants)})")
        adapter_sha = sha256_file(paths.adapter / "adapter_model.safetensors")
        results.append(
            export_gguf(
                staged_merged,
                cfg.export.name,
                cfg.export,
                cfg.verify,
                paths.export_dir / cfg.export.name,
                provenance_metadata(cfg, base, {"finetune.adapter_sha256": adapter_sha}),
                texts,
                training,
            )
        )
        sidecar_path = Path(cfg.export.gguf_dir) / f"{cfg.export.base_name}.export.json"
        current = _base_export_is_current(cfg, base, sidecar_path) if cfg.export.export_base else None
        sidecar = None
        if cfg.export.export_base and current is None:
            base_result = _export_base(cfg, paths, base, texts, training)
            if base_result is not None:
                results.append(base_result)
                sidecar = {
                    "base_revision": base.revision,
                    "llama_cpp": llama,
                    "quants": list(cfg.export.quants),
                    "default_quant": cfg.export.default_quant,
                    "token_embedding_type": cfg.export.token_embedding_type,
                    "float_type": cfg.export.float_type,
                    "imatrix": cfg.export.imatrix,
                }
        elif current:
            log.info(f"base GGUF {cfg.export.base_name} is current for revision {base.revision}; not re-exported")
        # --- the adapter as a GGUF and Ollama Modelfiles (convert/lora_gguf.py, convert/modelfile.py) ---
        lora = export_run_lora(paths.adapter, base.path, results, texts or training) if cfg.export.lora_gguf else None
    except VerificationFailed as e:
        write_reports(paths.root, [r for x in results for r in x.reports] + e.reports, True, staged_merged, cfg.verify)
        manifest.status = "export_failed"
        manifest.verification = {"passed": False, "report": str(paths.verify_md)}
        paths.write_manifest(manifest)
        raise
    except BaseException:
        shutil.rmtree(staged_merged, ignore_errors=True)  # interrupted or failed: no 5 GB of work files left
        raise
    merged_files = record_files(staged_merged)
    _promote(cfg, paths, staged_merged, results, sidecar)
    lora_record = _promote_lora_and_modelfiles(cfg, results, lora, tokenizer)
    if lora_record is not None:
        manifest.artifacts["lora_gguf"] = lora_record
    manifest.artifacts["adapter"] = {"path": str(paths.adapter_out), "files": record_files(paths.adapter)}
    manifest.artifacts["merged"] = {"path": str(paths.merged_out), "files": merged_files}
    manifest.artifacts["gguf"] = {"finetuned": file_entries(results[0])}
    if len(results) > 1:
        manifest.artifacts["gguf"]["base"] = file_entries(results[1])
    elif current is not None:
        manifest.artifacts["gguf"]["base"] = current["files"]
    write_reports(paths.root, results, reference=paths.merged_out.absolute(), verify_cfg=cfg.verify)
    best = {x.name: recommend(x.reports, cfg.verify.recommend_max_kld) for x in results}
    manifest.verification = {
        "passed": True,
        "report": str(paths.verify_md),
        "files": {Path(r.path).name: r.measures for x in results for r in x.reports},
        "recommended": {name: (r.path if r else None) for name, r in best.items()},
    }
    manifest.default_gguf = str(
        Path(cfg.export.gguf_dir) / gguf_filename(cfg.export.name, cfg.export.default_quant, cfg.export.default_quant)
    )
    return manifest
