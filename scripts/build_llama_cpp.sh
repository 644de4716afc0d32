#!/usr/bin/env bash
# Compile llama.cpp once per llama.cpp commit, from the tree vendored in the pinned llama-cpp-python source
# distribution: its shared libraries, the two tools the export runs (llama-quantize, llama-imatrix), and the
# Python binding packaged as a wheel around those same libraries; then install that wheel into PYTHON's env.
#
# Why one build: pip's build of the binding's sdist compiles this same tree (4-5 min on 2 cores), and the tools
# used to take a second compile of it. Here cmake compiles it once. The binding is packaged from its sdist with
# LLAMA_BUILD=OFF and LLAVA_BUILD=OFF, the switches of its CMakeLists.txt that skip the compile, and this build's
# libraries installed into its llama_cpp/lib/, where llama_cpp/llama_cpp.py loads libllama.so from. They travel
# inside the wheel, so `import llama_cpp` works from any process of that environment (a test's subprocess, the
# Docker image) without LLAMA_CPP_LIB_PATH. Binding, tools, converter and gguf-py: one commit, one compilation.
# Not built: libmtmd (llama_cpp.mtmd_cpp, the multimodal chat handlers, which this project never imports; that
# import raises FileNotFoundError naming 'mtmd') and llama-perplexity (nothing runs it).
#
# usage: scripts/build_llama_cpp.sh TREE [DEST] [PYTHON]
#   TREE    the converter tree that scripts/fetch_llama_cpp.sh unpacked (its VERSION names the commit)
#   DEST    cache root (default: $LLAMA_TOOLS_DIR, else ${XDG_CACHE_HOME:-~/.cache}/gemma-lora-pipeline/llama.cpp);
#           the build goes to DEST/<llama.cpp commit>/: bin/ (tools and libraries; convert/llamacpp.py looks there),
#           wheel/ (the binding), BUILD-INFO
#   PYTHON  interpreter whose pip downloads the sdist, builds the wheel and installs it (default: python)
# A folder whose BUILD-INFO matches the commit and flags is reused (nothing compiled); a new pin builds into a
# new folder. The wheel is reinstalled each time, so the environment always runs this build's libraries.
set -euo pipefail

tree=${1:?usage: $0 TREE [DEST] [PYTHON]}
root=${2:-${LLAMA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gemma-lora-pipeline/llama.cpp}}
py=${3:-python}
here=$(cd "$(dirname "$0")/.." && pwd)
tools=(llama-imatrix llama-quantize)
# What the binding loads: libllama.so and the ggml libraries it needs (its NEEDED entries, and theirs); the load
# check at the end fails if a future pin needs another one.
binding_libs=(libllama.so libggml.so libggml-base.so libggml-cpu.so)
# Portable (GGML_NATIVE=OFF: AVX2/FMA/F16C, not this CPU's -march=native), Release, shared libraries looked up
# beside whatever loads them (RUNPATH $ORIGIN: the tools in bin/, the libraries in bin/ or in the wheel's lib/;
# unversioned names, so one file each), and nothing that is not needed: no tests, examples, server or web UI, no
# HTTPS (LLAMA_OPENSSL: model download).
flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON
       -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' -DLLAMA_OPENSSL=OFF
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF)
# The tools' command-line glue is compiled without optimization: llama-common (argument parsing, JSON, chat
# templates, the imatrix file) and the cpp-httplib it links are 239 of the build's ~516 CPU-seconds at -O3 and run
# once per command. What computes stays at -O3: libggml and libllama (quantization, evaluation), and the tools' own
# sources (llama-quantize's, llama-imatrix's activation sums). A CMake hook run after the top project() appends
# -O0 to those two targets (the last -O wins) once they exist.
glue_targets=(llama-common cpp-httplib)

version=$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' "$here/constraints.txt")
[ -n "$version" ] || { echo "error: no llama-cpp-python pin in constraints.txt" >&2; exit 2; }
if ! grep -qx "llama-cpp-python=$version" "$tree/VERSION" 2>/dev/null; then
    echo "error: $tree/VERSION is not from llama-cpp-python $version (the pin in constraints.txt)" >&2
    echo "  fix: bash scripts/fetch_llama_cpp.sh $tree $py   (or make setup)" >&2
    exit 2
fi
commit=$(sed -n 's/^llama.cpp=//p' "$tree/VERSION")
# The folder name convert/llamacpp.py computes from the same VERSION file.
key=$commit
[ -n "$key" ] && [ "$key" != unknown ] || key="llama-cpp-python-$version"
dest="$root/$key"
stamp="llama-cpp-python=$version llama.cpp=$commit flags=${flags[*]} tools=${tools[*]} binding=${binding_libs[*]}"
stamp+=" O0=${glue_targets[*]}"

# The one wheel of the build (py3-none-<platform>: the sdist sets wheel.py-api = "py3"; ctypes, no extension module).
wheel_of() { compgen -G "$1/wheel/llama_cpp_python-$version-py3-none-*.whl"; }
have_all() {
    [ -f "$dest/BUILD-INFO" ] && [ "$(cat "$dest/BUILD-INFO")" = "$stamp" ] && wheel_of "$dest" >/dev/null || return 1
    for t in "${tools[@]}"; do [ -x "$dest/bin/$t" ] || return 1; done
}

if have_all; then
    echo "llama.cpp $key already built at $dest"
else
    for cmd in cmake c++; do
        command -v "$cmd" >/dev/null || { echo "error: $cmd not found; compiling llama.cpp needs cmake and a C++ compiler" >&2
                                          echo "  fix: apt-get install cmake build-essential (or your system's equivalent)" >&2; exit 2; }
    done
    mkdir -p "$root"
    work=$(mktemp -d "$root/.build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    start=$SECONDS
    # --no-binary for this package only: its build dependencies come as wheels (see Dockerfile.cuda on :all:).
    "$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work"
    tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
    sdist="$work/llama_cpp_python-$version"
    src="$sdist/vendor/llama.cpp"
    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    glue="$work/glue-O0.cmake"
    {   # cmake_language(DEFER) is CMake 3.19's; llama.cpp needs 3.14, and an older CMake builds the glue at -O3
        echo "if(CMAKE_VERSION VERSION_GREATER_EQUAL 3.19)"
        defer='cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL set_property TARGET'
        for t in "${glue_targets[@]}"; do echo "  $defer $t APPEND PROPERTY COMPILE_OPTIONS -O0)"; done
        echo "endif()"
    } > "$glue"
    cmake -S "$src" -B "$work/build" "${generator[@]}" "${flags[@]}" "-DCMAKE_PROJECT_llama.cpp_INCLUDE=$glue" \
        >"$work/cmake.log" 2>&1 \
        || { tail -n 30 "$work/cmake.log" >&2; echo "error: cmake configure failed" >&2; exit 1; }
    cmake --build "$work/build" --parallel "$(nproc 2>/dev/null || echo 2)" --target "${tools[@]}"
    mkdir -p "$work/stage/bin" "$work/stage/wheel"
    for t in "${tools[@]}"; do cp "$work/build/bin/$t" "$work/stage/bin/"; done
    cp "$work/build/bin/"lib*.so "$work/stage/bin/"  # what the tools link (libllama-common.so too)
    cp "$src/LICENSE" "$work/stage/"

    # The binding's wheel, compiling nothing: CMAKE_PROJECT_<name>_INCLUDE (a CMake hook run at the end of the
    # sdist's `project(llama_cpp)`) installs this build's libraries where LLAMA_BUILD=ON would have put its own.
    # --no-cache-dir: a wheel made from a local build must not land in pip's cache under the sdist's name.
    hook="$work/binding-libs.cmake"
    printf 'install(FILES %s DESTINATION "${SKBUILD_PLATLIB_DIR}/llama_cpp/lib")\n' \
        "$(printf '"%s" ' "${binding_libs[@]/#/$work/stage/bin/}")" > "$hook"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama_cpp_INCLUDE='$hook'" \
        "$py" -m pip wheel --quiet --no-deps --no-cache-dir -w "$work/stage/wheel" "$sdist" >"$work/wheel.log" 2>&1 \
        || { tail -n 30 "$work/wheel.log" >&2; echo "error: packaging the llama-cpp-python wheel failed" >&2; exit 1; }
    wheel_of "$work/stage" >/dev/null \
        || { ls "$work/stage/wheel" >&2; echo "error: no llama_cpp_python-$version wheel from the sdist" >&2; exit 1; }
    echo "$stamp" > "$work/stage/BUILD-INFO"
    # Atomic for readers: the folder appears complete or not at all (a concurrent build of the same key loses
    # the rename race harmlessly: its result is equivalent).
    rm -rf "$dest.old" && { [ ! -e "$dest" ] || mv "$dest" "$dest.old"; }
    mv "$work/stage" "$dest" 2>/dev/null || have_all
    rm -rf "$dest.old"
    echo "built llama.cpp $commit (${tools[*]}, libraries, binding wheel) into $dest in $((SECONDS - start)) s"
fi

"$py" -m pip install --quiet --no-deps --force-reinstall "$(wheel_of "$dest")"
# dlopen resolves libllama.so's own dependencies: a library missing from the wheel fails here, not at first use.
"$py" -c 'import ctypes, importlib.util, pathlib, sys
lib = pathlib.Path(importlib.util.find_spec("llama_cpp").submodule_search_locations[0]) / "lib" / "libllama.so"
ctypes.CDLL(str(lib))
print(f"llama-cpp-python installed into {sys.prefix}, loading {lib}")'
