"""The pinned llama.cpp: where its pieces are, and running them. The converter tree (`tree()`, unpacked by
scripts/fetch_llama_cpp.sh) and the tools built from the same release (`tool()`, scripts/build_llama_cpp.sh, one
folder per llama.cpp commit so that a new pin never runs an old tool; docs/export-and-verify.md, "Tools"); the
converters and llama-quantize run as child processes that a signal stops and whose output appears only when complete.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from convert.gguf_header import read_header
from core.errors import LlamaCppError
from core.paths import require_file
from core.quants import QUANTS

TOOLS = ("llama-imatrix", "llama-quantize")
# Starts each child so that it dies with this process (see the file; Linux's prctl, hence Linux only).
DIE_WITH_PARENT = Path(__file__).with_name("die_with_parent.py")
# Runs the converter unchanged, handing extra keys to its GGUF writer (see the file).
CONVERTER_CHILD = Path(__file__).with_name("converter_child.py")


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
    binding = importlib.metadata.version("llama_cpp_python")
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


def tools_dir() -> Path:
    """<root>/<llama.cpp commit>/bin for the release the converter tree (and binding) are from."""
    info = version_info(tree())
    commit = info.get("llama.cpp", "unknown")
    key = commit if commit and commit != "unknown" else f"llama-cpp-python-{info.get('llama-cpp-python')}"
    # the root the build script writes to (the same rule as scripts/build_llama_cpp.sh)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma-lora-pipeline" / "llama.cpp"
    return Path(os.environ.get("LLAMA_TOOLS_DIR") or cache) / key / "bin"


def tool(name: str) -> Path:
    """The path of one llama.cpp tool of the pinned commit; LlamaCppError saying how to build it if missing."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; built: {', '.join(TOOLS)}")
    path = tools_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LlamaCppError(
            f"llama.cpp tool {name} not found at {path}.\n"
            f"  fix: run `make setup` (or `bash scripts/build_llama_cpp.sh {tree()} '' {sys.executable}`): it builds "
            f"{', '.join(TOOLS)} from the pinned llama.cpp tree once (cmake and a C++ compiler needed),\n"
            f"       or point LLAMA_TOOLS_DIR at the root of such a build"
        )
    return path


def convert_hf_to_gguf(
    model_dir: Path,
    out_path: Path,
    outtype: str = "f32",
    log_path: Path | None = None,
    model_name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Run the pinned convert_hf_to_gguf.py on a HF folder, with `metadata` written in the converter's own pass; the
    output appears only when complete."""
    if not (model_dir / "tokenizer.model").is_file():
        # Gemma's vocab is read from the SentencePiece file; without it the converter fails late.
        raise LlamaCppError(f"{model_dir} has no tokenizer.model: the Gemma converter needs it")
    model_dir, out_path = model_dir.resolve(), out_path.resolve()  # the converter runs in its own folder
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_when_done(out_path) as tmp:
        args = [str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
        args += ["--model-name", model_name] if model_name else []
        run_converter("convert_hf_to_gguf.py", model_dir.name, args, tmp, log_path, metadata)


def run_converter(
    script: str, source: str, args: list[str], out: Path, log_path: Path | None, keys: dict[str, str] | None = None
) -> None:
    """One of the pinned tree's converter scripts, offline, run from its own folder (run_child), which must write
    `out`. keys: string keys its GGUFWriter adds to the file (convert/converter_child.py runs the script unchanged)."""
    folder = tree()
    script_and_keys = [str(CONVERTER_CHILD), str(folder / script), json.dumps(keys)] if keys else [str(folder / script)]
    cmd = [sys.executable, *script_and_keys, *args]
    # Without NO_LOCAL_GGUF the converter imports the gguf-py next to it, the one it was written for.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"HF_HUB_OFFLINE": "1"}
    rc = run_child(cmd, log_path, cwd=folder, env=env)
    if rc != 0 or not out.is_file():
        where = f"; its output is in {log_path}" if log_path else ""
        raise LlamaCppError(f"{script} failed on {source} (exit {rc}){where}")


@contextmanager
def replaced_when_done(out: Path, tmp: Path | None = None) -> Iterator[Path]:
    """A temporary path (.<name>.tmp beside `out`) that becomes `out` when the block completes, and is removed
    however it ends: a failed or interrupted tool leaves no partial file."""
    tmp = tmp or out.with_name(f".{out.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def run_child(cmd: list[str], log_path: Path | None, cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
    """Run a llama.cpp tool as a child process, its output appended to log_path; return its exit status.

    A child, because long native calls cannot be interrupted from Python (signal handlers run between bytecodes):
    on any exception while waiting (SIGINT/SIGTERM's Interrupted included) it is killed and reaped first. It has its
    own session (a terminal's Ctrl-C reaches the parent only) and, on Linux, dies with a parent killed outright
    (convert/die_with_parent.py)."""
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-I", "-S", str(DIE_WITH_PARENT), str(os.getpid()), *cmd]
    with open(log_path or os.devnull, "a") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise


def quantize(
    src: Path,
    dst: Path,
    quant: str,
    token_embedding_type: str | None = None,
    log_path: Path | None = None,
    imatrix: Path | None = None,
) -> None:
    """llama-quantize from a float GGUF, as a child process that SIGINT/SIGTERM stop (run_child; minutes for the 2B
    model: docs/operations.md), with an importance matrix if given. The output appears only when complete."""
    with replaced_when_done(dst) as tmp:
        rc = run_child(quantize_tool_command(src, tmp, quant, token_embedding_type, imatrix), log_path)
        if rc != 0:
            where = f"; see {log_path}" if log_path else ""
            raise LlamaCppError(f"llama-quantize {src.name} -> {quant} failed (code {rc}){where}")


def quantize_tool_command(
    src: Path, dst: Path, quant: str, token_embedding_type: str | None, imatrix: Path | None
) -> list[str]:
    """llama-quantize's command line: the llama_ftype of `quant`, every core, and `token_embedding_type` for
    token_embd (quantized types only: a float file keeps its embedding as converted)."""
    cmd = [str(tool("llama-quantize"))]
    if imatrix is not None:
        cmd += ["--imatrix", str(require_file(imatrix, "importance matrix", "compute it with convert.imatrix"))]
    if token_embedding_type and not QUANTS[quant].is_float:
        cmd += ["--token-embedding-type", QUANTS[token_embedding_type].tensor_type.name]
    # llama-quantize reads the type as a name (Q4_K_M) or as the llama_ftype number (try_parse_ftype): the number
    # is the table's general.file_type itself (core/quants.py), with no name mapping in between
    return cmd + [str(src), str(dst), str(int(QUANTS[quant].file_type)), str(os.cpu_count() or 1)]


def read_metadata(path: Path) -> dict[str, object]:
    """Scalar and string metadata of a GGUF (arrays such as the vocab are summarised by length), and its
    tensor_count; InvalidInput (exit 2) for a missing or damaged file (convert/gguf_header.py reads it)."""
    header = read_header(path)
    return header.metadata | {"tensor_count": len(header.tensors)}
