"""Nightly retraining end to end, through the real CLI (`python -m train.nightly`, in forks of the CLI server) on
the tiny Gemma 2, in a workspace with relative paths. Two trainings in all, shared by the module's tests as
workspaces that a test copies before it changes anything:

    night1     night 1 on 200 records, SIGKILLed at its promotion's first point (after_stage), then run again:
               the same candidate, not retrained, promoted (the first champion: absolute gates only)
    rejected   night1, then a night on data whose answers are reversed: rejected (exit 7), champion untouched

The logic behind each verb (gates, retention, recovery, rollback, crashes at every promotion point) is tested on
files in tests/unit/test_nightly_logic.py and tests/unit/test_releases.py."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from core import releases
from core.files import jsonable
from tests.conftest import DEMO_DATA, DEMO_HELDOUT, ROOT, TINY_REPO, copy_workspace

pytestmark = pytest.mark.slow

NAME = "gemma_2b_finetuned"
NAMES = (f"{NAME}.gguf", f"{NAME}.q4_k_m.gguf")  # the live GGUF files (q8_0 is the default)
CONFIG = {
    "run_name": "unused",
    "model": {"name_or_path": TINY_REPO, "dtype": "float32", "attn_implementation": "eager"},
    "data": {"train_files": ["train.jsonl"], "max_seq_length": 128},
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "training": {
        "max_steps": 12,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "warmup_steps": 2,
        "logging_steps": 4,
        "save_steps": 12,
        "report_to": [],
        "seed": 7,
    },
    "export": {
        "quants": ["q8_0", "q4_k_m"],
        "default_quant": "q8_0",
        "export_base": False,
        "lora_gguf": False,
        "gguf_dir": "models/gguf",
    },
    "verify": {"heldout_files": [str(DEMO_HELDOUT)], "max_heldout_records": 4},
    "nightly": {
        "eval_files": [str(DEMO_HELDOUT)],
        "task_checks": str(ROOT / "data" / "demo" / "nightly_tasks.jsonl"),
        "max_new_tokens": 16,
        "keep_candidates": 1,
    },
    "paths": {"output_dir": "outputs", "models_dir": "models"},
}


# ----------------------------------------------------------------------------- helpers


def records(n: int | None = None) -> list[dict]:
    return [json.loads(line) for line in DEMO_DATA.read_text().splitlines()][:n]


def write_data(ws: Path, rows: list[dict]) -> None:
    (ws / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def reversed_answers(rows: list[dict]) -> list[dict]:
    """Every assistant answer written backwards: a broken upstream export. (Answers shuffled between records
    would be the subtler fault, but in 12 steps the tiny model learns only which answers are frequent, not
    which fits a question, so shuffling does not yet cost held-out loss.)"""
    out = json.loads(json.dumps(rows))
    for r in out:
        r["messages"][-1]["content"] = r["messages"][-1]["content"][::-1]
    return out


def nightly(cli, ws: Path, verb: str, *args: str, kill_at: str | None = None) -> tuple[int, str]:
    """`python -m train.nightly <verb> --config config.yaml <args>` in ws: (exit status, stdout + stderr)."""
    res = cli.run("train.nightly", [verb, "--config", "config.yaml", *args], ws, kill_at=kill_at)
    return res.returncode, res.stdout + res.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def live_files(ws: Path) -> dict[str, str]:
    return {n: sha(ws / "models" / "gguf" / n) for n in NAMES}


def registry(ws: Path) -> list[dict]:
    path = ws / "models" / "finetuned" / "registry.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def live(ws: Path) -> releases.Release | None:
    return releases.live(ws / "models" / "gguf", NAME)


def tree(folder: Path) -> dict[str, str]:
    """Every file under folder (links by target) with its content hash."""
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            found[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            found[str(p.relative_to(folder))] = sha(p)
    return found


# ----------------------------------------------------------------------------- the two trained nights


@pytest.fixture(scope="module")
def night1(cli, tmp_path_factory) -> dict:
    ws = tmp_path_factory.mktemp("nightly") / "night1"
    ws.mkdir()
    (ws / "config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    write_data(ws, records(200))
    rc, killed = nightly(cli, ws, "run", kill_at="after_stage")
    assert rc == -9, killed[-4000:]
    gguf = ws / "models" / "gguf"
    after_kill = {
        "releases": sorted(p.name for p in (gguf / ".releases" / NAME).iterdir()),
        "live": live(ws),
        "names": sorted(p.name for p in gguf.iterdir() if not p.name.startswith(".")),
        "registry": registry(ws),
    }
    rc, out = nightly(cli, ws, "run")
    assert rc == 0, out[-4000:]
    (line,) = registry(ws)
    return {"ws": ws, "run": line["run"], "line": line, "killed": killed, "out": out, "after_kill": after_kill}


@pytest.fixture(scope="module")
def rejected(cli, night1) -> dict:
    ws = copy_workspace(night1["ws"], night1["ws"].with_name("rejected"))
    write_data(ws, reversed_answers(records(200)))
    rc, out = nightly(cli, ws, "run")
    assert rc == 7, out[-4000:]
    return {"ws": ws, "out": out, "line": registry(ws)[-1]}


# ----------------------------------------------------------------------------- night 1: promoted


def test_night_one_is_promoted_after_a_kill_mid_promotion(night1):
    ws, run, line = night1["ws"], night1["run"], night1["line"]
    assert run.startswith("nightly-") and len(run.split("-")[-1]) == 8
    assert "trained 12 steps" in night1["killed"]
    # Killed after its release was staged, before the switch: nothing live, nothing recorded, no name made.
    assert night1["after_kill"] == {"releases": [run], "live": None, "names": [], "registry": []}
    assert f"candidate {run} is already trained, exported and verified; not retrained" in night1["out"]
    assert line["decision"] == "promoted" and line["champion_before"] is None and line["exit_code"] == 0
    assert {g["name"]: g["passed"] for g in line["gates"]} == {  # no champion: absolute gates only
        "hf_loss measured and finite": True,
        "gguf_loss measured and finite": True,
        "task_accuracy measured and finite": True,
    }
    assert live_files(ws) == {n: e["sha256"] for n, e in line["files"].items()}
    release = live(ws)
    assert release.run == run and release.record["nightly"] == line and release.problems() == []
    assert [(h["event"], h["release"], h["was"]) for h in releases.history(ws / "models" / "gguf", NAME)] == [
        ("publish", release.id, None)
    ]
    assert release.id == f"{run}.2"  # the killed night's staged release was never live: retention removed it
    assert releases.release_ids(ws / "models" / "gguf", NAME) == [release.id]
    assert os.readlink(ws / "models" / "gguf" / NAMES[0]) == f".releases/{NAME}/live/{NAMES[0]}"
    assert (ws / "models" / "finetuned" / "final_models" / run / "config.json").is_file()
    assert (ws / "models" / "finetuned" / "adapters" / run / "adapter_config.json").is_file()
    assert (ws / "outputs" / run / "nightly.md").read_text().startswith(f"# Nightly {run}: promoted")
    assert (ws / "outputs" / run / "nightly_scores.png").read_bytes()[:4] == b"\x89PNG"
    (cached,) = (ws / "models" / "finetuned" / "nightly" / "scores").glob(f"{run}.*.json")
    assert json.loads(cached.read_text()) == line["scores"]["candidate"]
    assert f"live: models/gguf/{NAMES[0]} is now {run}'s" in night1["out"]


def test_status_shows_the_promoted_night(cli, night1):
    ws, run = night1["ws"], night1["run"]
    rc, out = nightly(cli, ws, "status")
    assert rc == 0, out
    release = live(ws)
    assert f"live:      {run}, since 20" in out and ", published by python -m train.nightly\n" in out
    assert f"files:     models/gguf/.releases/{NAME}/{release.id} (4 files, intact)" in out
    assert "rollback:  none (no previous model)" in out
    assert f"promoted         {run}" in out
    rc, out = nightly(cli, ws, "status", "--json")
    status = json.loads(out)
    assert (status["live"], status["release"], status["files_intact"], status["rollback_to"]) == (
        run,
        release.id,
        True,
        None,
    )
    assert status["scores"] == night1["line"]["scores"]["candidate"]


def test_an_unchanged_night_exits_in_seconds_writing_only_a_registry_line(cli, night1, tmp_path):
    ws = copy_workspace(night1["ws"], tmp_path / "ws")
    before = tree(ws)
    t0 = time.monotonic()
    rc, out = nightly(cli, ws, "run")
    seconds = time.monotonic() - t0
    assert rc == 0, out[-3000:]
    assert f"unchanged since {night1['run']}: same data, config, base model and code" in out
    assert seconds < 20, f"an unchanged night took {seconds:.1f} s"
    after = tree(ws)
    registry_file = "models/finetuned/registry.jsonl"
    assert {k: v for k, v in after.items() if k != registry_file} == {
        k: v for k, v in before.items() if k != registry_file
    }
    first, last = registry(ws)
    assert last["decision"] == "unchanged" and last["champion"] == night1["run"] and last["exit_code"] == 0
    assert last["inputs"] == first["inputs"]


def test_rollback_without_a_previous_model_is_a_clear_error(cli, night1, tmp_path):
    ws = copy_workspace(night1["ws"], tmp_path / "ws")
    before = tree(ws)
    rc, out = nightly(cli, ws, "rollback")
    assert rc == 2, out
    assert f"error: no previous model to roll back to: the only model published is {live(ws).id}" in out
    assert tree(ws) == before


def test_the_candidate_scores_are_read_from_its_verification(night1, monkeypatch):
    """The scores the night recorded are its verification's per-record losses (scoring does not run the models
    again), and they are what scoring the models computes."""
    from convert import score, verify  # noqa: PLC0415 (the models' imports, for this test only)
    from core.config import load_config  # noqa: PLC0415
    from train.nightly import scores  # noqa: PLC0415

    ws, run, line = night1["ws"], night1["run"], night1["line"]
    monkeypatch.chdir(ws)
    cfg = load_config("config.yaml")
    eval_set = scores.load_eval_set(cfg)
    model_dir, gguf = Path("models/finetuned/final_models") / run, live(ws).folder / NAMES[0]
    report = verify.file_report(Path("outputs") / run, NAMES[0])
    assert report is not None and len(report["losses"]) == len(DEMO_HELDOUT.read_text().splitlines())

    def not_again(*a, **k):
        raise AssertionError("convert.score.losses called: the candidate was scored again")

    monkeypatch.setattr(scores, "losses", not_again)
    read = jsonable(scores.score_model(model_dir, gguf, eval_set, cfg, report))
    assert read | {"gguf": NAMES[0]} == line["scores"]["candidate"] | {"gguf": NAMES[0]}  # scored as its work file
    monkeypatch.setattr(scores, "losses", score.losses)
    computed = scores.score_model(model_dir, gguf, eval_set, cfg, None)
    for metric in ("hf_loss", "gguf_loss"):
        assert computed[metric] == pytest.approx(read[metric], rel=1e-4), metric


# ----------------------------------------------------------------------------- a rejected night


def test_a_worse_candidate_is_rejected_and_the_champion_untouched(night1, rejected):
    ws, champion, out, line = rejected["ws"], night1["run"], rejected["out"], rejected["line"]
    assert "rejected: nightly-" in out and f"{NAME}.gguf stays {champion}'s" in out
    assert f"scores of {champion} on eval set {line['eval_set']}: cached" in out
    assert line["decision"] == "rejected" and line["exit_code"] == 7 and line["champion_before"] == champion
    assert line["changed"] == ["data"]
    failed = {g["name"] for g in line["gates"] if not g["passed"]}
    assert {"hf_loss <= champion + 2%", "gguf_loss <= champion + 2%"} <= failed
    assert line["scores"]["champion"] == night1["line"]["scores"]["candidate"]
    assert tree(ws / "models" / "gguf") == tree(night1["ws"] / "models" / "gguf")  # nothing staged or switched
    assert live_files(ws) == live_files(night1["ws"])
    assert json.loads((ws / "outputs" / line["run"] / "manifest.json").read_text())["status"] == "exported"
    assert not (ws / "models" / "finetuned" / "final_models" / line["run"]).exists()
    report = (ws / "outputs" / line["run"] / "nightly.md").read_text()
    assert report.startswith(f"# Nightly {line['run']}: rejected")
    assert "| hf_loss <= champion + 2% |" in report and "| FAIL |" in report
    assert (ws / "outputs" / line["run"] / "nightly_scores.png").read_bytes()[:4] == b"\x89PNG"


def test_prune_dry_run_names_what_it_would_delete_and_prune_deletes_only_that(cli, night1, rejected, tmp_path):
    """`prune --dry-run` lists the rejected candidate's folders and changes nothing; `prune` deletes exactly those,
    keeps the champion live and intact, and a second prune has nothing to delete."""
    ws, champion, stale = copy_workspace(rejected["ws"], tmp_path / "ws"), night1["run"], rejected["line"]["run"]
    keep_none = "nightly.keep_candidates=0"
    before = tree(ws)
    rc, out = nightly(cli, ws, "prune", "--dry-run", keep_none)
    assert rc == 0 and "retention: would delete " in out and f"outputs/{stale}" in out, out[-3000:]
    assert champion not in out.split("retention: would delete ", 1)[1].splitlines()[0]
    assert tree(ws) == before
    rc, out = nightly(cli, ws, "prune", keep_none)
    assert rc == 0 and "retention: deleted " in out and f"outputs/{stale}" in out, out[-3000:]
    assert not (ws / "outputs" / stale).exists() and (ws / "outputs" / champion).is_dir()
    assert live(ws).run == champion and live_files(ws) == live_files(night1["ws"])
    rc, out = nightly(cli, ws, "prune", keep_none)
    assert rc == 0 and "retention: nothing to delete" in out, out[-3000:]
    rc, out = nightly(cli, ws, "status")
    assert rc == 0 and f"live:      {champion}, since 20" in out, out[-3000:]


def test_a_plain_train_replaces_the_live_model_and_the_next_night_gates_against_it(cli, night1, rejected, tmp_path):
    """`python -m train` of the same export.name (here: publishing the rejected candidate, whose run folder has
    everything but the publication) replaces the champion; the next night is gated against that model."""
    ws, first, other = copy_workspace(rejected["ws"], tmp_path / "ws"), night1["run"], rejected["line"]["run"]
    res = cli.run("train", ["--config", f"outputs/{other}/config.yaml"], ws)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert live(ws).run == other and live(ws).record["by"] == "python -m train"
    rc, out = nightly(cli, ws, "status")
    assert rc == 0 and f"live:      {other}, since 20" in out and ", published by python -m train\n" in out
    assert "(4 files, intact)" in out and f"rollback:  {first}.2\n" in out  # night 1's release

    write_data(ws, records(200))  # night 1's data again: its candidate, gated against the live model
    rc, out = nightly(cli, ws, "run")
    assert rc == 0, out[-3000:]
    assert f"candidate {first} is already trained, exported and verified; not retrained" in out
    line = registry(ws)[-1]
    assert f"scores of {other} on eval set {line['eval_set']}: cached" in out  # scored as a candidate already
    assert (line["decision"], line["run"], line["champion_before"]) == ("promoted", first, other)
    assert line["changed"] == ["data", "config", "base", "code"]  # the plain run's release records no inputs
    assert {g["name"]: g["passed"] for g in line["gates"]} == {
        "hf_loss measured and finite": True,
        "gguf_loss measured and finite": True,
        "task_accuracy measured and finite": True,
        "hf_loss <= champion + 2%": True,
        "gguf_loss <= champion + 2%": True,
        "task_accuracy >= champion - 0": True,
    }
    assert line["scores"]["champion"] == rejected["line"]["scores"]["candidate"]
    assert live(ws).run == first and live_files(ws) == live_files(night1["ws"])
    assert releases.history(ws / "models" / "gguf", NAME)[-1]["event"] == "publish"

    rc, out = nightly(cli, ws, "rollback")  # the plain run's model back, byte for byte
    assert rc == 0, out[-3000:]
    assert live(ws).run == other and live_files(ws) == {n: sha(live(ws).folder / n) for n in NAMES}
    assert registry(ws)[-1] | {"time": None, "host": None} == {
        "time": None,
        "host": None,
        "name": NAME,  # the champion belongs to the GGUF name, not to the config
        "event": "rollback",
        "run": other,
        "from_run": first,
    }
    rc, out = nightly(cli, ws, "run")  # the rolled-back candidate is not promoted again
    assert rc == 0 and f"unchanged since {first}" in out and "which was rolled back" in out, out[-3000:]
    assert live(ws).run == other
