#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-imatrix, llama-quantize) from the llama.cpp tree vendored in the
# pinned llama-cpp-python source distribution, once per llama.cpp commit.
#
# Why: the Python binding exposes the runtime and llama_model_quantize, but not an importance matrix
# (llama-imatrix collects it; llama_model_quantize takes it only as a C++ map that llama-quantize builds from
# the file). Built from the same sdist as the binding, so tools, binding, converter and gguf-py are one
# llama.cpp commit.
#
# usage: scripts/build_llama_tools.sh TREE [DEST] [PYTHON]
#   TREE    the converter tree that scripts/fetch_llama_cpp.sh unpacked (its VERSION names the commit)
#   DEST    cache root (default: $LLAMA_TOOLS_DIR, else ${XDG_CACHE_HOME:-~/.cache}/gemma-lora-pipeline/llama-tools);
#           the tools go to DEST/<llama.cpp commit>/bin/, where convert/tools.py looks for them
#   PYTHON  interpreter whose pip downloads the sdist (default: python)
# A folder that holds every tool built with the same flags is kept; a new pin builds into a new folder.
set -euo pipefail

tree=${1:?usage: $0 TREE [DEST] [PYTHON]}
root=${2:-${LLAMA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gemma-lora-pipeline/llama-tools}}
py=${3:-python}
here=$(cd "$(dirname "$0")/.." && pwd)
targets=(llama-imatrix llama-quantize)
# Portable (GGML_NATIVE=OFF builds for AVX2/FMA/F16C, as the binding's build does, not for this CPU only),
# static (the binaries move and run without the build folder), Release, and nothing that is not needed:
# no tests, examples, server or web UI, no HTTPS (LLAMA_OPENSSL: model download; LLAMA_CURL is gone at
# this commit, replaced by it).
flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF)

version=$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' "$here/constraints.txt")
[ -n "$version" ] || { echo "error: no llama-cpp-python pin in constraints.txt" >&2; exit 2; }
if ! grep -qx "llama-cpp-python=$version" "$tree/VERSION" 2>/dev/null; then
    echo "error: $tree/VERSION is not from llama-cpp-python $version (the pin in constraints.txt)" >&2
    echo "  fix: bash scripts/fetch_llama_cpp.sh $tree $py   (or make setup)" >&2
    exit 2
fi
commit=$(sed -n 's/^llama.cpp=//p' "$tree/VERSION")
# The folder name convert/tools.py computes from the same VERSION file.
key=$commit
[ -n "$key" ] && [ "$key" != unknown ] || key="llama-cpp-python-$version"
dest="$root/$key"
stamp="llama-cpp-python=$version llama.cpp=$commit flags=${flags[*]}"

have_all() {
    [ -f "$dest/BUILD-INFO" ] && [ "$(cat "$dest/BUILD-INFO")" = "$stamp" ] || return 1
    for t in "${targets[@]}"; do [ -x "$dest/bin/$t" ] || return 1; done
}
if have_all; then
    echo "llama.cpp tools for $key already at $dest/bin"
    exit 0
fi

for cmd in cmake c++; do
    command -v "$cmd" >/dev/null || { echo "error: $cmd not found; the llama.cpp tools need cmake and a C++ compiler" >&2
                                      echo "  fix: apt-get install cmake build-essential (or your system's equivalent)" >&2; exit 2; }
done
mkdir -p "$root"
work=$(mktemp -d "$root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS
# --no-binary for this package only: its build dependencies come as wheels (see Dockerfile.cuda on :all:).
"$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work"
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$src" -B "$work/build" "${generator[@]}" "${flags[@]}" >"$work/cmake.log" 2>&1 \
    || { tail -n 30 "$work/cmake.log" >&2; echo "error: cmake configure failed" >&2; exit 1; }
cmake --build "$work/build" --parallel "$(nproc 2>/dev/null || echo 2)" --target "${targets[@]}"
mkdir -p "$work/stage/bin"
for t in "${targets[@]}"; do cp "$work/build/bin/$t" "$work/stage/bin/"; done
cp "$src/LICENSE" "$work/stage/"
echo "$stamp" > "$work/stage/BUILD-INFO"
# Atomic for readers: the folder appears complete or not at all (a concurrent build of the same key loses
# the rename race harmlessly: its result is identical).
rm -rf "$dest.old" && { [ ! -e "$dest" ] || mv "$dest" "$dest.old"; }
mv "$work/stage" "$dest" 2>/dev/null || have_all
rm -rf "$dest.old"
echo "built ${targets[*]} (llama.cpp $commit) into $dest/bin in $((SECONDS - start)) s"
