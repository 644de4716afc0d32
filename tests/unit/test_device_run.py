"""bench/device_run.sh, the one script a lent GPU runs (docs/gpu-box.md, "The device run"): valid bash, every stage
under an explicit timeout within 8 minutes, and every option it passes is one the bench script's argparse has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import bench_module

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "device_run.sh"


def invocations() -> dict[str, list[str]]:
    """{bench script: the options the device run passes it}, continuation lines joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.search(r"bench/(\w+\.py)\b(.*)", line)
        if m and not line.lstrip().startswith("#"):
            found.setdefault(m.group(1), []).extend(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)))
    return found


def test_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0


def test_runs_both_benches_within_eight_minutes():
    text = SCRIPT.read_text()
    assert set(invocations()) == {"gpu_train.py", "bench_export.py"}
    budgets = [int(b) for b in re.findall(r"_BUDGET_S:-(\d+)\}", text)]
    kill_after = [int(k) for k in re.findall(r"--kill-after=(\d+)", text)]
    assert len(budgets) == 3 and kill_after and sum(budgets) + 3 * max(kill_after) <= 8 * 60  # wheels, train, export
    assert text.count('stage gpu_train "$TRAIN_BUDGET_S"') == text.count('stage bench_export "$EXPORT_BUDGET_S"') == 1
    assert "nvidia-smi --query-gpu=name" in text and '"$OUT/table.txt"' in text
    assert "trl@full" in text and "trl-tuned@full" in text and "production@full" in text


@pytest.mark.parametrize(("script", "parse"), [("gpu_train.py", "parse"), ("bench_export.py", "parse_args")])
def test_every_option_passed_exists_in_the_bench_argparse(script, parse, capsys):
    passed = invocations()[script]
    assert passed, script
    with pytest.raises(SystemExit) as shown:  # the script's own parser, as `python bench/<script> --help` shows it
        getattr(bench_module(script.removesuffix(".py")), parse)(["--help"])
    assert shown.value.code == 0
    help_text = capsys.readouterr().out
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text.split("options:")[-1]))
    assert set(passed) <= options, sorted(set(passed) - options)
