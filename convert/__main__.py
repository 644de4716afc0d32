"""python -m convert {export,verify,info}: the conversion stage on its own."""

from __future__ import annotations

import argparse
import sys

from convert.inputs import cmd_info, verify_inputs
from core.config import load_config
from core.errors import cli_exit
from core.hub import configure_cache_env
from core.log import setup_cli_logging

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
    """Every input is checked (convert.inputs: paths, GGUF files, config) before the verbs import transformers:
    a mistake is reported at once, and `info` never needs them."""
    if args.command == "info":
        return cmd_info(args)
    if args.command == "verify":
        inputs = verify_inputs(args)
    else:
        cfg = load_config(args.config, args.overrides)
    # Imported only now: transformers and huggingface_hub read the cache variables once, at import time.
    from convert.commands import cmd_export, cmd_verify  # noqa: PLC0415

    return cmd_verify(inputs) if args.command == "verify" else cmd_export(cfg)


if __name__ == "__main__":
    sys.exit(main())
