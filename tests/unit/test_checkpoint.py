"""Unit tests of the resilience layer's pieces: commit records, resume choice, retention, resume safety,
locks, the disk-space estimate and the safety rules. The end-to-end behaviour is in tests/cli/test_resilience.py."""

from __future__ import annotations

import errno
import inspect
import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.config import RESUME, Config, changed_keys, to_yaml
from core.errors import EXIT_LOCKED, DiskSpaceError, LockHeld, RunError
from core.locks import hold_lock
from core.runfolder import RunFolder
from tests.conftest import ROOT
from train.callbacks import read_metrics, trim_metrics
from train.checkpoint import (
    COMMIT_FILE,
    CheckpointError,
    apply_retention,
    check_explicit,
    commit_checkpoint,
    verify_checkpoint,
)
from train.diskspace import Write, check_free_space, gguf_bytes, is_disk_full, tensor_counts
from train.resume import plan_resume, prepare_run_folder

TRAINER_FILES = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "training_args.bin",
]


def fake_checkpoint(
    checkpoints: Path, step: int, commit: bool = True, eval_loss: float | None = None, skip: str | None = None
) -> Path:
    folder = checkpoints / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for i, name in enumerate(n for n in TRAINER_FILES if n != skip):
        (folder / name).write_bytes(bytes([step, i]) * 500)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if commit:
        commit_checkpoint(folder, {"data_fingerprint": "abc"}, extra={"eval_loss": eval_loss} if eval_loss else None)
    return folder


# ----------------------------------------------------------------------------- commit and verify


def test_commit_records_every_file_and_verify_catches_truncation_and_edits(tmp_path):
    folder = fake_checkpoint(tmp_path, 4)
    record = json.loads((folder / COMMIT_FILE).read_text())
    assert sorted(record["files"]) == sorted([*TRAINER_FILES, "trainer_state.json"])
    assert record["step"] == 4 and record["identity"] == {"data_fingerprint": "abc"}
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []
    assert verify_checkpoint(folder) == []

    (folder / "optimizer.pt").write_bytes(b"x" * 10)
    (folder / "scheduler.pt").write_bytes(bytes(reversed((folder / "scheduler.pt").read_bytes())) + b"")
    problems = verify_checkpoint(folder)
    assert problems == [
        f"{folder / 'optimizer.pt'}: 10 bytes, the commit record says 1000 (truncated?)",
        f"{folder / 'scheduler.pt'}: content differs from the commit record (sha256 mismatch)",
    ]
    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'optimizer.pt'}: 10 bytes")):
        check_explicit(folder)


def test_a_missing_rng_state_is_an_error_not_a_log_line(tmp_path):
    with pytest.raises(CheckpointError, match="rng_state.pth"):
        fake_checkpoint(tmp_path, 2, skip="rng_state.pth")
    folder = fake_checkpoint(tmp_path, 4)
    record = json.loads((folder / COMMIT_FILE).read_text())
    del record["files"]["rng_state.pth"]
    (folder / COMMIT_FILE).write_text(json.dumps(record))
    assert verify_checkpoint(folder) == [
        f"{folder / 'rng_state.pth'}: RNG state not in the commit record: the run could not resume exactly"
    ]


def test_a_step_mismatch_between_folder_and_trainer_state_is_caught(tmp_path):
    folder = fake_checkpoint(tmp_path, 6)
    moved = folder.rename(tmp_path / "checkpoint-8")
    assert "global_step 6 does not match" in verify_checkpoint(moved)[0]


def test_a_resume_takes_the_newest_good_checkpoint_and_sets_newer_bad_ones_aside(tmp_path, caplog):
    cfg = Config.model_validate({"run_name": "run", "paths": {"output_dir": str(tmp_path)}})
    folder = RunFolder.of(cfg)
    checkpoints = folder.checkpoints
    fake_checkpoint(checkpoints, 2)
    fake_checkpoint(checkpoints, 4)
    fake_checkpoint(checkpoints, 6, commit=False)
    bad = fake_checkpoint(checkpoints, 8)
    (bad / "adapter_model.safetensors").unlink()
    identity = {"data_fingerprint": "abc"}
    plan = plan_resume(folder, cfg, False, identity)  # what the dry run says: nothing moved yet
    assert plan.checkpoint == checkpoints / "checkpoint-4" and [p.name for p, _ in plan.set_aside] == [
        "checkpoint-8",
        "checkpoint-6",
    ]
    assert "resume from checkpoint-4" in plan.describe() and "would set aside checkpoint-8" in plan.describe()
    assert len(list(checkpoints.iterdir())) == 4
    with caplog.at_level(logging.INFO):
        assert prepare_run_folder(folder, cfg, False, identity) == checkpoints / "checkpoint-4"
    assert caplog.messages == [
        f"warning: skipping checkpoint-8: {bad / 'adapter_model.safetensors'}: missing; moved to "
        f"{tmp_path / 'run' / 'rejected' / 'checkpoint-8'}",
        f"warning: skipping checkpoint-6: {checkpoints / 'checkpoint-6' / COMMIT_FILE}: missing: the save never "
        f"completed (the process was killed or failed while writing); moved to "
        f"{tmp_path / 'run' / 'rejected' / 'checkpoint-6'}",
    ]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]


# ----------------------------------------------------------------------------- retention


def test_retention_keeps_the_newest_commits_and_the_best_eval(tmp_path):
    fake_checkpoint(tmp_path, 2, eval_loss=3.0)
    fake_checkpoint(tmp_path, 4, eval_loss=1.0)  # best
    fake_checkpoint(tmp_path, 6, eval_loss=2.0)
    fake_checkpoint(tmp_path, 8, eval_loss=2.5)
    fake_checkpoint(tmp_path, 10, commit=False)  # someone else's business: never deleted by retention
    removed = apply_retention(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-10",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert apply_retention(tmp_path, keep_last=None) == []
    assert [p.name for p in apply_retention(tmp_path, keep_last=1)] == ["checkpoint-6"]


# ----------------------------------------------------------------------------- resume safety


def test_resume_refuses_only_keys_that_change_the_trajectory():
    before = Config()
    after = Config.model_validate(
        {
            "lora": {"r": 32},
            "training": {"learning_rate": 1e-4, "save_steps": 7, "logging_steps": 3, "save_total_limit": 9},
            "export": {"quants": ["q8_0"], "default_quant": "q8_0"},
        }
    )
    assert changed_keys(before, after, RESUME) == ["lora.r: 16 -> 32", "training.learning_rate: 0.0002 -> 0.0001"]
    assert changed_keys(before, Config(), RESUME) == []


# ----------------------------------------------------------------------------- locks


HOLDER = """
import sys, time
from pathlib import Path
from core.locks import hold_lock
with hold_lock(Path(sys.argv[1]), "run folder x", "holder-run"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def start_holder(lock: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_names_its_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / ".lock"
    holder = start_holder(lock, 60)
    try:
        with pytest.raises(LockHeld) as e, hold_lock(lock, "run folder x", "second"):
            pass
        assert e.value.exit_code == EXIT_LOCKED == 75
        assert f"run folder x is in use by pid {holder.pid} (run 'holder-run'" in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold_lock(lock, "run folder x", "third"):  # at once: the kernel dropped the dead holder's lock
        assert json.loads(lock.read_text())["run_name"] == "third"
    assert lock.read_text() == ""  # released: names nobody


def test_promotion_waits_for_a_short_holder(tmp_path):
    lock = tmp_path / ".gemma.lock"
    holder = start_holder(lock, 0.5)
    t0 = time.monotonic()
    with hold_lock(lock, "promotion target gemma", "second", wait_s=30):
        waited = time.monotonic() - t0
    holder.wait()
    assert 0.2 < waited < 30


# ----------------------------------------------------------------------------- disk space


def test_preflight_refuses_with_both_numbers(tmp_path):
    writes = [
        Write("checkpoints", tmp_path / "outputs" / "run", 900_000),
        Write("adapter", tmp_path / "models", 100_000),
    ]
    with pytest.raises(DiskSpaceError) as e:
        check_free_space(writes, free=lambda _: 500_000)
    assert e.value.exit_code == 6
    assert (
        "needs about 1.0 MiB (1100000 bytes: checkpoints 878.9 KiB, adapter 97.7 KiB; +10%), 488.3 KiB (500000 "
        "bytes) free" in str(e.value)
    )
    assert "paths.check_free_space=false" in str(e.value)
    assert check_free_space(writes, free=lambda _: 2_000_000).startswith("disk: the run will write about 1.0 MiB")


def test_gguf_estimate_counts_parameters_from_safetensors_headers(tmp_path):
    from safetensors.numpy import save_file

    save_file(
        {
            "model.embed_tokens.weight": np.zeros((1000, 64), np.float32),
            "model.layers.0.mlp.up_proj.weight": np.zeros((256, 64), np.float32),
        },
        str(tmp_path / "m.safetensors"),
    )
    counts = tensor_counts(tmp_path)
    assert (counts.params, counts.embedding_params) == (80_384, 64_000)
    assert gguf_bytes(counts, "f32", None) == 80_384 * 4
    assert gguf_bytes(counts, "q8_0", None) == int(80_384 * 8.5 / 8)
    # q4_k_m with token_embd kept at q8_0 (export.token_embedding_type): the embedding costs 8.5 bits
    assert gguf_bytes(counts, "q4_k_m", "q8_0") == int((80_384 * 4.9 + 64_000 * 3.6) / 8)


def test_disk_full_is_recognised_by_errno_message_or_free_space(tmp_path, monkeypatch):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert is_disk_full(RuntimeError("Error while serializing: No space left on device (os error 28)"), tmp_path)
    torch_style = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not is_disk_full(torch_style, tmp_path)
    monkeypatch.setattr("train.diskspace.free_bytes", lambda _: 4096)
    assert is_disk_full(torch_style, tmp_path)


# ----------------------------------------------------------------------------- metrics on resume


def test_trim_metrics_drops_rows_after_the_resumed_step_and_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert trim_metrics(path, 3) == 2
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert path.read_text().endswith("}\n")


# ----------------------------------------------------------------------------- safety rules


def test_every_torch_load_uses_weights_only():
    """Ours (none today must stay so) and the Trainer's loads of RNG, optimizer and scheduler state."""
    from transformers import Trainer

    ours = [
        (p, line)
        for p in [*(ROOT / "train").rglob("*.py"), *(ROOT / "convert").rglob("*.py")]
        for line in p.read_text().splitlines()
        if "torch.load(" in line and "weights_only=True" not in line
    ]
    assert ours == []
    for method in (Trainer._load_rng_state, Trainer._load_optimizer_and_scheduler):
        calls = re.findall(r"torch\.load\((.*?)\)\n", inspect.getsource(method), re.S)
        assert calls and all("weights_only=True" in c for c in calls), method.__name__


def test_remote_code_is_off_unless_configured():
    assert Config().model.trust_remote_code is False
    code = [
        p
        for p in [*(ROOT / "train").rglob("*.py"), *(ROOT / "convert").rglob("*.py")]
        if "trust_remote_code=True" in p.read_text()
    ]
    assert code == []


# ----------------------------------------------------------------------------- the run folder on resume


IDENTITY = {"base_model": "m", "base_revision": "r", "data_fingerprint": "abc", "lora": {"r": 8}}


def run_folder(tmp_path: Path, steps: list[int]):
    cfg = Config.model_validate({"run_name": "t", "paths": {"output_dir": str(tmp_path), "models_dir": str(tmp_path)}})
    paths = RunFolder.of(cfg)
    for step in steps:
        folder = fake_checkpoint(paths.checkpoints, step, commit=False)
        commit_checkpoint(folder, IDENTITY)
    paths.config.write_text(to_yaml(cfg))
    return cfg, paths


def test_explicit_resume_moves_the_newer_branch_aside(tmp_path, caplog):
    cfg, paths = run_folder(tmp_path, [2, 4, 6])
    with caplog.at_level(logging.INFO):
        resume = prepare_run_folder(paths, cfg, False, IDENTITY, paths.checkpoints / "checkpoint-4")
    assert resume == (paths.checkpoints / "checkpoint-4").resolve()
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert caplog.messages == [
        f"warning: skipping checkpoint-6: newer than the requested --resume-from checkpoint-4; moved to "
        f"{paths.root / 'rejected' / 'checkpoint-6'}"
    ]


def test_resume_is_refused_on_changed_identity_or_config_and_nothing_is_touched(tmp_path):
    cfg, paths = run_folder(tmp_path, [2, 4])
    with pytest.raises(RunError) as e:
        prepare_run_folder(
            paths, cfg, False, IDENTITY | {"data_fingerprint": "def"}, paths.checkpoints / "checkpoint-2"
        )
    assert "training data fingerprint (the tokenized examples): checkpoint has 'abc', this run has 'def'" in str(
        e.value
    )
    assert "--fresh" in str(e.value)
    changed = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 4})})
    with pytest.raises(RunError, match=r"lora.r: 16 -> 4"):
        prepare_run_folder(paths, changed, False, IDENTITY)
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (paths.root / "rejected").exists()
    # --fresh empties the folder but keeps the lock file the running process holds
    paths.lock_file.write_text("")
    assert prepare_run_folder(paths, cfg, True, IDENTITY) is None
    assert sorted(p.name for p in paths.root.iterdir()) == [".lock", "config.yaml"]
