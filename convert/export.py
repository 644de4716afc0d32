"""Merged HF model -> f32 GGUF -> quants -> verification (export_gguf), then promotion to models/gguf
(promote_ggufs).

Nothing reaches models/gguf unless every file of the export passed verification; a failed export
stays in the run folder (outputs/<run>/export/) for inspection and the command exits non-zero. An export
stopped for any other reason (SIGINT/SIGTERM, a tool failing) removes its work files: the f32 GGUF of
the 2B model alone is about 10 GB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from convert.llamacpp import add_metadata, convert_hf_to_gguf, quantize, version_info
from convert.verify import FileReport, VerificationFailed, to_json, to_table, verify_files
from core.files import atomic_write_json, atomic_write_text, move_into_place, sha256_file
from core.locks import promotion_lock

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    name: str
    model_dir: Path
    candidates: dict[str, Path] = field(default_factory=dict)  # quant -> verified GGUF in the work folder
    files: dict[str, Path] = field(default_factory=dict)  # quant -> promoted GGUF
    reports: list[FileReport] = field(default_factory=list)


def remove_work_files(work_dir: Path, name: str) -> None:
    """The GGUFs (finished or partial) of an export of `name` in its work folder; convert.log stays."""
    for p in work_dir.glob(f"*{name}.*"):
        if p.is_file() and (p.suffix in (".gguf", ".tmp")):
            p.unlink()


def gguf_filename(name: str, quant: str, default_quant: str) -> str:
    """<name>.gguf for the quant applications load by default, <name>.<quant>.gguf for the others."""
    return f"{name}.gguf" if quant == default_quant else f"{name}.{quant}.gguf"


def export_gguf(
    model_dir: Path,
    name: str,
    export_cfg,
    verify_cfg,
    work_dir: Path,
    provenance: dict[str, str],
    texts: list[str],
) -> ExportResult:
    """Convert one HF folder to every configured GGUF type in work_dir and verify all (promote_ggufs promotes).

    Raises VerificationFailed if a gate fails (the files stay for inspection); any other stop removes them."""
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_work_files(work_dir, name)  # an earlier attempt's files are not this attempt's
    log_path = work_dir / "convert.log"
    f32 = work_dir / f"{name}.f32.gguf"
    files = {"f32": f32}
    try:
        log.info(f"  converting -> {f32.name} (llama.cpp convert_hf_to_gguf.py; log: {log_path})")
        convert_hf_to_gguf(model_dir, f32, "f32", log_path, model_name=name)
        add_metadata(f32, provenance)
        for quant in export_cfg.quants:
            if quant != "f32":
                files[quant] = work_dir / f"{name}.{quant}.gguf"
                log.info(f"  quantizing -> {files[quant].name}")
                quantize(f32, files[quant], quant, export_cfg.token_embedding_type, log_path)
        log.info(f"  verifying {len(files)} file(s) against the HF model they were converted from")
        reports = verify_files(model_dir, list(files.items()), verify_cfg, texts, log_path)
    except BaseException:
        remove_work_files(work_dir, name)
        raise
    if not all(r.passed for r in reports):
        raise VerificationFailed(reports)
    return ExportResult(name, model_dir, candidates=files, reports=reports)


def promote_ggufs(result: ExportResult, export_cfg, run_name: str) -> None:
    """Move verified GGUFs into export.gguf_dir, one rename each; the f32 intermediate is then deleted (unless
    exported or export.keep_f32) and every report names where its file is now, or that it was deleted."""
    gguf_dir = Path(export_cfg.gguf_dir)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    where: dict[str, str | None] = {}
    # one promoter per file stem at a time: two runs exporting the same name would otherwise interleave quants
    with promotion_lock(gguf_dir / result.name, run_name):
        for quant in export_cfg.quants:
            dst = gguf_dir / gguf_filename(result.name, quant, export_cfg.default_quant)
            move_into_place(result.candidates[quant], dst)
            result.files[quant] = dst
            where[str(result.candidates[quant])] = str(dst)
    f32 = result.candidates["f32"]
    if "f32" not in export_cfg.quants and not export_cfg.keep_f32:
        f32.unlink(missing_ok=True)
        where[str(f32)] = None
    for r in result.reports:
        if r.path in where and where[r.path] is None:
            r.notes.append("the f32 intermediate: deleted after verification (export.keep_f32 keeps it)")
            r.path = Path(r.path).name  # no path to a file that is gone
        else:
            r.path = where.get(r.path) or r.path


def provenance_metadata(cfg, base, extra: dict[str, str]) -> dict[str, str]:
    """GGUF keys that tie a file to the llama.cpp release and the training run that made it."""
    info = version_info()
    keys = {
        "finetune.llama_cpp.commit": info.get("llama.cpp", "unknown"),
        "finetune.llama_cpp_python.version": info.get("llama-cpp-python", "unknown"),
        "finetune.base_model": base.repo_id or str(base.path),
        "finetune.base_revision": base.revision or "local",
        "finetune.run_name": cfg.run_name,
    }
    return keys | extra


def gates_text(verify_cfg, quants: list[str]) -> list[str]:
    """The gates applied to these types, one line each, as verify.md states them."""
    lines = []
    for q in quants:
        if q in verify_cfg.max_nmse:
            lines.append(
                f"- {q}: NMSE (last token) <= {verify_cfg.max_nmse[q]:g}, top-1 (last) >= {verify_cfg.min_top1[q]:.0%}"
            )
        elif q in verify_cfg.max_kld:
            lines.append(f"- {q}: mean KLD <= {verify_cfg.max_kld[q]:g}")
    return lines + ["- every type: tokens identical, chat template equal, <end_of_turn> stops generation"]


def write_reports(
    run_dir: Path,
    results: list[ExportResult] | list[FileReport],
    failed: bool = False,
    reference: Path | None = None,
    verify_cfg=None,
) -> None:
    """verify.json (machine-readable) and verify.md (the table, the reference model and the gates) in the run folder."""
    reports = [r for x in results for r in (x.reports if isinstance(x, ExportResult) else [x])]
    passed = not failed and all(r.passed for r in reports)
    atomic_write_json(
        run_dir / "verify.json",
        {"passed": passed, "reference": str(reference) if reference else None, "files": to_json(reports)},
    )
    head = ["# Verification", ""]
    if reference:
        head += [f"Reference: {reference} (Hugging Face, float32, CPU)", ""]
    if verify_cfg is not None:
        head += ["Gates:", *gates_text(verify_cfg, list(dict.fromkeys(r.quant for r in reports))), ""]
    notes = [f"- {Path(r.path).name}: {n}" for r in reports for n in r.notes]
    tail = ["", "Notes:", *notes] if notes else []
    atomic_write_text(run_dir / "verify.md", "\n".join([*head, to_table(reports), *tail]) + "\n")


def file_entries(result: ExportResult) -> dict[str, dict]:
    return {q: {"path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p)} for q, p in result.files.items()}
