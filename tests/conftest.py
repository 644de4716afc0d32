"""Shared fixtures: the tiny Gemma 2 in a private HF cache, one trained and exported run (the golden run) that
tests copy before they change it, and the real CLIs, run in forks of a server that imported them once.

Session fixtures built here are built once for the whole session, also under pytest-xdist: the first worker
builds them under a lock, the others wait and reuse the folder (`shared`)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "demo" / "chat.jsonl"
DEMO_HELDOUT = ROOT / "data" / "demo" / "heldout.jsonl"
TINY_REPO = "tiny-gemma/gemma-2-tiny"
GEMMA_TEMPLATE = ROOT / "core" / "templates" / "gemma.jinja"

# One OpenMP thread team per core, not per process: under pytest-xdist every worker and every CLI it starts would
# otherwise run torch with one thread per core, and OpenMP's spinning threads, oversubscribed, made a tiny
# training run 2.3x slower on the 2-core CI box (7.8 s vs 18.3 s for the same 40 steps beside another job).
# Read by torch when it starts (workers import it later; CLI processes inherit the environment).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )


def shared(tmp_path_factory, name: str, build) -> Path:
    """A folder `build(folder)` fills once per test session, whichever worker asks first; the others wait on the
    lock and reuse it (xdist workers' base folders are siblings under one session folder)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    """A fresh HF_HOME holding only the tiny model, built through its real command."""
    return shared(tmp_path_factory, "hf_home", build_tiny_model)


# Written by the converter into tiny_gguf's file, as an export writes the run's keys (an empty value is kept too).
TINY_GGUF_KEYS = {"finetune.run_name": "t", "finetune.adapter_sha256": ""}


@pytest.fixture(scope="session")
def tiny_gguf(hf_home: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny model's folder with the chat template we ship, its f32 GGUF with TINY_GGUF_KEYS), converted once."""

    def build(work: Path) -> None:
        from convert.llamacpp import convert_hf_to_gguf
        from core.hub import resolve_model

        shutil.copytree(resolve_model(TINY_REPO, hf_home=hf_home).path, work / "model")
        shutil.copyfile(GEMMA_TEMPLATE, work / "model" / "chat_template.jinja")
        convert_hf_to_gguf(work / "model", work / "t.f32.gguf", "f32", metadata=TINY_GGUF_KEYS)

    work = shared(tmp_path_factory, "tiny_gguf", build)
    return work / "model", work / "t.f32.gguf"


# The golden run: the demo's shape at a test's size. Trained for 40 steps and exported (f16, q8_0 as the default,
# q4_k_m, the base model, the adapter GGUF), with every path relative to its workspace.
GOLDEN_RUN = "golden"
GOLDEN_STEPS = 40


def golden_config(**sections) -> dict:
    cfg = {
        "run_name": GOLDEN_RUN,
        "model": {"name_or_path": TINY_REPO, "dtype": "float32"},
        "data": {"train_files": [str(DEMO_DATA)], "max_seq_length": 128},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "training": {
            "max_steps": GOLDEN_STEPS,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "warmup_steps": 4,
            "logging_steps": 5,
            "save_steps": 20,
            "report_to": [],
            "seed": 7,
        },
        "export": {"quants": ["f16", "q8_0", "q4_k_m"], "default_quant": "q8_0", "gguf_dir": "models/gguf"},
        "verify": {"heldout_files": [str(DEMO_HELDOUT)], "max_heldout_records": 4},
        "paths": {"output_dir": "outputs", "models_dir": "models"},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


@pytest.fixture(scope="session")
def golden(cli, tmp_path_factory) -> Path:
    """The golden run's workspace (config.yaml, outputs/, models/): read it, never change it (`workspace` copies)."""

    def build(ws: Path) -> None:
        (ws / "config.yaml").write_text(yaml.safe_dump(golden_config(), sort_keys=False))
        res = cli.run("train", ["--config", "config.yaml"], ws)
        (ws / "train.out").write_text(res.stdout + res.stderr)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    return shared(tmp_path_factory, "golden", build)


@pytest.fixture
def workspace(golden: Path, tmp_path: Path) -> Path:
    """A copy of the golden run's workspace, the test's to change."""
    return copy_workspace(golden, tmp_path / "ws")


def copy_workspace(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)  # the live names and pointers are relative symlinks
    return dst


@pytest.fixture(scope="session")
def cli(hf_home: Path, tmp_path_factory):
    """The real CLIs, each call a fork of a server that imported them once (CliServer)."""
    server = CliServer(hf_home, ROOT, tmp_path_factory.mktemp("cli_output"))
    yield server
    server.close()


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """torch.compile through AOTAutograd without code generation (backend "aot_eager"): what is ours to check on
    CPU (the graphs dynamo captures, recompiles, autograd through them, masks and score functions) without
    inductor building C++ kernels that no production run uses (a GPU compiles Triton kernels; the gpu tests do).
    Building them took these tests 50 s on a fresh clone, where no kernel is cached yet (12 s without)."""
    import torch
    from transformers.integrations.flex_attention import WrappedFlexAttention

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kw: compile_(*args, **{"backend": "aot_eager", **kw}))
    # transformers keeps the flex_attention it compiled first, for the process: not the one compiled here
    monkeypatch.setattr(WrappedFlexAttention, "_instance", None)


@pytest.fixture(scope="module")
def tok(hf_home: Path):
    """The tiny model's tokenizer with the chat template we ship, loaded from the HF cache like a run does."""
    from transformers import AutoTokenizer

    from core.hub import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(TINY_REPO, hf_home=hf_home).path))
    tokenizer.chat_template = GEMMA_TEMPLATE.read_text(encoding="utf-8")
    return tokenizer


def build_tiny_model(home: Path) -> Path:
    """`python -m scripts.tiny_model --hf-home home`, as a user runs it; returns home."""
    subprocess.run(
        [sys.executable, "-m", "scripts.tiny_model", "--hf-home", str(home), "--data", str(DEMO_DATA)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env=cli_env(home),
    )
    return home


def bench_module(name: str) -> ModuleType:
    """bench/<name>.py imported as module <name> (the bench scripts are files, not a package); registered in
    sys.modules: dataclasses look their module up by name."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cli_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TORCH_HOME", "TENSORBOARD"))}
    env.update(
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
        HF_DATASETS_CACHE=str(hf_home / "datasets"),
    )
    return env


def run_cli(
    module: str, args: list[str], cwd: Path, hf_home: Path, timeout: float = 600, **popen
) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` the way a user does; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(hf_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


class CliServer:
    """`run_cli` for many short commands: tests/support/cli_server.py imports both CLIs once and runs each
    command's real main() in a fork of itself (own process, working directory, stdout/stderr, exit status)."""

    def __init__(self, hf_home: Path, cwd: Path, scratch: Path):
        self.scratch = scratch
        self.count = 0
        self.detached = None  # a command started detached whose reply is still to come (tests/support/processes.py)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.cli_server"],
            cwd=cwd,
            env=cli_env(hf_home),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self,
        module: str,
        args: list[str],
        cwd: Path,
        timeout: float = 600,
        kill_at: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """`python -m <module> <args>` in cwd, with `env` added to its environment; kill_at: SIGKILL it at that
        promotion point (cli_server.py)."""
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        request = {"module": module, "args": args, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.send(request | {"kill_at": kill_at, "env": env or {}, "timeout": timeout})
        rc = self.reply()["returncode"]
        return subprocess.CompletedProcess([module, *args], rc, out.read_text(), err.read_text())

    def send(self, request: dict) -> None:
        """One request; a detached command still running (a test that failed before it ended) is killed first: the
        server serves one command at a time."""
        if self.detached is not None:
            self.detached.kill()
            self.detached.wait()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the CLI server died (exit {self.proc.wait()})"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def small_config(workdir: Path, **sections) -> Path:
    """A config for the tiny model with every path inside workdir; `sections` update it (nested dicts)."""
    cfg = {
        "run_name": "t",
        "model": {"name_or_path": TINY_REPO, "dtype": "float32"},
        "data": {"train_files": [str(DEMO_DATA)], "max_seq_length": 128},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "training": {
            "max_steps": 8,
            "per_device_train_batch_size": 4,
            "learning_rate": 3e-3,
            "logging_steps": 2,
            "save_steps": 4,
            "report_to": [],
            "seed": 7,
        },
        "export": {"enabled": False, "gguf_dir": str(workdir / "models" / "gguf")},
        "verify": {"heldout_files": [str(DEMO_HELDOUT)], "max_heldout_records": 4},
        "paths": {"output_dir": str(workdir / "outputs"), "models_dir": str(workdir / "models")},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
