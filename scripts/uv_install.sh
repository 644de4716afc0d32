#!/usr/bin/env bash
# `pip install ARGS` into PYTHON's environment, done by uv, reading pip's configuration.
#
# Why uv: the project's ~90 packages (torch included) install, bytecode compiled, in 30 s where pip takes 75 s
# (fresh venv, empty caches, this 2-core box, 2026-12-08), the biggest part of a fresh clone's `make setup`.
# --compile-bytecode does what pip does at install: without it every process that imports torch and transformers
# compiles them again where bytecode is not written (PYTHONDONTWRITEBYTECODE), 17 s instead of 8. uv reads none of pip's
# configuration, so the settings that choose where packages come from are passed on from `pip config list`
# (pip.conf files and PIP_* variables; the variables win, as in pip): index-url, extra-index-url, find-links,
# no-index, constraint and cert. pip's other settings do not change what gets installed.
#
# usage: scripts/uv_install.sh PYTHON ARGS...   (PYTHON's environment must have pip; uv is installed into it)
set -euo pipefail

py=${1:?usage: $0 PYTHON ARGS...}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
"$py" -m pip --version >/dev/null 2>&1 || {
    echo "error: $py cannot run pip; give the environment's interpreter (make setup passes .venv/bin/python)" >&2
    exit 2
}
# -qq: not the warnings about indexes without uv. uv only makes the install faster: where it cannot be had (a
# mirror without it), pip installs the same things, reading its configuration itself.
if ! "$py" -m pip install -qq -c "$here/constraints.txt" uv; then
    echo "uv is not installable here; installing with pip (about a minute slower)" >&2
    exec "$py" -m pip install "$@"
fi
uv=$(dirname "$py")/uv

# `pip config list` prints section.key='value': ":env:" for PIP_* variables, "global" and "install" for the files
# (merged across them). pip's precedence: the variables, then [install], then [global].
declare -A setting rank
while IFS= read -r line; do
    section=${line%%.*} rest=${line#*.}
    key=${rest%%=*} value=${rest#*=}
    value=${value#\'} value=${value%\'} value=${value//\\n/ }
    case $section in :env:) r=3 ;; install) r=2 ;; global) r=1 ;; *) continue ;; esac
    [ "${rank[$key]:-0}" -ge "$r" ] || { setting[$key]=$value; rank[$key]=$r; }
done < <("$py" -m pip config list)

set -f  # the values below are split on spaces and never globbed
args=(--python "$py" --index-strategy unsafe-best-match)  # pip's rule: the best version from any index
for v in ${setting[index-url]:-}; do args+=(--index-url "$v"); done
for v in ${setting[extra-index-url]:-}; do args+=(--extra-index-url "$v"); done
for v in ${setting[find-links]:-}; do args+=(--find-links "$v"); done
for v in ${setting[constraint]:-}; do args+=(--constraint "$v"); done
case ${setting[no-index]:-} in 1 | true | yes | on) args+=(--no-index) ;; esac
[ -z "${setting[cert]:-}" ] || export SSL_CERT_FILE=${SSL_CERT_FILE:-${setting[cert]}}

"$uv" pip install --quiet --compile-bytecode "${args[@]}" "$@"
