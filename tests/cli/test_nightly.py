"""Nightly retraining through the real CLI (`python -m train.nightly`) on the tiny Gemma 2.

Two trained nights are shared (module fixture `nights`), as snapshots of a whole workspace (config with
relative paths, data, outputs/, models/) that each test copies and works on:

    champion_a   night 1 on data A (200 records) promoted: A is live
    pending_b    then night 2 on data B (A + 100 new records), trained, scored and SIGKILLed at the first
                 step of its promotion (before_copy): A still live, B's decision journaled
    promoted_b   pending_b after one more plain night: B live, A the rollback target

Crashes are real SIGKILLs at the named points of train.nightly.promote, through tests/support/nightly_faults.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEMO_DATA, DEMO_HELDOUT, ROOT, TINY_REPO, cli_env

pytestmark = pytest.mark.slow

NAMES = ("gemma_2b_finetuned.gguf", "gemma_2b_finetuned.q4_k_m.gguf")  # the live files (q8_0 is the default)
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


def nightly(ws: Path, hf_home: Path, *args: str, harness: bool = False, **env: str) -> subprocess.Popen:
    """Start `python -m train.nightly <args> --config config.yaml` in ws; output to a file (a pipe could block)."""
    n = len(list(ws.glob("nightly-*.out")))
    out = open(ws / f"nightly-{n}.out", "w")  # noqa: SIM115 (closed when the process is finished)
    module = "tests.support.nightly_faults" if harness else "train.nightly"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args, "--config", "config.yaml"],
        cwd=ws,
        env=cli_env(hf_home) | env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log = Path(out.name)  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, proc.log.read_text()  # type: ignore[attr-defined]


def run_nightly(ws: Path, hf_home: Path, *args: str, **kw) -> tuple[int, str]:
    return finish(nightly(ws, hf_home, *args, **kw))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def live(ws: Path) -> dict[str, str]:
    return {n: sha(ws / "models" / "gguf" / n) for n in NAMES}


def registry(ws: Path) -> list[dict]:
    path = ws / "models" / "finetuned" / "registry.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def champion_files(ws: Path, run: str) -> dict[str, str]:
    """The sha256 of each live name, from the run's manifest: the files its export verified."""
    manifest = json.loads((ws / "outputs" / run / "manifest.json").read_text())
    return {Path(e["path"]).name: e["sha256"] for e in manifest["artifacts"]["gguf"]["finetuned"].values()}


def copy_ws(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)  # .live and the live names are relative symlinks
    for out in dst.glob("nightly-*.out"):
        out.unlink()
    return dst


def tree(ws: Path) -> dict[str, str]:
    """Every file under ws (links by target) with its content hash."""
    found = {}
    for p in sorted(ws.rglob("*")):
        rel = str(p.relative_to(ws))
        if p.is_symlink():
            found[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            found[rel] = sha(p)
    return found


# ----------------------------------------------------------------------------- the shared nights


@pytest.fixture(scope="module")
def nights(hf_home: Path, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("nightly")
    ws = base / "ws"
    ws.mkdir()
    (ws / "config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    write_data(ws, records(200))
    rc, out1 = run_nightly(ws, hf_home, "run")
    assert rc == 0, out1[-4000:]
    a = registry(ws)[-1]["run"]
    champion_a = copy_ws(ws, base / "champion_a")

    write_data(ws, records())
    rc, out2 = run_nightly(ws, hf_home, "run", harness=True, NIGHTLY_TEST_KILL_AT="before_copy")
    assert rc == -9, out2[-4000:]
    pending_b = copy_ws(ws, base / "pending_b")
    b = json.loads((ws / "models" / "finetuned" / "nightly" / "promotion.json").read_text())["run"]

    rc, out3 = run_nightly(ws, hf_home, "run")
    assert rc == 0, out3[-4000:]
    promoted_b = copy_ws(ws, base / "promoted_b")
    return {
        "a": a,
        "b": b,
        "champion_a": champion_a,
        "pending_b": pending_b,
        "promoted_b": promoted_b,
        "outputs": (out1, out2, out3),
        "files_a": champion_files(champion_a, a),
        "files_b": champion_files(pending_b, b),
    }


# ----------------------------------------------------------------------------- tests


def test_first_night_promotes_and_names_the_run(nights):
    ws, a = nights["champion_a"], nights["a"]
    assert a.startswith("nightly-") and len(a.split("-")[-1]) == 8
    assert "trained 12 steps" in nights["outputs"][0]
    (line,) = registry(ws)
    assert line["decision"] == "promoted" and line["champion_before"] is None and line["exit_code"] == 0
    assert {g["name"] for g in line["gates"]} == {
        "hf_loss measured and finite",
        "gguf_loss measured and finite",
        "task_accuracy measured and finite",
    }
    assert live(ws) == nights["files_a"] == {n: e["sha256"] for n, e in line["files"].items()}
    assert os.readlink(ws / "models" / "gguf" / ".live") == f".releases/{a}"
    assert (ws / "models" / "finetuned" / "final_models" / a / "config.json").is_file()
    assert (ws / "outputs" / a / "nightly.md").read_text().startswith(f"# Nightly {a}: promoted")
    assert (ws / "outputs" / a / "nightly_scores.png").read_bytes()[:4] == b"\x89PNG"


def test_unchanged_data_skips_in_seconds_writing_only_the_registry_line(nights, hf_home, tmp_path):
    ws = copy_ws(nights["champion_a"], tmp_path / "ws")
    before = tree(ws)
    t0 = time.monotonic()
    rc, out = run_nightly(ws, hf_home, "run")
    seconds = time.monotonic() - t0
    assert rc == 0, out[-3000:]
    assert f"unchanged since {nights['a']}" in out
    assert seconds < 20, f"an unchanged night took {seconds:.1f} s"
    after = tree(ws)
    registry_file = "models/finetuned/registry.jsonl"
    assert {k: v for k, v in after.items() if k != registry_file and not k.startswith("nightly-")} == {
        k: v for k, v in before.items() if k != registry_file
    }
    lines = registry(ws)
    assert len(lines) == 2
    assert lines[-1]["decision"] == "unchanged" and lines[-1]["champion"] == nights["a"]
    assert lines[-1]["fingerprint"] == lines[0]["fingerprint"]


def test_new_data_is_trained_gated_and_promoted(nights):
    a, b = nights["a"], nights["b"]
    assert b != a and "trained 12 steps" in nights["outputs"][1]  # night 2 trained B, then was killed
    assert f"candidate {b} is already trained" in nights["outputs"][2]  # the next night did not retrain it
    ws = nights["promoted_b"]
    promoted = [r for r in registry(ws) if r.get("decision") == "promoted"]
    assert [r["run"] for r in promoted] == [a, b]
    line = promoted[-1]
    assert line["champion_before"] == a and line["changed"] == ["data"]
    assert all(g["passed"] for g in line["gates"]) and len(line["gates"]) == 6
    assert line["scores"]["champion"]["hf_loss"] == promoted[0]["scores"]["candidate"]["hf_loss"]  # cached
    assert line["scores"]["candidate"]["gguf_loss"] < line["scores"]["champion"]["gguf_loss"] * 1.02
    assert live(ws) == nights["files_b"] == {n: e["sha256"] for n, e in line["files"].items()}
    assert live(ws) != nights["files_a"]
    assert os.readlink(ws / "models" / "gguf" / ".live") == f".releases/{b}"


def test_worse_candidate_is_rejected_and_the_champion_untouched(nights, hf_home, tmp_path):
    ws = copy_ws(nights["champion_a"], tmp_path / "ws")
    gguf_before = tree(ws / "models" / "gguf")
    write_data(ws, reversed_answers(records()))
    rc, out = run_nightly(ws, hf_home, "run")
    assert rc == 7, out[-3000:]
    assert "rejected: nightly-" in out and f"{nights['a']} stays live" in out
    line = registry(ws)[-1]
    assert line["decision"] == "rejected" and line["exit_code"] == 7
    failed = {g["name"] for g in line["gates"] if not g["passed"]}
    assert {"hf_loss <= champion + 2%", "gguf_loss <= champion + 2%"} <= failed
    assert tree(ws / "models" / "gguf") == gguf_before  # no release staged, nothing switched
    assert live(ws) == nights["files_a"]
    report = (ws / "outputs" / line["run"] / "nightly.md").read_text()
    assert "| hf_loss <= champion + 2% |" in report and "| FAIL |" in report


@pytest.mark.parametrize(
    ("point", "live_after_kill"),
    [("after_copy", "a"), ("before_switch", "a"), ("between_renames", "b"), ("before_record", "b")],
)
def test_sigkill_during_promotion_leaves_one_champion_and_the_next_night_recovers(
    nights, hf_home, tmp_path, point, live_after_kill
):
    ws = copy_ws(nights["pending_b"], tmp_path / "ws")
    rc, out = run_nightly(ws, hf_home, "run", harness=True, NIGHTLY_TEST_KILL_AT=point)
    assert rc == -9 and f"reached {point}" in out, out[-3000:]
    assert live(ws) == nights[f"files_{live_after_kill}"]
    assert os.readlink(ws / "models" / "gguf" / ".live") == f".releases/{nights[live_after_kill]}"

    rc, out = run_nightly(ws, hf_home, "run")
    assert rc == 0, out[-3000:]
    assert live(ws) == nights["files_b"]
    lines = registry(ws)
    promoted_b = [r for r in lines if r.get("decision") == "promoted" and r["run"] == nights["b"]]
    assert len(promoted_b) == 1
    if live_after_kill == "b":  # switched before the kill: recovery recorded the journaled decision
        assert "recovered" in promoted_b[0] and "unchanged since" in out
    else:
        assert [r["event"] for r in lines].count("promotion_undone") == 2  # the fixture's kill, and this one
    assert list((ws / "models" / "gguf").glob("*nightly-tmp")) == []  # no temporary link left
    assert not (ws / "models" / "finetuned" / "nightly" / "promotion.json").exists()
    releases = ws / "models" / "gguf" / ".releases"
    assert sorted(p.name for p in releases.iterdir()) == sorted([nights["a"], nights["b"]])  # no staging folder


def test_a_second_job_exits_75_while_one_runs(nights, hf_home, tmp_path):
    ws = copy_ws(nights["pending_b"], tmp_path / "ws")
    release = tmp_path / "release"
    first = nightly(
        ws, hf_home, "run", harness=True, NIGHTLY_TEST_HOLD_AT="before_switch", NIGHTLY_TEST_RELEASE=str(release)
    )
    deadline = time.monotonic() + 300
    while "reached before_switch" not in first.log.read_text():  # type: ignore[attr-defined]
        assert first.poll() is None and time.monotonic() < deadline, first.log.read_text()[-3000:]  # type: ignore[attr-defined]
        time.sleep(0.1)
    t0 = time.monotonic()
    rc, out = run_nightly(ws, hf_home, "run")
    assert rc == 75, out[-3000:]
    assert time.monotonic() - t0 < 20
    assert f"pid {first.pid}" in out and "'nightly run'" in out
    rc, out = run_nightly(ws, hf_home, "rollback")
    assert rc == 75, out[-3000:]
    assert live(ws) == nights["files_a"]  # the second jobs changed nothing
    release.touch()
    assert finish(first)[0] == 0
    assert live(ws) == nights["files_b"]


def test_a_reader_polling_during_promotion_sees_only_whole_files(nights, hf_home, tmp_path):
    ws = copy_ws(nights["pending_b"], tmp_path / "ws")
    old, new = nights["files_a"], nights["files_b"]
    defaults: list[str] = []  # the default file, opened by its usual path
    sets: list[tuple[str, str]] = []  # both files, read from one resolution of .live
    errors: list[str] = []
    job = nightly(ws, hf_home, "run", harness=True, NIGHTLY_TEST_PAUSE_S="0.3")

    def poll() -> None:
        gguf = ws / "models" / "gguf"
        while job.poll() is None:
            try:
                defaults.append(sha(gguf / NAMES[0]))
                release = Path(os.path.realpath(gguf / ".live"))
                sets.append((sha(release / NAMES[0]), sha(release / NAMES[1])))
            except OSError as e:
                errors.append(repr(e))

    reader = threading.Thread(target=poll)
    reader.start()
    rc, out = finish(job)
    reader.join()
    assert rc == 0, out[-3000:]
    assert errors == []
    assert set(defaults) <= {old[NAMES[0]], new[NAMES[0]]}  # never partial, never anything else
    assert defaults[0] == old[NAMES[0]] and defaults[-1] == new[NAMES[0]]
    assert set(sets) <= {(old[NAMES[0]], old[NAMES[1]]), (new[NAMES[0]], new[NAMES[1]])}  # never mixed


def test_rollback_restores_the_previous_champion_byte_for_byte(nights, hf_home, tmp_path):
    ws = copy_ws(nights["promoted_b"], tmp_path / "ws")
    release_a = ws / "models" / "gguf" / ".releases" / nights["a"]
    rc, out = run_nightly(ws, hf_home, "rollback")
    assert rc == 0, out[-3000:]
    assert live(ws) == nights["files_a"]
    for name in NAMES:  # the same bytes as the file that was live, not just the same hash
        assert (ws / "models" / "gguf" / name).read_bytes() == (release_a / name).read_bytes()
    line = registry(ws)[-1]
    assert line["event"] == "rollback" and line["run"] == nights["a"] and line["from_run"] == nights["b"]
    rc, out = run_nightly(ws, hf_home, "status")
    assert rc == 0 and f"live:      {nights['a']}" in out and "rollback:  none" in out
    rc, out = run_nightly(ws, hf_home, "run")  # B's data again: B was rolled back, so not re-promoted
    assert rc == 0 and f"unchanged since {nights['b']}, which was rolled back" in out
    assert live(ws) == nights["files_a"]


def test_rollback_without_a_previous_champion_is_a_clear_error(nights, hf_home, tmp_path):
    ws = copy_ws(nights["champion_a"], tmp_path / "ws")
    before = tree(ws)
    rc, out = run_nightly(ws, hf_home, "rollback")
    assert rc == 2
    assert f"error: no previous champion to roll back to: the only champion is {nights['a']}" in out
    assert {k: v for k, v in tree(ws).items() if not k.startswith("nightly-")} == before


def test_retention_keeps_champions_and_deletes_the_rest(nights, hf_home, tmp_path):
    ws = copy_ws(nights["promoted_b"], tmp_path / "ws")
    stale = "nightly-2020-01-01-0badc0de"  # an interrupted candidate from long ago, never decided
    made = [
        ws / "outputs" / stale / "nightly.json",
        ws / "models" / "finetuned" / "final_models" / stale / "config.json",
        ws / "models" / "finetuned" / "adapters" / stale / "adapter_config.json",
        ws / "models" / "gguf" / ".releases" / stale / NAMES[0],
    ]
    for p in made:
        p.parent.mkdir(parents=True)
        p.write_text("{}")
    (ws / "outputs" / "manual-run").mkdir()  # not the nightly job's: never touched
    keep = ["nightly.keep_candidates=0", "nightly.keep_champions=1"]
    rc, out = run_nightly(ws, hf_home, "prune", "--dry-run", *keep)
    assert rc == 0 and f"would delete outputs/{stale}, models/finetuned/final_models/{stale}" in out, out[-3000:]
    assert all(p.exists() for p in made)
    rc, out = run_nightly(ws, hf_home, "prune", *keep)
    assert rc == 0, out[-3000:]
    assert not any(p.parent.exists() for p in made)
    assert sorted(p.name for p in (ws / "outputs").iterdir()) == sorted([nights["a"], nights["b"], "manual-run"])
    assert live(ws) == nights["files_b"]
    rc, out = run_nightly(ws, hf_home, "status")
    assert rc == 0 and f"rollback:  {nights['a']}" in out
