"""python -m train --config FILE [dotted.key=value ...] [--dry-run] [--fresh | --resume-from CHECKPOINT]"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from core.config import commented_defaults, load_config
from core.errors import cli_exit, set_resume_command
from core.hub import configure_cache_env
from core.log import setup_cli_logging

EPILOG = """\
examples:
  python -m train --config configs/demo.yaml
  python -m train --config configs/gemma2b_lora.yaml --dry-run
  python -m train --config configs/gemma2b_lora.yaml run_name=nightly-2026-11-27 training.max_steps=500
  python -m train --print-defaults > my_config.yaml

what it does:
  validate config, model and data -> LoRA training (checkpoints in outputs/<run_name>/) ->
  adapter to models/finetuned/adapters/<run_name>/ -> (export.enabled) merge to
  models/finetuned/final_models/<run_name>/ -> float GGUF (f16/bf16) + quants with llama.cpp -> verification
  against the merged model -> promotion to models/gguf/. Running the same command again on a
  complete run reports it without retraining; on an unfinished run it resumes from the newest
  committed checkpoint whose hashes verify (see docs/operations.md).

exit codes:
  0    success
  1    unexpected error
  2    invalid config, data or missing model; unsafe resume (nothing trained)
  3    verification failed (nothing promoted)
  4    llama.cpp tooling missing or failed
  5    non-finite loss or gradient norm: stopped before applying it (last commit kept)
  6    not enough disk space (preflight), or the disk filled up during a save (last commit kept)
  75   the run folder or a promotion target is locked by another process (named in the message)
  130  stopped by SIGINT, 143 stopped by SIGTERM: step finished, checkpoint committed; the printed command
       resumes (the same one without --fresh or --resume-from)
"""


_UNITS = {"gib": 1 << 30, "g": 1 << 30, "gb": 10**9, "mib": 1 << 20, "mb": 10**6, "": 1 << 30}


def memory_size(text: str) -> int:
    """--gpu-memory: '24GiB', '16GB', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 24GiB, 16GB or 80 (GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="LoRA and QLoRA fine-tuning of Gemma 2 (3 and 1 too) with verified GGUF export through llama.cpp.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (see configs/; every key is documented by --print-defaults)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys, e.g. training.learning_rate=1e-4 lora.r=8",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate config, model presence and data; print the plan and the resolved config; write nothing",
    )
    parser.add_argument("--fresh", action="store_true", help="discard outputs/<run_name>/ and train from scratch")
    parser.add_argument(
        "--resume-from",
        metavar="CHECKPOINT",
        type=Path,
        help="resume from this checkpoint of the run (outputs/<run>/checkpoints/checkpoint-N) instead of the "
        "newest good one; it must verify against its commit record; newer checkpoints are moved to rejected/",
    )
    parser.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        type=memory_size,
        help="with --dry-run: plan for a GPU of this memory (24GiB, 16GB, 80 = GiB) instead of the detected one: "
        "the estimated peak of one training step, and the knob to turn first if it does not fit",
    )
    parser.add_argument(
        "--print-defaults",
        action="store_true",
        help="print every config key with its default and documentation, then exit",
    )
    args = parser.parse_intermixed_args(argv)
    if not args.config and not args.print_defaults:
        parser.error("--config is required (try configs/demo.yaml)")
    if args.fresh and args.resume_from:
        parser.error("--fresh and --resume-from exclude each other: --fresh discards every checkpoint")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_defaults:  # through cli_exit too: `--print-defaults | head` must end quietly
        return cli_exit(lambda: print(commented_defaults()))
    setup_cli_logging()
    configure_cache_env()
    set_resume_command(sys.argv[1:] if argv is None else argv)
    return cli_exit(lambda: _train(args))


def _train(args: argparse.Namespace) -> object:
    cfg = load_config(args.config, args.overrides)  # a config mistake is reported before seconds of imports
    # Imported only now: transformers and huggingface_hub read the cache variables once, at import time
    # (and `--help` stays instant).
    from train.run import run  # noqa: PLC0415

    return run(cfg, dry_run=args.dry_run, fresh=args.fresh, resume_from=args.resume_from, gpu_memory=args.gpu_memory)


if __name__ == "__main__":
    sys.exit(main())
