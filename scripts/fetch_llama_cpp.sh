#!/usr/bin/env bash
# Unpack llama.cpp's converter tree from the llama-cpp-python source distribution we pin, and install
# its own gguf-py into the current Python environment.
#
# Why: the converter (convert_hf_to_gguf.py + conversion/) must run with the gguf-py of the same
# llama.cpp commit; PyPI's gguf 0.19.0 carries the same version number but lacks MODEL_ARCH constants this
# converter uses (AttributeError at import; seen with llama-cpp-python 0.3.36).
# The llama-cpp-python sdist vendors exactly the llama.cpp tree its binding (and quantizer) is built
# from, so one pin gives converter, gguf-py, quantizer and runtime from one commit.
#
# The unpacked tree (2 MB) is kept beside the llama.cpp builds (build_llama_cpp.sh's cache root), once per pin: a
# fresh clone copies it instead of fetching and unpacking the 77 MB sdist again (12 s of its set-up; 3.7 s with this
# script's gguf-py install).
#
# usage: scripts/fetch_llama_cpp.sh DEST [PYTHON]
#   DEST    folder to create (e.g. .venv/llama.cpp); replaced atomically when the version changes
#   PYTHON  interpreter whose environment gets gguf-py (default: python)
set -euo pipefail

dest=${1:?usage: $0 DEST [PYTHON]}
py=${2:-python}
here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' "$here/constraints.txt")
[ -n "$version" ] || { echo "error: no llama-cpp-python pin in constraints.txt" >&2; exit 2; }
cached=${LLAMA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gemma-lora-pipeline/llama.cpp}/llama-cpp-python-$version-tree

if [ -f "$dest/VERSION" ] && grep -qx "llama-cpp-python=$version" "$dest/VERSION"; then
    echo "llama.cpp tree for llama-cpp-python $version already at $dest"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    stage="$work/tree"
    if [ -f "$cached/VERSION" ]; then
        cp -r "$cached" "$stage"
        how="copied from $cached"
    else
        # --no-binary for this package only (as build_llama_cpp.sh): pip prepares the sdist's metadata, and with
        # :all: its build dependencies (scikit-build-core, cmake, ninja) were built from source too, minutes with
        # pip's cache empty
        "$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work"
        tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
        src="$work/llama_cpp_python-$version"
        tree="$src/vendor/llama.cpp"
        mkdir -p "$stage"
        cp -r "$tree/convert_hf_to_gguf.py" "$tree/convert_lora_to_gguf.py" "$tree/conversion" \
              "$tree/gguf-py" "$tree/LICENSE" "$stage/"
        # The sdist carries no git metadata; its changelog names the llama.cpp commit of each release.
        commit=$(awk -v v="## [$version]" '$0==v {f=1; next} /^## \[/ {f=0} f' "$src/CHANGELOG.md" \
                 | grep -o 'llama.cpp@[0-9a-f]*' | head -n1 | cut -d@ -f2)
        {
            echo "llama-cpp-python=$version"
            echo "llama.cpp=${commit:-unknown}"
        } > "$stage/VERSION"
        # A copy renamed into the cache: a concurrent set-up finds a whole tree or none. No cache is no error.
        if mkdir -p "$(dirname "$cached")" 2>/dev/null && cp -r "$stage" "$work/cache" 2>/dev/null; then
            mv -T "$work/cache" "$cached" 2>/dev/null || true
        fi
        how="unpacked from the sdist"
    fi
    rm -rf "$dest.tmp" && mkdir -p "$(dirname "$dest")" && mv "$stage" "$dest.tmp"
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
    echo "llama.cpp $(sed -n 's/^llama.cpp=//p' "$dest/VERSION") (llama-cpp-python $version) in $dest, $how"
fi
# Replace PyPI's gguf with the vendored one, so `import gguf` everywhere matches the converter.
"$py" -m pip install --quiet --no-deps --force-reinstall "$dest/gguf-py"
