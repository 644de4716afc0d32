"""`make demo-real`: a real Gemma taught a task it cannot do before training, on the CPU, and what ships checked.

    python -m scripts.demo_real [--config configs/gemma3_270m_lora.yaml] [key=value ...]

google/gemma-3-270m (real weights and tokenizer: python -m scripts.real_gemma builds it into the HF cache) is
fine-tuned on the demo's operations assistant, whose facts (disk usage, uptimes, on-call names) are invented:
the base model cannot know them. `python -m train` trains, exports and verifies as for any model; then, on the
held-out records (data/demo/heldout.jsonl, never trained on), before (the base model) and after (fine-tuned):

- held-out loss on the answers' tokens, through the HF model and through the GGUF that ships (from each
  export's verification: convert/score.py, the same numbers verify.json records);
- each held-out question answered greedily by the GGUF that ships, through llama.cpp with the file's own chat
  template: exact answers, base vs fine-tuned;
- the verification table (verify.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.config import load_config
from core.errors import cli_exit
from core.hub import configure_cache_env
from core.log import setup_cli_logging
from core.runfolder import RunFolder

DEFAULT_CONFIG = Path("configs/gemma3_270m_lora.yaml")


def heldout_tasks(path: str) -> list[tuple[str, str]]:
    """(question, expected answer) of every held-out chat record: its user turn and its assistant turn."""
    from core.records.sources import read_source  # noqa: PLC0415 (imports datasets: after setup_cli_logging)

    tasks = []
    for row in read_source(path).rows:
        messages = (row.record or {}).get("messages") or []
        user = next((m["content"] for m in messages if m["role"] == "user"), None)
        answer = next((m["content"] for m in messages if m["role"] == "assistant"), None)
        if user and answer:
            tasks.append((user, answer))
    return tasks


def demo(config: Path, overrides: list[str]) -> int:
    # after the cache variables: transformers reads them at import
    from convert.score import GGUF, mean_loss  # noqa: PLC0415
    from convert.verify import file_report  # noqa: PLC0415
    from train.run import run  # noqa: PLC0415

    cfg = load_config(config, overrides)
    t0 = time.monotonic()
    manifest = run(cfg)
    assert manifest is not None
    trained = time.monotonic() - t0
    run_dir = RunFolder.of(cfg).root
    default = {
        label: f"{name}.gguf" for label, name in (("base", cfg.export.base_name), ("fine-tuned", cfg.export.name))
    }
    tasks = heldout_tasks(cfg.verify.heldout_files[0])
    print(f"\n=== before and after, on {len(tasks)} held-out records (data the model never trained on)")
    print(f"{'':<12}{'HF loss':>10}{'GGUF loss':>11}{'exact answers':>16}")
    for label, file in default.items():
        report = file_report(run_dir, file)
        if report is None:  # a base export reused from an earlier run: its scores are in that run's verify.json
            print(f"{label:<12} (no verification of {file} in this run: its export was reused)")
            continue
        gguf = Path(cfg.export.gguf_dir) / file
        with GGUF(gguf) as g:
            replies = [(q, want, g.reply(q, 64)) for q, want in tasks]
        exact = sum(stopped and got.strip() == want.strip() for _, want, (got, stopped) in replies)
        # per held-out record: [NLL, supervised tokens], through the HF reference and through the GGUF
        hf = mean_loss(report["reference_losses"], list(report["reference_losses"]))
        ours = mean_loss(report["losses"], list(report["losses"]))
        print(f"{label:<12}{hf:>10.3f}{ours:>11.3f}{f'{exact}/{len(tasks)}':>16}")
        for q, want, (got, _) in replies[:3]:
            print(f"    {q!r}\n      expected {want!r}\n      {label} says {got.strip()!r}")
    print(f"\ntrained, exported and verified in {trained:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.demo_real", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    setup_cli_logging()
    configure_cache_env()
    return cli_exit(lambda: demo(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
