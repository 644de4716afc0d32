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
# usage: scripts/fetch_llama_cpp.sh DEST [PYTHON]
#   DEST    folder to create (e.g. .venv/llama.cpp); replaced atomically when the version changes
#   PYTHON  interpreter whose environment gets gguf-py (default: python)
set -euo pipefail

dest=${1:?usage: $0 DEST [PYTHON]}
py=${2:-python}
here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' "$here/constraints.txt")
[ -n "$version" ] || { echo "error: no llama-cpp-python pin in constraints.txt" >&2; exit 2; }

if [ -f "$dest/VERSION" ] && grep -qx "llama-cpp-python=$version" "$dest/VERSION"; then
    echo "llama.cpp tree for llama-cpp-python $version already at $dest"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # --no-binary for this package only (as build_llama_cpp.sh): pip prepares the sdist's metadata, and with :all:
    # its build dependencies (scikit-build-core, cmake, ninja) were built from source too, minutes with pip's cache empty
    "$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work"
    tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
    src="$work/llama_cpp_python-$version"
    tree="$src/vendor/llama.cpp"
    stage="$work/tree"
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
    rm -rf "$dest.tmp" && mkdir -p "$(dirname "$dest")" && mv "$stage" "$dest.tmp"
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
    echo "unpacked llama.cpp ${commit:-unknown} (llama-cpp-python $version) into $dest"
fi
# Replace PyPI's gguf with the vendored one, so `import gguf` everywhere matches the converter.
"$py" -m pip install --quiet --no-deps --force-reinstall "$dest/gguf-py"
