"""SIGINT and SIGTERM at each stage of a run, through the real CLIs (issue 9).

Every interrupted command must exit with 130 (SIGINT) or 143 (SIGTERM), without a traceback, leave `models/`
byte for byte as it was, leave no work files (GGUFs, the merged model) or child processes behind, and the next
run of the same command must finish by itself. The signal is sent when the stage's log line appears. The
llama.cpp children (converter, quantizer) take well under a second on the tiny model, so a test hook
(tests/support/slow_children/sitecustomize.py) holds them for a while: the signal then lands while they run.
`kill -9` of the parent runs none of its cleanup: the kernel kills its children (convert/die_with_parent.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert.llamacpp import read_metadata
from convert.tools import TOOLS, tool, version_info
from core.files import sha256_file
from tests.conftest import ROOT, cli_env, run_cli, small_config
from tests.support.snapshots import tree_snapshot

pytestmark = pytest.mark.slow

SLOW_CHILDREN = ROOT / "tests" / "support" / "slow_children"
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.fixture(scope="module")
def complete(hf_home: Path, tmp_path_factory) -> Path:
    """A complete, exported tiny run (relative paths): the live models an interrupted command must not touch."""
    work = tmp_path_factory.mktemp("interrupts")
    small_config(
        work,
        training={
            "max_steps": 6,
            "save_steps": 2,
            "logging_steps": 1,
            "report_to": [],
            "seed": 7,
            "per_device_train_batch_size": 4,
            "learning_rate": 3e-3,
        },
        export={
            "enabled": True,
            "quants": ["f16", "q8_0"],
            "default_quant": "q8_0",
            "export_base": False,
            "lora_gguf": False,  # its conversion and check are tested in test_pipeline/test_lora_gguf
            "gguf_dir": "models/gguf",
        },
        paths={"output_dir": "outputs", "models_dir": "models"},
    )
    res = run_cli("train", ["--config", "config.yaml"], work, hf_home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return work


def start(work: Path, hf_home: Path, module: str, *args: str, **env: str) -> subprocess.Popen:
    out = open(work / f"{module}-{len(list(work.glob('*.out')))}.out", "w")  # noqa: SIM115 (read by wait_for_line)
    base_env = cli_env(hf_home)
    if env:  # the slow-children hook goes first on the children's PYTHONPATH
        base_env["PYTHONPATH"] = os.pathsep.join([str(SLOW_CHILDREN), base_env["PYTHONPATH"]])
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--config", "config.yaml", *args]
        if module == "train"
        else [sys.executable, "-m", module, "export", "--config", "config.yaml", *args],
        cwd=work,
        env=base_env | env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log = Path(out.name)  # type: ignore[attr-defined]
    return proc


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log.read_text():  # type: ignore[attr-defined]
        if proc.poll() is not None:
            pytest.fail(f"ended (rc {proc.returncode}) before {text!r}:\n{proc.log.read_text()[-3000:]}")  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {text!r} within {timeout} s")
        time.sleep(0.05)


def interrupt(proc: subprocess.Popen, sig: signal.Signals) -> str:
    proc.send_signal(sig)
    proc.wait(timeout=120)
    out = proc.log.read_text()  # type: ignore[attr-defined]
    assert proc.returncode == EXIT[sig], out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for init to reap it, but runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")  # the state follows the parenthesised name


def slow_tools(root: Path, name: str) -> Path:
    """A tools root (LLAMA_TOOLS_DIR) whose `name` is a Python stand-in that execs the real tool: the slow-children
    hook runs in it first, and the process the parent started is the one that becomes the tool. The other tools
    are links to the real ones (their RUNPATH $ORIGIN resolves through the link to the real folder)."""
    real = {t: tool(t) for t in TOOLS}
    bin_dir = root / version_info()["llama.cpp"] / "bin"
    bin_dir.mkdir(parents=True)
    for t, path in real.items():
        if t != name:
            (bin_dir / t).symlink_to(path)
    stand_in, tool_path = bin_dir / name, str(real[name])
    stand_in.write_text(
        f"#!{sys.executable}\nimport os, sys\nos.execv({tool_path!r}, [{tool_path!r}, *sys.argv[1:]])\n"
    )
    stand_in.chmod(0o755)
    return root


def promoted_adapter_matches_the_run(work: Path) -> None:
    """The live GGUF names the adapter the run folder vouches for."""
    run_adapter = sha256_file(work / "outputs" / "t" / "adapter" / "adapter_model.safetensors")
    assert read_metadata(work / "models" / "gguf" / "gemma_2b_finetuned.gguf")["finetune.adapter_sha256"] == run_adapter
    assert sha256_file(work / "models" / "finetuned" / "adapters" / "t" / "adapter_model.safetensors") == run_adapter


# (stage, the log line that starts it, the signal, which llama.cpp child to hold while the signal arrives)
EXPORT_STAGES = [
    ("merge", "merging adapter into", signal.SIGINT, ""),
    ("conversion", "converting ->", signal.SIGTERM, "convert"),
    ("quantization", "quantizing ->", signal.SIGINT, "quantize"),
    ("verification", "verifying 2 file(s)", signal.SIGTERM, ""),
]


@pytest.mark.parametrize("stage, line, sig, child", EXPORT_STAGES, ids=[s[0] for s in EXPORT_STAGES])
def test_export_interrupted_at_each_stage_leaves_models_and_recovers(
    stage, line, sig, child, complete: Path, hf_home: Path, tmp_path: Path
):
    work = tmp_path / "work"
    shutil.copytree(complete, work, symlinks=True)
    before = tree_snapshot(work / "models")
    pids = tmp_path / "children.pids"
    hook = {"TEST_SLOW_CHILD": "30", "TEST_SLOW_CHILD_KIND": child, "TEST_SLOW_CHILD_PIDS": str(pids)} if child else {}
    if child == "quantize":
        hook["LLAMA_TOOLS_DIR"] = str(slow_tools(tmp_path / "tools", "llama-quantize"))
    proc = start(work, hf_home, "convert", **hook)
    wait_for_line(proc, line)
    if child:  # the child has started (and waits): the signal lands while it runs
        deadline = time.monotonic() + 60
        while not (pids.is_file() and pids.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
    interrupt(proc, sig)
    assert tree_snapshot(work / "models") == before
    export = work / "outputs" / "t" / "export"
    assert [p for p in export.rglob("*") if p.suffix in (".gguf", ".tmp")] == []
    assert not (export / "merged").exists()
    if child:
        assert [int(p) for p in pids.read_text().split() if running(int(p))] == []
    # the same command again finishes by itself and promotes what the run folder vouches for
    res = run_cli("convert", ["export", "--config", "config.yaml"], work, hf_home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((work / "outputs" / "t" / "manifest.json").read_text())["status"] == "complete"
    promoted_adapter_matches_the_run(work)


@pytest.mark.parametrize("child", ["convert", "quantize"], ids=["conversion", "quantization"])
def test_kill_9_of_the_parent_kills_its_llama_cpp_child_within_2_s(child: str, tmp_path: Path):
    """SIGKILL runs nothing in the parent, so no cleanup of ours can stop the child: the kernel's parent-death signal
    (convert/die_with_parent.py) must. An orphan would go on writing the temporary GGUF that the rerun writes too."""
    pids = tmp_path / "children.pids"
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(SLOW_CHILDREN), str(ROOT)]),
        "TEST_SLOW_CHILD": "60",
        "TEST_SLOW_CHILD_KIND": child,
        "TEST_SLOW_CHILD_PIDS": str(pids),
    }
    model, gguf = tmp_path / "model", tmp_path / "model.f32.gguf"  # never read: the child is held before it starts
    model.mkdir()
    (model / "tokenizer.model").touch()
    if child == "convert":
        call = f"convert_hf_to_gguf(Path({str(model)!r}), Path({str(gguf)!r}))"
    else:
        env["LLAMA_TOOLS_DIR"] = str(slow_tools(tmp_path / "tools", "llama-quantize"))
        call = f"quantize(Path({str(gguf)!r}), Path({str(tmp_path / 'model.q8_0.gguf')!r}), 'q8_0')"
    code = f"from pathlib import Path\nfrom convert.llamacpp import convert_hf_to_gguf, quantize\n{call}"
    log = tmp_path / "parent.log"
    with open(log, "w") as out:
        parent = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while not (pids.is_file() and pids.read_text().strip()):
        assert parent.poll() is None, f"ended (rc {parent.returncode}) before its child started:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no child started within 60 s"
        time.sleep(0.02)
    (pid,) = (int(p) for p in pids.read_text().split())
    try:
        assert running(pid)
        parent.kill()
        parent.wait()
        killed = time.monotonic()
        while running(pid) and time.monotonic() < killed + 2:
            time.sleep(0.02)
        assert not running(pid), f"the {child} child {pid} outlived its parent's SIGKILL by 2 s"
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def test_fresh_run_interrupted_in_training_is_neither_exported_nor_lost(complete: Path, hf_home: Path, tmp_path: Path):
    """Issue 9, class 4: complete run -> the same run with --fresh, Ctrl-C mid-training -> `convert export` must
    refuse the previous run's adapter; the same training command without --fresh resumes and completes."""
    work = tmp_path / "work"
    shutil.copytree(complete, work, symlinks=True)
    before = tree_snapshot(work / "models")
    proc = start(work, hf_home, "train", "--fresh")
    wait_for_line(proc, "training t:")
    deadline = time.monotonic() + 240
    metrics = work / "outputs" / "t" / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    out = interrupt(proc, signal.SIGINT)
    assert "stopped by SIGINT after step" in out
    manifest = json.loads((work / "outputs" / "t" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stopped"]["reason"] == "SIGINT"
    assert tree_snapshot(work / "models") == before

    refused = run_cli("convert", ["export", "--config", "config.yaml"], work, hf_home)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "no finished training to export (status: interrupted)" in refused.stderr
    assert tree_snapshot(work / "models") == before

    res = run_cli("train", ["--config", "config.yaml"], work, hf_home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming from checkpoint-" in res.stdout
    promoted_adapter_matches_the_run(work)


def test_sigterm_while_the_model_loads_leaves_models_and_the_rerun_trains(complete: Path, hf_home: Path, tmp_path):
    """Outside the training loop SIGTERM is an exception too (exit 143): nothing half-written, nothing promoted."""
    work = tmp_path / "work"
    shutil.copytree(complete, work, symlinks=True)
    before = tree_snapshot(work / "models")
    proc = start(work, hf_home, "train", "--fresh")
    wait_for_line(proc, "training t:")  # data read, run folder prepared; the model loads next
    out = interrupt(proc, signal.SIGTERM)
    assert "stopped by SIGTERM" in out
    assert tree_snapshot(work / "models") == before
    res = run_cli("train", ["--config", "config.yaml"], work, hf_home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    promoted_adapter_matches_the_run(work)
