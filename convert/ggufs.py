"""One HF model's GGUF files in a work folder: the float GGUF (export.float_type, the run's provenance keys written
by the converter itself) -> an importance matrix if asked -> every quant, made from the float GGUF -> every file
verified against the HF model (convert/verify.py). convert/export.py calls this for the fine-tuned and the base model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from convert.imatrix import compute_imatrix
from convert.llamacpp import convert_hf_to_gguf, quantize
from convert.verify import FileReport, MergeCheck, VerificationFailed, verify_files
from core.config import Config
from core.quants import QUANTS, float_gguf_type
from core.records.heldout import HeldOut

log = logging.getLogger(__name__)


@dataclass
class ModelGGUFs:
    name: str  # the file stem: <name>.gguf is the default quant, <name>.<quant>.gguf the others
    float_type: str  # the float GGUF converted first: the quants' source
    files: dict[str, Path] = field(default_factory=dict)  # quant -> verified GGUF in the work folder
    reports: list[FileReport] = field(default_factory=list)


def remove_work_files(work_dir: Path, name: str) -> None:
    """The GGUFs (finished or partial, the importance matrix too) of an export of `name`; convert.log stays."""
    for p in work_dir.glob(f"*{name}.*"):
        if p.is_file() and (p.suffix in (".gguf", ".tmp")):
            p.unlink()


def gguf_filename(name: str, quant: str, default_quant: str) -> str:
    """<name>.gguf for the quant applications load by default, <name>.<quant>.gguf for the others."""
    return f"{name}.gguf" if quant == default_quant else f"{name}.{quant}.gguf"


def export_ggufs(
    cfg: Config,
    model_dir: Path,
    name: str,
    export_dir: Path,
    provenance: dict[str, str],
    heldout: list[HeldOut],
    training: list[list[int]],
    merge: MergeCheck | None = None,
) -> ModelGGUFs:
    """Convert one HF folder to every configured GGUF type in the work folder export_dir/<name> and verify all.
    training: the run's training records' ids, the importance matrix's calibration text and the scored set's filler;
    merge: the merge check that made model_dir (its reference is the verification's). Raises VerificationFailed if a
    gate fails (the files stay for inspection); any other stop removes them."""
    work_dir = export_dir / name
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_work_files(work_dir, name)  # an earlier attempt's files are not this attempt's
    log_path = work_dir / "convert.log"
    float_type = float_gguf_type(cfg.export.float_type, cfg.export.quants, model_dir)
    source = work_dir / f"{name}.{float_type}.gguf"
    files = {float_type: source}
    try:
        log.info(f"  converting -> {source.name} (llama.cpp convert_hf_to_gguf.py; log: {log_path})")
        convert_hf_to_gguf(model_dir, source, float_type, log_path, model_name=name, metadata=provenance)
        imatrix = None
        if cfg.export.imatrix and any(not QUANTS[q].is_float and q != "q8_0" for q in cfg.export.quants):
            calibration = training or [r.ids for r in heldout]
            log.info(f"  importance matrix from {len(calibration)} record(s) (llama-imatrix; log: {log_path})")
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            # llama-imatrix tokenizes its text file itself; decoding one sequence gives a str (the stubs allow a list)
            text = [tokenizer.decode(ids[1:]) for ids in calibration]
            imatrix = compute_imatrix(source, text, work_dir / f"{name}.imatrix.gguf", log_path)  # type: ignore[arg-type]
        for quant in cfg.export.quants:
            if quant != float_type:
                files[quant] = work_dir / f"{name}.{quant}.gguf"
                log.info(f"  quantizing -> {files[quant].name}" + (" (importance matrix)" if imatrix else ""))
                weights = None if QUANTS[quant].is_float else imatrix
                quantize(source, files[quant], quant, cfg.export.token_embedding_type, log_path, imatrix=weights)
        log.info(f"  verifying {len(files)} file(s) against the HF model, one at a time")
        # work_dir keeps the reference's logits between files (unnamed: gone with the process)
        reports = verify_files(model_dir, list(files.items()), cfg.verify, heldout, log_path, training, work_dir, merge)
    except BaseException:
        remove_work_files(work_dir, name)
        raise
    if not all(r.passed for r in reports):
        raise VerificationFailed(reports)
    return ModelGGUFs(name, float_type, files, reports)
