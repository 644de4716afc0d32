"""python -m convert {export,verify,info}: the conversion stage on its own."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from convert.llamacpp import read_metadata
from core.config import Config, load_config
from core.errors import PathError, RunError, cli_exit
from core.files import human_size
from core.hub import configure_cache_env
from core.log import setup_cli_logging
from core.paths import require_dir, user_path
from core.quants import QUANTS, quant_of_file_type

log = logging.getLogger("convert")  # run as __main__: our handlers are on the package loggers

EPILOG = """\
examples:
  python -m convert export --config configs/gemma2b_lora.yaml          # a trained run -> verified GGUFs
  python -m convert verify --model models/finetuned/final_models/demo models/gguf/gemma_2b_finetuned.gguf
  python -m convert info models/gguf/gemma_2b_finetuned.gguf

exit codes: 0 ok, 2 invalid input, 3 verification failed (nothing promoted), 4 llama.cpp tooling error,
  6 disk full, 75 run folder or promotion target locked by another process
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="merge a trained run's adapter, export GGUFs, verify, promote")
    p.add_argument("--config", required=True, help="the run's config (the run folder is outputs/<run_name>)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p = sub.add_parser("verify", help="verify GGUF files against the HF model they were made from")
    p.add_argument("--model", required=True, help="HF model folder (e.g. models/finetuned/final_models/<run>)")
    p.add_argument("gguf", nargs="+", help="GGUF files; their type is read from the file")
    p.add_argument("--config", help="take gates, prompts and held-out data from this config")
    p.add_argument("--report", help="also write the measurements as JSON here")
    p = sub.add_parser("info", help="print a GGUF's metadata (architecture, template, provenance)")
    p.add_argument("gguf")
    args = parser.parse_args(argv)
    setup_cli_logging()
    configure_cache_env()
    return cli_exit(lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    """Every input is checked (paths, GGUF files, config) before the verbs import transformers: a mistake is
    reported at once, and `info` never needs them."""
    if args.command == "info":
        return cmd_info(args)
    if args.command == "verify":
        cfg = load_config(args.config) if args.config else Config()
        model, report = hf_model_dir(args.model), report_path(args.report)
        files = [(quant_of(Path(p)), user_path(p)) for p in args.gguf]
    else:
        cfg = load_config(args.config, args.overrides)
    # Imported only now: transformers and huggingface_hub read the cache variables once, at import time.
    from convert.commands import cmd_export, cmd_verify  # noqa: PLC0415

    return cmd_verify(cfg, model, files, report) if args.command == "verify" else cmd_export(cfg)


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


def cmd_info(args) -> int:
    """Every scalar and string of the GGUF's metadata (arrays by their length), its file type by name and its size."""
    path = Path(args.gguf)
    meta = read_metadata(path)
    for key, value in meta.items():
        if key == "general.file_type" and isinstance(value, int):
            value = f"{value} ({quant_of_file_type(value) or 'a type this pipeline does not export'})"
        log.info(f"{key}: {value}")
    log.info(f"file size: {human_size(path.stat().st_size)} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
