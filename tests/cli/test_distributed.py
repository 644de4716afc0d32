"""Two ranks on the CPU (gloo) under torchrun, through the real CLI: `python -m torch.distributed.run
--nproc-per-node 2 -m train` (issue 11, multi-GPU on accelerate).

Rank 0 alone prepares the folder, writes the manifest, saves and exports; the loss curve is the one a single
process gets at twice the per-device batch; SIGTERM to one rank stops both at the same step with one committed
checkpoint, and the same command resumes from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.locks import read_holder
from tests.conftest import ROOT, cli_env, run_cli, small_config
from train.checkpoint import COMMIT_FILE, verify_checkpoint

SLOW_CHILDREN = ROOT / "tests" / "support" / "slow_children"
TRAINING = {"learning_rate": 3e-3, "logging_steps": 1, "report_to": [], "seed": 7, "save_total_limit": None}


def torchrun(work: Path, hf_home: Path, log: Path, **env: str) -> subprocess.Popen:
    """The command a user types, with a free rendezvous port (--standalone): tests may run side by side."""
    base = cli_env(hf_home)
    if env:  # the test hook that records the llama.cpp converter's pid goes first on PYTHONPATH
        base["PYTHONPATH"] = os.pathsep.join([str(SLOW_CHILDREN), base["PYTHONPATH"]])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.Popen(
        [*cmd, "-m", "train", "--config", "config.yaml"],
        cwd=work,
        env=base | env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def curve(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], float(r["loss"]), float(r["grad_norm"])) for r in rows if "loss" in r]


def rank_exit_codes(out: str) -> dict[int, int]:
    """torchrun's failure report: `rank : N (local_rank: N)` then `exitcode : C` for each rank that failed."""
    return {int(r): int(c) for r, c in re.findall(r"rank\s*:\s*(\d+) \(local_rank.*?\n\s*exitcode\s*:\s*(-?\d+)", out)}


def no_traceback_from_us(out: str) -> None:
    """torchrun prints its own traceback when a rank exits non-zero; none may come from the pipeline."""
    assert not re.search(r'File "[^"]*/(train|core|convert)/[^"]*\.py"', out), out[-4000:]


def export_config(work: Path, batch: int) -> None:
    small_config(
        work,
        training={**TRAINING, "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": batch},
        export={
            "enabled": True,
            "quants": ["q8_0"],
            "default_quant": "q8_0",
            "export_base": False,
            "lora_gguf": False,  # tested in test_pipeline/test_lora_gguf; here the conversions are counted
            "gguf_dir": str(work / "models" / "gguf"),
        },
    )


def converter_hook(work: Path) -> dict[str, str]:
    """The test hook records the pid of every convert_hf_to_gguf.py child (0 s delay): one line per conversion."""
    return {"TEST_SLOW_CHILD": "0", "TEST_SLOW_CHILD_KIND": "convert", "TEST_SLOW_CHILD_PIDS": str(work / "pids")}


@pytest.fixture(scope="module")
def two_ranks(hf_home: Path, tmp_path_factory) -> tuple[Path, str]:
    """A complete, exported 2-rank run at 1 example per rank: (work folder, torchrun's output)."""
    work = tmp_path_factory.mktemp("two_ranks")
    export_config(work, batch=1)
    proc = torchrun(work, hf_home, work / "run.out", **converter_hook(work))
    proc.wait(timeout=300)
    out = (work / "run.out").read_text()
    assert proc.returncode == 0, out[-4000:]
    return work, out


@pytest.fixture(scope="module")
def one_rank(hf_home: Path, tmp_path_factory) -> Path:
    """The same run in one process at 2 examples per step: the reference for the loss curve and the export."""
    work = tmp_path_factory.mktemp("one_rank")
    export_config(work, batch=2)
    env = cli_env(hf_home) | converter_hook(work)
    env["PYTHONPATH"] = os.pathsep.join([str(SLOW_CHILDREN), env["PYTHONPATH"]])
    cmd = [sys.executable, "-m", "train", "--config", "config.yaml"]
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return work


def test_rank0_alone_writes_the_folder_the_adapter_and_the_export(two_ranks: tuple[Path, str], one_rank: Path):
    work, out = two_ranks
    run = work / "outputs" / "t"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["training"]["global_step"] == 4
    # one export: as many llama.cpp conversions as one process makes, one summary printed, one GGUF promoted
    conversions = len((one_rank / "pids").read_text().split())
    assert conversions >= 1 and len((work / "pids").read_text().split()) == conversions
    assert out.count("=== run t: complete") == 1 and out.count("merging adapter into") == 1
    promoted = sorted(p.name for p in (work / "models" / "gguf").glob("*.gguf"))
    assert promoted == sorted(p.name for p in (one_rank / "models" / "gguf").glob("*.gguf"))
    assert "gemma_2b_finetuned.gguf" in promoted
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (work / "models" / "finetuned" / "adapters" / "t" / "adapter_model.safetensors").is_file()
    assert not (run / ".adapter.partial").exists()
    assert read_holder(run / ".lock") == {}, "the lock is released and names nobody"
    # each checkpoint holds both ranks' RNG states and verifies for a 2-rank resume
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        assert verify_checkpoint(run / "checkpoints" / ckpt, world_size=2) == []


def test_loss_curve_equals_one_rank_at_twice_the_batch(two_ranks: tuple[Path, str], one_rank: Path):
    """2 ranks x 1 example per step = 1 rank x 2 examples: the same examples in each step (the sampler shards the
    one seeded permutation round-robin) and the loss normalized by the supervised tokens of all ranks together."""
    got, want = curve(two_ranks[0] / "outputs" / "t"), curve(one_rank / "outputs" / "t")
    assert [s for s, _, _ in got] == [s for s, _, _ in want] == [1, 2, 3, 4]
    for (_, loss, norm), (_, ref_loss, ref_norm) in zip(got, want, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)


@pytest.fixture(scope="module")
def interrupted(hf_home: Path, tmp_path_factory) -> tuple[Path, str]:
    """A 2-rank run stopped by SIGTERM to rank 1 only, mid-training: (work folder, torchrun's output).

    Rank 0 learns of the signal through the all-reduce at the next step boundary."""
    work = tmp_path_factory.mktemp("sigterm")
    small_config(
        work,
        data={"max_seq_length": 256},
        training={**TRAINING, "max_steps": 12, "save_steps": 100, "per_device_train_batch_size": 4},
        paths={"output_dir": "outputs", "models_dir": "models"},  # relative: the resume test runs on a copy
    )
    log = work / "run.out"
    proc = torchrun(work, hf_home, log)
    metrics = work / "outputs" / "t" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    ranks = {}
    for pid in (int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()):
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        ranks[int(env["RANK"])] = pid
    assert set(ranks) == {0, 1}
    os.kill(ranks[1], signal.SIGTERM)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 1, out[-4000:]  # torchrun's own status when a rank fails; the ranks' are below
    return work, out


def test_sigterm_to_one_rank_stops_both_with_one_committed_checkpoint(interrupted: tuple[Path, str]):
    work, out = interrupted
    assert rank_exit_codes(out) == {0: 143, 1: 143}, out[-4000:]  # what `python -m train` exits with on SIGTERM
    no_traceback_from_us(out)
    run = work / "outputs" / "t"
    manifest = json.loads((run / "manifest.json").read_text())
    stopped = manifest["stopped"]
    assert manifest["status"] == "interrupted" and stopped["reason"] == "SIGTERM", stopped
    step = stopped["after_step"]
    assert 2 <= step < 12 and stopped["last_committed_checkpoint"] == f"checkpoint-{step}"
    assert f"stopped by SIGTERM after step {step}; checkpoint-{step} is committed" in out
    assert f"rank 1: stopped by SIGTERM after step {step}; checkpoint-{step} is committed" in out
    ckpt = run / "checkpoints" / f"checkpoint-{step}"
    assert [p.name for p in (run / "checkpoints").iterdir()] == [ckpt.name] and (ckpt / COMMIT_FILE).is_file()
    assert verify_checkpoint(ckpt, world_size=2) == []
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    assert [r[0] for r in curve(run)] == list(range(1, step + 1))
    assert read_holder(run / ".lock") == {}


def test_the_same_command_resumes_both_ranks(interrupted: tuple[Path, str], hf_home: Path, tmp_path: Path):
    work = tmp_path / "work"
    shutil.copytree(interrupted[0], work)
    step = json.loads((work / "outputs" / "t" / "manifest.json").read_text())["stopped"]["after_step"]
    # one process cannot resume what two trained (the global batch would change): refused, nothing moved aside
    before = sorted(str(p.relative_to(work)) for p in (work / "outputs").rglob("*"))
    single = run_cli("train", ["--config", "config.yaml"], work, hf_home)
    assert single.returncode == 2, single.stdout[-3000:] + single.stderr[-3000:]
    assert f"checkpoint-{step} was trained by 2 process(es) and this run has 1" in single.stderr
    assert "torchrun --nproc-per-node 2 -m train" in single.stderr
    assert sorted(str(p.relative_to(work)) for p in (work / "outputs").rglob("*")) == before

    proc = torchrun(work, hf_home, tmp_path / "resume.out")
    proc.wait(timeout=300)
    out = (tmp_path / "resume.out").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert f"resuming from checkpoint-{step}" in out
    run = work / "outputs" / "t"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["training"]["resumed_from"] == f"checkpoint-{step}"
    assert [r[0] for r in curve(run)] == list(range(1, 13)), "each step logged once"
