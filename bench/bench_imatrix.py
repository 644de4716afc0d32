"""q4_k_m with and without an importance matrix from the run's own data, against the float GGUF, in one run.

    python bench/bench_imatrix.py [--model HF_DIR] [--calibration N] [--max-tokens N] [--float-type bf16]
                                  [--max-positions N]

The model is the tiny Gemma 2 (python -m scripts.tiny_model builds it into a temporary HF_HOME), or --model, any Gemma
2 HF folder (bench/bench_export.py's full-shape one: there use --float-type bf16 and smaller --max-tokens and
--max-positions, e.g. 2048 each: calibration and scoring are forward passes of the 2B on the CPU). Both quants are
made from the same float GGUF (f32 unless --float-type) with the same llama.cpp quantizer and token_embd at q8_0
(export.token_embedding_type); the only difference is the importance matrix, computed by
convert.imatrix.compute_imatrix from the first --calibration records of data/demo/chat.jsonl (the "training data").
Both are scored against the float GGUF on records the matrix never saw (the rest of chat.jsonl and
data/demo/heldout.jsonl): KL(float || quant) at every position, its mean and 99th percentile, and the share of
positions with the same top-1 token. Prints both, the ratios, and the file sizes (the same tensor bytes by
construction: the matrix changes values, not types; the imatrix file carries a few hundred bytes of
quantize.imatrix.* keys more).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from convert.imatrix import DEFAULT_MAX_TOKENS, compute_imatrix  # noqa: E402
from convert.llamacpp import convert_hf_to_gguf, quantize  # noqa: E402
from convert.score import log_softmax, native_output_to  # noqa: E402

TEMPLATE = ROOT / "core" / "templates" / "gemma.jinja"
DATA = ROOT / "data" / "demo"


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
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [tok.apply_chat_template(r["messages"], tokenize=False).removeprefix(tok.bos_token) for r in rows]


def score(reference: Path, quants: list[Path], texts: list[str], max_positions: int, n_ctx: int = 512) -> list[dict]:
    """KL(reference || quant) at every position of the texts (until max_positions), per quant: the three models are
    loaded at once and each text's logits dropped after it (the 2B's 256k-vocab logits are 1 MB per position)."""
    with native_output_to(None):
        models = [
            llama_cpp.Llama(
                model_path=str(m), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False
            )
            for m in [reference, *quants]
        ]
    per_position: list[list[np.ndarray]] = [[] for _ in quants]
    same = [0 for _ in quants]
    positions = 0
    try:
        for text in texts:
            if positions >= max_positions:
                break
            ids = models[0].tokenize(text.encode("utf-8"), add_bos=True, special=True)[:n_ctx]
            out = []
            for llm in models:
                llm.reset()
                with native_output_to(None):
                    llm.eval(ids)
                out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
            lp = log_softmax(out[0])
            for i, got in enumerate(out[1:]):
                per_position[i].append(np.array((lp.exp() * (lp - log_softmax(got))).sum(-1).tolist()))
                same[i] += int((out[0].argmax(-1) == got.argmax(-1)).sum())
            positions += len(ids)
    finally:
        for llm in models:
            llm.close()
    results = []
    for k, hits in zip(per_position, same, strict=True):
        kl = np.concatenate(k)
        results.append(
            {"mean": float(kl.mean()), "p99": float(np.percentile(kl, 99)), "top1": hits / len(kl), "n": len(kl)}
        )
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="Gemma 2 HF folder (default: the tiny model, built here)")
    ap.add_argument("--calibration", type=int, default=250, help="records of chat.jsonl that calibrate")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="calibration token budget")
    ap.add_argument("--float-type", choices=["f32", "f16", "bf16"], default="f32", help="the source and reference")
    ap.add_argument("--max-positions", type=int, default=10**9, help="scored positions (whole records) at most")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_imatrix.") as tmp:
        work = Path(tmp)
        model = args.model or tiny_model(work / "hf")
        tok = AutoTokenizer.from_pretrained(str(model))
        tok.chat_template = TEMPLATE.read_text()
        records = rendered(tok, DATA / "chat.jsonl")
        calibration, evaluation = records[: args.calibration], records[args.calibration :]
        evaluation += rendered(tok, DATA / "heldout.jsonl")
        log = work / "convert.log"
        f32 = work / f"m.{args.float_type}.gguf"
        convert_hf_to_gguf(model, f32, args.float_type, log)
        t0 = time.perf_counter()
        imatrix = compute_imatrix(f32, calibration, work / "m.imatrix.gguf", log, max_tokens=args.max_tokens)
        t_imatrix = time.perf_counter() - t0
        plain, calibrated = work / "m.q4_k_m.gguf", work / "m.q4_k_m.imatrix.gguf"
        quantize(f32, plain, "q4_k_m", "q8_0", log)
        quantize(f32, calibrated, "q4_k_m", "q8_0", log, imatrix=imatrix)
        a, b = score(f32, [plain, calibrated], evaluation, args.max_positions)
        size_a, size_b = plain.stat().st_size, calibrated.stat().st_size
    name = args.model or "tiny Gemma 2 (scripts.tiny_model)"
    print(f"model: {name}; calibration: {len(calibration)} records; scored: {a['n']} positions of "
          f"{len(evaluation)} unseen records; llama-imatrix {t_imatrix:.1f} s")  # fmt: skip
    print(f"{'q4_k_m':<18} {'bytes':>10} {'mean KLD':>10} {'p99 KLD':>10} {'same top-1':>10}")
    for name, m, size in (("plain", a, size_a), ("imatrix", b, size_b)):
        print(f"{name:<18} {size:>10} {m['mean']:>10.3e} {m['p99']:>10.3e} {m['top1']:>10.2%}")
    print(f"imatrix / plain: mean KLD {b['mean'] / a['mean']:.3f}, p99 KLD {b['p99'] / a['p99']:.3f}, "
          f"bytes {size_b / size_a:.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
