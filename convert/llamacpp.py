"""llama.cpp tooling, all from one pinned release: converter, gguf-py, quantizer, runtime.

The converter tree (convert_hf_to_gguf.py, conversion/, gguf-py/) is unpacked from the
llama-cpp-python sdist by scripts/fetch_llama_cpp.sh; the quantizer and runtime are the compiled
binding of the same release, and the command-line tools (llama-quantize for quants with an importance
matrix) are built from that sdist too. convert/tools.py finds each piece and checks they are one release.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp

from convert.gguf_header import read_header
from convert.tools import tool, tree
from convert.tools import version_info as version_info  # re-exported: callers import it from here
from core.errors import LlamaCppError
from core.paths import require_file
from core.quants import QUANTS

# The project root, so that `python -m convert.llamacpp` (the quantizer's child process) imports this tree.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def convert_hf_to_gguf(
    model_dir: Path,
    out_path: Path,
    outtype: str = "f32",
    log_path: Path | None = None,
    model_name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Run the pinned convert_hf_to_gguf.py on a HF folder; the output appears only when complete.

    metadata: string keys written into the GGUF by the converter's own pass (convert/converter_child.py)."""
    if not (model_dir / "tokenizer.model").is_file():
        # Gemma's vocab is read from the SentencePiece file; without it the converter fails late.
        raise LlamaCppError(f"{model_dir} has no tokenizer.model: the Gemma converter needs it")
    folder = tree()
    model_dir, out_path = model_dir.resolve(), out_path.resolve()  # the converter runs in its own folder
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    script = str(folder / "convert_hf_to_gguf.py")
    if metadata:  # the same script, run by converter_child.py, which hands the keys to its writer
        script_and_keys = [str(Path(__file__).with_name("converter_child.py")), script, json.dumps(metadata)]
    else:
        script_and_keys = [script]
    cmd = [
        sys.executable,
        *script_and_keys,
        str(model_dir),
        "--outfile",
        str(tmp),
        "--outtype",
        outtype,
    ] + (["--model-name", model_name] if model_name else [])
    # Without NO_LOCAL_GGUF the converter imports the gguf-py next to it, the one it was written for.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"HF_HUB_OFFLINE": "1"}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        rc = run_child(cmd, log_path, cwd=folder, env=env)
        if rc != 0:
            where = f"; its output is in {log_path}" if log_path else ""
            raise LlamaCppError(f"convert_hf_to_gguf.py failed on {model_dir.name} (exit {rc}){where}")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed or interrupted conversion leaves no partial file


def run_child(cmd: list[str], log_path: Path | None, cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
    """Run a llama.cpp tool as a child process, its output appended to log_path; return its exit status.

    Long native calls cannot be interrupted from Python (a signal handler runs only between bytecodes, and an
    exception raised in a ctypes callback is discarded), so they run in a child that the parent can stop: on
    SIGINT/SIGTERM (Interrupted) or any other error while waiting, the child is killed and reaped before the
    exception goes on. The child has its own session, so a terminal's Ctrl-C reaches the parent only."""
    with open(log_path or os.devnull, "a") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise


def quantize_in_process(src: Path, dst: Path, quant: str, token_embedding_type: str | None = None) -> int:
    """llama.cpp's quantizer (llama_model_quantize, as llama-quantize uses) from an f32 GGUF; its return code."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(QUANTS[quant].file_type)
    params.nthread = os.cpu_count() or 1
    if token_embedding_type and not QUANTS[quant].is_float:
        params.token_embedding_type = int(QUANTS[token_embedding_type].tensor_type)
    return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)))


def quantize(
    src: Path,
    dst: Path,
    quant: str,
    token_embedding_type: str | None = None,
    log_path: Path | None = None,
    imatrix: Path | None = None,
) -> None:
    """Quantize in a child process, so that SIGINT/SIGTERM stop it: llama_model_quantize is one native call of
    minutes for the 2B model (docs/operations.md). The output appears only when complete.

    Without an importance matrix the child is `python -m convert.llamacpp quantize ...` (the binding); with one
    it is llama-quantize, whose loader turns the matrix file into the per-tensor weights llama_model_quantize
    takes (and records it in the quant's quantize.imatrix.* keys). Same llama.cpp commit, same quantizer."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    if imatrix is None:
        cmd = [sys.executable, "-m", "convert.llamacpp", "quantize", str(src), str(tmp), quant]
        cmd.append(token_embedding_type or "")
    else:
        cmd = quantize_tool_command(src, tmp, quant, token_embedding_type, imatrix)
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    try:
        rc = run_child(cmd, log_path, env=os.environ | {"PYTHONPATH": path})
        if rc != 0:
            where = f"; see {log_path}" if log_path else ""
            how = "llama-quantize --imatrix" if imatrix else "llama_model_quantize"
            raise LlamaCppError(f"{how} {src.name} -> {quant} failed (code {rc}){where}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # a failed or interrupted quantization leaves no partial file


def quantize_tool_command(
    src: Path, dst: Path, quant: str, token_embedding_type: str | None, imatrix: Path | None
) -> list[str]:
    """llama-quantize's command line for what quantize_in_process asks the binding for (same ftype, threads and
    token_embd type; `token_embedding_type` only for quantized types, as there)."""
    cmd = [str(tool("llama-quantize"))]
    if imatrix is not None:
        cmd += ["--imatrix", str(require_file(imatrix, "importance matrix", "compute it with convert.imatrix"))]
    if token_embedding_type and not QUANTS[quant].is_float:
        cmd += ["--token-embedding-type", QUANTS[token_embedding_type].tensor_type.name]
    # llama-quantize reads the type as a name (Q4_K_M) or as the llama_ftype number (try_parse_ftype): the number
    # is exactly what the binding is given
    return cmd + [str(src), str(dst), str(int(QUANTS[quant].file_type)), str(os.cpu_count() or 1)]


def read_metadata(path: Path) -> dict[str, object]:
    """Scalar and string metadata of a GGUF (arrays such as the vocab are summarised by length), and its
    tensor_count; InvalidInput (exit 2) for a missing or damaged file (convert/gguf_header.py reads it)."""
    header = read_header(path)
    return header.metadata | {"tensor_count": len(header.tensors)}


def main(argv: list[str]) -> int:
    """`python -m convert.llamacpp quantize SRC DST QUANT [TOKEN_EMBEDDING_TYPE]`: the quantizer's child process."""
    if len(argv) != 5 or argv[0] != "quantize":
        print("usage: python -m convert.llamacpp quantize SRC DST QUANT [TOKEN_EMBEDDING_TYPE]", file=sys.stderr)
        return 2
    _, src, dst, quant, token_embedding_type = argv
    return quantize_in_process(Path(src), Path(dst), quant, token_embedding_type or None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
