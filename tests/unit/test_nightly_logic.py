"""The nightly job's logic on files (train/nightly): the night's inputs, the gates, the candidate's config, the
job lock's recovery, retention, status and the report.

Releases, registry lines and run folders are made with the real functions (core.releases.publish, append_line)
in tmp_path, from files of a few bytes; only what needs a model (training, scoring) is replaced. The whole night
through the real CLI on the tiny model is tests/cli/test_nightly.py."""

from __future__ import annotations

import json
import math
import os
import signal
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from core import releases
from core.config import FINGERPRINTED, Config, NightlySection, apply_override, keys_affecting
from core.errors import DataError, LockHeld, Preempted, RunError
from core.files import append_line, atomic_write_json, jsonable, read_lines
from core.gates import Gate, summary, table
from core.locks import hold_lock
from core.runfolder import Layout, Manifest
from tests.conftest import DEMO_HELDOUT
from train.nightly import night, retention
from train.nightly.inputs import NightInputs, config_part, night_inputs
from train.nightly.report import status_json, status_text, write_report
from train.nightly.scores import gates, load_eval_set

NAME = "m"
BY = night.BY
FILES = ("m.gguf", "m.q4_k_m.gguf")


def config(tmp_path: Path, *overrides: str) -> Config:
    """A config whose every path is in tmp_path; a fake local base model and training data are made once."""
    base, train = tmp_path / "base", tmp_path / "train.jsonl"
    if not base.is_dir():
        base.mkdir()
        (base / "config.json").write_text('{"model_type": "gemma2"}')
        (base / "model.safetensors").write_bytes(b"weights v1")
        train.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    raw: dict[str, Any] = {
        "run_name": "manual",
        "model": {"name_or_path": str(base)},
        "data": {"train_files": [str(train)]},
        "export": {
            "name": NAME,
            "quants": ["q8_0", "q4_k_m"],
            "default_quant": "q8_0",
            "gguf_dir": str(tmp_path / "models" / "gguf"),
        },
        "verify": {"heldout_files": [str(DEMO_HELDOUT)], "max_heldout_records": 4},
        "nightly": {"max_eval_records": 8},
        "paths": {"output_dir": str(tmp_path / "outputs"), "models_dir": str(tmp_path / "models")},
    }
    for o in overrides:
        apply_override(raw, o)
    return Config.model_validate(raw)


def inputs(digest: str) -> NightInputs:
    parts = {"data": digest, "config": "c", "base": "b", "code": "k"}
    return NightInputs(digest, parts, parts)


def scores(hf: float, gguf: float, **more: Any) -> dict[str, Any]:
    return {"hf_loss": hf, "gguf_loss": gguf, "quant_gap": gguf - hf, **more}


def nightly_record(run: str, digest: str, when: str, decision: str = "promoted", **more: Any) -> dict[str, Any]:
    """A registry line as train_and_decide writes it (the fields status, retention and recovery read)."""
    return {
        "time": when,
        "event": "night",
        "decision": decision,
        "run": run,
        "inputs": digest,
        "scores": {"candidate": scores(2.0, 2.1), "champion": None},
        "reason": "all 2 gates passed" if decision == "promoted" else "failed gguf_loss <= champion + 2%",
        "exit_code": 0 if decision == "promoted" else 7,
    } | more


def gguf_files(tmp_path: Path, run: str) -> dict[str, Path]:
    folder = tmp_path / "work" / run
    folder.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        (folder / f).write_bytes(f"{run}/{f}".encode())
    return {f: folder / f for f in FILES}


def candidate_folders(cfg: Config, run: str, digest: str, created: str = "") -> list[Path]:
    """What a nightly candidate leaves besides its release: run folder, promoted adapter and merged model."""
    layout = Layout.of(cfg)
    atomic_write_json(layout.run(run).root / "nightly.json", {"inputs": digest, "created": created})
    for folder in (layout.adapter(run), layout.final_model(run)):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    return [layout.run(run).root, layout.adapter(run), layout.final_model(run)]


def promoted(tmp_path: Path, cfg: Config, run: str, digest: str, when: str) -> releases.Release:
    """A night that promoted `run`: run folders, release (with the decision in its record), registry line."""
    candidate_folders(cfg, run, digest, when)
    record = nightly_record(run, digest, when)
    rel = releases.publish(
        Path(cfg.export.gguf_dir), NAME, run, gguf_files(tmp_path, run), {"by": BY, "inputs": digest, "nightly": record}
    )
    append_line(Layout.of(cfg).registry, record)
    return rel


def manual(tmp_path: Path, cfg: Config, run: str) -> releases.Release:
    """`python -m train` of the same export.name: a release without a nightly decision or inputs."""
    return releases.publish(Path(cfg.export.gguf_dir), NAME, run, gguf_files(tmp_path, run), {"by": "python -m train"})


def live_run(cfg: Config) -> str | None:
    found = releases.live(Path(cfg.export.gguf_dir), NAME)
    return found.run if found else None


def tree(folder: Path) -> dict[str, str | bytes]:
    return {
        str(p.relative_to(folder)): ("-> " + os.readlink(p)) if p.is_symlink() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


# ----------------------------------------------------------------------------- the night's inputs


@pytest.mark.parametrize(
    ("override", "changed"),
    [
        ("lora.r=4", ["config"]),  # trained
        ("training.learning_rate=0.5", ["config"]),
        ("export.quants=[q8_0,q4_k_m,q6_k]", ["config"]),  # exported
        ("verify.max_heldout_records=9", []),  # how an export is judged: not an input
        ("nightly.max_loss_regression=0.5", []),  # how a candidate is judged: not an input
        ("nightly.eval_files=[other.jsonl]", []),
        ("paths.output_dir=elsewhere", []),  # where files go
        ("export.gguf_dir=elsewhere", []),
        ("run_name=other", []),
    ],
)
def test_what_changes_the_night_inputs(tmp_path, override, changed):
    before = night_inputs(config(tmp_path))
    after = night_inputs(config(tmp_path, override))
    assert after.changed_since(before.part_digests) == changed
    assert (after.digest == before.digest) == (changed == [])


def test_data_and_base_bytes_change_the_night_inputs(tmp_path):
    cfg = config(tmp_path)
    first = night_inputs(cfg)
    assert night_inputs(cfg) == first  # deterministic: the same files give the same digest
    assert first.changed_since(None) == ["data", "config", "base", "code"]
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "new"}]}) + "\n")
    second = night_inputs(cfg)
    assert second.changed_since(first.part_digests) == ["data"]
    (tmp_path / "base" / "model.safetensors").write_bytes(b"weights v2")
    assert night_inputs(cfg).changed_since(second.part_digests) == ["base"]
    assert len({first.digest, second.digest, night_inputs(cfg).digest}) == 3


def test_the_config_part_is_the_fingerprinted_keys(tmp_path):
    cfg = config(tmp_path)
    part = config_part(cfg)
    assert part == keys_affecting(cfg, FINGERPRINTED)
    assert part["lora.r"] == cfg.lora.r and part["export.default_quant"] == "q8_0"
    assert not any(k.startswith(("nightly.", "paths.", "verify.")) for k in part)
    assert "run_name" not in part and "export.gguf_dir" not in part


# ----------------------------------------------------------------------------- unchanged


def test_unchanged_when_the_live_release_has_the_same_inputs(tmp_path):
    cfg = config(tmp_path)
    layout = Layout.of(cfg)
    assert night.unchanged(cfg, layout, inputs("a" * 64)) is None  # nothing published
    promoted(tmp_path, cfg, "n1", "a" * 64, "2026-01-01T00:00:00+0000")
    why = night.unchanged(cfg, layout, inputs("a" * 64))
    assert why == "unchanged since n1: same data, config, base model and code (inputs aaaaaaaa)"
    assert night.unchanged(cfg, layout, inputs("b" * 64)) is None
    manual(tmp_path, cfg, "by-hand")  # a release with no inputs: tonight trains, whatever its inputs
    assert night.unchanged(cfg, layout, inputs("a" * 64)) is None


def test_a_rolled_back_model_is_not_trained_again(tmp_path):
    cfg = config(tmp_path)
    layout, gguf = Layout.of(cfg), Path(cfg.export.gguf_dir)
    promoted(tmp_path, cfg, "n1", "a" * 64, "2026-01-01T00:00:00+0000")
    promoted(tmp_path, cfg, "n2", "b" * 64, "2026-01-02T00:00:00+0000")
    releases.publish(gguf, NAME, "rollback", rollback_to="n1")
    when = releases.history(gguf, NAME)[-1]["time"]
    rolled_back = f"unchanged since n2, which was rolled back at {when}: not trained or promoted again"
    assert night.unchanged(cfg, layout, inputs("b" * 64)).startswith(rolled_back)
    assert night.unchanged(cfg, layout, inputs("a" * 64)).startswith("unchanged since n1: ")  # live again
    promoted(tmp_path, cfg, "n3", "c" * 64, "2026-01-03T00:00:00+0000")  # later nights do not clear the mark
    assert night.unchanged(cfg, layout, inputs("b" * 64)).startswith(rolled_back)
    promoted(tmp_path, cfg, "n4", "b" * 64, "2026-01-04T00:00:00+0000")  # promoted again (by hand): live
    assert night.unchanged(cfg, layout, inputs("b" * 64)).startswith("unchanged since n4: ")
    releases.publish(gguf, NAME, "rollback", rollback_to="n3")
    assert "n4, which was rolled back" in night.unchanged(cfg, layout, inputs("b" * 64))


# ----------------------------------------------------------------------------- the gates


def named(checks) -> dict[str, bool]:
    return {g.name: g.passed for g in checks}


def test_the_first_night_has_only_absolute_gates():
    n = NightlySection()
    assert named(gates(scores(2.0, 2.1), None, n, tasks=False)) == {
        "hf_loss measured and finite": True,
        "gguf_loss measured and finite": True,
    }
    n = NightlySection(max_gguf_loss=2.0, max_quant_gap=0.2, min_task_accuracy=0.5)
    assert named(gates(scores(1.9, 2.05, task_accuracy=0.5), None, n, tasks=True)) == {
        "hf_loss measured and finite": True,
        "gguf_loss measured and finite": True,
        "task_accuracy measured and finite": True,
        "gguf_loss <= 2": False,
        "quant_gap <= 0.2": True,
        "task_accuracy >= 0.5": True,
    }


def test_a_regression_beyond_the_margin_fails():
    n = NightlySection(max_loss_regression=0.02)
    champion = scores(2.0, 3.0)
    assert all(named(gates(scores(2.039, 3.059), champion, n, tasks=False)).values())
    assert named(gates(scores(2.041, 2.5), champion, n, tasks=False)) == {
        "hf_loss measured and finite": True,
        "gguf_loss measured and finite": True,
        "hf_loss <= champion + 2%": False,
        "gguf_loss <= champion + 2%": True,
    }
    (regression,) = [g for g in gates(scores(2.0, 3.1), champion, n, tasks=False) if not g.passed]
    assert (regression.name, regression.value, regression.threshold) == ("gguf_loss <= champion + 2%", 3.1, 3.06)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "nan", None, True], ids=["nan", "inf", "json-nan", "none", "bool"])
def test_a_loss_not_measured_never_passes(bad):
    candidate = scores(2.0, 2.0) | {"gguf_loss": bad}
    if bad is None:
        del candidate["gguf_loss"]
    first = named(gates(jsonable(candidate), None, NightlySection(max_gguf_loss=100.0), tasks=False))
    assert first == {
        "hf_loss measured and finite": True,
        "gguf_loss measured and finite": False,
        "gguf_loss <= 100": False,
    }
    checks = gates(candidate, scores(3.0, 3.0), NightlySection(), tasks=False)
    against = named(checks)
    assert against["gguf_loss <= champion + 2%"] is False and against["hf_loss <= champion + 2%"] is True
    # as nightly.md is written from the record: the same gates, the same table (an inf one failed to format)
    recorded = [Gate.from_json(json.loads(json.dumps(g.to_json()))) for g in checks]
    assert table(recorded) == table(checks)


def test_a_champion_without_a_figure_is_not_compared_on_it():
    """A champion whose loss is NaN (or missing) would otherwise fail every candidate's regression gate for ever:
    that comparison is dropped; the candidate's own figures are still gated."""
    champion = scores(2.0, 2.0) | {"gguf_loss": math.nan}
    got = named(gates(scores(1.9, 2.5), champion, NightlySection(), tasks=False))
    assert got == {
        "hf_loss measured and finite": True,
        "gguf_loss measured and finite": True,
        "hf_loss <= champion + 2%": True,
    }
    assert (
        named(gates(scores(1.9, math.nan), champion, NightlySection(), tasks=False))["gguf_loss measured and finite"]
        is False
    )


def test_a_nightly_job_and_a_manual_run_of_the_same_name_refuse_each_other(tmp_path):
    from core.locks import publisher_lock
    from train.run import publishing

    cfg = config(tmp_path)
    layout, gguf = Layout.of(cfg), Path(cfg.export.gguf_dir)
    with publisher_lock(gguf, NAME, "manual", exclusive=False), publishing(cfg, True):  # two manual runs: fine
        with pytest.raises(LockHeld, match="a run that will publish it") as held, night.job_lock(cfg, layout, "run"):
            pass
        assert held.value.exit_code == 75
    with night.job_lock(cfg, layout, "run"):
        with pytest.raises(LockHeld, match=r"run 'nightly run'"), publishing(cfg, True):
            pass
        with publishing(cfg, False):  # the nightly's own candidate does not publish: it takes no lock
            pass


def test_task_accuracy_gates_against_the_champion():
    champion = scores(2.0, 2.0, task_accuracy=0.75)
    strict = NightlySection()  # max_accuracy_drop 0
    assert (
        named(gates(scores(2.0, 2.0, task_accuracy=0.5), champion, strict, tasks=True))["task_accuracy >= champion - 0"]
        is False
    )
    assert all(named(gates(scores(2.0, 2.0, task_accuracy=0.75), champion, strict, tasks=True)).values())
    lenient = NightlySection(max_accuracy_drop=0.25)
    assert all(named(gates(scores(2.0, 2.0, task_accuracy=0.5), champion, lenient, tasks=True)).values())
    missing = named(gates(scores(2.0, 2.0), champion, strict, tasks=True))
    assert missing["task_accuracy measured and finite"] is False and missing["task_accuracy >= champion - 0"] is False
    assert "task_accuracy >= champion - 0" not in named(gates(scores(2.0, 2.0), champion, strict, tasks=False))


# ----------------------------------------------------------------------------- the candidate


def test_candidate_config_scores_the_eval_set_in_its_verification(tmp_path):
    cfg = config(tmp_path, "nightly.eval_files=[eval.jsonl]", "nightly.max_eval_records=64", "export.enabled=false")
    c = night.candidate_config(cfg, "nightly-2026-01-01-abcdef12")
    assert c.run_name == "nightly-2026-01-01-abcdef12"
    assert c.verify.heldout_files[:1] == ["eval.jsonl"]  # scored first: its losses are in verify.json
    assert c.verify.max_heldout_records == 64
    assert (c.export.enabled, c.export.export_base) == (True, False)
    assert (cfg.run_name, cfg.verify.heldout_files, cfg.export.enabled) == ("manual", [str(DEMO_HELDOUT)], False)
    more = config(tmp_path, "verify.max_heldout_records=100", "nightly.max_eval_records=8")
    assert night.candidate_config(more, "r").verify.max_heldout_records == 100  # raised, never lowered
    plain = night.candidate_config(config(tmp_path), "r")  # no nightly.eval_files: verify.heldout_files is the set
    assert plain.verify.heldout_files == [str(DEMO_HELDOUT)]


def test_an_earlier_candidate_of_the_same_inputs_is_resumed_under_its_name(tmp_path):
    cfg = config(tmp_path)
    layout = Layout.of(cfg)
    fp = inputs("abcdef12" + "0" * 56)
    today = date(2026, 3, 4)
    assert night.candidate_name(cfg, layout, fp, today) == "nightly-2026-03-04-abcdef12"
    atomic_write_json(layout.run("nightly-2026-03-01-abcdef12").root / "nightly.json", {"inputs": fp.digest})
    assert night.candidate_name(cfg, layout, fp, today) == "nightly-2026-03-01-abcdef12"
    other = inputs("abcdef12" + "1" * 56)  # the same 8 hex, other inputs: not the same candidate
    assert night.candidate_name(cfg, layout, other, today) == "nightly-2026-03-04-abcdef12"


def test_an_exported_candidate_is_not_trained_again(tmp_path, monkeypatch):
    c = night.candidate_config(config(tmp_path), "nightly-2026-03-01-abcdef12")
    folder = Layout.of(c).run(c.run_name)
    calls = []
    monkeypatch.setattr(night, "train_run", lambda cfg, publish: calls.append(publish) or "trained")
    assert night.build(c) == "trained" and calls == [False]  # nothing yet: trained, exported, not published
    folder.write_manifest(Manifest(status="training", run_name=c.run_name))
    assert night.build(c) == "trained"  # interrupted: resumed by train.run
    folder.write_manifest(Manifest(status="exported", run_name=c.run_name))
    assert night.build(c).status == "exported" and calls == [False, False]


def test_a_failed_night_is_recorded_with_its_exit_status(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    layout = Layout.of(cfg)

    def no_data(c):
        raise DataError(["train.jsonl:3: messages: two consecutive user messages"])

    monkeypatch.setattr(night, "build", no_data)
    with pytest.raises(DataError):
        night.train_and_decide(cfg, layout, inputs("d" * 64), date(2026, 3, 4))
    (line,) = read_lines(layout.registry)
    assert {k: line[k] for k in ("event", "decision", "run", "inputs", "exit_code", "reason")} == {
        "event": "night",
        "decision": "failed",
        "run": "nightly-2026-03-04-dddddddd",
        "inputs": "d" * 64,
        "exit_code": 2,
        "reason": "error: 1 data problem(s):",
    }
    assert json.loads((layout.run(line["run"]).root / "nightly.json").read_text())["inputs"] == "d" * 64

    def stopped(c):
        raise Preempted(signal.SIGTERM, 3, None)

    monkeypatch.setattr(night, "build", stopped)
    with pytest.raises(Preempted):
        night.train_and_decide(cfg, layout, inputs("d" * 64), date(2026, 3, 5))  # resumed under its first name
    last = read_lines(layout.registry)[-1]
    assert (last["decision"], last["run"], last["exit_code"]) == ("interrupted", "nightly-2026-03-04-dddddddd", 143)


def test_scores_are_computed_once_per_run_and_eval_set(tmp_path, monkeypatch):
    """The champion is not scored again each night: its scores are cached per eval set, and read from the cache
    even once its model is gone; another eval set scores it again."""
    cfg = config(tmp_path)
    layout, eval_set = Layout.of(cfg), load_eval_set(cfg)
    model_dir, gguf = tmp_path / "final" / "n1", tmp_path / "work" / "m.gguf"
    model_dir.mkdir(parents=True)
    gguf.parent.mkdir()
    gguf.write_bytes(b"gguf")
    report = {"path": "m.gguf", "losses": {"r0": [1.0]}, "reference_losses": {"r0": [0.9]}}
    atomic_write_json(layout.run("n1").root / "verify.json", {"files": [{"path": "m.q4_k_m.gguf"}, report]})
    calls = []

    def score_model(model, file, scored_on, c, verified):
        calls.append((model, file, scored_on.digest, verified))
        return {"hf_loss": 1.5, "gguf_loss": math.nan}

    monkeypatch.setattr(night, "score_model", score_model)
    first = night.scores_of(layout, "n1", model_dir, gguf, eval_set, cfg)
    assert first == {"hf_loss": 1.5, "gguf_loss": "nan"}  # strict JSON: NaN as a string the gates refuse
    assert calls == [(model_dir, gguf, eval_set.digest, report)]  # with its verification's per-record losses
    cached = layout.nightly / "scores" / f"n1.{eval_set.digest[:16]}.json"
    assert json.loads(cached.read_text()) == first
    model_dir.rmdir()
    assert night.scores_of(layout, "n1", model_dir, gguf, eval_set, cfg) == first and len(calls) == 1
    other = load_eval_set(config(tmp_path, "nightly.max_eval_records=2"))
    with pytest.raises(RunError, match=f"cannot score n1: {model_dir} is missing"):
        night.scores_of(layout, "n1", model_dir, gguf, other, cfg)


def test_the_eval_set_digest_changes_with_what_changes_a_score(tmp_path):
    digest = load_eval_set(config(tmp_path)).digest
    assert load_eval_set(config(tmp_path, "nightly.max_loss_regression=0.5", "lora.r=4")).digest == digest
    assert load_eval_set(config(tmp_path, "nightly.max_eval_records=2")).digest != digest
    assert load_eval_set(config(tmp_path, "verify.max_tokens_per_text=64")).digest != digest
    broken = tmp_path / "eval.jsonl"
    broken.write_text(DEMO_HELDOUT.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(DataError, match=f"{broken}:2"):
        load_eval_set(config(tmp_path, f"nightly.eval_files=[{broken}]"))


# ----------------------------------------------------------------------------- the job lock and its recovery


@pytest.mark.parametrize("point", ["between_renames", "before_record"])
def test_the_job_lock_records_a_promotion_a_kill_left_unrecorded(tmp_path, point):
    """Killed after the switch: at between_renames (no history line either) or at before_record (published, the
    registry line not yet appended). The next verb records the decision once; status shows the model live with
    the previous one as the rollback target; rollback returns to it."""
    cfg = config(tmp_path)
    layout, gguf = Layout.of(cfg), Path(cfg.export.gguf_dir)
    promoted(tmp_path, cfg, "n1", "a" * 64, "2026-01-01T00:00:00+0000")
    decision = nightly_record("n2", "b" * 64, "2026-01-02T00:00:00+0000", champion_before="n1")
    sources = gguf_files(tmp_path, "n2")
    pid = os.fork()
    if pid == 0:
        try:
            releases.reached = lambda p: os.kill(os.getpid(), signal.SIGKILL) if p == point else None
            releases.publish(gguf, NAME, "n2", sources, {"by": BY, "inputs": "b" * 64, "nightly": decision})
            releases.reached("before_record")  # train_and_decide's point after publish_run
        finally:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    assert live_run(cfg) == "n2" and [r["run"] for r in read_lines(layout.registry)] == ["n1"]

    for _ in range(2):
        with night.job_lock(cfg, layout, "run"):
            pass
    lines = read_lines(layout.registry)
    assert [r["run"] for r in lines] == ["n1", "n2"]  # once
    assert lines[-1] == decision | {"recovered": lines[-1]["recovered"]}
    text = status_text(cfg, layout)
    n2 = releases.live(gguf, NAME)
    assert n2 is not None
    # the switch's own history line, or (killed before it was written) when the release was staged
    since = n2.record["time"] if point == "between_renames" else releases.history(gguf, NAME)[-1]["time"]
    assert f"live:      n2, since {since}, published by python -m train.nightly" in text
    assert "rollback:  n1" in text and "(recorded at " in text and "after an interrupted promotion)" in text
    assert night.unchanged(cfg, layout, inputs("b" * 64)).startswith("unchanged since n2: ")

    assert night.roll_back(cfg) == 0
    assert live_run(cfg) == "n1"
    last = read_lines(layout.registry)[-1]
    assert (last["event"], last["run"], last["from_run"]) == ("rollback", "n1", "n2")


def test_a_recorded_or_manual_release_adds_no_registry_line(tmp_path):
    cfg = config(tmp_path)
    layout = Layout.of(cfg)
    promoted(tmp_path, cfg, "n1", "a" * 64, "2026-01-01T00:00:00+0000")  # its line is in the registry
    with night.job_lock(cfg, layout, "run"):
        pass
    manual(tmp_path, cfg, "by-hand")
    with night.job_lock(cfg, layout, "prune"):
        pass
    assert [r["run"] for r in read_lines(layout.registry)] == ["n1"]


def test_a_second_verb_exits_75_naming_the_running_job(tmp_path):
    cfg = config(tmp_path)
    layout = Layout.of(cfg)
    promoted(tmp_path, cfg, "n1", "a" * 64, "2026-01-01T00:00:00+0000")
    promoted(tmp_path, cfg, "n2", "b" * 64, "2026-01-02T00:00:00+0000")
    before = tree(tmp_path / "models")
    with night.job_lock(cfg, layout, "run"):
        verbs = [lambda: night.roll_back(cfg), lambda: night.run_prune(cfg, False)]
        for verb in [*verbs, lambda: night.run_night(cfg, date.today())]:
            with pytest.raises(LockHeld) as held:
                verb()
            assert held.value.exit_code == 75
            assert f"pid {os.getpid()} (run 'nightly run'" in str(held.value)
        lock = Path(cfg.export.gguf_dir) / ".locks" / f"{NAME}.publishers.lock"  # export.name's publisher lock
        assert tree(tmp_path / "models") == before | {str(lock.relative_to(tmp_path / "models")): lock.read_bytes()}
    assert live_run(cfg) == "n2"


def test_rollback_without_a_previous_model_changes_nothing(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(RunError, match=r"no previous model to roll back to: nothing has been published \("):
        night.roll_back(cfg)
    promoted(tmp_path, cfg, "n1", "a" * 64, "2026-01-01T00:00:00+0000")
    before = tree(tmp_path / "models")
    with pytest.raises(RunError, match="no previous model to roll back to: the only model published is n1"):
        night.roll_back(cfg)
    assert tree(tmp_path / "models") == before


# ----------------------------------------------------------------------------- retention


@pytest.fixture
def history(tmp_path):
    """Nights n1..n3 promoted (n3 live), rejected r1 (older) and r2 (recent), an interrupted candidate s, a
    `python -m train` release made live between n1 and n2, and a run the nightly job did not make."""
    cfg = config(tmp_path, "nightly.keep_champions=1", "nightly.keep_candidates=1")
    layout = Layout.of(cfg)
    candidate_folders(cfg, "s", "5" * 64, created="2026-01-01T00:00:00+0000")
    promoted(tmp_path, cfg, "n1", "1" * 64, "2026-01-02T00:00:00+0000")
    manual(tmp_path, cfg, "by-hand")
    for run, digest, when in (
        ("r1", "7" * 64, "2026-01-03T00:00:00+0000"),
        ("r2", "8" * 64, "2026-01-06T00:00:00+0000"),
    ):
        candidate_folders(cfg, run, digest)
        append_line(layout.registry, nightly_record(run, digest, when, "rejected"))
    promoted(tmp_path, cfg, "n2", "2" * 64, "2026-01-04T00:00:00+0000")
    promoted(tmp_path, cfg, "n3", "3" * 64, "2026-01-05T00:00:00+0000")
    for run in ("n1", "n2", "r1"):
        atomic_write_json(layout.nightly / "scores" / f"{run}.0123456789abcdef.json", {"hf_loss": 1.0})
    (layout.outputs / "by-hand").mkdir()
    (layout.outputs / "by-hand" / "manifest.json").write_text("{}")
    return cfg, layout


def test_retention_keeps_the_live_model_its_predecessors_and_recent_candidates(tmp_path, history):
    cfg, layout = history
    gguf = Path(cfg.export.gguf_dir)
    registry = layout.registry.read_bytes()
    deleted = retention.prune(cfg, layout)
    assert sorted(str(p.relative_to(tmp_path)) for p in deleted) == sorted(
        [
            *(f"outputs/{r}" for r in ("n1", "r1", "s")),
            *(f"models/finetuned/adapters/{r}" for r in ("n1", "r1", "s")),
            *(f"models/finetuned/final_models/{r}" for r in ("n1", "r1", "s")),
            "models/finetuned/nightly/scores/n1.0123456789abcdef.json",
            "models/finetuned/nightly/scores/r1.0123456789abcdef.json",
            "models/gguf/.releases/m/n1",
        ]
    )
    assert not any(p.exists() for p in deleted)
    assert sorted(p.name for p in layout.outputs.iterdir()) == ["by-hand", "n2", "n3", "r2"]
    assert sorted(p.name for p in (layout.models / "finetuned" / "final_models").iterdir()) == ["n2", "n3", "r2"]
    assert releases.release_ids(gguf, NAME) == ["by-hand", "n2", "n3"]  # a manual release is never deleted
    assert live_run(cfg) == "n3" and releases.live(gguf, NAME).problems() == []
    assert (layout.nightly / "scores" / "n2.0123456789abcdef.json").is_file()
    assert layout.registry.read_bytes() == registry  # the history stays
    assert retention.prune(cfg, layout) == []


def test_retention_dry_run_deletes_nothing(tmp_path, history):
    cfg, layout = history
    before = tree(tmp_path)
    would = retention.prune(cfg, layout, dry_run=True)
    assert tree(tmp_path) == before
    assert would == list(retention.doomed(cfg, layout)) and len(would) == 12


def test_retention_skips_a_run_in_use_and_finishes_an_interrupted_prune(tmp_path, history):
    cfg, layout = history
    leftovers = [layout.outputs / ".old.deleting", layout.models / "finetuned" / "adapters" / ".old.deleting"]
    for p in leftovers:
        p.mkdir()
        (p / "adapter_model.safetensors").write_bytes(b"half deleted")
    with hold_lock(layout.run("r1").root / ".lock", "run folder", "r1"):  # a training run working in r1
        deleted = retention.prune(cfg, layout)
    assert not any(p.exists() for p in leftovers)
    assert not any("r1" in p.name for p in deleted)
    assert layout.run("r1").root.is_dir() and layout.final_model("r1").is_dir()
    assert not layout.run("n1").root.exists() and not layout.run("s").root.exists()


def test_retention_keeps_more_champions_when_asked(tmp_path, history):
    cfg, layout = history
    more = config(tmp_path, "nightly.keep_champions=3", "nightly.keep_candidates=0")
    retention.prune(more, layout)
    gguf = Path(cfg.export.gguf_dir)
    assert releases.release_ids(gguf, NAME) == ["by-hand", "n1", "n2", "n3"]  # stack: n1, by-hand, n2, n3
    assert sorted(p.name for p in layout.outputs.iterdir()) == ["by-hand", "n1", "n2", "n3"]


# ----------------------------------------------------------------------------- status and report


def test_status_before_anything_is_published(tmp_path):
    cfg = config(tmp_path)
    layout = Layout.of(cfg)
    text = status_text(cfg, layout)
    assert text.splitlines()[:2] == [
        f"live:      nothing published as {layout.gguf_dir / NAME}.gguf yet (registry {layout.registry})",
        "rollback:  none (no previous model)",
    ]
    assert status_json(cfg, layout) == {
        "live": None,
        "release": None,
        "scores": None,
        "files_intact": None,
        "rollback_to": None,
        "last_events": [],
    }


def test_status_shows_the_live_model_its_files_and_the_rollback_target(tmp_path):
    cfg = config(tmp_path)
    layout, gguf = Layout.of(cfg), Path(cfg.export.gguf_dir)
    promoted(tmp_path, cfg, "n1", "a" * 64, "2026-01-01T00:00:00+0000")
    rel = promoted(tmp_path, cfg, "n2", "b" * 64, "2026-01-02T00:00:00+0000")
    since = releases.history(gguf, NAME)[-1]["time"]
    lines = status_text(cfg, layout, nights=1).splitlines()
    assert lines == [
        f"live:      n2, since {since}, published by python -m train.nightly",
        "scores:    hf_loss 2  gguf_loss 2.1  quant_gap 0.1",
        f"files:     {rel.folder} (2 files, intact)",
        "rollback:  n1",
        "last nights (newest first):",
        f"  2026-01-02T00:00  promoted         n2{' ' * 30} all 2 gates passed",
    ]
    assert status_json(cfg, layout, nights=5) | {"last_events": None} == {
        "live": "n2",
        "release": "n2",
        "scores": scores(2.0, 2.1),
        "files_intact": True,
        "rollback_to": "n1",
        "last_events": None,
    }
    assert [e["run"] for e in status_json(cfg, layout, nights=5)["last_events"]] == ["n1", "n2"]
    os.chmod(rel.folder / FILES[1], 0o644)
    (rel.folder / FILES[1]).write_bytes(b"n2/" + b"X" * len(FILES[1]))  # same size, other bytes
    text = status_text(cfg, layout)
    assert (
        f"files:     {rel.folder} (2 files, NOT the files published: {rel.folder / FILES[1]}: content differs" in text
    )
    assert status_json(cfg, layout)["files_intact"] is False


def test_status_shows_a_manual_release_as_live(tmp_path):
    cfg = config(tmp_path)
    layout = Layout.of(cfg)
    promoted(tmp_path, cfg, "n1", "a" * 64, "2026-01-01T00:00:00+0000")
    manual(tmp_path, cfg, "by-hand")
    text = status_text(cfg, layout)
    assert "published by python -m train\n" in text and "live:      by-hand, since " in text
    assert "scores:    -\n" in text and "(2 files, intact)" in text and "rollback:  n1" in text


def test_the_report_names_each_gate_and_plots_the_nights(tmp_path):
    champion = scores(2.0, 2.1, task_accuracy=1.0)
    candidate = scores(
        2.5, math.nan, task_accuracy=0.5, task_failures=[{"prompt": "2+2?", "expected": "4", "got": "5"}]
    )
    checks = gates(jsonable(candidate), champion, NightlySection(), tasks=True)
    earlier = nightly_record(
        "n1", "a" * 64, "2026-01-01T00:00:00+0000", scores={"candidate": champion, "champion": None}
    )
    record = nightly_record(
        "n2",
        "b" * 64,
        "2026-01-02T00:00:00+0000",
        decision="rejected",
        scores={"candidate": jsonable(candidate), "champion": champion},
        gates=[g.to_json() for g in checks],
        reason=summary(checks),
        champion_before="n1",
        changed=["data"],
        eval_set="0123456789abcdef",
    )
    folder = tmp_path / "outputs" / "n2"
    folder.mkdir(parents=True)
    out = write_report(folder, record, [earlier, record])
    text = out.read_text()
    assert out == folder / "nightly.md" and text.startswith("# Nightly n2: rejected\n\nfailed gguf_loss measured")
    assert "- inputs `bbbbbbbbbbbbbbbb`; changed since the champion: data" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[:9] == [
        "| gate | value | limit | result |",
        "| hf_loss measured and finite | True | - | pass |",
        "| gguf_loss measured and finite | False | - | FAIL |",
        "| task_accuracy measured and finite | True | - | pass |",
        "| hf_loss <= champion + 2% | 2.5 | <= 2.04 | FAIL |",
        "| gguf_loss <= champion + 2% | missing | <= 2.142 | FAIL |",
        "| task_accuracy >= champion - 0 | 0.5 | >= 1 | FAIL |",
        "| metric | candidate n2 | champion n1 |",
        "| hf_loss | 2.5 | 2 |",
    ]
    assert "- '2+2?': expected '4', got '5'" in text
    assert "![score history](nightly_scores.png)" in text
    assert (folder / "nightly_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
