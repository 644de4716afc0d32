"""scripts/uv_install.sh: `make setup`'s install is uv's, and uv reads none of pip's configuration, so the script
passes on the settings that choose where packages come from, with pip's precedence (PIP_* variables, then
[install], then [global]). pip and uv are stand-ins here: the script's own logic is the subject."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
# `-m pip config list` prints the canned configuration; the install of the pinned uv puts uv beside this file
# (fails where no-uv exists); any other `-m pip install` records its arguments.
here=$(dirname "$0")
case "$*" in
    "-m pip --version") echo "pip (stand-in)" ;;
    "-m pip config list") cat "$here/pip-config" ;;
    "-m pip install -qq -c "*"/constraints.txt uv") [ ! -e "$here/no-uv" ] && cp "$here/fake-uv" "$here/uv" ;;
    "-m pip install "*) shift 3; printf '%s\\n' pip "$@" > "$here/uv-args" ;;
    *) exit 9 ;;
esac
"""
FAKE_UV = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$(dirname "$0")/uv-args"
echo "SSL_CERT_FILE=${SSL_CERT_FILE:-}" >> "$(dirname "$0")/uv-args"
"""


def install(tmp_path: Path, config: str, env: dict[str, str] | None = None, uv: bool = True) -> list[str]:
    """Run the script with `config` as `pip config list` prints it; the arguments uv got, one per line (with
    uv=False, uv is not installable and pip's arguments are returned, after "pip")."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    if not uv:
        (bin_dir / "no-uv").touch()
    for name, text in (("python", FAKE_PYTHON), ("fake-uv", FAKE_UV), ("pip-config", config)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run = subprocess.run(
        [shutil.which("bash"), str(ROOT / "scripts" / "uv_install.sh"), str(bin_dir / "python"), "-e", ".[dev]"],
        env={"PATH": os.environ["PATH"], **(env or {})},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return (bin_dir / "uv-args").read_text().splitlines()


def pairs(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_pips_sources_reach_uv_with_pips_precedence(tmp_path):
    config = (
        ":env:.find-links='/from/env'\n"
        "global.cert='/etc/ssl/ca.pem'\n"
        "global.constraint='/etc/pip/c.txt'\n"
        "global.extra-index-url='\\nfile:///a/simple\\nfile:///b/simple'\n"  # a value on several lines
        "global.find-links='/from/file'\n"
        "global.index-url='https://global.example/simple'\n"
        "install.index-url='https://install.example/simple'\n"
        "install.timeout='60'\n"
    )
    args = install(tmp_path, config)
    assert args[:5] == ["pip", "install", "--quiet", "--compile-bytecode", "--python"]
    assert pairs(args, "--find-links") == ["/from/env"]  # the variable beats the file
    assert pairs(args, "--index-url") == ["https://install.example/simple"]  # [install] beats [global]
    assert pairs(args, "--extra-index-url") == ["file:///a/simple", "file:///b/simple"]
    assert pairs(args, "--constraint") == ["/etc/pip/c.txt"]
    assert pairs(args, "--index-strategy") == ["unsafe-best-match"]  # pip's rule across indexes
    assert "--no-index" not in args and "60" not in args  # settings that choose nothing are not passed
    assert args[-3:] == ["-e", ".[dev]", "SSL_CERT_FILE=/etc/ssl/ca.pem"]


def test_no_index_and_a_users_certificate_file_are_kept(tmp_path):
    args = install(tmp_path, "global.no-index='true'\nglobal.cert='/etc/ssl/ca.pem'\n", {"SSL_CERT_FILE": "/mine.pem"})
    assert "--no-index" in args
    assert args[-1] == "SSL_CERT_FILE=/mine.pem"
    assert not pairs(args, "--index-url") and not pairs(args, "--find-links")


def test_without_uv_pip_installs_the_same_arguments(tmp_path):
    args = install(tmp_path, "global.find-links='/from/file'\n", uv=False)
    assert args == ["pip", "-e", ".[dev]"]  # pip reads its own configuration


def test_an_interpreter_without_pip_is_named_and_nothing_installed(tmp_path):
    run = subprocess.run(
        [shutil.which("bash"), str(ROOT / "scripts" / "uv_install.sh"), str(tmp_path / "python"), "-e", ".[dev]"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"error: {tmp_path / 'python'} cannot run pip" in run.stderr
    assert "uv is not installable" not in run.stderr
