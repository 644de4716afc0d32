"""Adapter -> merged HF model -> f32 GGUF -> quants -> verification -> promotion to models/gguf.

Nothing reaches models/gguf unless every file of the export passed verification; a failed export
stays in the run folder (outputs/<run>/export/) for inspection and the command exits non-zero.
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
    files: dict[str, Path] = field(default_factory=dict)  # quant -> promoted GGUF
    reports: list[FileReport] = field(default_factory=list)


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
    """Convert one HF folder to every configured GGUF type, verify all, promote only if all pass."""
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "convert.log"
    f32 = work_dir / f"{name}.f32.gguf"
    log.info(f"  converting {model_dir} -> {f32.name} (llama.cpp convert_hf_to_gguf.py; log: {log_path})")
    convert_hf_to_gguf(model_dir, f32, "f32", log_path, model_name=name)
    add_metadata(f32, provenance)
    files = {"f32": f32}
    for quant in export_cfg.quants:
        if quant != "f32":
            files[quant] = work_dir / f"{name}.{quant}.gguf"
            log.info(f"  quantizing -> {files[quant].name}")
            quantize(f32, files[quant], quant, export_cfg.token_embedding_type, log_path)
    log.info(f"  verifying {len(files)} file(s) against {model_dir}")
    reports = verify_files(model_dir, list(files.items()), verify_cfg, texts, log_path)
    result = ExportResult(name, model_dir, reports=reports)
    if not all(r.passed for r in reports):
        raise VerificationFailed(reports)
    gguf_dir = Path(export_cfg.gguf_dir)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    # one promoter per file stem at a time (models/gguf/.<name>.lock): two runs exporting the same name
    # would otherwise interleave their quants
    with promotion_lock(gguf_dir / name, provenance.get("finetune.run_name", "?")):
        for quant in export_cfg.quants:
            dst = gguf_dir / gguf_filename(name, quant, export_cfg.default_quant)
            move_into_place(files[quant], dst)
            result.files[quant] = dst
            for r in reports:  # report where the verified file now lives
                if r.path == str(files[quant]):
                    r.path = str(dst)
    if "f32" not in export_cfg.quants and not export_cfg.keep_f32:
        f32.unlink()
    return result


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


def write_reports(run_dir: Path, results: list[ExportResult] | list[FileReport], failed: bool = False) -> None:
    """verify.json (machine-readable) and verify.md (the table) in the run folder."""
    reports = [r for x in results for r in (x.reports if isinstance(x, ExportResult) else [x])]
    atomic_write_json(
        run_dir / "verify.json", {"passed": not failed and all(r.passed for r in reports), "files": to_json(reports)}
    )
    atomic_write_text(run_dir / "verify.md", "# Verification\n\n" + to_table(reports) + "\n")


def file_entries(result: ExportResult) -> dict[str, dict]:
    return {q: {"path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p)} for q, p in result.files.items()}
