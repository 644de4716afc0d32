"""Every CLI verb fed a table of bad inputs, as a demanding new user types them (issue 9).

Each case must end with its documented exit code, a message naming the offending thing, and nothing written; the
good forms of a path (relative, trailing slash, symlink) must work. CASES are direct calls of the function that
decides (config and overrides, paths, data sources, GGUF headers, --report, resume checkpoints, trainer settings,
argument parsing): its exception, the exit code the CLIs turn it into (core.errors.exit_status) and the message they
print. END_TO_END runs the real CLIs (forks of the CLI server, tests/conftest.py `cli`), chosen so that every verb
and every way a user's command ends stays covered through the command itself; `| head` starts real processes.
All cases work in one copy of the golden run, with relative paths; a case that changes the run gets its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from convert.__main__ import hf_model_dir, quant_of, report_path
from convert.export import vouched_adapter
from convert.llamacpp import read_metadata
from core.config import load_config
from core.errors import (
    ConfigError,
    DataError,
    InvalidInput,
    ModelNotFoundError,
    PathError,
    PipelineError,
    RunError,
    exit_status,
)
from core.hub import CACHE_ENV, MODELS_CACHE, resolve_model
from core.runfolder import RunFolder
from tests.conftest import DEMO_DATA, GOLDEN_RUN, ROOT, cli_env, copy_workspace
from tests.support.snapshots import tree_snapshot
from train.__main__ import parse_args as train_args
from train.data import load_data
from train.model import chat_template_text
from train.report import check_complete_run_config
from train.resume import plan_resume
from train.run import publishing
from train.validate import validate_training_setup

pytestmark = pytest.mark.slow

GGUF = "models/gguf/gemma_2b_finetuned.gguf"
MERGED = f"models/finetuned/final_models/{GOLDEN_RUN}"
CHECKPOINTS = f"outputs/{GOLDEN_RUN}/checkpoints"
CLASSES = {"paths", "files", "stale", "validation", "parsing", "surprises"}  # the classes


class Ctx(NamedTuple):
    """What a direct call needs besides the workspace (its working directory)."""

    tok: object  # the tiny model's tokenizer
    hf_home: Path


@dataclass(frozen=True)
class Case:
    """A direct call, in the workspace: `call` raises `error`, which the CLIs end with exit `rc` and a message that
    holds `expect` (and not `absent`); a good form (rc 0, error None) returns a description holding `expect`."""

    id: str
    cls: str
    call: Callable[[Ctx], object]
    error: type[BaseException] | None
    rc: int
    expect: str
    absent: str = ""
    mutate: str = ""  # a function below that changes a copy of the workspace first


@dataclass(frozen=True)
class Cli:
    """`python -m <module> <args>` through the CLI server: exit rc, each of `expect` in its output, not `absent`,
    models/ byte for byte as it was and no path added or removed anywhere in the workspace.
    elsewhere: run from an empty folder of the test's own, as a user who is not in the project's folder; publishing:
    while a `python -m train` that publishes export.name holds its lock. args and expect may name {work} (the
    workspace), {elsewhere}, {root} (the project's folder), {size} and {mib} (the published default GGUF's size)."""

    id: str
    cls: str
    module: str
    args: list[str]
    rc: int
    expect: tuple[str, ...]
    absent: str = ""
    mutate: str = ""
    elsewhere: bool = False
    publishing: bool = False


# ----------------------------------------------------------------------------- the calls the commands make


def config(*overrides: str):
    """The workspace's config with overrides, as `python -m train --config config.yaml <overrides>` reads it."""
    return load_config("config.yaml", list(overrides))


def data(*overrides: str) -> Callable[[Ctx], str]:
    """The data stage (train.data.load_data: training, eval and held-out sources), as a run and its dry run call it."""

    def call(ctx: Ctx) -> str:
        cfg = config(*overrides)
        prepared = load_data(ctx.tok, cfg, RunFolder.of(cfg).root)
        return f"{prepared.train_stats.records} training records"

    return call


def validate(*overrides: str) -> Callable[[Ctx], None]:
    """The trainer settings and output folders a run checks before it writes anything (train.validate)."""

    def call(ctx: Ctx) -> None:
        cfg = config(*overrides)
        base = resolve_model(cfg.model.name_or_path, cfg.model.revision, ctx.hf_home)
        validate_training_setup(cfg, RunFolder.of(cfg), base, False)

    return call


def model(*overrides: str) -> Callable[[Ctx], object]:
    def call(ctx: Ctx) -> object:
        cfg = config(*overrides)
        return resolve_model(cfg.model.name_or_path, cfg.model.revision, ctx.hf_home)

    return call


def template(spec: str) -> Callable[[Ctx], str]:
    return lambda ctx: chat_template_text(config(f"model.chat_template={spec}").model.chat_template)


def parsed(*overrides: str) -> Callable[[Ctx], object]:
    return lambda ctx: config(*overrides)


def config_file(path: str) -> Callable[[Ctx], object]:
    return lambda ctx: load_config(path)


def resume_from(checkpoint: str) -> Callable[[Ctx], object]:
    """--resume-from: what the run (and its dry run) would resume from (train.resume.plan_resume)."""

    def call(ctx: Ctx) -> object:
        cfg = config()
        return plan_resume(RunFolder.of(cfg), cfg, False, {}, Path(checkpoint))

    return call


def architecture(gguf: str) -> Callable[[Ctx], str]:
    """`convert info`'s reading of a GGUF (convert.llamacpp.read_metadata)."""
    return lambda ctx: f"general.architecture: {read_metadata(Path(gguf))['general.architecture']}"


def exported(ctx: Ctx) -> object:
    """What `convert export` checks before it exports: that the run folder vouches for its adapter."""
    return vouched_adapter(RunFolder.of(config()))


CASES = [
    # ---------------------------------------------------------------- 1. paths: good forms work, bad ones say what
    Case(
        "data-relative-folder-slash", "paths", data("data.train_files=[bad/data_dir/]"), None, 0, "300 training records"
    ),
    Case("data-relative-folder", "paths", data("data.train_files=[bad/data_dir]"), None, 0, "300 training records"),
    Case("data-symlinked-folder", "paths", data("data.train_files=[bad/link_dir/]"), None, 0, "300 training records"),
    Case(
        "data-dot-relative-file",
        "paths",
        data("data.train_files=[./bad/data_dir/train.jsonl]"),
        None,
        0,
        "300 training records",
    ),
    Case(
        "data-missing-file",
        "paths",
        data("data.train_files=[bad/nope.jsonl]"),
        DataError,
        2,
        "bad/nope.jsonl: file not found",
    ),
    Case(
        "data-missing-folder-slash", "paths", data("data.train_files=[bad/nope/]"), DataError, 2, "bad/nope/: file not"
    ),
    Case(
        "data-device",
        "paths",
        data("data.train_files=[/dev/null]"),
        DataError,
        2,
        "/dev/null: is a device or other special file, not a data file",
    ),
    Case(
        "data-empty-file", "paths", data("data.train_files=[bad/empty.jsonl]"), DataError, 2, "bad/empty.jsonl: file is"
    ),
    Case(
        "data-empty-folder", "paths", data("data.train_files=[bad/empty_dir/]"), DataError, 2, "bad/empty_dir/: no data"
    ),
    Case("data-dangling-link", "paths", data("data.train_files=[bad/dangling.jsonl]"), DataError, 2, "broken symlink"),
    Case(
        "eval-missing",
        "paths",
        data("data.eval_files=[bad/nope.jsonl]"),
        DataError,
        2,
        "bad/nope.jsonl: file not found (relative paths start at {work})\n  nothing was trained",
    ),
    Case(
        "heldout-missing",
        "paths",
        data("verify.heldout_files=[bad/nope.jsonl]"),
        DataError,
        2,
        "bad/nope.jsonl: file not found (relative paths start at {work})\n  in verify.heldout_files / data.eval_files",
    ),
    Case(
        "heldout-folder-empty",
        "paths",
        data("verify.heldout_files=[bad/empty_dir]"),
        DataError,
        2,
        "bad/empty_dir: no data files (.jsonl, .json, .csv, .parquet) in this folder\n  in verify.heldout_files",
    ),
    Case("template-missing", "paths", template("bad/nope.jinja"), RunError, 2, "no template 'bad/nope.jinja'"),
    Case(
        "model-folder-without-config",
        "paths",
        model("model.name_or_path=bad/empty_dir"),
        ModelNotFoundError,
        2,
        "bad/empty_dir is a folder but has no config.json",
    ),
    Case(
        "model-not-cached",
        "paths",
        model("model.name_or_path=acme/not-there"),
        ModelNotFoundError,
        2,
        "model 'acme/not-there' (revision main) is not in the Hugging Face cache",
    ),
    Case(
        "output-dir-is-a-file",
        "paths",
        validate("paths.output_dir=bad/a_file"),
        RunError,
        2,
        "paths.output_dir bad/a_file",
    ),
    Case(
        "gguf-dir-under-a-file",
        "paths",
        validate("export.gguf_dir=bad/a_file/gguf"),
        RunError,
        2,
        "export.gguf_dir bad/a_file/gguf",
    ),
    Case("config-missing", "paths", config_file("bad/nope.yaml"), ConfigError, 2, "config file not found: bad/nope"),
    Case("config-folder", "paths", config_file("bad"), ConfigError, 2, "--config bad: is a folder"),
    Case("config-device", "paths", config_file("/dev/null"), ConfigError, 2, "--config /dev/null: is a device"),
    Case(
        "config-empty", "paths", config_file("bad/empty.yaml"), ConfigError, 2, "--config bad/empty.yaml: is an empty"
    ),
    Case("resume-from-missing", "paths", resume_from("bad/nope"), RunError, 2, "not a checkpoint of this run"),
    Case("resume-from-file", "paths", resume_from("config.yaml"), RunError, 2, "not a checkpoint of this run"),
    Case(
        "resume-from-missing-step",
        "paths",
        resume_from(f"{CHECKPOINTS}/checkpoint-99/"),
        RunError,
        2,
        "checkpoint-99: is missing; this run's committed checkpoints: checkpoint-20, checkpoint-40",
    ),
    Case("info-relative", "paths", architecture(GGUF), None, 0, "general.architecture: gemma2"),
    Case("info-symlink", "paths", architecture("bad/link.gguf"), None, 0, "general.architecture: gemma2"),
    Case(
        "verify-report-folder-missing",
        "paths",
        lambda ctx: report_path("bad/nope/r.json"),
        PathError,
        2,
        "--report's folder",
    ),
    Case("verify-report-is-folder", "paths", lambda ctx: report_path("bad"), PathError, 2, "--report bad: is a folder"),
    Case("verify-config-missing", "paths", config_file("bad/n.yaml"), ConfigError, 2, "config file not found"),
    Case("export-config-folder", "paths", config_file("bad/"), ConfigError, 2, "--config bad: is a folder"),
    # ---------------------------------------------------------------- 2. files that are not what they claim
    Case("info-missing", "files", architecture("bad/nope.gguf"), PathError, 2, "GGUF file bad/nope.gguf"),
    Case("info-folder", "files", architecture("bad/folder.gguf"), PathError, 2, "is a folder, not a file"),
    Case("info-empty", "files", architecture("bad/empty.gguf"), PathError, 2, "is an empty file"),
    Case(
        "info-truncated",
        "files",
        architecture("bad/truncated.gguf"),
        InvalidInput,
        2,
        "truncated or damaged (its header is a GGUF's)",
    ),
    Case("info-device", "files", architecture("/dev/null"), PathError, 2, "GGUF file /dev/null: is a device"),
    Case("info-dangling-link", "files", architecture("bad/dangling.gguf"), PathError, 2, "broken symlink"),
    Case(
        "verify-model-file", "files", lambda ctx: hf_model_dir("config.yaml"), PathError, 2, "is a file, not a folder"
    ),
    Case(
        "verify-model-no-config",
        "files",
        lambda ctx: hf_model_dir("bad/empty_dir"),
        PathError,
        2,
        "--model bad/empty_dir: has no config.json",
    ),
    Case(
        "verify-truncated",
        "files",
        lambda ctx: quant_of(Path("bad/truncated.gguf")),
        InvalidInput,
        2,
        "bad/truncated.gguf: truncated or damaged",
    ),
    Case(
        "verify-text",
        "files",
        lambda ctx: quant_of(Path("bad/text.gguf")),
        InvalidInput,
        2,
        "bad/text.gguf: not a GGUF file (wrong magic)",
        absent="export it again",  # what wrote it was not our export
    ),
    Case("verify-empty", "files", lambda ctx: quant_of(Path("bad/empty.gguf")), PathError, 2, "is an empty file"),
    # ------------------------------------------------------------ 4. only what the run folder vouches for is exported
    Case("export-adapter-changed", "stale", exported, RunError, 2, "is not the adapter", mutate="tamper_adapter"),
    Case("export-adapter-missing", "stale", exported, RunError, 2, "is not the adapter", mutate="remove_adapter"),
    Case(
        "export-failed-training", "stale", exported, RunError, 2, "(status: interrupted)", mutate="interrupted_status"
    ),
    # ------------------------------------------------------------ 5. validation a dry run does not leave to training
    Case("optim-unknown", "validation", validate("training.optim=adamw_bogus"), RunError, 2, "adamw_bogus is not a"),
    Case(
        "scheduler-unknown",
        "validation",
        validate("training.lr_scheduler_type=cosinus"),
        RunError,
        2,
        "cosinus is not a valid SchedulerType",
    ),
    Case(
        "report-to-unknown",
        "validation",
        validate("training.report_to=[nonsense]"),
        RunError,
        2,
        "training.report_to: nonsense is not supported",
    ),
    Case(
        "report-to-missing-package",
        "validation",
        validate("training.report_to=[mlflow]"),
        RunError,
        2,
        "training.report_to: mlflow not installed",
    ),
    Case(
        "lora-target-none",
        "validation",
        validate("lora.target_modules=[qkv_proj]"),
        RunError,
        2,
        "lora.target_modules: qkv_proj match no module",
    ),
    Case(
        "lora-target-partly",
        "validation",
        validate("lora.target_modules=[q_proj,c_attn]"),
        RunError,
        2,
        "lora.target_modules: c_attn match no module",
    ),
    Case("template-unknown", "validation", template("llama9"), RunError, 2, "no template 'llama9'"),
    # ---------------------------------------------------------------- 6. parsing
    Case("override-broken-yaml", "parsing", parsed("data.train_files=[a.jsonl"), ConfigError, 2, "not valid YAML"),
    Case("override-unclosed-quote", "parsing", parsed("run_name='abc"), ConfigError, 2, "not valid YAML"),
    Case("override-no-equals", "parsing", parsed("training.max_steps"), ConfigError, 2, "not of the form dotted.key="),
    Case("override-empty-key", "parsing", parsed("=5"), ConfigError, 2, "not of the form dotted.key=value"),
    Case("override-empty-part", "parsing", parsed("training..max_steps=5"), ConfigError, 2, "not of the form"),
    Case("override-into-value", "parsing", parsed("run_name.x=1"), ConfigError, 2, "'run_name' is not a section"),
    Case(
        "bool-as-int",
        "parsing",
        parsed("training.max_steps=true"),
        ConfigError,
        2,
        "training.max_steps: Input should be a valid integer (got True)",
    ),
    Case(
        "bool-as-float",
        "parsing",
        parsed("training.learning_rate=true"),
        ConfigError,
        2,
        "training.learning_rate: Input should be a valid number (got True)",
    ),
    Case(
        "int-as-bool",
        "parsing",
        parsed("data.packing=1"),
        ConfigError,
        2,
        "data.packing: Input should be a valid boolean (got 1)",
    ),
    Case(
        "float-as-int",
        "parsing",
        parsed("lora.r=8.5"),
        ConfigError,
        2,
        "lora.r: Input should be a valid integer (got 8.5)",
    ),
    Case("max-steps-zero", "parsing", parsed("training.max_steps=0"), ConfigError, 2, "training.max_steps: 0"),
    Case(
        "run-name-empty",
        "parsing",
        parsed("run_name="),
        ConfigError,
        2,
        "run_name: Input should be a valid string (got nothing: give a value, run_name=..., or leave the key out",
    ),
    Case("duplicate-key", "parsing", config_file("bad/dup.yaml"), ConfigError, 2, "duplicate key 'run_name'"),
    Case("duplicate-nested-key", "parsing", config_file("bad/dup_nested.yaml"), ConfigError, 2, "duplicate key 'r'"),
    Case(
        "negative-kld-gate",
        "parsing",
        parsed("verify.max_kld.q8_0=-1"),
        ConfigError,
        2,
        "verify.max_kld.q8_0: -1.0 must be above 0",
    ),
    Case(
        "zero-nmse-gate",
        "parsing",
        parsed("verify.max_nmse.f16=0"),
        ConfigError,
        2,
        "verify.max_nmse.f16: 0.0 must be above 0",
    ),
    Case(
        "top1-above-one",
        "parsing",
        parsed("verify.min_top1.f16=1.5"),
        ConfigError,
        2,
        "verify.min_top1.f16: 1.5 is not a fraction in (0, 1]",
    ),
    Case("gate-unknown-type", "parsing", parsed("verify.max_kld.q9_9=0.1"), ConfigError, 2, "q9_9: unknown type"),
    Case(
        "duplicate-quants",
        "parsing",
        parsed("export.quants=[q8_0,q8_0]", "export.default_quant=q8_0"),
        ConfigError,
        2,
        "q8_0 listed more than once",
    ),
    Case("no-quants", "parsing", parsed("export.quants=[]"), ConfigError, 2, "export.quants: is empty"),
    Case("no-prompts", "parsing", parsed("verify.prompts=[]"), ConfigError, 2, "verify.prompts: needs at least one"),
    Case(
        "run-name-escape", "parsing", parsed("run_name=../x"), ConfigError, 2, "run_name: String should match pattern"
    ),
    Case("config-top-level-list", "parsing", config_file("bad/list.yaml"), ConfigError, 2, "top level must be a"),
    Case(
        "config-binary",
        "parsing",
        config_file("bad/binary.yaml"),
        ConfigError,
        2,
        "bad/binary.yaml: not UTF-8 text (byte 0)",
    ),
    Case(
        "config-tab-indent",
        "parsing",
        config_file("bad/tabs.yaml"),
        ConfigError,
        2,
        "bad/tabs.yaml:2:1: not valid YAML",
    ),
    Case("config-only-comments", "parsing", config_file("bad/comments.yaml"), ConfigError, 2, "holds no settings"),
    Case("export-override-broken", "parsing", parsed("export.quants=[f16"), ConfigError, 2, "not valid YAML"),
    Case("no-config", "parsing", lambda ctx: train_args([]), SystemExit, 2, "--config is required"),
    # ---------------------------------------------------------------- 7. silent surprises
    Case(
        "complete-run-changed-key-dry",
        "surprises",
        lambda ctx: check_complete_run_config(RunFolder.of(config("lora.r=4")), config("lora.r=4")),
        RunError,
        2,
        "lora.r: 8 -> 4",
    ),
]


def dry(*overrides: str) -> list[str]:
    return ["--config", "config.yaml", "--dry-run", *overrides]


END_TO_END = [
    # a dry run on the complete golden run checks a new data file first, then refuses the changed key as the real
    # command would: a missing file is the data error, a good one is read and then refused
    Cli(
        "complete-run-dry-new-data-missing",
        "paths",
        "train",
        dry("data.train_files=[bad/nope.jsonl]"),
        2,
        ("error: 1 data problem(s):\n  bad/nope.jsonl: file not found",),
        absent="would be ignored",
    ),
    Cli(
        "complete-run-dry-new-data-good",
        "surprises",
        "train",
        dry("data.train_files=[bad/data_dir/train.jsonl]"),
        2,
        (
            "train bad/data_dir/train.jsonl: 300 records -> 300 examples",
            f"run {GOLDEN_RUN} is complete",
            "these changes would be ignored:\n    data.train_files: [",
        ),
    ),
    Cli(
        "dry-run-eval-fraction",
        "validation",
        "train",
        dry("run_name=new", "data.eval_fraction=0.1"),
        0,
        ("held out for eval) -> ", "\n    eval: ", "--- the command would: train from step 0"),
    ),
    Cli(
        "another-working-directory",
        "paths",
        "train",
        ["--config", "{work}/config.yaml", "--dry-run"],
        2,
        (
            "is not in the Hugging Face cache",
            "(relative paths start at {elsewhere}, not at the project's root folder {root}: run commands from there)",
            "python -m scripts.tiny_model",  # built on this machine: no hub serves it
        ),
        absent="hf download",
        elsewhere=True,
    ),
    Cli(
        "unknown-key",
        "parsing",
        "train",
        dry("training.lerning_rate=1e-4"),
        2,
        ("did you mean 'training.learning_rate'",),
    ),
    Cli(
        "fresh-and-resume",
        "parsing",
        "train",
        ["--config", "config.yaml", "--fresh", "--resume-from", f"{CHECKPOINTS}/checkpoint-20"],
        2,
        ("--fresh and --resume-from exclude each other",),
    ),
    Cli("convert-unknown-verb", "parsing", "convert", ["exprot"], 2, ("invalid choice: 'exprot'",)),
    Cli(
        "info-file-type-and-size",
        "files",
        "convert",
        ["info", GGUF],
        0,
        ("general.architecture: gemma2", "general.file_type: 7 (q8_0)", "file size: {mib} MiB ({size:,} bytes)"),
    ),
    Cli(
        "info-text",
        "files",
        "convert",
        ["info", "bad/text.gguf"],
        2,
        ("bad/text.gguf: not a GGUF file (wrong magic)", "fix: give the path of a .gguf file that llama.cpp wrote"),
        absent="export it again",
    ),
    Cli(
        "verify-model-missing",
        "files",
        "convert",
        ["verify", "--model", "bad/nope", GGUF],
        2,
        ("--model bad/nope (relative to {work}): is missing, not a folder",),
    ),
    Cli(
        "export-never-trained",  # and no outputs/other/ (nor its .lock) is made for it: the snapshot
        "stale",
        "convert",
        ["export", "--config", "config.yaml", "run_name=other"],
        2,
        ("outputs/other has no finished training to export (status: no manifest)",),
    ),
    Cli(
        "export-fresh-restarted",
        "stale",
        "convert",
        ["export", "--config", "config.yaml"],
        2,
        ("no finished training to export (status: training)",),
        mutate="restarted_fresh",
    ),
    Cli(
        "complete-run-changed-key",
        "surprises",
        "train",
        ["--config", "config.yaml", "training.learning_rate=1e-3"],
        2,
        ("training.learning_rate: 0.003 -> 0.001", "pass --fresh to retrain with them"),
    ),
    Cli(
        "complete-run-export-key",
        "surprises",
        "train",
        ["--config", "config.yaml", "export.quants=[f16]", "export.default_quant=f16"],
        2,
        ("export.quants: ['f16', 'q8_0', 'q4_k_m'] -> ['f16']", "python -m convert export"),
    ),
    Cli(
        "nightly-during-a-training",
        "surprises",
        "train.nightly",
        ["run", "--config", "config.yaml"],
        75,
        ("models/gguf/gemma_2b_finetuned.gguf (what publishes it) is in use by a run that will publish it",),
        publishing=True,
    ),
]


# ----------------------------------------------------------------------------- mutations of a copied run


def restarted_fresh(work: Path) -> None:
    """What `--fresh` leaves when interrupted mid-training: a run folder that vouches for no adapter yet, while
    models/finetuned/adapters/<run> still holds the previous run's."""
    run = work / "outputs" / GOLDEN_RUN
    shutil.rmtree(run / "adapter")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(
        json.dumps({"status": "training", "run_name": GOLDEN_RUN, "data": manifest["data"]})
    )


def tamper_adapter(work: Path) -> None:
    path = work / "outputs" / GOLDEN_RUN / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def remove_adapter(work: Path) -> None:
    shutil.rmtree(work / "outputs" / GOLDEN_RUN / "adapter")


def interrupted_status(work: Path) -> None:
    path = work / "outputs" / GOLDEN_RUN / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"status": "interrupted"}))


MUTATIONS = {f.__name__: f for f in (restarted_fresh, tamper_adapter, remove_adapter, interrupted_status)}


# ----------------------------------------------------------------------------- the workspace and its bad files


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
    text = (work / "config.yaml").read_text()
    assert "  r: 8\n" in text
    (bad / "dup_nested.yaml").write_text(text.replace("  r: 8\n", "  r: 8\n  r: 4\n"))
    (bad / "list.yaml").write_text("- run_name: a\n")
    (bad / "binary.yaml").write_bytes(b"\xff\xfe\x00run_name")
    (bad / "tabs.yaml").write_text("run_name: a\n\ttraining: {}\n")
    (bad / "comments.yaml").write_text("# nothing but a comment\n\n")


@pytest.fixture(scope="module")
def work(golden: Path, tmp_path_factory) -> Path:
    """A copy of the golden run with the bad files beside it; no case may change it."""
    ws = copy_workspace(golden, tmp_path_factory.mktemp("bad_inputs") / "ws")
    write_bad_files(ws)
    return ws


def changed_copy(work: Path, mutation: str, tmp_path: Path) -> Path:
    ws = copy_workspace(work, tmp_path / "ws")
    MUTATIONS[mutation](ws)
    return ws


# ----------------------------------------------------------------------------- the table


def outcome(case: Case, ctx: Ctx, capsys) -> tuple[BaseException | None, int, str]:
    """(the exception, the exit status and the message the CLIs end with); a good form: (None, 0, its description)."""
    try:
        result = case.call(ctx)
    except PipelineError as e:
        status = exit_status(e)  # what cli_exit turns it into
        assert status is not None
        return e, *status
    except SystemExit as e:  # argparse: the usage and the error went to stderr
        return e, e.code, capsys.readouterr().err  # type: ignore[return-value]
    return None, 0, str(result)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, work: Path, tok, hf_home: Path, tmp_path: Path, monkeypatch, capsys):
    ws = changed_copy(work, case.mutate, tmp_path) if case.mutate else work
    monkeypatch.chdir(ws)  # relative paths start here, as in a user's shell
    before = tree_snapshot(ws, contents=False)
    error, rc, message = outcome(case, Ctx(tok, hf_home), capsys)
    assert type(error) is (case.error or type(None)), message
    assert rc == case.rc, message
    assert case.expect.format(work=ws) in message
    assert not case.absent or case.absent not in message
    assert tree_snapshot(ws, contents=False) == before


@pytest.mark.parametrize("case", END_TO_END, ids=lambda c: c.id)
def test_bad_input_end_to_end(case: Cli, work: Path, cli, hf_home: Path, tmp_path: Path, monkeypatch):
    ws = changed_copy(work, case.mutate, tmp_path) if case.mutate else work
    cwd, env = ws, None
    if case.elsewhere:  # HF_HOME: what configure_cache_env makes of models/.cache there (a user sets none)
        cwd = tmp_path / "elsewhere"
        cwd.mkdir()
        env = {"HF_HOME": str(cwd / MODELS_CACHE / CACHE_ENV["HF_HOME"])}
    size = (ws / GGUF).stat().st_size
    fill = {"work": ws, "elsewhere": cwd, "root": ROOT, "size": size, "mib": f"{size / 2**20:.1f}"}
    args = [a.format(**fill) for a in case.args]
    models, paths = tree_snapshot(ws / "models"), set(tree_snapshot(ws, contents=False))
    monkeypatch.chdir(ws)
    held = nullcontext()
    if case.publishing:  # what `python -m train` holds while it trains a run that publishes export.name
        held = publishing(config(), True)
    with held:
        res = cli.run(case.module, args, cwd, timeout=300, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == case.rc, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for text in case.expect:
        assert text.format(**fill) in out, out[-3000:]
    assert not case.absent or case.absent not in out, out[-3000:]
    assert tree_snapshot(ws / "models") == models
    assert set(tree_snapshot(ws, contents=False)) == paths  # nothing made, nothing removed (locks, run folders)
    assert not case.elsewhere or list(cwd.iterdir()) == []


def test_the_table_covers_every_class_and_verb_with_sixty_distinct_inputs():
    cases = [*CASES, *END_TO_END]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    assert len([c for c in cases if c.rc != 0]) >= 60
    assert {c.cls for c in cases} == CLASSES
    # end to end: every command, every convert verb, and each way a bad input ends a command (argparse's usage
    # error, a PipelineError's exit 2, a held lock's 75) besides success
    assert {(c.module, c.args[0] if c.module != "train" else "") for c in END_TO_END} >= {
        ("train", ""),
        ("convert", "export"),
        ("convert", "verify"),
        ("convert", "info"),
        ("train.nightly", "run"),
    }
    assert {c.rc for c in END_TO_END} == {0, 2, 75}
    assert 10 <= len(END_TO_END) <= 20


# ----------------------------------------------------------------------------- a reader that goes away (| head)


@pytest.mark.parametrize(
    "args",
    [["train", "--print-defaults"], ["convert", "info", GGUF], ["train", "--config", "config.yaml"]],
    ids=["print-defaults", "info", "complete-rerun"],
)
def test_output_piped_into_a_reader_that_stops_early(args: list[str], work: Path, hf_home: Path):
    """`... | head -1`: the reader closes the pipe after one line; the CLI ends quietly with its usual status. A real
    process: what is under test is its exit, the interpreter's last flush of a closed stdout included."""
    before = tree_snapshot(work / "models")
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=work,
        env=cli_env(hf_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # as head does after its first line
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err[-3000:]
    assert first.strip(), err[-3000:]  # it had begun to answer
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Logging error" not in err, err[-3000:]
    assert tree_snapshot(work / "models") == before


# ----------------------------------------------------------------------------- what a run prints and ships


def test_progress_to_a_pipe_is_a_line_per_interval(golden: Path):
    """The golden run's output went to a pipe: progress bars would redraw one line with carriage returns, thousands
    of characters long. The Trainer prints a line per logged step instead, the scoring a line per file (and per
    interval), and no line is longer than a terminal's few widths."""
    out = (golden / "train.out").read_text()
    lines = out.split("\n")  # not splitlines(): a carriage return does not end a line in a file
    assert max(len(line) for line in lines) <= 300, max(lines, key=len)[:400]
    assert "\r" not in out
    steps = [yaml.safe_load(line) for line in lines if line.startswith("{'loss': ")]
    assert len(steps) == 8  # 40 steps, logging_steps 5
    scored = [line for line in lines if line.startswith("score ") and " tokens in " in line]
    assert len(scored) >= 6  # each GGUF of the fine-tuned and the base model


def test_promoted_files_are_readable_by_others_and_only_what_a_consumer_needs(golden: Path):
    models = golden / "models"
    umask = os.umask(0)
    os.umask(umask)
    for p in models.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.parent.name != ".locks":
            # a release's files never change under a reader (core/releases.py); the rest is the umask's
            mode = 0o444 if p.parents[2].name == ".releases" else 0o666 & ~umask
            assert p.stat().st_mode & 0o777 == mode, p
    adapter = {p.name for p in (models / "finetuned" / "adapters" / GOLDEN_RUN).iterdir()}
    assert "adapter_model.safetensors" in adapter and "training_args.bin" not in adapter
    gguf = models / "gguf"
    assert sorted(p.name for p in gguf.iterdir() if not p.is_symlink()) == [".locks", ".releases"]
    report = json.loads((golden / "outputs" / GOLDEN_RUN / "verify.json").read_text())
    for entry in report["files"]:  # each file by the name it ships under
        assert (gguf / entry["path"]).is_file(), entry
    md = (golden / "outputs" / GOLDEN_RUN / "verify.md").read_text()
    assert f"Reference: {golden / MERGED} " in md and "\n- q8_0: kld <= 0.001\n" in md
