"""q4_k_m with and without an importance matrix from the run's own data, against the float GGUF, in one run.

    python bench/bench_imatrix.py [--model HF_DIR] [--calibration N] [--max-tokens N] [--float-type bf16]

The model is the tiny Gemma 2 (python -m train.tiny_model builds it into a temporary HF_HOME), or --model, any
Gemma 2 HF folder (bench/bench_export.py's full-shape one: there use --float-type bf16 and a smaller --max-tokens,
calibration and scoring are forward passes of the 2B on the CPU). Both quants are made from the same float GGUF
(f32 unless --float-type) with the same llama.cpp quantizer and token_embd at q8_0 (export.token_embedding_type);
the only difference is the importance matrix, computed by convert.imatrix.compute_imatrix from the first
--calibration records of data/demo/chat.jsonl (the "training data"). Both are scored against the float GGUF on
records the matrix never saw (the rest of chat.jsonl and data/demo/heldout.jsonl): KL(float || quant) at every
position, its mean and 99th percentile, and the share of positions with the same top-1 token. Prints both, the
ratios, and the file sizes (the same tensor bytes by construction: the matrix changes values, not types; the
imatrix file carries a few hundred bytes of quantize.imatrix.* keys more).
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
from convert.llamacpp import convert_hf_to_gguf, native_output_to, quantize  # noqa: E402

TEMPLATE = ROOT / "core" / "templates" / "gemma.jinja"
DATA = ROOT / "data" / "demo"


def tiny_model(home: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "train.tiny_model", "--hf-home", str(home), "--data", str(DATA / "chat.jsonl")],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(home)},
    )
    return next((home / "hub").glob("models--tiny-gemma--gemma-2-tiny/snapshots/*"))


def rendered(tok, path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [tok.apply_chat_template(r["messages"], tokenize=False).removeprefix(tok.bos_token) for r in rows]


def logits(model: Path, texts: list[str], n_ctx: int = 512) -> list[np.ndarray]:
    with native_output_to(None):
        llm = llama_cpp.Llama(
            model_path=str(model), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False
        )
    out = []
    try:
        for text in texts:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)[:n_ctx]
            llm.reset()
            with native_output_to(None):
                llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
    finally:
        llm.close()
    return out


def kld(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    per_position, same = [], 0
    for r, g in zip(ref, got, strict=True):
        lp = r - r.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        lq = g - g.max(-1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
        per_position.append((np.exp(lp) * (lp - lq)).sum(-1))
        same += int((r.argmax(-1) == g.argmax(-1)).sum())
    k = np.concatenate(per_position)
    return {"mean": float(k.mean()), "p99": float(np.percentile(k, 99)), "top1": same / len(k), "n": len(k)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="Gemma 2 HF folder (default: the tiny model, built here)")
    ap.add_argument("--calibration", type=int, default=250, help="records of chat.jsonl that calibrate")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="calibration token budget")
    ap.add_argument("--float-type", choices=["f32", "f16", "bf16"], default="f32", help="the source and reference")
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
        ref = logits(f32, evaluation)
        a, b = kld(ref, logits(plain, evaluation)), kld(ref, logits(calibrated, evaluation))
        size_a, size_b = plain.stat().st_size, calibrated.stat().st_size
    name = args.model or "tiny Gemma 2 (train.tiny_model)"
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
