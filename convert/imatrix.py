"""An importance matrix from the run's own data (llama-imatrix, llama.cpp PR 4861): llama-quantize weighs each
weight's rounding error by the activations the run's chat-rendered records put on it. K-quants and IQ quants use it;
q8_0 and float types ignore it.
"""

from __future__ import annotations

import os
from pathlib import Path

from convert.llamacpp import replaced_when_done, run_child, tool
from convert.score import GGUF
from core.errors import InvalidInput, LlamaCppError

# llama-imatrix's default context; each chunk of this many tokens is one forward pass (a <bos> starts it).
CHUNK_TOKENS = 512
# Below this a chunk says little about attention over a conversation; calibration text shorter than two such
# chunks (llama-imatrix needs two) is an error, not a silently worse matrix.
MIN_CHUNK_TOKENS = 64
# Calibration budget: llama.cpp's usual imatrix runs use ~100 chunks of 512; the matrix is an average that
# settles long before (its PR 4861 thread), and the forward passes cost CPU minutes at the 2B's size.
DEFAULT_MAX_TOKENS = 16384


def compute_imatrix(
    float_gguf: Path, texts: list[str], out: Path, log_path: Path, max_tokens: int = DEFAULT_MAX_TOKENS
) -> Path:
    """Run llama-imatrix on `float_gguf` over the texts (at most ~max_tokens of them); the matrix (GGUF format)
    appears at `out` only when complete. InvalidInput when the texts are too short to calibrate on."""
    out = out.resolve()
    # the texts, cut at a record boundary once max_tokens are reached; counted with the GGUF's own tokenizer, special
    # markers as single tokens, as llama-imatrix reads the file with --parse-special
    with GGUF(float_gguf, vocab_only=True) as vocab:
        kept, n_tokens = [], 0
        for text in texts:
            if n_tokens >= max_tokens:
                break
            kept.append(text)
            n_tokens += len(vocab.tokenize(text, bos=False))
    chunk = CHUNK_TOKENS  # or the largest power of two that still gives llama-imatrix its two chunks
    while chunk > MIN_CHUNK_TOKENS and 2 * chunk > n_tokens:
        chunk //= 2
    if n_tokens < 2 * chunk:
        raise InvalidInput(
            f"the importance matrix needs at least {2 * MIN_CHUNK_TOKENS} tokens of calibration text; "
            f"{len(texts)} record(s) give {n_tokens}.\n"
            f"  fix: give the run more data, or export without an importance matrix"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    calibration = out.with_name(f".{out.name}.calibration.txt")
    tmp = out.with_name(f".{out.stem}.tmp.gguf")  # .gguf: the tool picks its output format from the suffix
    cmd = [
        str(tool("llama-imatrix")),
        "--model", str(float_gguf),
        "--file", str(calibration),
        "--output-file", str(tmp),
        "--ctx-size", str(chunk),
        "--chunks", str(n_tokens // chunk),
        "--parse-special",  # <start_of_turn>/<end_of_turn> as the single tokens the model was trained on
        "--no-ppl",  # perplexity of the chunks is not needed and costs a softmax over the vocab per token
        "--threads", str(os.cpu_count() or 1),
    ]  # fmt: skip
    calibration.write_text("".join(kept), encoding="utf-8")
    try:
        with replaced_when_done(out, tmp):
            rc = run_child(cmd, log_path)
            if rc != 0 or not tmp.is_file():
                raise LlamaCppError(
                    f"llama-imatrix failed on {float_gguf.name} (exit {rc}); its output is in {log_path}"
                )
    finally:
        calibration.unlink(missing_ok=True)
    return out
