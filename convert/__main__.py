"""python -m convert {export,verify,info}: the conversion stage on its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.hub import configure_cache_env

EPILOG = """\
examples:
  python -m convert export --config configs/gemma2b_lora.yaml          # a trained run -> verified GGUFs
  python -m convert verify --model models/finetuned/final_models/demo models/gguf/gemma_2b_finetuned.gguf
  python -m convert info models/gguf/gemma_2b_finetuned.gguf

exit codes: 0 ok, 2 invalid input, 3 verification failed (nothing promoted), 4 llama.cpp tooling error,
  6 disk full, 75 run folder or promotion target locked by another process
"""


def quant_of(path: Path) -> str:
    """Our quant name for a GGUF, from its general.file_type (llama_ftype)."""
    import llama_cpp

    from convert.llamacpp import FTYPE_NAMES, read_metadata

    ftype = read_metadata(path).get("general.file_type", 0)  # absent means all-f32
    for name, const in FTYPE_NAMES.items():
        if getattr(llama_cpp, const) == ftype:
            return name
    from train.run import RunError

    raise RunError(f"{path}: file type {ftype} is not one this pipeline exports ({', '.join(FTYPE_NAMES)})")


def cmd_export(args) -> int:
    from convert.pipeline import export_run
    from train.artifacts import atomic_write_json
    from train.config import load_config
    from train.hub import resolve_model
    from train.locking import hold_lock
    from train.report import print_summary
    from train.run import RunError, RunPaths

    cfg = load_config(args.config, args.overrides)
    paths = RunPaths.of(cfg)
    if not (paths.adapter_out / "adapter_model.safetensors").is_file():
        raise RunError(
            f"no trained adapter at {paths.adapter_out}: train first (python -m train --config {args.config})"
        )
    base = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    with hold_lock(paths.lock, f"run folder {paths.root}", cfg.run_name):  # not while `train` writes it
        manifest = json.loads(paths.manifest.read_text()) if paths.manifest.is_file() else {"run_name": cfg.run_name}
        manifest.setdefault("artifacts", {})
        manifest = export_run(cfg, paths, base, manifest)
        manifest["status"] = "complete"
        atomic_write_json(paths.manifest, manifest)
    print_summary(paths, cfg, manifest)
    return 0


def cmd_verify(args) -> int:
    from convert.verify import to_json, to_table, verify_files
    from train.config import Config, load_config

    cfg = load_config(args.config) if args.config else Config()
    files = [(quant_of(Path(p)), Path(p)) for p in args.gguf]
    texts = []
    if cfg.verify.heldout_files:
        from transformers import AutoTokenizer

        from convert.pipeline import heldout_texts

        texts = heldout_texts(AutoTokenizer.from_pretrained(str(args.model)), cfg)
    reports = verify_files(Path(args.model), files, cfg.verify, texts)
    print(to_table(reports))
    if args.report:
        Path(args.report).write_text(json.dumps(to_json(reports), indent=2) + "\n")
    failed = [r for r in reports if not r.passed]
    for r in failed:
        print(f"FAILED {r.path} [{r.quant}]: " + "; ".join(r.failures()), file=sys.stderr)
    return 3 if failed else 0


def cmd_info(args) -> int:
    from convert.llamacpp import read_metadata

    for key, value in read_metadata(Path(args.gguf)).items():
        print(f"{key}: {value}")
    return 0


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
    configure_cache_env()

    from train.stops import cli_exit

    commands = {"export": cmd_export, "verify": cmd_verify, "info": cmd_info}
    return cli_exit(lambda: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
