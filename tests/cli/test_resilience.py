"""Runs that survive: kills, preemption, NaN, a full disk, damaged checkpoints, a second process, changed data.

The golden run (tests/conftest.py) is the uninterrupted reference. One lineage trains its second half again from
the golden run's checkpoint-20, stopped every way a run stops: a non-finite loss, a full disk, SIGTERM, SIGKILL,
then damaged checkpoints; its last attempt must end with the golden adapter, byte for byte, and the golden run's
gradient norms and learning rates. Two faults that cannot be produced on demand use the test hooks of
tests/support/faults.py (TRAIN_TEST_NAN_AT_STEP, and TRAIN_TEST_ENOSPC_AT_SAVE where no small tmpfs can be
mounted); signals and kills go to real processes, every other command runs through the CLI server. Every attempt
runs with HF_TOKEN set: no file may keep it. The other cases work on copies of the golden run and train nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from core.locks import hold_lock
from tests.conftest import DEMO_DATA, GOLDEN_RUN, GOLDEN_STEPS, ROOT, copy_workspace
from tests.support.faults import ENOSPC_AT_SAVE, NAN_AT_STEP
from tests.support.processes import logged_steps, start, start_forked, stop, wait_for_step, wait_until
from tests.support.snapshots import tree_snapshot
from train.checkpoint import COMMIT_FILE, checkpoint_dirs, step_of, verify_checkpoint

pytestmark = pytest.mark.slow

SECRET = "hf_resilienceTestTokenThatMustNeverBeWritten"
SLOW_CHILDREN = ROOT / "tests" / "support" / "slow_children"
# The lineage's overrides: a checkpoint every 2 steps and a loss logged at every step (neither changes the weights),
# no export (test_pipeline.py and test_interrupts.py test it).
LINEAGE = ["--config", "config.yaml", "training.save_steps=2", "training.logging_steps=1", "export.enabled=false"]


def run_dir(ws: Path) -> Path:
    return ws / "outputs" / GOLDEN_RUN


def read_manifest(ws: Path) -> dict | None:
    path = run_dir(ws) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def metric_rows(ws: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir(ws) / "metrics.jsonl").read_text().splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapters(ws: Path) -> list[Path]:
    """The run folder's adapter and the published one."""
    return [
        run_dir(ws) / "adapter" / "adapter_model.safetensors",
        ws / "models" / "finetuned" / "adapters" / GOLDEN_RUN / "adapter_model.safetensors",
    ]


def as_unfinished(ws: Path, *checkpoints: str) -> None:
    """The golden run as a run killed before it finished: no manifest, no adapter (in the run folder or published),
    and without the named checkpoints."""
    (run_dir(ws) / "manifest.json").unlink()
    for name in checkpoints:
        shutil.rmtree(run_dir(ws) / "checkpoints" / name)
    for adapter in adapters(ws):
        shutil.rmtree(adapter.parent)


# ----------------------------------------------------------------------------- the lineage


@dataclass
class Attempt:
    """One command of the lineage and the run folder it left."""

    rc: int
    out: str
    manifest: dict | None
    on_disk: list[str]  # every checkpoint folder
    committed: list[str]  # those whose commit record verifies
    logged: list[int]  # the steps metrics.jsonl holds a loss for
    partial_files: list[str]  # *.tmp anywhere in the run folder
    seconds: float = 0.0  # from the signal to the exit
    mounted: bool = False  # a real full disk (a tmpfs), not an injected ENOSPC


def attempt(ws: Path, rc: int, out: str, **extra) -> Attempt:
    checkpoints = checkpoint_dirs(run_dir(ws) / "checkpoints")
    return Attempt(
        rc,
        out,
        read_manifest(ws),
        [c.name for c in checkpoints],
        [c.name for c in checkpoints if not verify_checkpoint(c)],
        logged_steps(run_dir(ws) / "metrics.jsonl"),
        [str(p) for p in run_dir(ws).rglob("*.tmp")],
        **extra,
    )


@dataclass
class Lineage:
    ws: Path
    attempts: dict[str, Attempt] = field(default_factory=dict)
    truncated: Path | None = None  # the damage done before the last two attempts
    uncommitted: Path | None = None
    resume: str = ""  # the checkpoint the last attempt must resume from
    rejected: list[str] = field(default_factory=list)


def pages(folder: Path) -> int:
    """The bytes folder's files take on a tmpfs (whole pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


@contextmanager
def small_disk(folder: Path, room: int) -> Iterator[bool]:
    """folder moved onto a tmpfs with `room` bytes free beyond its files, where this machine lets us mount one (root
    with CAP_SYS_ADMIN), and back afterwards; yields whether it is. Elsewhere folder stays as it is (False)."""
    aside = folder.with_name(f"{folder.name}.aside")
    size = pages(folder) + room + (64 << 10)
    folder.rename(aside)
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    if not shutil.which("mount") or subprocess.run(mount, capture_output=True).returncode != 0:
        folder.rmdir()
        aside.rename(folder)
        yield False
        return
    try:
        shutil.copytree(aside, folder, dirs_exist_ok=True)
        shutil.rmtree(aside)
        yield True
    finally:
        shutil.copytree(folder, aside)
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()
        aside.rename(folder)


@pytest.fixture(scope="module")
def lineage(golden: Path, cli, tmp_path_factory) -> Lineage:
    """The golden run's steps 21-40 again, stopped on the way every way a run stops, each attempt resuming the last:

    nan        step 23's loss is NaN (injected)                       -> exit 5 after checkpoint-22
    disk_full  the disk fills up in the save of checkpoint-26         -> exit 6, checkpoint-24 kept
    sigterm    SIGTERM once step 27 is logged                         -> exit 143 after a checkpoint of its step
    sigkill    SIGKILL three steps later                              -> exit -9, wherever it was
    (then the newest good checkpoint is truncated, the one before it loses its commit record)
    explicit   --resume-from the truncated checkpoint                 -> exit 2, nothing moved
    final      the plain command                                      -> resumes from the third newest, to the end
    """
    ws = copy_workspace(golden, tmp_path_factory.mktemp("lineage") / "ws")
    as_unfinished(ws, "checkpoint-40")
    checkpoints, metrics = run_dir(ws) / "checkpoints", run_dir(ws) / "metrics.jsonl"
    token = {"HF_TOKEN": SECRET}
    found = Lineage(ws)
    a = found.attempts

    res = cli.run("tests.support.faults", LINEAGE, ws, env=token | {NAN_AT_STEP: "23"})
    a["nan"] = attempt(ws, res.returncode, res.stdout + res.stderr)

    room = pages(checkpoints / "checkpoint-20") * 3 // 2  # checkpoint-24 fits, checkpoint-26 does not
    with small_disk(checkpoints, room) as mounted:
        if mounted:  # a real full disk: torch.save then fails with "unexpected pos", without an errno
            res = cli.run("train", [*LINEAGE, "paths.check_free_space=false"], ws, env=token)
        else:
            res = cli.run("tests.support.faults", LINEAGE, ws, env=token | {ENOSPC_AT_SAVE: "2"})
        a["disk_full"] = attempt(ws, res.returncode, res.stdout + res.stderr, mounted=mounted)

    proc = start_forked(cli, ws, "train", LINEAGE, token)
    wait_for_step(proc, metrics, 27)
    out, seconds = stop(proc, signal.SIGTERM)
    a["sigterm"] = attempt(ws, 143, out, seconds=seconds)

    proc = start_forked(cli, ws, "train", LINEAGE, token)
    wait_for_step(proc, metrics, max(a["sigterm"].logged) + 3)
    out, _ = stop(proc, signal.SIGKILL)
    a["sigkill"] = attempt(ws, -9, out)

    good = [checkpoints / name for name in a["sigkill"].committed]
    found.truncated, found.uncommitted = good[-1] / "adapter_model.safetensors", good[-2] / COMMIT_FILE
    found.truncated.write_bytes(found.truncated.read_bytes()[:1000])
    found.uncommitted.unlink()
    found.resume = good[-3].name
    found.rejected = [c.name for c in checkpoint_dirs(checkpoints) if step_of(c) > step_of(good[-3])]
    res = cli.run("train", [*LINEAGE, "--resume-from", str(good[-1])], ws, env=token)
    a["explicit"] = attempt(ws, res.returncode, res.stdout + res.stderr)

    res = cli.run("train", LINEAGE, ws, env=token)
    a["final"] = attempt(ws, res.returncode, res.stdout + res.stderr)
    return found


def test_non_finite_loss_stops_before_the_update(lineage):
    a = lineage.attempts["nan"]
    assert a.rc == 5, a.out[-3000:]
    assert "resuming from checkpoint-20" in a.out
    assert "non-finite training signal at step 23: loss nan" in a.out
    assert a.manifest["status"] == "failed"
    stopped = a.manifest["stopped"]
    # measured at the stop, before optimizer.step(): the restored 20 updates and 2 more applied, not the NaN one
    assert stopped["non_finite"]["optimizer_updates_applied"] == 22
    assert stopped["non_finite"]["trainable_weights_finite"] is True
    assert a.logged == [5, 10, 15, 20, 21, 22]  # golden's rows up to the checkpoint, then this attempt's
    assert a.on_disk == a.committed == ["checkpoint-20", "checkpoint-22"]
    assert stopped["last_committed_checkpoint"] == "checkpoint-22"


def test_disk_full_during_a_save_keeps_the_previous_commit_and_no_partial_files(lineage):
    a = lineage.attempts["disk_full"]
    assert a.rc == 6, a.out[-3000:]
    assert "resuming from checkpoint-22" in a.out
    if not a.mounted:
        assert "No space left on device" in a.out and "optimizer.pt" in a.out
    assert "the disk filled up during training after step 26" in a.out
    assert "the last committed checkpoint, checkpoint-24, is intact" in a.out
    assert a.on_disk == a.committed == ["checkpoint-20", "checkpoint-22", "checkpoint-24"]
    assert a.partial_files == []
    assert a.manifest["stopped"]["reason"] == "disk full"
    assert a.manifest["stopped"]["removed_partial_checkpoint"] == "checkpoint-26"


def test_sigterm_finishes_its_step_commits_and_stops(lineage):
    a = lineage.attempts["sigterm"]
    assert "resuming from checkpoint-24" in a.out
    last = max(a.logged)
    assert last >= 27
    # finished the step it was in, committed a checkpoint of it, and exited in bounded time
    assert a.on_disk[-1] == a.committed[-1] == f"checkpoint-{last}"
    assert a.seconds < 60
    assert f"stopped by SIGTERM after step {last}; checkpoint-{last} is committed" in a.out
    assert a.manifest["status"] == "interrupted" and a.manifest["stopped"]["reason"] == "SIGTERM"
    assert f"resuming from checkpoint-{last}" in lineage.attempts["sigkill"].out  # and the next run took it


def test_auto_resume_skips_truncated_and_uncommitted_checkpoints(lineage):
    explicit, final = lineage.attempts["explicit"], lineage.attempts["final"]
    truncated, uncommitted = lineage.truncated, lineage.uncommitted
    assert explicit.rc == 2, explicit.out[-3000:]
    record = run_dir(lineage.ws) / "rejected" / truncated.parent.name / COMMIT_FILE  # moved there by the last attempt
    size = json.loads(record.read_text())["files"][truncated.name]["size"]
    assert f"{truncated}: 1000 bytes, the commit record says {size} (truncated?)" in explicit.out
    assert explicit.on_disk == lineage.attempts["sigkill"].on_disk  # refused before moving anything

    rel = Path("outputs") / GOLDEN_RUN / "checkpoints"
    assert final.rc == 0, final.out[-3000:]
    assert f"warning: skipping {truncated.parent.name}: {rel / truncated.parent.name / truncated.name}" in final.out
    assert f"warning: skipping {uncommitted.parent.name}: {rel / uncommitted.parent.name / COMMIT_FILE}: missing" in (
        final.out
    )
    assert f"resuming from {lineage.resume}" in final.out
    assert final.manifest["training"]["resumed_from"] == lineage.resume
    rejected = run_dir(lineage.ws) / "rejected"
    assert sorted(p.name for p in rejected.iterdir()) == sorted(lineage.rejected)
    assert {truncated.parent.name, uncommitted.parent.name} <= set(lineage.rejected)


def test_stopped_and_killed_runs_resume_to_the_golden_run(lineage, golden):
    final = lineage.attempts["final"]
    assert final.manifest["status"] == "complete", final.out[-3000:]
    assert final.manifest["training"]["global_step"] == GOLDEN_STEPS
    golden_adapter = sha256(adapters(golden)[0])
    assert [sha256(p) for p in adapters(lineage.ws)] == [golden_adapter, golden_adapter]
    # every step once; each step's gradient norm and learning rate as in the golden run, and its logged loss (a
    # mean over 5 steps) the mean of this lineage's per-step losses
    rows, reference = metric_rows(lineage.ws), {r["step"]: r for r in metric_rows(golden) if "loss" in r}
    got = {r["step"]: r for r in rows if "loss" in r}
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20, *range(21, GOLDEN_STEPS + 1)]
    assert all(got[s] == reference[s] for s in (5, 10, 15, 20))  # golden's rows, kept by every resume
    for s in range(25, GOLDEN_STEPS + 1, 5):
        assert (got[s]["grad_norm"], got[s]["learning_rate"]) == (
            reference[s]["grad_norm"],
            reference[s]["learning_rate"],
        )
        mean = sum(got[t]["loss"] for t in range(s - 4, s + 1)) / 5
        assert mean == pytest.approx(reference[s]["loss"], rel=1e-6)


def test_committed_checkpoint_holds_exactly_the_trainer_files_and_the_record(golden, lineage):
    folder = run_dir(golden) / "checkpoints" / "checkpoint-40"
    record = json.loads((folder / COMMIT_FILE).read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([*record["files"], COMMIT_FILE])
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        record["files"]
    )
    assert record["step"] == GOLDEN_STEPS
    assert record["identity"]["data_fingerprint"] == read_manifest(golden)["data"]["fingerprint"]
    for name, entry in record["files"].items():
        assert sha256(folder / name) == entry["sha256"]
    # retention: the newest save_total_limit=3 commits survive, in the manifest too
    final = lineage.attempts["final"]
    assert final.on_disk == final.committed == ["checkpoint-36", "checkpoint-38", "checkpoint-40"]
    assert final.manifest["training"]["checkpoints"] == final.on_disk


def test_no_secret_reaches_any_file_the_run_wrote(lineage):
    """Every attempt ran with HF_TOKEN set: no file (configs, manifests, checkpoints, logs, the adapter) has it."""
    written = [p for p in lineage.ws.rglob("*") if p.is_file()]
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []
    assert any(p.name == "training_args.bin" and "checkpoint-40" in str(p) for p in written)
    assert any(p.name == COMMIT_FILE and "checkpoint-40" in str(p) for p in written)
    assert yaml.safe_load((run_dir(lineage.ws) / "config.yaml").read_text())["model"]["trust_remote_code"] is False
    assert os.environ.get("HF_TOKEN") != SECRET  # the secret only ever lived in the commands' environment


# ----------------------------------------------------------------------------- on copies of the golden run


def test_second_process_on_the_run_folder_exits_with_the_lock_code(workspace, hf_home, cli, tmp_path):
    """An export holds the run folder (held in its merge by the slow-stage hook); `python -m train` is refused."""
    pids = tmp_path / "held.pids"
    hook = {"TEST_SLOW_CHILD": "600", "TEST_SLOW_CHILD_KIND": "merge", "TEST_SLOW_CHILD_PIDS": str(pids)}
    holder = start(workspace, hf_home, "convert", ["export", "--config", "config.yaml"], hook, SLOW_CHILDREN)
    try:
        wait_until(holder, lambda: pids.is_file() and pids.read_text().strip() != "", "the export's merge")
        before = tree_snapshot(run_dir(workspace))
        res = cli.run("train", ["--config", "config.yaml"], workspace)
        after = tree_snapshot(run_dir(workspace))
    finally:
        holder.popen.kill()
        holder.popen.wait()
    assert res.returncode == 75, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"run folder outputs/{GOLDEN_RUN} is in use by pid {holder.pid} (run '{GOLDEN_RUN}'" in res.stderr
    assert "already complete" not in res.stdout  # refused before reading the run
    assert after == before
    # the kernel released the killed holder's lock: nothing stale is left to clean up
    with hold_lock(run_dir(workspace) / ".lock", "test", GOLDEN_RUN):
        pass


def test_a_run_killed_after_its_last_step_finishes_without_training_further(workspace, golden, cli):
    """Killed during the adapter save or the export: the rerun must not take a step past the end."""
    as_unfinished(workspace)
    res = cli.run("train", ["--config", "config.yaml", "export.enabled=false"], workspace)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "checkpoint-40 holds the run's last step: nothing left to train" in res.stdout
    m = read_manifest(workspace)
    assert m["status"] == "complete" and m["training"]["global_step"] == GOLDEN_STEPS
    assert m["training"]["resumed_from"] == "checkpoint-40"
    assert [sha256(p) for p in adapters(workspace)] == [sha256(adapters(golden)[0])] * 2
    assert metric_rows(workspace) == metric_rows(golden)  # nothing trained, nothing logged twice


def test_changed_data_fingerprint_refuses_to_resume(workspace, cli, tmp_path):
    """The same config, and data that changed since the checkpoints were made."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(DEMO_DATA.read_text().splitlines()[:-1]) + "\n")  # one record fewer
    as_unfinished(workspace)
    for config in (workspace / "config.yaml", run_dir(workspace) / "config.yaml"):
        cfg = yaml.safe_load(config.read_text())
        cfg["data"]["train_files"] = [str(data)]
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = tree_snapshot(run_dir(workspace))
    res = cli.run("train", ["--config", "config.yaml"], workspace)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert "checkpoint-40 cannot be resumed by this run" in res.stderr
    assert "training data fingerprint" in res.stderr and "--fresh" in res.stderr
    assert tree_snapshot(run_dir(workspace)) == before  # nothing was touched
