"""Merged HF model -> float GGUF -> (importance matrix) -> quants -> verification (export_gguf), then promotion
to models/gguf (promote_ggufs).

The float GGUF is written straight in export.float_type (bf16 for a bf16 base: exact, and half an f32 file's
bytes), with the run's provenance keys written by the converter itself; every quant is made from it. Every file
is scored against the HF model (convert/verify.py). Nothing reaches models/gguf unless every file of
the export passed verification; a failed export stays in the run folder (outputs/<run>/export/) for
inspection and the command exits non-zero. An export stopped for any other reason (SIGINT/SIGTERM, a tool
failing) removes its work files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from convert.imatrix import compute_imatrix
from convert.llamacpp import convert_hf_to_gguf, quantize, version_info
from convert.verify import (
    FileReport,
    VerificationFailed,
    recommend,
    recommendation_line,
    to_json,
    to_table,
    verify_files,
)
from core.files import atomic_write_json, atomic_write_text, move_into_place, sha256_file
from core.locks import promotion_lock
from core.quants import QUANTS, float_gguf_type

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    name: str
    model_dir: Path
    float_type: str  # the float GGUF converted first: the quants' source and reference
    candidates: dict[str, Path] = field(default_factory=dict)  # quant -> verified GGUF in the work folder
    files: dict[str, Path] = field(default_factory=dict)  # quant -> promoted GGUF
    reports: list[FileReport] = field(default_factory=list)


def remove_work_files(work_dir: Path, name: str) -> None:
    """The GGUFs (finished or partial, the importance matrix too) of an export of `name` in its work folder;
    convert.log stays."""
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
    training_texts: list[str] | None = None,
) -> ExportResult:
    """Convert one HF folder to every configured GGUF type in work_dir and verify all (promote_ggufs promotes).

    texts: held-out texts, scored in full; training_texts: the run's training data, the importance matrix's
    calibration text and the scored set's filler up to verify.min_scored_tokens.
    Raises VerificationFailed if a gate fails (the files stay for inspection); any other stop removes them."""
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_work_files(work_dir, name)  # an earlier attempt's files are not this attempt's
    log_path = work_dir / "convert.log"
    float_type = float_gguf_type(export_cfg.float_type, export_cfg.quants, model_dir)
    source = work_dir / f"{name}.{float_type}.gguf"
    files = {float_type: source}
    try:
        log.info(f"  converting -> {source.name} (llama.cpp convert_hf_to_gguf.py; log: {log_path})")
        convert_hf_to_gguf(model_dir, source, float_type, log_path, model_name=name, metadata=provenance)
        imatrix = None
        if export_cfg.imatrix and any(not QUANTS[q].is_float and q != "q8_0" for q in export_cfg.quants):
            calibration = training_texts or texts
            log.info(f"  importance matrix from {len(calibration)} record(s) (llama-imatrix; log: {log_path})")
            imatrix = compute_imatrix(source, calibration, work_dir / f"{name}.imatrix.gguf", log_path)
        for quant in export_cfg.quants:
            if quant != float_type:
                files[quant] = work_dir / f"{name}.{quant}.gguf"
                log.info(f"  quantizing -> {files[quant].name}" + (" (importance matrix)" if imatrix else ""))
                weights = None if QUANTS[quant].is_float else imatrix
                quantize(source, files[quant], quant, export_cfg.token_embedding_type, log_path, imatrix=weights)
        log.info(f"  verifying {len(files)} file(s) against the HF model, one at a time")
        reports = verify_files(
            model_dir,
            list(files.items()),
            verify_cfg,
            texts,
            log_path,
            fallback_texts=training_texts or (),
            scratch_dir=work_dir,  # the reference's logits between files (2.1 GB at 2,048 positions), unnamed
        )
    except BaseException:
        remove_work_files(work_dir, name)
        raise
    if not all(r.passed for r in reports):
        raise VerificationFailed(reports)
    return ExportResult(name, model_dir, float_type, candidates=files, reports=reports)


def promote_ggufs(result: ExportResult, export_cfg, run_name: str) -> None:
    """Move verified GGUFs into export.gguf_dir, one rename each; the float GGUF is then deleted (unless exported
    or export.keep_float) and every report names where its file is now, or that it was deleted."""
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
    source = result.candidates[result.float_type]
    if result.float_type not in export_cfg.quants and not export_cfg.keep_float:
        source.unlink(missing_ok=True)
        where[str(source)] = None
    for r in result.reports:
        if r.path in where and where[r.path] is None:
            r.notes.append(
                f"the {result.float_type} intermediate: deleted after verification (export.keep_float keeps it)"
            )
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
    """verify.json (machine-readable) and verify.md (the quality table, the references, the scored token count,
    the gates and a recommendation per exported model) in the run folder."""
    groups = [(x.name, x.reports) if isinstance(x, ExportResult) else ("", [x]) for x in results]
    reports = [r for _, group in groups for r in group]
    passed = not failed and all(r.passed for r in reports)
    scored = min((int(r.measures.get("positions", 0)) for r in reports), default=0)
    minimum = verify_cfg.min_scored_tokens if verify_cfg is not None else None
    budget = verify_cfg.recommend_max_kld if verify_cfg is not None else None
    by_name: dict[str, list[FileReport]] = {}
    for name, group in groups:
        by_name.setdefault(name, []).extend(group)
    recommended = {}
    if budget is not None:
        recommended = {name: recommend(group, budget) for name, group in by_name.items()}
    atomic_write_json(
        run_dir / "verify.json",
        {
            "passed": passed,
            "reference": str(reference) if reference else None,
            "scored_tokens": scored,
            "min_scored_tokens": minimum,
            "short_of_minimum": minimum is not None and scored < minimum,
            "recommend_max_kld": budget,
            "recommended": {n: (Path(r.path).name if r else None) for n, r in recommended.items()},
            "files": to_json(reports),
        },
    )
    head = ["# Verification", ""]
    if reference:
        head += [
            f"Reference: {reference} (Hugging Face, float32, streamed layer by layer on the CPU): every file,",
            "the float GGUF and each quant, is scored against the model that was trained.",
            "",
        ]
    if minimum is not None:
        short = f" (SHORT of verify.min_scored_tokens={minimum}: the data holds no more)" if scored < minimum else ""
        head += [f"Scored positions per file: {scored}{short}.", ""]
    if verify_cfg is not None:
        head += ["Gates:", *gates_text(verify_cfg, list(dict.fromkeys(r.quant for r in reports))), ""]
    lines = [to_table(reports)]
    if budget is not None:
        lines += [""] + [
            (f"{name}: " if len(recommended) > 1 else "") + recommendation_line(by_name[name], budget)
            for name in recommended
        ]
    notes = [f"- {Path(r.path).name}: {n}" for r in reports for n in r.notes]
    tail = ["", "Notes:", *notes] if notes else []
    legend = [
        "",
        "size: file bytes; bits/weight: file bytes x 8 / parameters (the whole file, vocabulary and metadata "
        "included); KLD: KL(reference || file) per position; same top-1: argmax agreement; ppl: perplexity of the "
        "scored text under the file's own logits (llama.cpp).",
    ]
    atomic_write_text(run_dir / "verify.md", "\n".join([*head, *lines, *legend, *tail]) + "\n")


def file_entries(result: ExportResult) -> dict[str, dict]:
    return {q: {"path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p)} for q, p in result.files.items()}
