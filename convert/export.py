"""The export stage of a run, then its publication.

    export_run   merge the adapter -> the fine-tuned model's GGUFs -> the base model's (unless its live export is
                 current) -> the adapter GGUF -> verify.md; all in the run folder, models/ untouched
    publish_run  the adapter and merged model to models/finetuned/, the verified GGUFs as releases (core/releases.py)

`python -m train` and `python -m convert export` run both; the nightly job runs export_run with training, and
publish_run only when its gates pass.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from convert.ggufs import ModelGGUFs, export_ggufs, gguf_filename
from convert.llamacpp import version_info
from convert.lora_gguf import export_lora_gguf
from convert.merge import is_tokenizer_file, merge_adapter
from convert.modelfile import write_modelfile
from convert.verify import FileReport, MergeCheck, VerificationFailed, verify_merge, write_reports
from core import releases
from core.config import BASE_EXPORT, Config, keys_affecting
from core.errors import PipelineError, RunError
from core.files import atomic_replace_dir, differences, move_dir_into_place, record_files, sha256_file
from core.hub import ResolvedModel
from core.locks import promotion_lock
from core.records.heldout import MAX_TRAINING_RECORDS, HeldOut, heldout_records, render_records
from core.runfolder import TRAINED, Manifest, RunFolder
from core.tokenizer import save_tokenizer

log = logging.getLogger(__name__)


def vouched_adapter(folder: RunFolder) -> Manifest:
    """The run's manifest, if it vouches for the adapter in the run folder: training finished and every adapter file
    has the sha256 recorded when training ended. Only then may it be exported and published: the run folder is the
    only witness of what was trained (models/finetuned/adapters/<run> may hold an older run's adapter)."""
    manifest = folder.read_manifest()
    status = manifest.status if manifest else "no manifest"
    if manifest is None or manifest.status not in TRAINED:
        raise RunError(
            f"{folder.root} has no finished training to export (status: {status}).\n"
            f"  fix: run the training to its end first (python -m train --config ...); it exports by itself"
        )
    recorded = (manifest.artifacts.get("adapter") or {}).get("files") or {}
    changed = differences(recorded, folder.adapter, str(folder.manifest), exact=True) if recorded else ["no record"]
    if changed:
        raise RunError(
            f"{folder.adapter} is not the adapter {folder.manifest} records ({'; '.join(changed)}); "
            f"refusing to export an adapter the run cannot vouch for.\n"
            f"  fix: run the training again (python -m train --config ...; add --fresh to start over)"
        )
    return manifest


def scored_inputs(cfg: Config, tokenizer) -> tuple[list[HeldOut], list[list[int]]]:
    """(held-out records, training records' ids) for an export whose training is not in memory (`python -m convert
    export`): rendered as the run's data stage renders them (train.data.load_data hands them on otherwise)."""
    heldout = heldout_records(tokenizer, cfg)
    try:
        training = render_records(
            tokenizer, cfg, [s.path for s in cfg.data.train_files], MAX_TRAINING_RECORDS, "data.train_files"
        )
    except PipelineError as e:  # training skipped invalid records (data.max_invalid_fraction); filler is optional
        log.warning(f"  training data not used for verification/calibration: {str(e).splitlines()[0]}")
        training = []
    return heldout, [r.ids for r in training]


# ----------------------------------------------------------------------------- export
def export_run(
    cfg: Config,
    folder: RunFolder,
    base: ResolvedModel,
    manifest: Manifest,
    heldout: list[HeldOut],
    training: list[list[int]],
) -> Manifest:
    """Merge + export + verify a trained run in its run folder; the manifest then says `exported` and names every
    verified file. Raises VerificationFailed (after writing verify.json/md and the manifest: export_failed) if any
    gate fails; any other stop removes the work files."""
    merged = folder.export_dir / "merged"
    manifest.llama_cpp = version_info()
    models: list[ModelGGUFs] = []
    check: MergeCheck | None = None
    try:
        check = _merge(cfg, folder, base, heldout, training, merged)
        log.info(f"exporting fine-tuned model as {cfg.export.name} ({', '.join(cfg.export.quants)})")
        adapter_sha = sha256_file(folder.adapter / "adapter_model.safetensors")
        keys = provenance(cfg, base) | {"finetune.adapter_sha256": adapter_sha}
        models.append(export_ggufs(cfg, merged, cfg.export.name, folder.export_dir, keys, heldout, training, check))
        current = current_base_export(cfg, base)
        if cfg.export.export_base and current is None:
            models.append(_export_base(cfg, folder, base, heldout, training))
        elif current is not None:
            log.info(f"base GGUF {cfg.export.base_name} is current ({current.run}, revision {base.revision})")
        lora = _export_lora(cfg, folder, base, merged, models, current, [r.ids for r in heldout] or training, keys)
    except VerificationFailed as e:
        groups = {"merge": check.reports if check else []} | {m.name: m.reports for m in models} | {"": e.reports}
        write_reports(folder.root, groups, cfg.verify, passed=False)
        manifest.status = "export_failed"
        manifest.verification = {"passed": False, "report": str(folder.verify_md)}
        folder.write_manifest(manifest)
        raise
    except BaseException:
        shutil.rmtree(merged, ignore_errors=True)  # interrupted or failed: no 5 GB of work files left
        raise
    _drop_float_intermediates(cfg, models)
    for m in models:  # the reports name each file as it ships (<name>.gguf is the default quant)
        names = {str(p): gguf_filename(m.name, q, cfg.export.default_quant) for q, p in m.files.items()}
        for r in m.reports:
            r.path = names.get(r.path, r.path)
    groups = {"merge": check.reports} | {m.name: m.reports for m in models}
    written = write_reports(folder.root, groups, cfg.verify, True, folder.merged_out.absolute())
    art = manifest.artifacts
    art["merged"] = {"path": str(merged), "files": record_files(merged), "into": check.way}
    art["gguf"] = {label: _entries(cfg, m) for label, m in zip(("finetuned", "base"), models, strict=False)}
    if current is not None:
        art["gguf"]["base"] = {"name": cfg.export.base_name, "release": current.id, "files": current.record["quants"]}
    art.pop("lora_gguf", None)  # an earlier export's: publish_run would move its published link into this release
    if lora is not None:
        art["lora_gguf"] = {
            "path": lora.path if lora.passed else None,
            "type": lora.quant,
            "passed": lora.passed,
            "check": lora.reference,
            "measures": lora.measures,
            "summary": lora.describe(),
        }
    manifest.verification = {
        "passed": True,
        "report": str(folder.verify_md),
        "files": {Path(r.path).name: r.measures for m in models for r in m.reports},
        "merge": {r.path: r.measures for r in check.reports},
        "recommended": written["recommended"],
    }
    manifest.status = "exported"
    folder.write_manifest(manifest)
    return manifest


def _merge(
    cfg: Config, folder: RunFolder, base: ResolvedModel, heldout: list[HeldOut], training: list[list[int]], out: Path
) -> MergeCheck:
    """The merge check (convert.verify.verify_merge), then the way it chose written to `out`. VerificationFailed,
    with nothing written, when that way is not within verify.max_merge_kld."""
    log.info("checking the merge against the model as trained")
    folder.export_dir.mkdir(parents=True, exist_ok=True)  # its reference logits are kept there between merges
    check = verify_merge(
        base.path, folder.adapter, cfg.model.load_in_4bit, cfg.verify, heldout, training, folder.export_dir
    )
    if not all(r.passed for r in check.reports):
        raise VerificationFailed(check.reports)
    log.info(f"merging adapter into {check.way}: {base.repo_id or base.path}")
    merge_adapter(base.path, folder.adapter, out, check.nf4)
    return check


def _drop_float_intermediates(cfg: Config, models: list[ModelGGUFs]) -> None:
    """The float GGUF the quants were made from, deleted unless export.quants lists it or export.keep_float (the
    2B's is 5 GB); its report says so."""
    for m in models:
        if m.float_type in cfg.export.quants or cfg.export.keep_float:
            continue
        path = m.files.pop(m.float_type)
        path.unlink(missing_ok=True)
        for r in m.reports:
            if r.path == str(path):
                r.path = path.name  # no path to a file that is gone
                r.notes.append(
                    f"the {m.float_type} intermediate: deleted after verification (export.keep_float keeps it)"
                )


def provenance(cfg: Config, base: ResolvedModel) -> dict[str, str]:
    """GGUF keys that tie a file to the llama.cpp release and the training run that made it."""
    info = version_info()
    return {
        "finetune.llama_cpp.commit": info.get("llama.cpp", "unknown"),
        "finetune.llama_cpp_python.version": info.get("llama-cpp-python", "unknown"),
        "finetune.base_model": base.repo_id or str(base.path),
        "finetune.base_revision": base.revision or "local",
        "finetune.run_name": cfg.run_name,
    }


def _entries(cfg: Config, model: ModelGGUFs) -> dict[str, Any]:
    """A model's exported files, by quant: the work file, its record, and the name it is published under."""
    files = {
        q: {"file": gguf_filename(model.name, q, cfg.export.default_quant), "path": str(p)}
        | {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for q, p in model.files.items()
        if q in cfg.export.quants
    }
    return {"name": model.name, "release": None, "files": files}


def base_export_keys(cfg: Config, base_revision: str | None) -> dict[str, Any]:
    """What the base model's GGUFs are made from: its revision, the llama.cpp release, the export settings."""
    return {"base_revision": base_revision, "llama_cpp": version_info(), **keys_affecting(cfg, BASE_EXPORT)}


def current_base_export(cfg: Config, base: ResolvedModel) -> releases.Release | None:
    """The live base release, if it was made from this base revision, llama.cpp release and export settings and its
    files are intact: then the base is not exported again."""
    if not cfg.export.export_base:
        return None
    found = releases.live(Path(cfg.export.gguf_dir), cfg.export.base_name)
    if found is None or found.record.get("export") != base_export_keys(cfg, base.revision) or found.problems():
        return None
    return found


def _export_base(
    cfg: Config, folder: RunFolder, base: ResolvedModel, heldout: list[HeldOut], training: list[list[int]]
) -> ModelGGUFs:
    """The base model's GGUFs, exported with the run's tokenizer (weights linked, not copied): google/gemma-2-2b
    ships no chat template, and the base GGUF is comparable with the fine-tuned one only with the same template."""
    staged = folder.export_dir / "base_model"  # a fixed name: the console shows no temporary folders
    shutil.rmtree(staged, ignore_errors=True)
    log.info(f"exporting base model as {cfg.export.base_name}")
    try:
        staged.mkdir(parents=True)
        for p in base.path.iterdir():
            if not is_tokenizer_file(p):
                (staged / p.name).symlink_to(p.resolve())
        tokenizer = AutoTokenizer.from_pretrained(str(folder.adapter))
        save_tokenizer(tokenizer, staged, folder.adapter / "tokenizer.model")
        keys = provenance(cfg, base)
        return export_ggufs(cfg, staged, cfg.export.base_name, folder.export_dir, keys, heldout, training)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _export_lora(
    cfg: Config,
    folder: RunFolder,
    base: ResolvedModel,
    merged: Path,
    models: list[ModelGGUFs],
    current: releases.Release | None,
    ids: list[list[int]],
    keys: dict[str, str],
) -> FileReport | None:
    """The adapter as <name>.lora.gguf beside the fine-tuned GGUFs, with the fine-tuned GGUFs' provenance `keys`,
    checked on a base GGUF of their float type when there is one (this export's, or the live base release's). Not
    shipped when its check fails (a warning: the model GGUFs are fine)."""
    if not cfg.export.lora_gguf:
        return None
    tuned = models[0]
    float_file = gguf_filename(cfg.export.base_name, tuned.float_type, cfg.export.default_quant)
    if len(models) > 1 and tuned.float_type in models[1].files:
        base_gguf: Path | None = models[1].files[tuned.float_type]
    elif current is not None and float_file in current.files:
        base_gguf = current.folder / float_file
    else:
        base_gguf = None
    merged_gguf = tuned.files[tuned.float_type]
    out = merged_gguf.with_name(f"{tuned.name}.lora.gguf")
    how = "on the base GGUF" if base_gguf else "by removing it from the merged GGUF (no base GGUF of its type)"
    log.info(f"  adapter -> {out.name} (convert_lora_to_gguf.py), checked {how}")
    log_path, device = out.parent / "convert.log", cfg.verify.device
    report = export_lora_gguf(
        folder.adapter, base.path, merged, merged_gguf, tuned.float_type, out, ids, log_path, base_gguf, keys, device
    )
    if not report.passed:
        log.warning(f"adapter GGUF not shipped: {report.describe()}")
    return report


# ----------------------------------------------------------------------------- publish
def publish_run(
    cfg: Config, folder: RunFolder, manifest: Manifest, by: str = "python -m train", meta: dict | None = None
) -> Manifest:
    """Make an exported run's artifacts the ones applications use: the adapter and merged model to
    models/finetuned/, the fine-tuned GGUFs (with the adapter GGUF and a Modelfile per model GGUF) and a base export
    made by this run as releases (core/releases.py); `meta` goes into the fine-tuned release's record. Stopped
    midway, each target is whole and the manifest still says `exported`: publishing again finishes it. A complete
    run whose release another has replaced (the nightly job promoting it again) is published as a new release."""
    art = manifest.artifacts
    with promotion_lock(folder.adapter_out, cfg.run_name):
        atomic_replace_dir(folder.adapter, folder.adapter_out)
    art["adapter"]["path"] = str(folder.adapter_out)
    merged = Path(art["merged"]["path"])
    if merged != folder.merged_out and (merged.exists() or not folder.merged_out.is_dir()):  # else moved already
        with promotion_lock(folder.merged_out, cfg.run_name):
            move_dir_into_place(merged, folder.merged_out)
    art["merged"]["path"] = str(folder.merged_out)
    gguf_dir = Path(cfg.export.gguf_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(folder.adapter))
    lora = art.get("lora_gguf")
    for label, export in art["gguf"].items():
        live = releases.live(gguf_dir, export["name"])
        if export["release"] is not None and (label == "base" or (live is not None and live.id == export["release"])):
            continue  # the live base export, reused (or published already); this run's release, live
        files = {e["file"]: _finished(gguf_dir, folder, export["name"], e) for e in export["files"].values()}
        for file, path in list(files.items()):
            files[f"{Path(file).stem}.Modelfile"] = write_modelfile(path, file, tokenizer)
        published = {q: e | {"path": str(gguf_dir / e["file"])} for q, e in export["files"].items()}
        record = {"by": by, "manifest": str(folder.manifest), "quants": published}
        if label == "finetuned":
            if lora and lora["path"]:
                lora_file = f"{export['name']}.lora.gguf"
                files[lora_file] = _finished(gguf_dir, folder, export["name"], {"file": lora_file} | lora)
                lora["path"] = str(gguf_dir / lora_file)
            record |= meta or {}
        else:
            record["export"] = base_export_keys(cfg, (manifest.base_model or {}).get("revision"))
        export["release"] = releases.publish(gguf_dir, export["name"], cfg.run_name, files, record).id
        export["files"] = published
    default = gguf_filename(cfg.export.name, cfg.export.default_quant, cfg.export.default_quant)
    manifest.default_gguf = str(gguf_dir / default)
    manifest.status = "complete"
    folder.write_manifest(manifest)
    return manifest


def _finished(gguf_dir: Path, folder: RunFolder, name: str, entry: dict[str, Any]) -> Path:
    """The finished file to publish as entry["file"]: the export's work file; or, when a publish of this run moved
    it into a release already (stopped before the manifest said so, or a complete run published again), a link to
    the release's copy with the sha256 the export recorded."""
    path = Path(entry["path"])
    if path.is_file() and not path.is_symlink():
        return path
    for release_id in reversed(releases.release_ids(gguf_dir, name)):
        found = releases.release(gguf_dir, name, release_id)
        if found is None or found.run != folder.run_name:
            continue
        recorded = found.files.get(entry["file"])
        if recorded and recorded["sha256"] == entry.get("sha256", recorded["sha256"]):
            work = folder.export_dir / name / entry["file"]  # work files are <name>.<quant>.gguf: none has this name
            work.parent.mkdir(parents=True, exist_ok=True)
            work.unlink(missing_ok=True)
            try:
                os.link(found.folder / entry["file"], work)
            except OSError:  # another volume
                shutil.copyfile(found.folder / entry["file"], work)
            return work
    return path  # missing: the publication says so
