"""Where the pinned llama.cpp pieces are: the converter tree (`tree()`, unpacked by scripts/fetch_llama_cpp.sh) and
the tools built from the same release (`tool()`, scripts/build_llama_cpp.sh, one folder per llama.cpp commit so that
a new pin never runs an old tool; docs/export-and-verify.md, "Tools").
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

from core.errors import LlamaCppError

TOOLS = ("llama-imatrix", "llama-quantize")


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
