"""Every CLI verb fed a table of bad inputs, as a demanding new user types them (issue 9).

Each case runs the real CLI in a process of its own and must end with its documented exit code, a message naming the
offending thing, no traceback, and `models/` byte for byte (and mode for mode) as it was. The cases share one
trained and exported tiny run (module fixture) and run in its folder with relative paths; a case that changes
the run folder gets a copy. A few cases are the good forms of a path (relative, trailing slash, symlink): those
must succeed. The cases' processes are forks of tests/support/cli_server.py, which has imported both CLIs once
(~8 s a process otherwise); the few tests of a process's own start (`| head`) start `python -m` themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEMO_DATA, CliServer, cli_env, run_cli, small_config
from tests.support.snapshots import tree_snapshot

pytestmark = pytest.mark.slow

GGUF = "models/gguf/gemma_2b_finetuned.gguf"
MERGED = "models/finetuned/final_models/t"
CHECKPOINT = "outputs/t/checkpoints/checkpoint-4"


@dataclass(frozen=True)
class Case:
    id: str
    cls: str  # the class: paths, files, stale, validation, parsing, surprises
    module: str
    args: list[str]
    rc: int
    expect: str  # must appear in stdout + stderr
    mutate: str = ""  # name of a function below that changes a copy of the run before the command
    extra: dict = field(default_factory=dict)


def dry(*overrides: str) -> list[str]:
    """A dry run of a new run: the shared run is complete, and a complete run only compares configs."""
    return ["--config", "config.yaml", "--dry-run", "run_name=new", *overrides]


CASES = [
    # ---------------------------------------------------------------- 1. paths: good forms succeed, bad ones say what
    Case("data-relative-folder-slash", "paths", "train", dry("data.train_files=[bad/data_dir/]"), 0, "dry run"),
    Case("data-relative-folder", "paths", "train", dry("data.train_files=[bad/data_dir]"), 0, "dry run"),
    Case("data-symlinked-folder", "paths", "train", dry("data.train_files=[bad/link_dir/]"), 0, "dry run"),
    Case(
        "data-dot-relative-file", "paths", "train", dry("data.train_files=[./bad/data_dir/train.jsonl]"), 0, "dry run"
    ),
    Case(
        "data-missing-file",
        "paths",
        "train",
        dry("data.train_files=[bad/nope.jsonl]"),
        2,
        "bad/nope.jsonl: file not found",
    ),
    Case(
        "data-missing-folder-slash",
        "paths",
        "train",
        dry("data.train_files=[bad/nope/]"),
        2,
        "bad/nope/: file not found",
    ),
    Case("data-device", "paths", "train", dry("data.train_files=[/dev/null]"), 2, "/dev/null: is a device"),
    Case(
        "data-empty-file",
        "paths",
        "train",
        dry("data.train_files=[bad/empty.jsonl]"),
        2,
        "bad/empty.jsonl: file is empty",
    ),
    Case("data-empty-folder", "paths", "train", dry("data.train_files=[bad/empty_dir/]"), 2, "no data files"),
    Case("data-dangling-link", "paths", "train", dry("data.train_files=[bad/dangling.jsonl]"), 2, "broken symlink"),
    Case(
        "eval-missing", "paths", "train", dry("data.eval_files=[bad/nope.jsonl]"), 2, "bad/nope.jsonl: file not found"
    ),
    Case(
        "heldout-missing",
        "paths",
        "train",
        dry("verify.heldout_files=[bad/nope.jsonl]", "export.enabled=true"),
        2,
        "bad/nope.jsonl: file not found",
    ),
    Case(
        "heldout-folder-empty",
        "paths",
        "train",
        dry("verify.heldout_files=[bad/empty_dir]", "export.enabled=true"),
        2,
        "no data files",
    ),
    Case("template-missing", "paths", "train", dry("model.chat_template=bad/nope.jinja"), 2, "bad/nope.jinja"),
    Case("model-folder-without-config", "paths", "train", dry("model.name_or_path=bad/empty_dir"), 2, "no config.json"),
    Case(
        "model-not-cached",
        "paths",
        "train",
        dry("model.name_or_path=acme/not-there"),
        2,
        "not in the Hugging Face cache",
    ),
    Case(
        "output-dir-is-a-file", "paths", "train", dry("paths.output_dir=bad/a_file"), 2, "paths.output_dir bad/a_file"
    ),
    Case(
        "gguf-dir-under-a-file",
        "paths",
        "train",
        dry("export.enabled=true", "export.gguf_dir=bad/a_file/gguf"),
        2,
        "export.gguf_dir bad/a_file/gguf",
    ),
    Case(
        "config-missing",
        "paths",
        "train",
        ["--config", "bad/nope.yaml", "--dry-run"],
        2,
        "config file not found: bad/nope.yaml",
    ),
    Case("config-folder", "paths", "train", ["--config", "bad", "--dry-run"], 2, "--config bad: is a folder"),
    Case(
        "config-device", "paths", "train", ["--config", "/dev/null", "--dry-run"], 2, "--config /dev/null: is a device"
    ),
    Case(
        "config-empty", "paths", "train", ["--config", "bad/empty.yaml"], 2, "--config bad/empty.yaml: is an empty file"
    ),
    Case(
        "resume-from-missing",
        "paths",
        "train",
        ["--config", "config.yaml", "--resume-from", "bad/nope"],
        2,
        "not a checkpoint of this run",
    ),
    Case(
        "resume-from-file",
        "paths",
        "train",
        ["--config", "config.yaml", "--resume-from", "config.yaml"],
        2,
        "not a checkpoint of this run",
    ),
    Case(
        "resume-from-missing-step",
        "paths",
        "train",
        ["--config", "config.yaml", "--resume-from", "outputs/t/checkpoints/checkpoint-99/"],
        2,
        "checkpoint-99",
    ),
    Case("info-relative", "paths", "convert", ["info", GGUF], 0, "general.architecture: gemma2"),
    Case("info-symlink", "paths", "convert", ["info", "bad/link.gguf"], 0, "general.architecture: gemma2"),
    Case(
        "verify-report-folder-missing",
        "paths",
        "convert",
        ["verify", "--model", MERGED, GGUF, "--report", "bad/nope/r.json"],
        2,
        "--report's folder",
    ),
    Case(
        "verify-report-is-folder",
        "paths",
        "convert",
        ["verify", "--model", MERGED, GGUF, "--report", "bad"],
        2,
        "--report bad: is a folder",
    ),
    Case(
        "verify-config-missing",
        "paths",
        "convert",
        ["verify", "--model", MERGED, GGUF, "--config", "bad/n.yaml"],
        2,
        "config file not found",
    ),
    Case("export-config-folder", "paths", "convert", ["export", "--config", "bad"], 2, "--config bad: is a folder"),
    # ---------------------------------------------------------------- 2. files that are not what they claim
    Case("info-missing", "files", "convert", ["info", "bad/nope.gguf"], 2, "GGUF file bad/nope.gguf"),
    Case("info-folder", "files", "convert", ["info", "bad/folder.gguf"], 2, "is a folder, not a file"),
    Case("info-empty", "files", "convert", ["info", "bad/empty.gguf"], 2, "is an empty file"),
    Case("info-text", "files", "convert", ["info", "bad/text.gguf"], 2, "not a GGUF file (wrong magic)"),
    Case("info-truncated", "files", "convert", ["info", "bad/truncated.gguf"], 2, "truncated or damaged"),
    Case("info-device", "files", "convert", ["info", "/dev/null"], 2, "is a device"),
    Case("info-dangling-link", "files", "convert", ["info", "bad/dangling.gguf"], 2, "broken symlink"),
    Case("verify-model-missing", "files", "convert", ["verify", "--model", "bad/nope", GGUF], 2, "--model bad/nope"),
    Case(
        "verify-model-file",
        "files",
        "convert",
        ["verify", "--model", "config.yaml", GGUF],
        2,
        "is a file, not a folder",
    ),
    Case(
        "verify-model-no-config", "files", "convert", ["verify", "--model", "bad/empty_dir", GGUF], 2, "no config.json"
    ),
    Case("verify-truncated", "files", "convert", ["verify", "--model", MERGED, "bad/truncated.gguf"], 2, "truncated"),
    Case("verify-text", "files", "convert", ["verify", "--model", MERGED, GGUF, "bad/text.gguf"], 2, "bad/text.gguf"),
    Case("verify-empty", "files", "convert", ["verify", "--model", MERGED, "bad/empty.gguf"], 2, "is an empty file"),
    # ------------------------------------------------------------ 4. only what the run folder vouches for is promoted
    Case(
        "export-fresh-restarted",
        "stale",
        "convert",
        ["export", "--config", "config.yaml"],
        2,
        "no finished training to export (status: training)",
        mutate="restarted_fresh",
    ),
    Case(
        "export-adapter-changed",
        "stale",
        "convert",
        ["export", "--config", "config.yaml"],
        2,
        "is not the adapter",
        mutate="tamper_adapter",
    ),
    Case(
        "export-adapter-missing",
        "stale",
        "convert",
        ["export", "--config", "config.yaml"],
        2,
        "is not the adapter",
        mutate="remove_adapter",
    ),
    Case(
        "export-never-trained",
        "stale",
        "convert",
        ["export", "--config", "config.yaml", "run_name=other"],
        2,
        "no finished training to export (status: no manifest)",
    ),
    Case(
        "export-failed-training",
        "stale",
        "convert",
        ["export", "--config", "config.yaml"],
        2,
        "(status: interrupted)",
        mutate="interrupted_status",
    ),
    # ------------------------------------------------------------ 5. validation a dry run does not leave to training
    Case("optim-unknown", "validation", "train", dry("training.optim=adamw_bogus"), 2, "adamw_bogus is not a valid"),
    Case("scheduler-unknown", "validation", "train", dry("training.lr_scheduler_type=cosinus"), 2, "cosinus"),
    Case("report-to-unknown", "validation", "train", dry("training.report_to=[nonsense]"), 2, "training.report_to"),
    Case(
        "report-to-missing-package", "validation", "train", dry("training.report_to=[mlflow]"), 2, "training.report_to"
    ),
    Case(
        "lora-target-none",
        "validation",
        "train",
        dry("lora.target_modules=[qkv_proj]"),
        2,
        "lora.target_modules: qkv_proj match no module",
    ),
    Case("lora-target-partly", "validation", "train", dry("lora.target_modules=[q_proj,c_attn]"), 2, "c_attn"),
    Case("template-unknown", "validation", "train", dry("model.chat_template=llama9"), 2, "no template 'llama9'"),
    # ---------------------------------------------------------------- 6. parsing
    Case("override-broken-yaml", "parsing", "train", dry("data.train_files=[a.jsonl"), 2, "not valid YAML"),
    Case("override-unclosed-quote", "parsing", "train", dry("run_name='abc"), 2, "not valid YAML"),
    Case("override-no-equals", "parsing", "train", dry("training.max_steps"), 2, "not of the form dotted.key=value"),
    Case("override-empty-key", "parsing", "train", dry("=5"), 2, "not of the form dotted.key=value"),
    Case("override-empty-part", "parsing", "train", dry("training..max_steps=5"), 2, "not of the form"),
    Case("override-into-value", "parsing", "train", dry("run_name.x=1"), 2, "'run_name' is not a section"),
    Case("bool-as-int", "parsing", "train", dry("training.max_steps=true"), 2, "training.max_steps"),
    Case("bool-as-float", "parsing", "train", dry("training.learning_rate=true"), 2, "training.learning_rate"),
    Case("int-as-bool", "parsing", "train", dry("data.packing=1"), 2, "data.packing"),
    Case("float-as-int", "parsing", "train", dry("lora.r=8.5"), 2, "lora.r"),
    Case("max-steps-zero", "parsing", "train", dry("training.max_steps=0"), 2, "training.max_steps: 0"),
    Case("duplicate-key", "parsing", "train", ["--config", "bad/dup.yaml", "--dry-run"], 2, "duplicate key 'run_name'"),
    Case("duplicate-nested-key", "parsing", "train", ["--config", "bad/dup_nested.yaml"], 2, "duplicate key 'r'"),
    Case("negative-kld-gate", "parsing", "train", dry("verify.max_kld.q8_0=-1"), 2, "verify.max_kld.q8_0"),
    Case("zero-nmse-gate", "parsing", "train", dry("verify.max_nmse.f16=0"), 2, "verify.max_nmse.f16"),
    Case("top1-above-one", "parsing", "train", dry("verify.min_top1.f16=1.5"), 2, "verify.min_top1.f16"),
    Case("gate-unknown-type", "parsing", "train", dry("verify.max_kld.q9_9=0.1"), 2, "q9_9: unknown type"),
    Case(
        "duplicate-quants",
        "parsing",
        "train",
        dry("export.quants=[q8_0,q8_0]", "export.default_quant=q8_0"),
        2,
        "q8_0 listed more than once",
    ),
    Case("no-quants", "parsing", "train", dry("export.quants=[]"), 2, "export.quants"),
    Case("no-prompts", "parsing", "train", dry("verify.prompts=[]"), 2, "verify.prompts"),
    Case(
        "unknown-key", "parsing", "train", dry("training.lerning_rate=1e-4"), 2, "did you mean 'training.learning_rate'"
    ),
    Case("run-name-escape", "parsing", "train", dry("run_name=../x"), 2, "run_name"),
    Case("config-top-level-list", "parsing", "train", ["--config", "bad/list.yaml"], 2, "top level must be a mapping"),
    Case("config-binary", "parsing", "train", ["--config", "bad/binary.yaml"], 2, "not UTF-8"),
    Case("config-tab-indent", "parsing", "train", ["--config", "bad/tabs.yaml"], 2, "bad/tabs.yaml:2"),
    Case("config-only-comments", "parsing", "train", ["--config", "bad/comments.yaml"], 2, "holds no settings"),
    Case(
        "export-override-broken",
        "parsing",
        "convert",
        ["export", "--config", "config.yaml", "export.quants=[f16"],
        2,
        "not valid YAML",
    ),
    Case(
        "fresh-and-resume",
        "parsing",
        "train",
        ["--config", "config.yaml", "--fresh", "--resume-from", CHECKPOINT],
        2,
        "exclude each other",
    ),
    Case("no-config", "parsing", "train", [], 2, "--config is required"),
    Case("convert-unknown-verb", "parsing", "convert", ["exprot"], 2, "invalid choice"),
    # ---------------------------------------------------------------- 7. silent surprises
    Case(
        "complete-run-changed-key",
        "surprises",
        "train",
        ["--config", "config.yaml", "training.learning_rate=1e-3"],
        2,
        "training.learning_rate: 0.003 -> 0.001",
    ),
    Case(
        "complete-run-changed-key-dry",
        "surprises",
        "train",
        ["--config", "config.yaml", "--dry-run", "lora.r=4"],
        2,
        "lora.r: 8 -> 4",
    ),
    Case(
        "complete-run-export-key",
        "surprises",
        "train",
        ["--config", "config.yaml", "export.quants=[f16]", "export.default_quant=f16"],
        2,
        "python -m convert export",
    ),
]


# ----------------------------------------------------------------------------- mutations of a copied run


def restarted_fresh(work: Path) -> None:
    """What `--fresh` leaves when interrupted mid-training: a run folder that vouches for no adapter yet, while
    models/finetuned/adapters/t still holds the previous run's."""
    run = work / "outputs" / "t"
    shutil.rmtree(run / "adapter")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({"status": "training", "run_name": "t", "data": manifest["data"]}))


def tamper_adapter(work: Path) -> None:
    path = work / "outputs" / "t" / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def remove_adapter(work: Path) -> None:
    shutil.rmtree(work / "outputs" / "t" / "adapter")


def interrupted_status(work: Path) -> None:
    path = work / "outputs" / "t" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest | {"status": "interrupted"}))


# ----------------------------------------------------------------------------- the shared run and the bad files


def write_bad_files(work: Path) -> None:
    bad = work / "bad"
    (bad / "empty_dir").mkdir(parents=True)
    (bad / "data_dir").mkdir()
    shutil.copyfile(DEMO_DATA, bad / "data_dir" / "train.jsonl")
    (bad / "link_dir").symlink_to("data_dir")
    (bad / "folder.gguf").mkdir()
    (bad / "empty.gguf").write_bytes(b"")
    (bad / "empty.jsonl").write_bytes(b"")
    (bad / "empty.yaml").write_bytes(b"")
    (bad / "a_file").write_text("not a folder\n")
    (bad / "text.gguf").write_text("this is not a model\n")
    good = (work / GGUF).read_bytes()
    (bad / "truncated.gguf").write_bytes(good[: len(good) // 2])
    (bad / "link.gguf").symlink_to(work / GGUF)
    (bad / "dangling.gguf").symlink_to(work / "bad" / "gone.gguf")
    (bad / "dangling.jsonl").symlink_to(work / "bad" / "gone.jsonl")
    (bad / "dup.yaml").write_text("run_name: a\nrun_name: b\n")
    config = yaml.safe_load((work / "config.yaml").read_text())
    text = yaml.safe_dump(config, sort_keys=False).replace("  r: 8\n", "  r: 8\n  r: 4\n")
    (bad / "dup_nested.yaml").write_text(text)
    (bad / "list.yaml").write_text("- run_name: a\n")
    (bad / "binary.yaml").write_bytes(b"\xff\xfe\x00run_name")
    (bad / "tabs.yaml").write_text("run_name: a\n\ttraining: {}\n")
    (bad / "comments.yaml").write_text("# nothing but a comment\n\n")


@pytest.fixture(scope="module")
def trained(hf_home: Path, tmp_path_factory) -> Path:
    """A complete, exported tiny run whose config uses relative paths; cases run in its folder."""
    work = tmp_path_factory.mktemp("bad_inputs")
    small_config(
        work,
        training={
            "max_steps": 4,
            "save_steps": 2,
            "logging_steps": 2,
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
            "gguf_dir": "models/gguf",
        },
        paths={"output_dir": "outputs", "models_dir": "models"},
    )
    res = run_cli("train", ["--config", "config.yaml"], work, hf_home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    write_bad_files(work)
    return work


@pytest.fixture(scope="module")
def cli(trained: Path, hf_home: Path, tmp_path_factory):
    server = CliServer(hf_home, trained, tmp_path_factory.mktemp("cli_output"))
    yield server
    server.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, trained: Path, cli: CliServer, tmp_path: Path):
    work = trained
    if case.mutate:
        work = tmp_path / "work"
        shutil.copytree(trained, work, symlinks=True)
        globals()[case.mutate](work)
    before = tree_snapshot(work / "models")
    res = cli.run(case.module, case.args, work, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == case.rc, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert case.expect in out, out[-3000:]
    assert tree_snapshot(work / "models") == before


def test_the_table_covers_every_class_with_sixty_distinct_inputs():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    bad = [c for c in CASES if c.rc != 0]
    assert len(bad) >= 60
    assert {c.cls for c in CASES} == {"paths", "files", "stale", "validation", "parsing", "surprises"}


# ----------------------------------------------------------------------------- a reader that goes away (| head)


@pytest.mark.parametrize(
    "args",
    [["train", "--print-defaults"], ["convert", "info", GGUF], ["train", "--config", "config.yaml"]],
    ids=["print-defaults", "info", "complete-rerun"],
)
def test_output_piped_into_a_reader_that_stops_early(args: list[str], trained: Path, hf_home: Path):
    """`... | head -1`: the reader closes the pipe after one line; the CLI ends quietly with its usual status."""
    before = tree_snapshot(trained / "models")
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=trained,
        env=cli_env(hf_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its first line
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err[-3000:]
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Logging error" not in err, err[-3000:]
    assert tree_snapshot(trained / "models") == before


# ----------------------------------------------------------------------------- what ships


def test_promoted_files_are_readable_by_others_and_only_what_a_consumer_needs(trained: Path):
    models = trained / "models"
    umask = os.umask(0)
    os.umask(umask)
    for p in models.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.parent.name != ".locks":
            assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
    adapter = {p.name for p in (models / "finetuned" / "adapters" / "t").iterdir()}
    assert "adapter_model.safetensors" in adapter and "training_args.bin" not in adapter
    assert sorted(p.name for p in (models / "gguf").iterdir()) == [
        ".locks",
        "gemma_2b_finetuned.Modelfile",  # Ollama's, one per model GGUF
        "gemma_2b_finetuned.f16.Modelfile",
        "gemma_2b_finetuned.f16.gguf",
        "gemma_2b_finetuned.gguf",
        "gemma_2b_finetuned.lora.gguf",  # the adapter, for llama.cpp on the base GGUF
    ]
    report = json.loads((trained / "outputs" / "t" / "verify.json").read_text())
    for entry in report["files"]:  # every path a report names exists (relative ones from the run's working
        # directory, `trained`), or is a bare name with a note
        assert (trained / entry["path"]).is_file() or (os.sep not in entry["path"] and entry["notes"]), entry
    md = (trained / "outputs" / "t" / "verify.md").read_text()
    assert f"Reference: {trained / MERGED} " in md and "q8_0: mean KLD <= 0.001" in md
