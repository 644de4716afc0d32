"""The one place CLIs turn exceptions into exit codes, user paths, strict config parsing, published modes (issue 9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from convert.export import vouched_adapter
from core import errors
from core.config import Config, ConfigError, load_config, parse_yaml, to_yaml
from core.errors import (
    EXIT_INVALID,
    Interrupted,
    NonFiniteLoss,
    PathError,
    Preempted,
    RunError,
    cli_exit,
    exit_status,
)
from core.files import atomic_replace_dir, move_dir_into_place, record_files
from core.paths import creatable_dir, require_dir, require_file, what_is
from core.runfolder import Manifest, RunFolder
from tests.conftest import ROOT
from train.resume import prepare_run_folder


def test_what_is_names_every_kind_of_path(tmp_path: Path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "full").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "full")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert what_is(tmp_path) == "a folder"
    assert what_is(tmp_path / "empty") == "an empty file"
    assert what_is(tmp_path / "full") == "a file"
    assert what_is(tmp_path / "link") == "a file"  # a link is what it points to
    assert what_is(tmp_path / "dangling") == "a broken symlink"
    assert what_is(tmp_path / "nope") == "missing"
    assert what_is(tmp_path / "full" / "below") == "missing (a parent of it is a file)"
    assert what_is(Path("/dev/null")) == "a device or other special file"


def test_user_paths_resolve_relative_to_the_working_directory(tmp_path: Path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert require_dir("d/", "data") == tmp_path / "d"
    assert require_file("./d/f.txt", "data") == tmp_path / "d" / "f.txt"
    with pytest.raises(PathError, match=r"--model d/f.txt \(relative to .*\): is a file, not a folder"):
        require_dir("d/f.txt", "--model")
    with pytest.raises(PathError, match="paths.output_dir d/f.txt/x .*d/f.txt is a file"):
        creatable_dir("d/f.txt/x", "paths.output_dir")
    assert creatable_dir("new/deeper", "paths.output_dir") == tmp_path / "new" / "deeper"


def test_yaml_refuses_duplicate_keys_and_reads_exponents_as_floats():
    assert parse_yaml("a: 1e-4\nb: 5E3\nc: 1.5\nd: 10\n") == {"a": 1e-4, "b": 5e3, "c": 1.5, "d": 10}
    with pytest.raises(Exception, match="duplicate key 'x'"):
        parse_yaml("s:\n  x: 1\n  x: 2\n")


def test_config_types_are_strict(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: a\n")
    assert load_config(path, ["training.learning_rate=1e-4"]).training.learning_rate == 1e-4
    for override, key in [
        ("training.max_steps=true", "training.max_steps"),
        ("data.packing=1", "data.packing"),
        ("lora.r=2.5", "lora.r"),
        ("training.max_steps=0", "training.max_steps"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(path, [override])


@pytest.mark.parametrize(
    "error, status",
    [
        (Interrupted(signal.SIGINT), 130),
        (Interrupted(signal.SIGTERM), 143),
        (PathError("x"), EXIT_INVALID),
        (PermissionError(13, "Permission denied", "/root/x"), EXIT_INVALID),
        (IsADirectoryError(21, "Is a directory", "/tmp"), EXIT_INVALID),
    ],
)
def test_exit_status_of_what_a_user_can_act_on(error: BaseException, status: int):
    found = exit_status(error)
    assert found is not None and found[0] == status


def test_a_bug_keeps_its_traceback():
    assert exit_status(ValueError("bug")) is None
    assert exit_status(FileNotFoundError(2, "No such file", "x")) is None  # our code should have checked it

    with pytest.raises(ValueError):
        cli_exit(lambda: (_ for _ in ()).throw(ValueError("bug")))


def test_sigterm_becomes_an_exception_that_finally_blocks_see():
    code = """
import os, signal, sys, time
from core.errors import cli_exit
def work():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    finally:
        print("cleaned up", flush=True)
sys.exit(cli_exit(work))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 143
    assert res.stdout == "cleaned up\n"
    assert "Traceback" not in res.stderr


def test_an_error_that_native_code_makes_of_a_signal_still_exits_as_the_signal(monkeypatch):
    from core import signals

    monkeypatch.setattr(signals, "_received", [])

    def native_read():  # what safetensors' get_tensors did when Ctrl-C landed inside it
        try:
            signal.raise_signal(signal.SIGINT)
        except Interrupted:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    assert cli_exit(native_read) == 130
    with pytest.raises(ValueError):  # without a signal the same error is a bug and keeps its traceback
        cli_exit(lambda: (_ for _ in ()).throw(ValueError("could not determine the shape")))


def test_promoted_folders_get_the_umask_mode(tmp_path: Path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("adapter_model.safetensors", "training_args.bin", "sub/x"):
        (src / name).write_text("x")
        os.chmod(src / name, 0o600)  # as safetensors' mkstemp leaves it
    umask = os.umask(0)
    os.umask(umask)
    atomic_replace_dir(src, tmp_path / "out", ignore=("training_args.bin",))
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["adapter_model.safetensors", "sub", "x"]
    for p in (tmp_path / "out").rglob("*"):
        assert p.stat().st_mode & 0o777 == ((0o777 if p.is_dir() else 0o666) & ~umask)
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "model.safetensors").write_text("new")
    os.chmod(tmp_path / "stage" / "model.safetensors", 0o600)
    move_dir_into_place(tmp_path / "stage", tmp_path / "out")
    assert not (tmp_path / "stage").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_run_that_never_committed_a_checkpoint_accepts_a_corrected_config(tmp_path: Path):

    cfg = Config.model_validate({"run_name": "t", "paths": {"output_dir": str(tmp_path), "models_dir": str(tmp_path)}})
    paths = RunFolder.of(cfg)
    paths.root.mkdir(parents=True)
    paths.config.write_text(
        to_yaml(cfg.model_copy(update={"training": cfg.training.model_copy(update={"optim": "x"})}))
    )
    assert prepare_run_folder(paths, cfg, False, {}) is None  # crashed before its first save: starts over
    assert load_config(paths.config).training.optim == "adamw_torch"


def test_export_refuses_an_adapter_the_run_folder_does_not_vouch_for(tmp_path: Path):

    cfg = Config.model_validate({"run_name": "t", "paths": {"output_dir": str(tmp_path), "models_dir": str(tmp_path)}})
    paths = RunFolder.of(cfg)
    paths.adapter.mkdir(parents=True)
    (paths.adapter / "adapter_model.safetensors").write_bytes(b"trained")
    record = {"adapter": {"path": str(paths.adapter_out), "files": record_files(paths.adapter)}}
    with pytest.raises(RunError, match="status: no manifest"):
        vouched_adapter(paths)
    for status in ("training", "interrupted", "failed"):
        paths.write_manifest(Manifest(status=status, run_name="t", artifacts=record))
        with pytest.raises(RunError, match=f"status: {status}"):
            vouched_adapter(paths)
    paths.write_manifest(Manifest(status="complete", run_name="t", artifacts=record))
    assert vouched_adapter(paths).status == "complete"
    (paths.adapter / "adapter_model.safetensors").write_bytes(b"another run's")
    with pytest.raises(RunError, match="adapter_model.safetensors: .* bytes, .*manifest.json says"):
        vouched_adapter(paths)


def test_a_signal_inside_a_deferred_block_takes_effect_as_the_block_ends(monkeypatch):
    import os

    from core import signals

    # the handler records each signal process-wide: keep this test's to itself
    monkeypatch.setattr(signals, "_received", [])
    monkeypatch.setattr(signals, "_pending", None)

    reached = []
    with signals.handled(), pytest.raises(Interrupted) as stopped:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("rest of the block")  # the native call's caller finishes its step first
        reached.append("after the block")
    assert reached == ["rest of the block"] and stopped.value.exit_code == 143
    assert signals.pending() is None  # raised once, then gone
    with signals.handled():
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.take() == signal.SIGINT  # acted on inside (training stopped for it): not raised again
        outer = signal.getsignal(signal.SIGTERM)
        with signals.deferred():
            pass  # no signal: nothing raised
        assert signal.getsignal(signal.SIGTERM) is outer
    assert signal.getsignal(signal.SIGTERM) is not signals._handle  # the handler in place before is back


UNFINISHED = "nothing was published by the unfinished stage. To continue:"


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "c.yaml", "--fresh", "lora.r=4"],
        ["--fresh", "--config", "c.yaml", "--resume-from", "outputs/r/checkpoints/checkpoint-5", "lora.r=4"],
        ["--config", "c.yaml", "--resume-from=outputs/r/checkpoints/checkpoint-5", "lora.r=4"],
    ],
)
def test_every_hint_names_a_command_that_resumes(argv: list[str], monkeypatch: pytest.MonkeyPatch):
    """The three hints a stop prints (a signal, a non-finite loss, an unfinished export) name one command: the
    run's own without --fresh (it would discard the checkpoint just committed) and without --resume-from (it would
    set the newer checkpoints aside). test_interrupts follows the signal's hint verbatim on a real run."""
    monkeypatch.setattr(errors, "_resume_command", errors._resume_command)  # restored after the test
    errors.set_resume_command(argv)
    want = "`python -m train --config c.yaml lora.r=4`"
    assert errors.resume_command() == want
    assert f"to resume: {want}" in str(Preempted(signal.SIGINT, 5, Path("checkpoint-5")))
    assert f"then {want} resumes" in str(NonFiniteLoss(7, {"loss": "nan", "grad_norm": "nan"}))
    assert exit_status(Interrupted(signal.SIGTERM)) == (143, f"stopped by SIGTERM; {UNFINISHED} {want}")
