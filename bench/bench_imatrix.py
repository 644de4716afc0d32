"""Quants with and without an importance matrix from the run's own data, against the HF model in float32, in one run.

    python bench/bench_imatrix.py [--model HF_DIR|REPO_ID] [--quants q4_k_m,...] [--calibration N] [--max-tokens N]
                                  [--float-type f32] [--max-positions N] [--work DIR]

The model is the tiny Gemma 2 (python -m scripts.tiny_model builds it into a temporary HF_HOME), or --model: an HF
folder or a repo id in the HF cache (core.hub.resolve_model: `--model google/gemma-3-270m` with HF_HUB_OFFLINE=1 and
HF_HOME pointing at the cache scripts/real_gemma.py built; docs/real-gemma.md). For the full-shape Gemma 2 2B use
--float-type bf16 and smaller --max-tokens and --max-positions (2048 each): calibration and scoring are forward
passes of the 2B on the CPU.

Every quant in --quants is made from the same float GGUF (f32 unless --float-type; a float type in --quants is
converted as an export converts it) with the same llama.cpp quantizer and token_embd at q8_0
(export.token_embedding_type), once plain and once with the importance matrix that convert.imatrix.compute_imatrix
computes from the first --calibration records of data/demo/chat.jsonl (the "training data"): the matrix is the
only difference. Float types take no matrix; a type llama.cpp refuses without one (core.quants needs_imatrix) is
made with it only, and a quantizer failure is a row that says so, not the end of the run.

Every file is scored as verification scores an export (convert/score.py: the streamed float32 HF reference, one
GGUF at a time in llama.cpp, the same tally) on records the matrix never saw: data/demo/heldout.jsonl first, then
the rest of chat.jsonl, whole records up to --max-positions. Per file: bytes, KL(HF || file) at every position (mean
and 99th percentile), the share of positions with the same top-1 token, and the perplexity of heldout.jsonl under
the file's own logits (every next token of those records; the HF model's is the first row). Prints each file's
measures as it is scored, then a markdown table.

--work DIR keeps the files in DIR (default: a temporary folder, deleted) and reuses any already there, so a rerun
with other scoring settings does not convert, calibrate and quantize again (at the 270M on a loaded 2-core box those
took 13 minutes). Reuse is by file name only: use one DIR per model, --calibration and --max-tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import AutoTokenizer  # noqa: E402

from convert.imatrix import DEFAULT_MAX_TOKENS, compute_imatrix  # noqa: E402
from convert.llamacpp import convert_hf_to_gguf, quantize  # noqa: E402
from convert.reference import Reference  # noqa: E402
from convert.score import CHUNK, GGUF, ReferenceChunks, Sequence, mean_loss, score, windows  # noqa: E402
from core.errors import LlamaCppError  # noqa: E402
from core.hub import resolve_model  # noqa: E402
from core.quants import QUANTS  # noqa: E402

TEMPLATE = ROOT / "core" / "templates" / "gemma.jinja"
DATA = ROOT / "data" / "demo"
HELDOUT = "heldout"  # the Sequence.record of heldout.jsonl's records: their next-token NLL is the table's PPL
UNSEEN = "chat, unseen"  # chat.jsonl's records after the calibration ones
N_CTX = 512  # llama.cpp's context per file; longer records are scored in windows (convert.score.windows)


def tiny_model(home: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "scripts.tiny_model", "--hf-home", str(home), "--data", str(DATA / "chat.jsonl")],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(home)},
    )
    return next((home / "hub").glob("models--tiny-gemma--gemma-2-tiny/snapshots/*"))


def rendered(tok, path: Path) -> list[str]:
    """The records of a chat JSONL file rendered with the chat template, <bos> included."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]


def scored_sequences(
    tok, origins: list[tuple[str, list[str]]], max_positions: int, window: int = N_CTX
) -> list[Sequence]:
    """Token sequences of rendered texts, origin by origin, whole records until max_positions are reached (the first
    record always). Every next token is labelled (labels = ids), so a file's tally keeps the next-token NLL of each
    origin under its name (Tally.loss[origin]): the perplexity of one origin's text alone."""
    bos = tok.bos_token_id
    out: list[Sequence] = []
    positions = 0
    for origin, texts in origins:
        for text in texts:
            if out and positions >= max_positions:
                return out
            ids = tok(text, add_special_tokens=False)["input_ids"]
            ids = ids if ids[:1] == [bos] else [bos, *ids]
            for seq in windows(Sequence(ids, list(ids), origin), bos, window):
                out.append(seq)
                positions += len(seq.ids)
    return out


def perplexity(losses: dict[str, list[float]], origin: str) -> float:
    """exp(mean next-token NLL) of one origin's positions, from a tally's per-record [NLL sum, tokens]."""
    return math.exp(mean_loss(losses, [origin]))


@dataclass
class Row:
    """One line of the table: a file (or, with path None, why there is none) and its measures."""

    quant: str
    imatrix: str  # "no", "yes", or "n/a" where the type takes no matrix
    path: Path | None = None
    note: str = ""
    measures: dict[str, float] = field(default_factory=dict)


def variants(quant: str) -> list[tuple[str, bool | None]]:
    """(imatrix column, use the matrix) of a quant type: float types once, without (n/a); types llama.cpp refuses
    without a matrix once plain (not made: None) and once with it; the rest plain and with it."""
    q = QUANTS[quant]
    if q.is_float:
        return [("n/a", False)]
    return [("no", None if q.needs_imatrix else False), ("yes", True)]


def markdown(rows: list[Row], reference_ppl: float, positions: int, heldout_positions: int) -> str:
    """The table: file bytes, KLD mean / p99, same top-1, held-out PPL; the HF reference first; a quant's imatrix
    row with its ratio to the plain one."""
    plain = {r.quant: r.measures for r in rows if r.imatrix == "no" and r.measures}
    lines = [
        f"| type | imatrix | file bytes | mean KLD | p99 KLD | same top-1 | PPL held-out ({heldout_positions} pos.) |",
        "|---|---|---|---|---|---|---|",
        f"| HF float32 (reference) | | | 0 | 0 | 100% | {reference_ppl:.3f} |",
    ]
    for r in rows:
        m = r.measures
        if not m:
            lines.append(f"| {r.quant} | {r.imatrix} | {r.note} | | | | |")
            continue
        base = plain.get(r.quant) if r.imatrix == "yes" else None
        ratio = f" ({m['kld'] / base['kld']:.2f}x)" if base and base["kld"] > 0 else ""
        lines.append(
            f"| {r.quant} | {r.imatrix} | {int(m['size']):,} | {m['kld']:.3e}{ratio} | {m['kld_p99']:.3e} "
            f"| {m['top1_all']:.2%} | {m['ppl_heldout']:.3f} |"
        )
    lines.append(f"\nKLD and top-1 over {positions} positions; PPL over heldout.jsonl's {heldout_positions}.")
    return "\n".join(lines)


def make_files(model: Path, work: Path, quants: list[str], float_type: str, calibration: list[str], max_tokens: int):
    """The float source, the importance matrix and every (quant, imatrix) file; rows for all of them."""
    log = work / "convert.log"
    source, matrix = work / f"m.{float_type}.gguf", work / "m.imatrix.gguf"
    if not source.is_file():
        convert_hf_to_gguf(model, source, float_type, log)
    if not matrix.is_file():
        t0 = time.perf_counter()
        # llama-imatrix starts each chunk with <bos> itself
        texts = [t.removeprefix("<bos>") for t in calibration]
        compute_imatrix(source, texts, matrix, log, max_tokens=max_tokens)
        print(f"llama-imatrix: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for quant in quants:
        for column, with_matrix in variants(quant):
            row = Row(quant, column)
            rows.append(row)
            if with_matrix is None:
                row.note = "refused without an imatrix (core.quants needs_imatrix)"
                continue
            path = work / f"m.{quant}{'.imatrix' if with_matrix else ''}.gguf"
            t0 = time.perf_counter()
            try:
                if quant == float_type:
                    path = source
                elif path.is_file():
                    pass  # made by an earlier run in this --work folder
                elif QUANTS[quant].is_float:  # as an export makes it: the converter writes float types
                    convert_hf_to_gguf(model, path, quant, log)
                else:
                    quantize(source, path, quant, "q8_0", log, imatrix=matrix if with_matrix else None)
            except LlamaCppError as e:
                row.note = f"llama.cpp failed: {e}"
                continue
            row.path = path
            print(f"made {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder or repo id in the HF cache (default: the tiny Gemma 2, built here)")
    ap.add_argument("--quants", default="q4_k_m", help="comma-separated types (core/quants.py), e.g. f16,q8_0,q4_k_m")
    ap.add_argument("--calibration", type=int, default=250, help="records of chat.jsonl that calibrate")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="calibration token budget")
    ap.add_argument("--float-type", choices=["f32", "f16", "bf16"], default="f32", help="the quants' source")
    ap.add_argument("--max-positions", type=int, default=10**9, help="scored positions (whole records) at most")
    ap.add_argument("--work", type=Path, help="keep the files here and reuse those already there (default: temporary)")
    args = ap.parse_args()
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        ap.error(f"--quants: {', '.join(unknown)} not in core/quants.py ({', '.join(QUANTS)})")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_imatrix.") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = resolve_model(args.model).path if args.model else tiny_model(work / "hf")
        tok = AutoTokenizer.from_pretrained(str(model))
        tok.chat_template = TEMPLATE.read_text()
        records = rendered(tok, DATA / "chat.jsonl")
        calibration, unseen = records[: args.calibration], records[args.calibration :]
        heldout = rendered(tok, DATA / "heldout.jsonl")
        sequences = scored_sequences(tok, [(HELDOUT, heldout), (UNSEEN, unseen)], args.max_positions)
        rows = make_files(model, work, quants, args.float_type, calibration, args.max_tokens)
        t0 = time.perf_counter()
        reference = ReferenceChunks(Reference(model, [s.ids for s in sequences]), CHUNK, work)
        print(f"reference decoder: {time.perf_counter() - t0:.0f} s", flush=True)
        ref_losses: dict[str, list[float]] = {}
        try:
            for row in rows:
                if row.path is None:
                    continue
                t0 = time.perf_counter()
                with GGUF(row.path, N_CTX) as g:
                    tally, ref_tally = score(iter(reference), sequences, g)
                row.measures = tally.measures() | {
                    "size": row.path.stat().st_size,
                    "ppl_heldout": perplexity(tally.loss, HELDOUT),
                }
                ref_losses = ref_tally.loss
                m = row.measures
                print(
                    f"scored {row.path.name} in {time.perf_counter() - t0:.0f} s: {m['size']} bytes, mean KLD "
                    f"{m['kld']:.3e}, p99 {m['kld_p99']:.3e}, top-1 {m['top1_all']:.2%}, PPL held-out "
                    f"{m['ppl_heldout']:.3f} (reference {perplexity(ref_tally.loss, HELDOUT):.3f})",
                    flush=True,
                )
        finally:
            reference.close()
    positions = sum(len(s.ids) for s in sequences)
    heldout_positions = int(ref_losses.get(HELDOUT, [0, 0])[1])
    print(
        f"\nmodel: {args.model or 'tiny Gemma 2 (scripts.tiny_model)'}; calibration: {len(calibration)} records of "
        f"chat.jsonl (<= {args.max_tokens} tokens); scored: {positions} positions of {len(sequences)} sequences "
        f"(heldout.jsonl, then unseen chat.jsonl records); reference: the HF model in float32; "
        f"{time.perf_counter() - started:.0f} s in all\n"
    )
    print(markdown(rows, perplexity(ref_losses, HELDOUT) if ref_losses else math.nan, positions, heldout_positions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
