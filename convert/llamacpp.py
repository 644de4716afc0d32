"""llama.cpp tooling, all from one pinned release: converter, gguf-py, quantizer, runtime.

The converter tree (convert_hf_to_gguf.py, conversion/, gguf-py/) is unpacked from the
llama-cpp-python sdist by scripts/fetch_llama_cpp.sh; the quantizer and runtime are the compiled
binding of the same release. `tree()` refuses a tree whose release differs from the binding's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import gguf
import llama_cpp
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from core.errors import LlamaCppError
from core.quants import QUANTS


def tree() -> Path:
    """The unpacked converter tree, checked against the installed binding's release."""
    env = os.environ.get("LLAMA_CPP_DIR")
    folder = Path(env) if env else Path(sys.prefix) / "llama.cpp"
    script = folder / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise LlamaCppError(
            f"llama.cpp converter not found at {script}.\n"
            f"  fix: run `make setup` (or `bash scripts/fetch_llama_cpp.sh {folder} {sys.executable}`),\n"
            f"       or point LLAMA_CPP_DIR at an unpacked tree of the pinned release"
        )
    info = version_info(folder)
    binding = metadata.version("llama_cpp_python")
    if info.get("llama-cpp-python") != binding:
        raise LlamaCppError(
            f"converter tree {folder} is from llama-cpp-python {info.get('llama-cpp-python')} but the "
            f"installed binding is {binding}: converter and quantizer must come from one release.\n"
            f"  fix: bash scripts/fetch_llama_cpp.sh {folder} {sys.executable}"
        )
    return folder


def version_info(folder: Path | None = None) -> dict[str, str]:
    """{'llama-cpp-python': version, 'llama.cpp': commit} from the tree's VERSION file."""
    folder = folder or tree()
    path = folder / "VERSION"
    if not path.is_file():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)


def convert_hf_to_gguf(
    model_dir: Path, out_path: Path, outtype: str = "f32", log_path: Path | None = None, model_name: str | None = None
) -> None:
    """Run the pinned convert_hf_to_gguf.py on a HF folder; the output appears only when complete."""
    if not (model_dir / "tokenizer.model").is_file():
        # Gemma's vocab is read from the SentencePiece file; without it the converter fails late.
        raise LlamaCppError(f"{model_dir} has no tokenizer.model: the Gemma converter needs it")
    folder = tree()
    model_dir, out_path = model_dir.resolve(), out_path.resolve()  # the converter runs in its own folder
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    cmd = [
        sys.executable,
        str(folder / "convert_hf_to_gguf.py"),
        str(model_dir),
        "--outfile",
        str(tmp),
        "--outtype",
        outtype,
    ] + (["--model-name", model_name] if model_name else [])
    # Without NO_LOCAL_GGUF the converter imports the gguf-py next to it, the one it was written for.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"HF_HUB_OFFLINE": "1"}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path or os.devnull, "a") as log:
        proc = subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        where = f"; its output is in {log_path}" if log_path else ""
        raise LlamaCppError(f"convert_hf_to_gguf.py failed on {model_dir} (exit {proc.returncode}){where}")
    os.replace(tmp, out_path)


@contextlib.contextmanager
def native_output_to(log_path: Path | None):
    """Send what C code prints on stdout/stderr (llama.cpp's load and quantize logs, which ignore
    verbose=False in places) to a log file, or discard it when log_path is None."""
    log_path = log_path or Path(os.devnull)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def quantize(
    src: Path, dst: Path, quant: str, token_embedding_type: str | None = None, log_path: Path | None = None
) -> None:
    """llama.cpp's quantizer (llama_model_quantize, as llama-quantize uses) from an f32 GGUF."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(QUANTS[quant].file_type)
    params.nthread = os.cpu_count() or 1
    if token_embedding_type and not QUANTS[quant].is_float:
        params.token_embedding_type = int(QUANTS[token_embedding_type].tensor_type)
    tmp = dst.with_name(f".{dst.name}.tmp")
    with native_output_to(log_path):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise LlamaCppError(f"llama_model_quantize {src.name} -> {quant} failed (code {rc})")
    os.replace(tmp, dst)


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add string key/values to a GGUF (rewritten beside it by gguf-py's own copier, then renamed over it).

    Quantizing copies every key of its input, so keys added to the f32 file reach every quant.
    """
    reader = gguf.GGUFReader(str(path))
    tmp = path.with_name(f".{path.name}.meta.tmp")
    writer = gguf.GGUFWriter(
        str(tmp), arch=reader.fields[gguf.Keys.General.ARCHITECTURE].contents(), endianess=reader.endianess
    )
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:  # tensor data offsets follow the source file's alignment
        writer.data_alignment = alignment.contents()
    new = {k: MetadataDetails(gguf.GGUFValueType.STRING, v) for k, v in extra.items()}
    try:
        copy_with_new_metadata(reader, writer, new, remove_metadata=[])
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    del reader
    os.replace(tmp, path)


def read_metadata(path: Path) -> dict[str, object]:
    """Scalar and string metadata of a GGUF (arrays such as the vocab are summarised by length)."""
    reader = gguf.GGUFReader(str(path))
    out: dict[str, object] = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            out[field.name] = f"[{len(field.data)} items]"
        else:
            out[field.name] = field.contents()
    out["tensor_count"] = len(reader.tensors)
    return out
