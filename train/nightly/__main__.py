"""python -m train.nightly {run,status,rollback,prune} --config FILE [dotted.key=value ...]"""

from __future__ import annotations

import argparse
import sys
from datetime import date

from core.config import load_config
from core.errors import cli_exit
from core.hub import configure_cache_env
from core.log import setup_cli_logging

EPILOG = """\
examples:
  python -m train.nightly run --config configs/gemma2b_lora.yaml        # from cron, a systemd timer, a CronJob
  python -m train.nightly status --config configs/gemma2b_lora.yaml
  python -m train.nightly rollback --config configs/gemma2b_lora.yaml
  python -m train.nightly prune --config configs/gemma2b_lora.yaml --dry-run

what `run` does (docs/nightly.md):
  take the job lock -> record a publication a crash left unrecorded -> hash the data, config, base and
  code -> the champion was trained on the same: exit 0 ("unchanged since <run>") -> train, export and
  verify the candidate <prefix>-YYYY-MM-DD-<inputs> (resuming it if an earlier night was interrupted)
  -> score candidate and champion on the fixed eval set (HF loss, llama.cpp loss on the GGUF that ships,
  task checks) -> gates (config section `nightly`) -> promote atomically or reject -> registry line
  (models/finetuned/registry.jsonl) -> report (outputs/<run>/nightly.md) -> retention

exit codes:
  0    promoted, or unchanged since the champion (the log line and the registry say which); status,
       rollback and prune succeeded
  7    rejected by a gate: the candidate is recorded, the champion stays live (alert on this)
  1    unexpected error
  2    invalid config, data or eval set, model not in the cache; rollback with no previous champion
  3    the candidate's GGUF failed verification (nothing promoted)
  4    llama.cpp tooling missing or failed
  5    non-finite loss or gradient norm while training (the next night resumes from the last commit)
  6    not enough disk space
  75   another nightly job, rollback or prune holds the lock (named in the message); nothing was done
  130  SIGINT, 143 SIGTERM: stopped; training committed a checkpoint and the next night resumes it
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.nightly",
        description="Nightly retraining that never ships a worse model: skip, train, gate, promote, roll back.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verbs = {
        "run": "one night: skip if unchanged, else train a candidate, gate it against the champion, promote",
        "status": "what is live, since when, its scores, the last nights (no lock, changes nothing)",
        "rollback": "make the previous champion live again, byte for byte, and record it",
        "prune": "apply retention now (it also runs after every trained night)",
    }
    for verb, text in verbs.items():
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("--config", required=True, help="the config nightly runs train with (section `nightly`)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for python -m train")
        if verb == "status":
            p.add_argument("--json", action="store_true", help="print machine-readable JSON")
            p.add_argument("--nights", type=int, default=7, help="how many past nights to show (default 7)")
        if verb == "prune":
            p.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_cli_logging()
    configure_cache_env()
    # Imported only now: transformers and huggingface_hub read the cache variables once, at import time.
    from train.nightly import night  # noqa: PLC0415

    def command() -> int:
        cfg = load_config(args.config, args.overrides)
        if args.command == "run":
            return night.run_night(cfg, date.today())
        if args.command == "status":
            return night.show_status(cfg, args.json, args.nights)
        if args.command == "rollback":
            return night.roll_back(cfg)
        return night.run_prune(cfg, args.dry_run)

    return cli_exit(command)


if __name__ == "__main__":
    sys.exit(main())
