"""What `python -m convert` is given, checked before the verbs import transformers and torch (seconds): paths,
GGUF files, config. `info` needs nothing more and stays instant."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from convert.llamacpp import read_metadata
from core.config import Config, load_config
from core.errors import PathError, RunError
from core.paths import require_dir, user_path
from core.quants import QUANTS, quant_of_file_type

log = logging.getLogger(__name__)


def quant_of(path: Path) -> str:
    """Our quant name for a GGUF, from its general.file_type (llama_ftype)."""
    ftype = read_metadata(path).get("general.file_type", 0)  # absent means all-f32
    quant = quant_of_file_type(ftype) if isinstance(ftype, int) else None
    if quant is None:
        raise RunError(f"{path}: file type {ftype} is not one this pipeline exports ({', '.join(QUANTS)})")
    return quant


def hf_model_dir(path: str) -> Path:
    """--model: a Hugging Face model folder (config.json, weights, tokenizer)."""
    folder = require_dir(path, "--model", "give the merged model's folder, e.g. models/finetuned/final_models/<run>")
    if not (folder / "config.json").is_file():
        raise PathError(f"--model {path}: has no config.json, so it is not a Hugging Face model folder")
    return folder


def report_path(path: str | None) -> Path | None:
    """--report: a file to write; its folder must exist (checked before minutes of verification)."""
    if path is None:
        return None
    target = user_path(path)
    require_dir(target.parent, "--report's folder", "create it first, or write the report elsewhere")
    if target.is_dir():
        raise PathError(f"--report {path}: is a folder; name a file such as {target / 'verify.json'}")
    return target


@dataclass(frozen=True)
class VerifyInputs:
    cfg: Config
    model: Path
    files: list[tuple[str, Path]]  # (quant, GGUF)
    report: Path | None


def verify_inputs(args) -> VerifyInputs:
    cfg = load_config(args.config) if args.config else Config()
    return VerifyInputs(
        cfg, hf_model_dir(args.model), [(quant_of(Path(p)), user_path(p)) for p in args.gguf], report_path(args.report)
    )


def cmd_info(args) -> int:
    for key, value in read_metadata(Path(args.gguf)).items():
        log.info(f"{key}: {value}")
    return 0
