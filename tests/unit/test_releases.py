"""core/releases.py on files: every promotion's one writer of models/gguf (immutable releases, one live pointer).

No model: each "GGUF" is a few bytes that name its run and file, so a name that resolves to the wrong release,
or to half of one, reads as the wrong bytes. Crashes are real SIGKILLs in a forked child, with no handler."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core import locks, releases
from core.errors import LockHeld, RunError

NAME = "m"
DEFAULT, Q4, F16 = "m.gguf", "m.q4_k_m.gguf", "m.f16.gguf"


def content(run: str, file: str) -> bytes:
    return f"{run}:{file}\n".encode() * (3 + len(run))  # run and file in every byte pattern; sizes differ by run


def made(tmp_path: Path, run: str, names: tuple[str, ...] = (DEFAULT, Q4)) -> dict[str, Path]:
    """A finished export of `run`: {file name: its work file}, outside models/gguf."""
    folder = tmp_path / "work" / run
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(content(run, n))
    return {n: folder / n for n in names}


def publish(gguf: Path, run: str, names: tuple[str, ...] = (DEFAULT, Q4), **meta) -> releases.Release:
    return releases.publish(gguf, NAME, run, made(gguf.parent, run, names), meta)


def names(gguf: Path) -> dict[str, bytes]:
    """What an application opening each visible name reads (a dangling link reads as nothing)."""
    return {p.name: p.read_bytes() for p in sorted(gguf.iterdir()) if not p.name.startswith(".") and p.exists()}


def expected(run: str, files: tuple[str, ...] = (DEFAULT, Q4)) -> dict[str, bytes]:
    return {n: content(run, n) for n in sorted(files)}


def tree(folder: Path) -> dict[str, str | bytes]:
    """Every entry under folder: links by target, files by content (what "nothing changed" compares)."""
    found: dict[str, str | bytes] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            found[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            found[str(p.relative_to(folder))] = p.read_bytes()
    return found


def damage(path: Path, data: bytes) -> None:
    os.chmod(path, 0o644)
    path.write_bytes(data)


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "gguf"
    folder.mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------- publish


def test_publish_links_every_name_through_the_live_pointer(gguf):
    sources = made(gguf.parent, "r1")
    rel = releases.publish(gguf, NAME, "r1", sources, {"by": "python -m train", "inputs": "abc"})
    assert (rel.id, rel.run, rel.folder) == ("r1", "r1", gguf / ".releases" / NAME / "r1")
    assert os.readlink(gguf / ".releases" / NAME / "live") == "r1"
    for n in (DEFAULT, Q4):
        assert os.readlink(gguf / n) == f".releases/{NAME}/live/{n}"
    assert names(gguf) == expected("r1")
    assert not any(p.exists() for p in sources.values())  # moved in, not copied
    assert releases.live(gguf, NAME) == rel
    (line,) = releases.history(gguf, NAME)
    assert {k: line[k] for k in ("event", "release", "run", "was", "by", "inputs")} == {
        "event": "publish",
        "release": "r1",
        "run": "r1",
        "was": None,
        "by": "python -m train",
        "inputs": "abc",
    }


def test_release_files_are_read_only_and_recorded(gguf):
    rel = publish(gguf, "r1", by="python -m train")
    record = json.loads((rel.folder / "release.json").read_text())
    assert record["name"] == NAME and record["run"] == "r1" and record["by"] == "python -m train"
    assert record["files"] == {
        n: {"size": len(content("r1", n)), "sha256": hashlib.sha256(content("r1", n)).hexdigest()}
        for n in (DEFAULT, Q4)
    }
    assert sorted(p.name for p in rel.folder.iterdir()) == [DEFAULT, Q4, "release.json"]
    assert all(p.stat().st_mode & 0o222 == 0 for p in rel.folder.iterdir())
    assert rel.problems() == []


def test_every_file_of_a_release_is_on_disk_before_it_is_renamed_in(gguf, monkeypatch):
    """A crash after the rename must not find a torn release.json beside whole data files."""
    synced: set[int] = set()  # inodes forced to disk, up to the release folder's rename
    fsync, rename = os.fsync, os.rename

    def logged_fsync(fd: int) -> None:
        fsync(fd)
        synced.add(os.fstat(fd).st_ino)

    def logged_rename(src, dst) -> None:
        rename(src, dst)
        if Path(dst).name == "r1":  # the staged release, renamed in: what it holds must already be durable
            monkeypatch.setattr(os, "fsync", fsync)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "rename", logged_rename)
    rel = publish(gguf, "r1")
    assert {p.name for p in rel.folder.iterdir() if p.stat().st_ino in synced} == {DEFAULT, Q4, "release.json"}


@pytest.mark.parametrize(
    ("harm", "problem"),
    [
        (lambda p: damage(p, content("r1", DEFAULT)[:-1] + b"?"), "content differs from"),
        (lambda p: damage(p, content("r1", DEFAULT)[:5]), "bytes, "),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["changed", "truncated", "deleted"],
)
def test_problems_finds_a_damaged_file(gguf, harm: Callable[[Path], None], problem: str):
    rel = publish(gguf, "r1")
    harm(rel.folder / DEFAULT)
    (found,) = releases.live(gguf, NAME).problems()
    assert found.startswith(f"{rel.folder / DEFAULT}: ") and problem in found


def test_a_second_publish_switches_every_name_and_drops_those_it_lacks(gguf):
    """The whole set rule: a publish with fewer quants leaves no older run's file under the name."""
    publish(gguf, "r1", (DEFAULT, Q4, F16))
    releases.publish(gguf, "other", "base", made(gguf.parent, "base", ("other.gguf",)))  # another name's link
    (gguf / "notes.txt").write_text("the operator's")  # a regular file of no name
    publish(gguf, "r2", (DEFAULT, Q4))
    assert names(gguf) == expected("r2") | expected("base", ("other.gguf",)) | {"notes.txt": b"the operator's"}
    assert not (gguf / F16).is_symlink()  # removed, not left dangling
    assert releases.release_ids(gguf, NAME) == ["r1", "r2"]  # the previous release stays, whole, for a rollback
    assert releases.release(gguf, NAME, "r1").problems() == []
    assert [h["was"] for h in releases.history(gguf, NAME)] == [None, "r1"]


def test_a_regular_file_at_a_name_is_replaced(gguf):
    (gguf / DEFAULT).write_bytes(b"copied here by hand")
    publish(gguf, "r1")
    assert os.readlink(gguf / DEFAULT) == f".releases/{NAME}/live/{DEFAULT}"
    assert names(gguf) == expected("r1")


def test_publishing_the_same_run_again_makes_a_new_release(gguf):
    first = publish(gguf, "r1")
    again = releases.publish(gguf, NAME, "r1", {DEFAULT: _file(gguf.parent / "again", b"retrained")})
    assert (first.id, again.id, again.run) == ("r1", "r1.2", "r1")
    assert names(gguf) == {DEFAULT: b"retrained"}  # Q4 is not in the new set
    assert first.problems() == []  # the first release is untouched
    assert releases.stack(gguf, NAME) == ["r1", "r1.2"]


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- rollback, stack, discard


def test_rollback_makes_the_previous_release_live_byte_for_byte(gguf):
    publish(gguf, "r1", (DEFAULT, Q4, F16), inputs="in1")
    publish(gguf, "r2", (DEFAULT,), inputs="in2")
    back = releases.publish(gguf, NAME, "rollback", rollback_to="r1")
    assert (back.id, back.run) == ("r1", "r1")
    assert names(gguf) == expected("r1", (DEFAULT, Q4, F16))  # F16 is back under its name too
    assert releases.release_ids(gguf, NAME) == ["r1", "r2"]  # no new release: the same files
    last = releases.history(gguf, NAME)[-1]
    assert (last["event"], last["release"], last["was"], last["inputs"]) == ("rollback", "r1", "r2", "in1")
    assert releases.stack(gguf, NAME) == ["r1"]


@pytest.mark.parametrize("target", ["r1", "r0"], ids=["damaged", "missing"])
def test_rollback_refuses_a_release_whose_files_changed_and_changes_nothing(gguf, target):
    publish(gguf, "r1")
    publish(gguf, "r2")
    damage(gguf / ".releases" / NAME / "r1" / Q4, content("r1", Q4)[:-1] + b"?")  # bit rot, same size
    before = tree(gguf)
    with pytest.raises(RunError) as refused:
        releases.publish(gguf, NAME, "rollback", rollback_to=target)
    problem = "content differs" if target == "r1" else "missing"
    assert f"cannot make {target} live again" in str(refused.value) and problem in str(refused.value)
    assert tree(gguf) == before
    assert names(gguf) == expected("r2")


def test_stack_replays_publishes_and_rollbacks(gguf):
    publish(gguf, "r1")
    publish(gguf, "r2")
    publish(gguf, "r3")
    assert releases.stack(gguf, NAME) == ["r1", "r2", "r3"]
    releases.publish(gguf, NAME, "rollback", rollback_to="r2")
    assert releases.stack(gguf, NAME) == ["r1", "r2"]
    publish(gguf, "r4")
    assert releases.stack(gguf, NAME) == ["r1", "r2", "r4"]
    releases.publish(gguf, NAME, "rollback", rollback_to="r2")
    releases.publish(gguf, NAME, "rollback", rollback_to="r1")
    assert releases.stack(gguf, NAME) == ["r1"]
    assert releases.live(gguf, NAME).id == "r1"


def test_discard_deletes_a_release_that_is_not_live_and_refuses_the_live_one(gguf):
    publish(gguf, "r1")
    publish(gguf, "r2")
    before = tree(gguf)
    with pytest.raises(RunError, match="r2 is the live release of m: not deleted"):
        releases.discard(gguf, NAME, "r2")
    assert tree(gguf) == before
    assert releases.discard(gguf, NAME, "r1") == gguf / ".releases" / NAME / "r1"
    assert releases.release_ids(gguf, NAME) == ["r2"]
    assert [p.name for p in (gguf / ".releases" / NAME).glob(".*")] == []  # no .r1.deleting left
    assert releases.discard(gguf, NAME, "r1") is None
    assert names(gguf) == expected("r2")


# ----------------------------------------------------------------------------- crashes, readers, publishers


def fork_publish(gguf: Path, prepare: Callable[[], None], run: str, files: tuple[str, ...] = (DEFAULT, Q4)) -> int:
    """Fork a child that runs `prepare` (its patches), publishes `run` and exits (0 when the publish returned);
    the child's pid."""
    sources = made(gguf.parent, run, files)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            prepare()
            releases.publish(gguf, NAME, run, sources, {})
            code = 0
        finally:
            os._exit(code)
    return pid


def kill_at(point: str) -> Callable[[], None]:
    """Patch the child to SIGKILL itself at the named point: no handler, no cleanup, as the OOM killer."""

    def die(*_a, **_k):
        os.kill(os.getpid(), signal.SIGKILL)

    def prepare() -> None:
        if point == "staging":  # the files moved into the staging folder, their record not yet written
            releases.record_files = die
        elif point.startswith("link:"):  # a link made beside its name, not yet renamed over it
            target, real = point.split(":")[1], os.replace
            os.replace = lambda src, dst: die() if Path(dst).name == target else real(src, dst)
        else:
            releases.reached = lambda p: die() if p == point else None

    return prepare


def leftovers(gguf: Path) -> list[str]:
    """Hidden entries a publish makes and removes (staging folders, temporary links)."""
    found = [*gguf.glob(".*"), *(gguf / ".releases" / NAME).glob(".*")]
    return sorted(p.name for p in found if p.name not in (".locks", ".releases"))


@pytest.mark.parametrize(
    ("point", "live_after", "left"),
    [
        ("staging", "r1", ".r2."),
        ("after_stage", "r1", None),
        ("before_switch", "r1", None),
        ("link:live", "r1", ".live."),
        ("between_renames", "r2", None),
        (f"link:{DEFAULT}", "r2", f".{DEFAULT}."),
    ],
)
def test_sigkill_leaves_one_whole_release_live_and_the_next_publish_cleans_up(gguf, point, live_after, left):
    """r1 has m.gguf and m.f16.gguf, r2 m.gguf and m.q4_k_m.gguf: a mix of the two would show."""
    publish(gguf, "r1", (DEFAULT, F16))
    _, status = os.waitpid(fork_publish(gguf, kill_at(point), "r2"), 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert [name.startswith(left) for name in leftovers(gguf)] == ([True] if left else [])
    live = releases.live(gguf, NAME)
    assert live.id == live_after and live.problems() == []
    seen = names(gguf)  # every name that resolves reads the live release: never a mix, never half a file
    assert seen == {n: content(live_after, n) for n in seen} and DEFAULT in seen
    assert releases.stack(gguf, NAME)[-1] == live_after  # what status and rollback read

    publish(gguf, "r3", (DEFAULT, Q4))
    assert names(gguf) == expected("r3")
    assert leftovers(gguf) == []
    folder = gguf / ".releases" / NAME
    staged = [] if point == "staging" else ["r2"]  # renamed into place before the kill: a release, not live
    assert sorted(p.name for p in folder.iterdir()) == ["history.jsonl", "live", "r1", *staged, "r3"]
    assert releases.history(gguf, NAME)[-1]["was"] == live_after
    assert releases.stack(gguf, NAME) == (["r1", "r3"] if live_after == "r1" else ["r1", "r2", "r3"])


def test_a_reader_polling_the_names_sees_only_whole_files_of_one_release(gguf, monkeypatch):
    publish(gguf, "r1")
    sources = {run: made(gguf.parent, run) for run in ("r2", "r3")}
    monkeypatch.setattr(releases, "reached", lambda point: time.sleep(0.05))  # each state lasts long enough to see
    defaults: list[bytes] = []  # the default file, opened by its name as applications do
    pairs: list[tuple[bytes, bytes]] = []  # both files, read from one resolution of `live`
    errors: list[str] = []
    done = threading.Event()

    def poll() -> None:
        pointer = gguf / ".releases" / NAME / "live"
        while not done.is_set():
            try:
                defaults.append((gguf / DEFAULT).read_bytes())
                folder = Path(os.path.realpath(pointer))
                pairs.append(((folder / DEFAULT).read_bytes(), (folder / Q4).read_bytes()))
            except OSError as e:
                errors.append(repr(e))

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        time.sleep(0.02)
        releases.publish(gguf, NAME, "r2", sources["r2"])
        releases.publish(gguf, NAME, "rollback", rollback_to="r1")
        releases.publish(gguf, NAME, "r3", sources["r3"])
        time.sleep(0.02)
    finally:
        done.set()
        reader.join()
    assert errors == []
    order = [d for i, d in enumerate(defaults) if i == 0 or d != defaults[i - 1]]
    assert order == [content(r, DEFAULT) for r in ("r1", "r2", "r1", "r3")]  # whole files, in publication order
    assert set(pairs) <= {(content(r, DEFAULT), content(r, Q4)) for r in ("r1", "r2", "r3")}  # never mixed
    assert len(set(pairs)) == 3


def test_two_publishers_of_one_name_take_turns(gguf, tmp_path, monkeypatch):
    publish(gguf, "r1")
    held, go = tmp_path / "held", tmp_path / "go"

    def hold_at_switch() -> None:
        def wait(point: str) -> None:
            if point == "before_switch":
                held.touch()
                while not go.exists():
                    time.sleep(0.01)

        releases.reached = wait

    pid = fork_publish(gguf, hold_at_switch, "r2")
    try:
        deadline = time.monotonic() + 30
        while not held.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # A publisher that gives up after its wait: LockHeld names the holder; nothing of its own is touched.
        monkeypatch.setattr(releases, "promotion_lock", functools.partial(locks.promotion_lock, wait_s=0.3))
        refused = made(gguf.parent, "r3")
        with pytest.raises(LockHeld) as stopped:
            releases.publish(gguf, NAME, "r3", refused)
        assert f"pid {pid} (run 'r2'" in str(stopped.value)
        assert all(p.is_file() for p in refused.values())  # not staged
        monkeypatch.undo()
        # One that waits (the default wait): it publishes after the holder, on top of its release.
        second = threading.Thread(target=releases.publish, args=(gguf, NAME, "r3", refused))
        second.start()
        time.sleep(0.5)
        assert second.is_alive() and releases.live(gguf, NAME).id == "r1"
    finally:
        go.touch()
        status = os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 0
    second.join(timeout=30)
    history = [(h["release"], h["was"]) for h in releases.history(gguf, NAME)]
    assert history == [("r1", None), ("r2", "r1"), ("r3", "r2")]
    assert names(gguf) == expected("r3")
