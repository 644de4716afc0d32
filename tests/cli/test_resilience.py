"""Runs that survive: kills, preemption, NaN, a full disk, a second process, changed data.

Everything goes through the real CLI (`python -m train`) as subprocesses on the tiny Gemma 2, with real
signals; a run is stopped at a chosen step by polling its metrics.jsonl. Two faults that cannot be
produced on demand use the test hooks of tests/support/faults.py (TRAIN_TEST_NAN_AT_STEP,
TRAIN_TEST_ENOSPC_AT_SAVE). Each interrupted run is finally compared with one uninterrupted reference
run of the same config: per-step loss, gradient norm and learning rate, and the adapter's sha256, exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from core.locks import hold_lock
from tests.conftest import DEMO_DATA, cli_env, small_config
from train.checkpoint import COMMIT_FILE, checkpoint_dirs, verify_checkpoint

pytestmark = pytest.mark.slow

STEPS = 12
# fp32 on CPU with full determinism: the setting under which a resumed run must equal an uninterrupted one.
TRAINING = {"max_steps": STEPS, "save_steps": 2, "logging_steps": 1, "save_total_limit": 3, "full_determinism": True}
SECRET = "hf_resilienceTestTokenThatMustNeverBeWritten"


def write_config(workdir: Path, data: Path = DEMO_DATA) -> Path:
    return small_config(workdir, training=TRAINING, data={"train_files": [str(data)], "max_seq_length": 128})


def run_dir(workdir: Path) -> Path:
    return workdir / "outputs" / "t"


def start(workdir: Path, hf_home: Path, *args: str, **env: str) -> subprocess.Popen:
    """`python -m train --config config.yaml` in workdir; output goes to files (a pipe could fill and block)."""
    n = len(list(workdir.glob("attempt-*.out")))
    out = open(workdir / f"attempt-{n}.out", "w")  # noqa: SIM115 (closed by finish)
    proc = subprocess.Popen(
        # with a fault requested, the same CLI through the test harness that injects it (tests/support/faults.py)
        [sys.executable, "-m", "tests.support.faults" if env else "train", "--config", "config.yaml", *args],
        cwd=workdir,
        env=cli_env(hf_home) | {"HF_TOKEN": SECRET} | env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log = Path(out.name)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    proc.wait(timeout=timeout)
    return proc.log.read_text()


def logged_steps(workdir: Path) -> list[int]:
    path = run_dir(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written
            rows.append(json.loads(line))
    return [r["step"] for r in rows if "loss" in r]


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(workdir), default=0) < step:
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before step {step}:\n{proc.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {step} within {timeout} s")
        time.sleep(0.01)


def metrics(workdir: Path) -> dict[int, tuple]:
    rows = [json.loads(line) for line in (run_dir(workdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: (r["loss"], r["grad_norm"], r["learning_rate"]) for r in rows if "loss" in r}


def adapter_sha(workdir: Path) -> str:
    data = (workdir / "models" / "finetuned" / "adapters" / "t" / "adapter_model.safetensors").read_bytes()
    return hashlib.sha256(data).hexdigest()


def manifest(workdir: Path) -> dict:
    return json.loads((run_dir(workdir) / "manifest.json").read_text())


@dataclass
class Reference:
    workdir: Path
    metrics: dict[int, tuple]
    adapter_sha: str


@pytest.fixture(scope="module")
def reference(hf_home, tmp_path_factory) -> Reference:
    """The uninterrupted run every interrupted one must reproduce exactly."""
    workdir = tmp_path_factory.mktemp("reference")
    write_config(workdir)
    out = finish(start(workdir, hf_home))
    assert manifest(workdir)["status"] == "complete", out[-3000:]
    ref = Reference(workdir, metrics(workdir), adapter_sha(workdir))
    assert sorted(ref.metrics) == list(range(1, STEPS + 1))
    return ref


def assert_same_as_reference(workdir: Path, ref: Reference) -> None:
    got = metrics(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    diff = {s: (got[s], ref.metrics[s]) for s in got if got[s] != ref.metrics[s]}
    assert not diff, f"steps differing from the uninterrupted run (resumed, reference): {diff}"
    assert adapter_sha(workdir) == ref.adapter_sha


def copy_unfinished(ref: Reference, workdir: Path, data: Path = DEMO_DATA) -> Path:
    """The reference's run folder as an unfinished run in workdir (its manifest gone), with a config there."""
    shutil.copytree(run_dir(ref.workdir), run_dir(workdir))
    (run_dir(workdir) / "manifest.json").unlink()
    config = write_config(workdir, data)
    shutil.copyfile(config, run_dir(workdir) / "config.yaml")  # same training; paths of this workdir
    return run_dir(workdir) / "checkpoints"


# ----------------------------------------------------------------------------- kills and preemption


def test_killed_and_preempted_runs_resume_to_the_uninterrupted_result(reference, hf_home, tmp_path):
    """SIGKILL twice, SIGTERM, SIGINT, then a plain rerun: the losses and adapter equal the reference.

    Each attempt must resume from the newest checkpoint that verified when the previous one died (a
    kill that lands in a save leaves it uncommitted: the attempt after must skip it).
    """
    write_config(tmp_path)
    checkpoints = run_dir(tmp_path) / "checkpoints"
    expected_resume = None
    attempts = [(signal.SIGKILL, -9, 2), (signal.SIGKILL, -9, 2), (signal.SIGTERM, 143, 2), (signal.SIGINT, 130, 1)]
    for sig, expected_rc, new_steps in attempts:
        proc = start(tmp_path, hf_home)
        # stale rows of the last attempt are at most max(logged): waiting past it waits for this attempt
        wait_for_step(proc, tmp_path, max(logged_steps(tmp_path), default=0) + new_steps)
        sent = time.monotonic()
        proc.send_signal(sig)
        out = finish(proc, timeout=120)
        assert proc.returncode == expected_rc, out[-3000:]
        if expected_resume:
            assert f"resuming from {expected_resume}" in out, out[-3000:]
        else:
            assert "resuming from" not in out, out[-3000:]
        if sig != signal.SIGKILL:
            # finished the step it was in, committed a checkpoint of it, and exited in bounded time
            last = max(logged_steps(tmp_path))
            newest = checkpoint_dirs(checkpoints)[-1]
            assert newest.name == f"checkpoint-{last}"
            assert verify_checkpoint(newest) == []
            assert time.monotonic() - sent < 60
            assert f"stopped by {sig.name} after step {last}; checkpoint-{last} is committed" in out
            assert manifest(tmp_path)["status"] == "interrupted"
        good = [p.name for p in checkpoint_dirs(checkpoints) if not verify_checkpoint(p)]
        expected_resume = good[-1] if good else None
    assert expected_resume is not None
    out = finish(start(tmp_path, hf_home))
    assert manifest(tmp_path)["status"] == "complete", out[-3000:]
    assert manifest(tmp_path)["training"]["resumed_from"] == expected_resume
    assert_same_as_reference(tmp_path, reference)


def test_second_process_on_the_run_folder_exits_with_the_lock_code(hf_home, tmp_path):
    write_config(tmp_path)
    first = start(tmp_path, hf_home)
    wait_for_step(first, tmp_path, 1)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run, lock and all
    try:
        second = start(tmp_path, hf_home)
        out = finish(second, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 75, out[-3000:]
    assert f"run folder {run_dir(tmp_path)} is in use by pid {first.pid} (run 't'" in out
    assert "resuming" not in out and "training t:" not in out  # refused before touching anything
    # the kernel released the killed holder's lock: nothing stale is left to clean up
    with hold_lock(run_dir(tmp_path) / ".lock", "test", "t"):
        pass


# ----------------------------------------------------------------------------- damaged checkpoints


def test_auto_resume_skips_truncated_and_uncommitted_checkpoints(reference, hf_home, tmp_path):
    checkpoints = copy_unfinished(reference, tmp_path)
    assert [p.name for p in checkpoint_dirs(checkpoints)] == ["checkpoint-8", "checkpoint-10", "checkpoint-12"]
    truncated = checkpoints / "checkpoint-12" / "adapter_model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    (checkpoints / "checkpoint-10" / COMMIT_FILE).unlink()

    explicit = start(tmp_path, hf_home, "--resume-from", str(checkpoints / "checkpoint-12"))
    out = finish(explicit)
    assert explicit.returncode == 2, out[-3000:]
    assert f"{truncated}: 1000 bytes, committed as" in out

    out = finish(start(tmp_path, hf_home))
    assert manifest(tmp_path)["status"] == "complete", out[-3000:]
    assert "warning: skipping checkpoint-12: " + str(truncated) in out
    assert f"warning: skipping checkpoint-10: {checkpoints / 'checkpoint-10' / COMMIT_FILE}: missing" in out
    assert "resuming from checkpoint-8" in out
    assert sorted(p.name for p in (run_dir(tmp_path) / "rejected").iterdir()) == ["checkpoint-10", "checkpoint-12"]
    assert_same_as_reference(tmp_path, reference)


def test_a_run_killed_after_its_last_step_finishes_without_training_further(reference, hf_home, tmp_path):
    """Killed during the adapter save or the export: the rerun must not take a step past the end."""
    copy_unfinished(reference, tmp_path)
    out = finish(start(tmp_path, hf_home))
    assert manifest(tmp_path)["status"] == "complete", out[-3000:]
    assert "checkpoint-12 holds the run's last step: nothing left to train" in out
    assert manifest(tmp_path)["training"]["global_step"] == STEPS
    assert_same_as_reference(tmp_path, reference)


def test_changed_data_fingerprint_refuses_to_resume(reference, hf_home, tmp_path):
    data = tmp_path / "train.jsonl"
    lines = DEMO_DATA.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")  # one record fewer: same config, different data
    copy_unfinished(reference, tmp_path, data)
    proc = start(tmp_path, hf_home)
    out = finish(proc)
    assert proc.returncode == 2, out[-3000:]
    assert "checkpoint-12 cannot be resumed by this run" in out
    assert "training data fingerprint" in out and "--fresh" in out
    assert len(checkpoint_dirs(run_dir(tmp_path) / "checkpoints")) == 3  # nothing was touched


# ----------------------------------------------------------------------------- NaN and a full disk


def test_non_finite_loss_stops_before_the_update(hf_home, tmp_path):
    write_config(tmp_path)
    proc = start(tmp_path, hf_home, TRAIN_TEST_NAN_AT_STEP="5")
    out = finish(proc)
    assert proc.returncode == 5, out[-3000:]
    assert "non-finite training signal at step 5: loss nan" in out
    stopped = manifest(tmp_path)["stopped"]
    assert manifest(tmp_path)["status"] == "failed"
    # measured at the stop, before optimizer.step(): 4 updates applied, weights untouched by the NaN
    assert stopped["non_finite"]["optimizer_updates_applied"] == 4
    assert stopped["non_finite"]["trainable_weights_finite"] is True
    assert logged_steps(tmp_path) == [1, 2, 3, 4]
    checkpoints = checkpoint_dirs(run_dir(tmp_path) / "checkpoints")
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert verify_checkpoint(checkpoints[-1]) == []
    assert stopped["last_committed_checkpoint"] == "checkpoint-4"


@pytest.fixture
def small_disk(reference, tmp_path):
    """tmp_path/outputs on a tmpfs with room for about 1.5 checkpoints, where this machine lets us mount one
    (root with CAP_SYS_ADMIN); None elsewhere, and the test then injects the ENOSPC (tests/support/faults.py)."""
    checkpoint = sum(p.stat().st_size for p in (run_dir(reference.workdir) / "checkpoints" / "checkpoint-8").iterdir())
    mount_point = tmp_path / "outputs"
    mount_point.mkdir()
    size = int(checkpoint * 1.5) + (64 << 10)
    mounted = (
        shutil.which("mount")
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True
        ).returncode
        == 0
    )
    yield mount_point if mounted else None
    if mounted:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_during_a_save_keeps_the_previous_commit_and_no_partial_files(hf_home, tmp_path, small_disk):
    write_config(tmp_path)
    if small_disk:  # a real full disk: torch.save then fails with "unexpected pos", without an errno
        proc = start(tmp_path, hf_home, "paths.check_free_space=false")
    else:
        proc = start(tmp_path, hf_home, TRAIN_TEST_ENOSPC_AT_SAVE="2")  # the save of checkpoint-4
    out = finish(proc)
    assert proc.returncode == 6, out[-3000:]
    if not small_disk:
        assert "No space left on device" in out and "optimizer.pt" in out
    assert "the disk filled up during training after step 4" in out
    assert "the last committed checkpoint, checkpoint-2, is intact" in out
    root = run_dir(tmp_path)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert verify_checkpoint(root / "checkpoints" / "checkpoint-2") == []
    assert [p for p in root.rglob("*") if p.name.endswith(".tmp")] == []
    assert manifest(tmp_path)["stopped"]["reason"] == "disk full"
    assert manifest(tmp_path)["stopped"]["removed_partial_checkpoint"] == "checkpoint-4"


# ----------------------------------------------------------------------------- provenance and secrets


def test_no_secret_reaches_any_file_the_run_wrote(reference):
    """The reference ran with HF_TOKEN set: no file it wrote (configs, manifests, checkpoints, logs) has it."""
    leaks = [p for p in reference.workdir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    written = list(reference.workdir.rglob("*"))
    assert any(p.name == "training_args.bin" for p in written) and any(p.name == COMMIT_FILE for p in written)
    assert (
        yaml.safe_load((run_dir(reference.workdir) / "config.yaml").read_text())["model"]["trust_remote_code"] is False
    )


def test_committed_checkpoint_holds_exactly_the_trainer_files_and_the_record(reference):
    folder = run_dir(reference.workdir) / "checkpoints" / "checkpoint-12"
    record = json.loads((folder / COMMIT_FILE).read_text())
    on_disk = sorted(p.name for p in folder.iterdir())
    assert on_disk == sorted([*record["files"], COMMIT_FILE])
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        record["files"]
    )
    assert record["step"] == 12
    assert record["identity"]["data_fingerprint"] == manifest(reference.workdir)["data"]["fingerprint"]
    for name, entry in record["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"]
    # retention: the newest save_total_limit=3 commits survive, in the manifest too
    assert manifest(reference.workdir)["training"]["checkpoints"] == ["checkpoint-8", "checkpoint-10", "checkpoint-12"]
    assert os.environ.get("HF_TOKEN") != SECRET  # the secret only ever lived in the child's environment
