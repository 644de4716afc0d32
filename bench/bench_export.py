"""Export at the real model's scale: `python -m convert export` against the plain, unverified route, in one run.

    python bench/bench_export.py [--only plain|ours] [--keep] [--workdir DIR] [--out FILE] [--rebuild]
                                 [--memory-limit SIZE]

The model: google/gemma-2-2b's exact architecture (26 layers, hidden 2304, intermediate 9216, 8 heads, 4 KV heads,
head_dim 256, vocab 256000, softcaps 50/30, sliding window 4096, tied embeddings; 2.6B parameters) with seeded
random weights in bf16 safetensors and the tiny model's tokenizer (scripts/tiny_model.py; its ids fit the 256k vocab).
It is a real Hugging Face cache entry, built once (~1-2 min, 5.2 GB) and reused:

    ~/.cache/gemma-lora-bench/hub/models--bench--gemma-2-2b-random      (HF_HOME=~/.cache/gemma-lora-bench,
                                                                         repo id bench/gemma-2-2b-random)

The adapter: a run folder made by `python -m train` on that model (bf16 on the CPU, configs/gemma2b_lora.yaml's
LoRA r=16 on every linear layer, 2 steps at lr 1e-3 so that LoRA B is not zero, export disabled), cached under
~/.cache/gemma-lora-bench/runs/<model revision>-<training key>/; the bench checks that its delta changes the
weights. GEMMA_LORA_BENCH_CACHE moves the cache; --rebuild makes both again.

Each stage runs in its own process (tree); the bench measures it from outside:
- wall: seconds from start to exit;
- peak RSS: the sum of RSS over the stage's whole process tree (psutil, children recursive), sampled every
  0.2 s (a shorter spike can be missed); "anon" is the same sum less file-backed shared pages (mmapped weights);
- written: write_bytes of the tree from the kernel's I/O accounting (os.wait4's rusage ru_oublock x 512: the
  stage and every descendant it waited for). Pages are counted when dirtied, so an intermediate that is
  written and deleted counts too; "left" is what the route's output folder holds at the end, "peak disk" its
  largest size seen (sampled every second).
Routes:
- plain (no verification): PEFT merge_and_unload in bf16 + save_pretrained (one process); the vendored
  convert_hf_to_gguf.py --outtype f16 (convert/llamacpp.py tree()); quantize Q4_K_M and Q8_0 from the f16 file
  with the quantizer our export uses (named in the output), token_embd as the production config sets it;
- ours: `python -m convert export --config configs/gemma2b_lora.yaml` on a copy of the cached run folder, with
  export.export_base=false (the fine-tuned export only) and the paths moved into the workdir; whatever the
  export is today: its verify.json (scored tokens and gates per file, imatrix comparison if present) is printed.
- scores (with --scores, after ours): the nightly job's scores of the exported model on an eval set its verification
  did not score (data/demo/heldout.jsonl), the costly case: train.nightly.scores.score_model streams the HF model
  (convert/score.py) beside the default GGUF. Issue 21's target: its peak tree RSS no higher than ours' export's.
Targets (issue 10): ours/plain wall <= 1.0x; ours peak RSS <= 4 GiB and <= 0.75x plain; written <= 1.2x plain.
With --only, the other route's numbers come from the earlier run recorded in --out (said so in the output).
With --memory-limit, each route runs in a fresh memory cgroup of that size (as `docker run --memory`): the result
is whether it completes (OOM kills counted) and the cgroup's peak charge; no ratios when a route does not complete.
2026-11-28, 2-core box: at 4 GiB ours completed in 670 s (every gate passed) and plain's merge was OOM-killed.
Needs ~35 GB of free disk in the workdir and ~16 GiB of RAM. Time on a quiet 2-core box: the plain route ~2.5 min,
our export ~15 min (902 s on 2026-12-07 with the merge check, 2,052 positions scored per file); ~18 min for both,
model and adapter cached. Every long stage prints progress.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.tiny_model import GEMMA_2_2B_CONFIG  # noqa: E402
from train.__main__ import memory_size  # noqa: E402 (the repository root is on the path from here)

CACHE = Path(os.environ.get("GEMMA_LORA_BENCH_CACHE") or Path.home() / ".cache" / "gemma-lora-bench")
REPO_ID = "bench/gemma-2-2b-random"
PRODUCTION = ROOT / "configs" / "gemma2b_lora.yaml"
TRAIN_DATA = ROOT / "data" / "demo" / "chat.jsonl"
RUN_NAME = "bench-export"
SEED = 0
GiB = 1 << 30

GEMMA_2_2B: dict[str, Any] = GEMMA_2_2B_CONFIG  # saved as bf16 here (the hub's file says float32)
SHARD_BYTES = 2 * GiB  # the hub's gemma-2-2b is sharded too (3 files)
ROWS_PER_CHUNK = 4096  # random init is generated and written this many rows at a time

# python -m train on the cached model: production LoRA (r=16, all linear layers), a real but tiny training.
TRAIN_SETTINGS = [
    "model.dtype=bfloat16",
    "model.device=cpu",
    "model.attn_implementation=eager",
    f"data.train_files=[{{path: {TRAIN_DATA}, max_samples: 4}}]",
    "data.max_seq_length=64",
    "data.max_invalid_fraction=0.5",  # a record cut to 64 tokens may keep no assistant token
    "training.max_steps=2",
    "training.per_device_train_batch_size=1",
    "training.gradient_accumulation_steps=1",
    "training.learning_rate=1.0e-3",  # LoRA B starts at 0: two Adam steps at 1e-3 make a delta bf16 can see
    "training.lr_scheduler_type=constant",
    "training.warmup_steps=0",
    "training.optim=adamw_torch",
    "training.activation_checkpointing=false",
    "training.logging_steps=1",
    "training.save_steps=100",
    "training.report_to=[]",
]

TARGETS = {"wall": 1.0, "rss_gib": 4.0, "rss": 0.75, "written": 1.2}


# --------------------------------------------------------------------------------------------------------------
# Measuring a stage from outside


@dataclass
class Stage:
    route: str
    name: str
    seconds: float = 0.0
    peak_rss: int = 0  # bytes, sum over the process tree
    peak_anon: int = 0  # the same less file-backed shared pages
    written: int = 0  # write_bytes of the tree (kernel I/O accounting)
    cpu_seconds: float = 0.0
    peak_disk: int = 0  # largest size of the watched folder during the stage
    peak_cgroup: int = 0  # with --memory-limit: the route's cgroup charge (RSS + page cache), peak while it ran
    oom_kills: int = 0  # with --memory-limit: processes the kernel killed for the limit during the stage
    load: float = 0.0  # mean 1-minute load average while it ran: above the CPU count, other work inflated the wall
    returncode: int = 0
    log: str = ""


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of RSS less shared file pages) over pid and all its descendants; (0, 0) once it is gone."""
    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return 0, 0
    rss = anon = 0
    for p in procs:
        try:
            m = p.memory_info()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        rss += m.rss
        anon += m.rss - getattr(m, "shared", 0)
    return rss, anon


def folder_size(path: Path | None) -> int:
    """Bytes of the regular files under path (symlinks not followed); 0 when it does not exist."""
    if path is None or not path.exists():
        return 0
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except FileNotFoundError:  # removed while we walk
                continue
            if not os.path.islink(os.path.join(dirpath, f)):
                total += st.st_size
    return total


class LogTail:
    """Echo a stage's log as it grows: complete lines only, a progress bar's redraws (\\r) as their last state,
    a line equal to the one before skipped."""

    def __init__(self, path: Path, prefix: str):
        self.file, self.prefix, self.buffer, self.last = open(path, errors="replace"), prefix, "", ""  # noqa: SIM115

    def echo(self, elapsed: float, final: bool = False) -> None:
        self.buffer += self.file.read()
        *lines, self.buffer = self.buffer.split("\n")
        if final:
            lines, self.buffer = [*lines, self.buffer], ""
        for raw in lines:
            line = raw.split("\r")[-1].rstrip()
            if line and line != self.last:
                print(f"  {self.prefix} {elapsed:6.0f}s | {line[:150]}", flush=True)
                self.last = line

    def close(self) -> None:
        self.file.close()


def sample_memory(stage: Stage, pid: int, cgroup: MemoryLimit | None) -> int:
    """One sample of the tree's RSS (returned) and anonymous RSS, and of the cgroup's charge, into the peaks."""
    rss, anon = tree_memory(pid)
    stage.peak_rss, stage.peak_anon = max(stage.peak_rss, rss), max(stage.peak_anon, anon)
    if cgroup:
        stage.peak_cgroup = max(stage.peak_cgroup, cgroup.usage())
    return rss


def run_stage(
    route: str,
    name: str,
    cmd: list[str],
    *,
    log_path: Path,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    watch: Path | None = None,
    echo: bool = False,
    interval: float = 0.2,
    heartbeat: float = 30.0,
    check: bool = True,
    cgroup: MemoryLimit | None = None,
) -> Stage:
    """Run cmd as its own process tree (own session) and measure it; output goes to log_path (echoed if asked).

    A non-zero exit stops the bench (SystemExit with the log's end) unless check is false. With cgroup, the stage
    runs in that memory cgroup and its charge is sampled with the RSS."""
    stage = Stage(route, name, log=str(log_path))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{route}/{name}] {' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}  (log: {log_path})", flush=True)
    with open(log_path, "w") as out:
        tail = LogTail(log_path, f"[{route}/{name}]") if echo else None
        t0 = time.perf_counter()
        ooms_before = cgroup.oom_kills() if cgroup else 0
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=cgroup.join if cgroup else None,  # noqa: PLW1509 (the bench runs no threads)
        )
        last_beat = last_disk = t0
        loads: list[float] = []
        try:
            while True:
                done, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if done == proc.pid:
                    break
                now = time.perf_counter()
                rss = sample_memory(stage, proc.pid, cgroup)
                if now - last_disk >= 1.0:
                    stage.peak_disk, last_disk = max(stage.peak_disk, folder_size(watch)), now
                    loads.append(os.getloadavg()[0])
                if tail:
                    tail.echo(now - t0)
                if now - last_beat >= heartbeat:
                    print(
                        f"  [{route}/{name}] {now - t0:6.0f}s: tree RSS {rss / GiB:.2f} GiB "
                        f"(peak {stage.peak_rss / GiB:.2f} GiB)",
                        flush=True,
                    )
                    last_beat = now
                time.sleep(interval)
        except BaseException:  # Ctrl-C or an error here: stop the whole stage, then go on raising
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        finally:
            if tail:
                tail.echo(time.perf_counter() - t0, final=True)
                tail.close()
        stage.seconds = time.perf_counter() - t0
        stage.load = sum(loads) / len(loads) if loads else os.getloadavg()[0]
        proc.returncode = stage.returncode = os.waitstatus_to_exitcode(status)
    stage.written = usage.ru_oublock * 512  # Linux reports write_bytes / 512 here
    stage.cpu_seconds = usage.ru_utime + usage.ru_stime
    stage.peak_disk = max(stage.peak_disk, folder_size(watch))
    stage.oom_kills = cgroup.oom_kills() - ooms_before if cgroup else 0
    limited = f", cgroup peak {stage.peak_cgroup / GiB:.2f} GiB, OOM kills {stage.oom_kills}" if cgroup else ""
    print(
        f"[{route}/{name}] exit {stage.returncode} after {stage.seconds:.1f} s: peak tree RSS "
        f"{stage.peak_rss / GiB:.2f} GiB, written {stage.written / 1e9:.2f} GB, load {stage.load:.1f}{limited}",
        flush=True,
    )
    if stage.returncode != 0 and check:
        tail_lines = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{route}/{name} failed (exit {stage.returncode}); end of {log_path}:\n{tail_lines}")
    return stage


class MemoryLimit:
    """A memory cgroup with a hard limit that a route's stages run in: what `docker run --memory` does.

    The kernel charges a cgroup for its processes' anonymous memory and for the page cache they bring in (mapped
    weights, files written); at the limit it first reclaims clean page cache (a mapped GGUF is re-read from disk),
    then kills (OOM). So a route either completes under the limit or ends with exit 137 and an oom_kill count.
    Made under this process's own cgroup (v1 `memory` hierarchy or v2 unified); needs root. Page cache charged
    earlier to another cgroup (a file read before) is not charged again, so the caches are dropped first."""

    def __init__(self, name: str, limit: int):
        # /proc/self/cgroup lines are "id:controllers:path"; v1 names the memory controller, v2 has "0::path"
        own = {c: path.strip().lstrip("/") for _, c, path in (x.split(":", 2) for x in open_lines("/proc/self/cgroup"))}
        v1 = Path("/sys/fs/cgroup/memory")
        self.v1 = v1.is_dir() and "memory" in own
        if self.v1:
            self.path, files = v1 / own["memory"] / name, ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            self.path, files = Path("/sys/fs/cgroup") / own.get("", "") / name, ("memory.max", "memory.current")
        self.limit_file, self.usage_file = (self.path / f for f in files)
        try:
            self.path.mkdir(exist_ok=True)
            self.limit_file.write_text(str(limit))
        except OSError as e:
            raise SystemExit(
                f"--memory-limit: cannot make the memory cgroup {self.path} ({e}); it needs root and a cgroup "
                f"hierarchy with the memory controller (v2: enabled in the parent's cgroup.subtree_control)"
            ) from None
        self.limit = limit

    def join(self) -> None:
        """Move the calling process into the cgroup (a child, before exec: Popen's preexec_fn)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> int:
        return int(self.usage_file.read_text())

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.v1 else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        with contextlib.suppress(OSError):  # still busy: left for the next run (mkdir exist_ok)
            self.path.rmdir()


def open_lines(path: str) -> list[str]:
    return Path(path).read_text().splitlines()


def drop_page_cache() -> None:
    """Write dirty pages back and drop the clean page cache, so that a route under a memory limit is charged for
    every file page it touches (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


# --------------------------------------------------------------------------------------------------------------
# Routes, totals, targets


def route_total(stages: list[Stage], left: int) -> dict[str, Any]:
    """A route's numbers: stages run one after another, so wall and written add up and the peak is the largest."""
    return {
        "seconds": sum(s.seconds for s in stages),
        "peak_rss": max((s.peak_rss for s in stages), default=0),
        "peak_anon": max((s.peak_anon for s in stages), default=0),
        "written": sum(s.written for s in stages),
        "cpu_seconds": sum(s.cpu_seconds for s in stages),
        "peak_disk": max((s.peak_disk for s in stages), default=0),
        "peak_cgroup": max((s.peak_cgroup for s in stages), default=0),
        "oom_kills": sum(s.oom_kills for s in stages),
        "completed": all(s.returncode == 0 for s in stages),
        "load": sum(s.load * s.seconds for s in stages) / max(sum(s.seconds for s in stages), 1e-9),
        "left": left,
        "stages": [asdict(s) for s in stages],
    }


@dataclass
class Check:
    what: str
    value: float
    target: float
    unit: str  # "x" for a ratio ours/plain, "GiB" for an absolute size

    @property
    def met(self) -> bool:
        return self.value <= self.target

    def line(self) -> str:
        v = f"{self.value:.2f}{self.unit}" if self.unit == "x" else f"{self.value:.2f} {self.unit}"
        target = f"{self.target:g}{self.unit}" if self.unit == "x" else f"{self.target:g} {self.unit}"
        return f"{self.what:<28}{v:>10}   target <= {target:<8} {'met' if self.met else 'MISSED'}"


def checks(plain: dict[str, Any], ours: dict[str, Any]) -> list[Check]:
    """The issue's targets for ours against plain (each a ratio ours/plain, and the absolute RSS bound)."""

    def ratio(key: str) -> float:
        return ours[key] / plain[key] if plain[key] else math.inf

    return [
        Check("wall (ours/plain)", ratio("seconds"), TARGETS["wall"], "x"),
        Check("peak tree RSS (ours)", ours["peak_rss"] / GiB, TARGETS["rss_gib"], "GiB"),
        Check("peak tree RSS (ours/plain)", ratio("peak_rss"), TARGETS["rss"], "x"),
        Check("written (ours/plain)", ratio("written"), TARGETS["written"], "x"),
    ]


def table(routes: dict[str, dict[str, Any]]) -> str:
    """One row per stage and one per route total."""
    head = f"{'route':<7}{'stage':<10}{'wall s':>8}{'cpu s':>8}{'peak RSS':>11}{'anon':>10}{'written':>10}"
    head += f"{'peak disk':>11}{'load':>6}{'left':>9}"
    rows = [head, "-" * len(head)]
    for route, total in routes.items():
        for s in total["stages"] + [total | {"name": "TOTAL", "route": route}]:
            left = f"{s['left'] / 1e9:>6.2f} GB" if s["name"] == "TOTAL" else ""
            load = f"{s['load']:.1f}" if "load" in s else "-"  # not recorded by older runs
            rows.append(
                f"{route:<7}{s['name']:<10}{s['seconds']:>8.1f}{s['cpu_seconds']:>8.0f}"
                f"{s['peak_rss'] / GiB:>7.2f} GiB{s['peak_anon'] / GiB:>6.2f} GiB{s['written'] / 1e9:>7.2f} GB"
                f"{s['peak_disk'] / 1e9:>8.2f} GB{load:>6}{left}"
            )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------------
# verify.json: scored tokens, gates, imatrix


def _find(obj: Any, pred, path: str = "") -> list[tuple[str, Any]]:
    """(json path, value) of every key under obj for which pred(key) holds."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else str(k)
            if pred(str(k)):
                found.append((p, v))
            found += _find(v, pred, p)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _find(v, pred, f"{path}[{i}]")
    return found


SCORED_KEYS = ("scored_tokens", "positions", "tokens_scored", "n_tokens")


def verify_summary(report: dict[str, Any]) -> list[str]:
    """Per file: scored tokens and every gate; then whatever the report says about an importance matrix."""
    lines = [f"verify.json: passed={report.get('passed')}"]
    for f in report.get("files", []):
        m = f.get("measures", {})
        scored = next((m[k] for k in SCORED_KEYS if k in m), None)
        scored_text = f"{scored:,}" if isinstance(scored, int | float) else "not reported"
        lines.append(f"  {Path(str(f.get('path', '?'))).name} [{f.get('quant')}]: scored tokens {scored_text}")
        for g in f.get("gates", []):
            value, threshold = g.get("value"), g.get("threshold")
            shown = f"{value:.3g}" if isinstance(value, float) else str(value)
            limit = f" (gate {threshold:g})" if isinstance(threshold, float) else ""
            lines.append(f"      {g.get('name'):<18}{shown:>12}{limit}  {'ok' if g.get('passed') else 'FAIL'}")
    lines += imatrix_lines(report)
    return lines


def imatrix_lines(report: dict[str, Any]) -> list[str]:
    """The imatrix q4_k_m / plain q4_k_m KLD ratio if verify.json has one (or both KLDs), else what it has."""
    hits = _find(report, lambda k: "imatrix" in k.lower())
    files = report.get("files", [])
    with_im = [f for f in files if "imatrix" in json.dumps(f).lower() and f.get("quant") == "q4_k_m"]
    leaves = [(lp, lv) for p, v in hits for lp, lv in [(p, v), *_find(v, lambda k: True, p)]]
    ratio = [(p, v) for p, v in leaves if "ratio" in p.lower() and isinstance(v, int | float)]
    if ratio:
        return [f"imatrix: {p} = {v:.3f}" for p, v in ratio]
    if not hits and not with_im:
        return ["imatrix: not in verify.json"]
    out = [f"imatrix: {p} = {json.dumps(v)[:200]}" for p, v in hits]
    plain_q4 = [f for f in files if f.get("quant") == "q4_k_m" and f not in with_im]
    if with_im and plain_q4:
        a, b = with_im[0].get("measures", {}).get("kld"), plain_q4[0].get("measures", {}).get("kld")
        if a and b:
            out.append(f"imatrix q4_k_m KLD {a:.4g} vs plain q4_k_m {b:.4g}: ratio {a / b:.3f} (target < 1)")
    return out


# --------------------------------------------------------------------------------------------------------------
# Stage bodies that run in a child process (hidden flags of this script)


def build_model(out: Path, seed: int) -> None:
    """Write the full-shape random Gemma 2 into the staging folder out: config, shards, index, tokenizer.

    Streams: every tensor is generated ROWS_PER_CHUNK rows at a time (seeded per tensor) and written straight into
    its shard, so memory stays at one chunk whatever the model's size. Init as transformers' Gemma 2: normal(0,
    initializer_range) for linear and embedding weights (the pad row zero), zeros for the RMSNorms (1-centred).
    """
    import torch  # noqa: PLC0415 (runs in its own process: the bench itself never imports torch)
    from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig  # noqa: PLC0415

    from core.hub import resolve_model  # noqa: PLC0415
    from scripts.tiny_model import TINY_REPO_ID, TURN_MARKER_IDS  # noqa: PLC0415

    config = Gemma2Config(**GEMMA_2_2B, dtype="bfloat16")
    config.architectures = ["Gemma2ForCausalLM"]
    with torch.device("meta"):
        shapes = [(n, list(p.shape)) for n, p in Gemma2ForCausalLM(config).named_parameters()]  # tied: no lm_head
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * 2
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_random_shard(out / file, shard, seed, config.initializer_range, torch)
        weight_map |= {name: file for name, _ in shard}
        print(f"  wrote {file} ({len(shard)} tensors)", flush=True)
    total = sum(math.prod(s) * 2 for _, s in shapes)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(str(out))
    GenerationConfig(
        bos_token_id=2, eos_token_id=[1, TURN_MARKER_IDS["<end_of_turn>"]], pad_token_id=0
    ).save_pretrained(str(out))
    tiny = resolve_model(TINY_REPO_ID, hf_home=ROOT / "models" / ".cache" / "huggingface").path
    for p in tiny.iterdir():
        if p.name.startswith("tokenizer") or p.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copyfile(p, out / p.name)
    print(f"  {sum(math.prod(s) for _, s in shapes):,} parameters in {len(shards)} shards", flush=True)


def _write_random_shard(path: Path, tensors: list[tuple[str, list[int]]], seed: int, std: float, torch) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, shape in tensors:
            tensor_seed = seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
            gen = torch.Generator().manual_seed(tensor_seed)
            rows, cols = shape[0], math.prod(shape[1:])
            for start in range(0, rows, ROWS_PER_CHUNK):
                n = min(ROWS_PER_CHUNK, rows - start)
                if "norm" in name:
                    chunk = torch.zeros(n, cols, dtype=torch.bfloat16)
                else:
                    chunk = (torch.randn(n, cols, generator=gen) * std).to(torch.bfloat16)
                    if name.endswith("embed_tokens.weight") and start == 0:
                        chunk[GEMMA_2_2B["pad_token_id"]] = 0
                f.write(chunk.view(torch.uint8).numpy().tobytes())


def check_adapter(run_dir: Path, base_dir: Path) -> None:
    """Print how much the adapter changes the base: every LoRA B must be non-zero, and the merged bf16 weights must
    differ from the base's (else the bench would time a merge that does nothing)."""
    import torch  # noqa: PLC0415 (child process)
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    from convert.merge import Merge  # noqa: PLC0415

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b_norms = [float(v.float().norm()) for k, v in weights.items() if ".lora_B." in k]
    zero = sum(n == 0 for n in b_norms)
    merge = Merge(run_dir / "adapter")
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    changed = []
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.25.mlp.down_proj.weight"):
        with safe_open(str(base_dir / index[name]), framework="pt") as st:
            base = st.get_tensor(name)
        merged = merge.weight(name, base)
        changed.append(f"{name}: {(merged != base).float().mean().item():.1%} of bf16 weights changed")
    print(
        f"adapter: {len(b_norms)} LoRA B matrices, {zero} all zero, |B| from {min(b_norms):.3g} to {max(b_norms):.3g}; "
        + "; ".join(changed),
        flush=True,
    )
    if zero or not b_norms or torch.tensor(b_norms).min() == 0:
        raise SystemExit("the adapter's LoRA B is zero somewhere: the merge would change nothing; rebuild (--rebuild)")


def plain_merge(base_dir: Path, adapter_dir: Path, out: Path) -> None:
    """The plain route's merge: PEFT on the bf16 model, merge_and_unload, save_pretrained, tokenizer files copied."""
    import torch  # noqa: PLC0415 (child process)
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(str(out))
    for p in adapter_dir.iterdir():  # the converter reads tokenizer.model; the chat template rides along
        if p.name.startswith("tokenizer") or p.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copyfile(p, out / p.name)


# --------------------------------------------------------------------------------------------------------------
# The cached model and run


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HOME=str(CACHE),
        HF_DATASETS_CACHE=str(CACHE / "datasets"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


def model_snapshot() -> Path | None:
    ref = CACHE / "hub" / ("models--" + REPO_ID.replace("/", "--")) / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = ref.parent.parent / "snapshots" / ref.read_text().strip()
    return snapshot if (snapshot / "model.safetensors.index.json").exists() else None


def ensure_model(rebuild: bool, logs: Path) -> Path:
    snapshot = None if rebuild else model_snapshot()
    if snapshot is not None:
        print(f"model: {REPO_ID} in {snapshot} (cached)")
        return snapshot
    tiny_home = ROOT / "models" / ".cache" / "huggingface"  # where `make tiny-model` puts it; build_model reads it
    if not (tiny_home / "hub" / "models--tiny-gemma--gemma-2-tiny").is_dir():
        subprocess.run([sys.executable, "-m", "scripts.tiny_model", "--hf-home", str(tiny_home)], cwd=ROOT, check=True)
    print(f"model: building {REPO_ID} (2.6B parameters, bf16, ~5.2 GB) into {CACHE} ...")
    run_stage(
        "setup",
        "model",
        [sys.executable, __file__, "--build-model"],
        log_path=logs / "build_model.log",
        env=child_env(),
        echo=True,
    )
    snapshot = model_snapshot()
    assert snapshot is not None, "the model build finished without a cache entry"
    return snapshot


def run_key(snapshot: Path) -> str:
    return f"{snapshot.name[:12]}-{hashlib.sha256(json.dumps(TRAIN_SETTINGS).encode()).hexdigest()[:8]}"


def run_overrides(output_dir: Path, models_dir: Path) -> list[str]:
    return [
        f"run_name={RUN_NAME}",
        f"model.name_or_path={REPO_ID}",
        *TRAIN_SETTINGS,
        f"paths.output_dir={output_dir}",
        f"paths.models_dir={models_dir}",
    ]


def ensure_run(snapshot: Path, rebuild: bool, logs: Path) -> Path:
    """The cached run folder (trained on this model revision with TRAIN_SETTINGS), made if missing."""
    home = CACHE / "runs" / run_key(snapshot)
    run_dir = home / "outputs" / RUN_NAME
    manifest = run_dir / "manifest.json"
    ok = manifest.is_file() and json.loads(manifest.read_text()).get("status") in ("exporting", "complete")
    if ok and not rebuild:
        print(f"adapter: run folder {run_dir} (cached)")
    else:
        shutil.rmtree(home, ignore_errors=True)
        print(f"adapter: python -m train on {REPO_ID} (bf16, CPU, 2 steps) into {run_dir} ...")
        cmd = [sys.executable, "-m", "train", "--config", str(PRODUCTION)]
        cmd += run_overrides(home / "outputs", home / "models") + ["export.enabled=false"]
        run_stage("setup", "train", cmd, log_path=logs / "train.log", env=child_env(), echo=True)
    run_stage(
        "setup",
        "adapter",
        [sys.executable, __file__, "--check-adapter", str(run_dir), str(snapshot)],
        log_path=logs / "check_adapter.log",
        env=child_env(),
        echo=True,
    )
    return run_dir


def quantizer() -> tuple[str, Callable[[Path, Path, str, str], list[str]]]:
    """What quantizes the plain route and its command (SRC, DST, QUANT, TOKEN_EMBD -> argv): llama-quantize of the
    pinned commit (convert/llamacpp.py), spelled as our export spells it."""
    from convert.llamacpp import quantize_tool_command  # noqa: PLC0415 (finds the pinned tree and tools)

    binary = quantize_tool_command(Path("src"), Path("dst"), "q8_0", None, None)[0]
    return (
        f"llama-quantize ({binary}; convert/llamacpp.py, built from the pinned llama.cpp tree)",
        lambda src, dst, q, te: quantize_tool_command(src, dst, q, te or None, None),
    )


# --------------------------------------------------------------------------------------------------------------
# The two routes


def run_plain(
    snapshot: Path, run_dir: Path, work: Path, logs: Path, token_embd: str, cgroup: MemoryLimit | None = None
) -> dict[str, Any]:
    """The plain route's stages; under a memory limit a stage that fails (OOM) ends the route as a result."""
    from convert.llamacpp import tree  # noqa: PLC0415 (loads the llama.cpp binding: only when needed)

    limited: dict[str, Any] = {"cgroup": cgroup, "check": cgroup is None}

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    merged, f16 = work / "merged", work / "plain.f16.gguf"
    env = child_env()
    stages = [
        run_stage(
            "plain",
            "merge",
            [sys.executable, __file__, "--plain-merge", str(snapshot), str(run_dir / "adapter"), str(merged)],
            log_path=logs / "plain_merge.log",
            env=env,
            watch=work,
            **limited,
        ),
    ]
    if stages[-1].returncode:
        return route_total(stages, folder_size(work))
    folder = tree()
    env_conv = {k: v for k, v in env.items() if k != "NO_LOCAL_GGUF"}
    stages.append(
        run_stage(
            "plain",
            "convert",
            [
                sys.executable,
                str(folder / "convert_hf_to_gguf.py"),
                str(merged),
                "--outfile",
                str(f16),
                "--outtype",
                "f16",
            ],
            log_path=logs / "plain_convert.log",
            cwd=folder,
            env=env_conv,
            watch=work,
            **limited,
        )
    )
    _, quantize = quantizer()
    for quant in ("q4_k_m", "q8_0"):
        cmd = quantize(f16, work / f"plain.{quant}.gguf", quant, token_embd)
        if stages[-1].returncode:
            break
        log_path = logs / f"plain_{quant}.log"
        stages.append(run_stage("plain", quant, cmd, log_path=log_path, env=env, watch=work, **limited))
    return route_total(stages, folder_size(work))


def run_ours(
    run_dir: Path, work: Path, logs: Path, cgroup: MemoryLimit | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    shutil.rmtree(work, ignore_errors=True)
    outputs, models = work / "outputs", work / "models"
    shutil.copytree(run_dir, outputs / RUN_NAME, ignore=shutil.ignore_patterns("checkpoints", "runs", ".lock"))
    before = folder_size(work)
    cmd = [sys.executable, "-m", "convert", "export", "--config", str(PRODUCTION)]
    cmd += run_overrides(outputs, models) + ["export.export_base=false", f"export.gguf_dir={models / 'gguf'}"]
    # not checked: a verification failure (exit 3) is a result to report, with its verify.json
    log_path = logs / "ours_export.log"
    stage = run_stage(
        "ours", "export", cmd, log_path=log_path, env=child_env(), watch=work, echo=True, check=False, cgroup=cgroup
    )
    stage.peak_disk -= before
    report_path = outputs / RUN_NAME / "verify.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return route_total([stage], folder_size(work) - before), report


def run_scores(work: Path, logs: Path) -> dict[str, Any]:
    """The nightly job's scoring of ours' published model (its merged folder and default GGUF), in a child."""
    cmd = [sys.executable, __file__, "--nightly-scores", str(work)]
    stage = run_stage("scores", "score_model", cmd, log_path=logs / "scores.log", env=child_env(), echo=True)
    return route_total([stage], 0)


def nightly_scores(work: Path) -> None:
    """--nightly-scores WORK: score_model on ours' output as a night scores a champion whose verification did not
    cover the eval set (verified=None: the HF model streamed, the GGUF run, the task checks answered)."""
    from core.config import load_config  # noqa: PLC0415 (child process)
    from core.runfolder import Layout  # noqa: PLC0415
    from train.nightly.scores import load_eval_set, score_model  # noqa: PLC0415

    overrides = run_overrides(work / "outputs", work / "models") + [
        f"export.gguf_dir={work / 'models' / 'gguf'}",
        f"nightly.eval_files=[{ROOT / 'data' / 'demo' / 'heldout.jsonl'}]",
        f"nightly.task_checks={ROOT / 'data' / 'demo' / 'nightly_tasks.jsonl'}",
        "nightly.max_new_tokens=16",
    ]
    cfg = load_config(PRODUCTION, overrides)
    layout = Layout.of(cfg)
    gguf = layout.gguf_dir / f"{cfg.export.name}.gguf"
    t0 = time.monotonic()
    scores = score_model(layout.final_model(RUN_NAME), gguf, load_eval_set(cfg), cfg, verified=None)
    shown = {k: scores[k] for k in ("hf_loss", "gguf_loss", "quant_gap", "task_accuracy", "records")}
    print(f"  scores in {time.monotonic() - t0:.0f} s: {json.dumps(shown)}", flush=True)


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_export.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", choices=["plain", "ours"], help="run one route; the other's numbers come from --out")
    parser.add_argument("--keep", action="store_true", help="keep both routes' outputs in the workdir (~35 GB)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=CACHE / "work",
        help=f"where the routes write (default "
        f"{CACHE / 'work'}; must be a disk, not tmpfs, for the written bytes to count)",
    )
    parser.add_argument("--out", type=Path, help="JSON of the numbers (default WORKDIR/bench_export.json)")
    parser.add_argument("--rebuild", action="store_true", help="build the cached model and adapter again")
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        type=memory_size,
        help="run each route in a memory cgroup of this size (4GiB, 4 = GiB), as `docker run --memory` would, and "
        "report whether it completes or is OOM-killed (root; drops the page cache before each route)",
    )
    parser.add_argument(
        "--scores",
        action="store_true",
        help="after ours, measure the nightly job's scoring of its output (peak RSS against ours' export's)",
    )
    parser.add_argument("--build-model", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nightly-scores", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--check-adapter", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plain-merge", nargs=3, type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_into_cache() -> None:
    """--build-model: stage the files, then store them the way huggingface_hub lays out a download."""
    from scripts.tiny_model import store_in_hub_cache  # noqa: PLC0415 (child process)

    staging = CACHE / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        build_model(staging, SEED)
        print("  storing in the hub cache (sha256 + blobs) ...", flush=True)
        snapshot = store_in_hub_cache(staging, CACHE / "hub", REPO_ID)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"  {REPO_ID} -> {snapshot}", flush=True)


def route_notes(route: str, total: dict[str, Any]) -> list[str]:
    """A route's outcome under a memory limit, and every stage that failed with the likely reason."""
    lines = []
    limit = total.get("memory_limit")
    if limit:
        state = "completed" if total["completed"] else f"did NOT complete ({total['oom_kills']} OOM kill(s))"
        lines.append(
            f"  {route}: under a {limit / GiB:g} GiB memory cgroup: {state}; peak charge "
            f"{total['peak_cgroup'] / GiB:.2f} GiB (RSS + page cache)"
        )
    for s in total["stages"]:
        if s["returncode"]:
            if s.get("oom_kills"):
                why = "killed: out of memory"
            else:
                why = "verification failed" if s["returncode"] == 3 else "failed"
            lines.append(f"  {route}/{s['name']} exited {s['returncode']} ({why}; see {s['log']})")
    return lines


def report(results: dict[str, Any]) -> None:
    routes = {r: results[r] for r in ("plain", "ours") if results.get(r)}
    print()
    print(f"quantizer (plain route): {results['quantizer']}")
    print(table(routes))
    for r, total in routes.items():
        if total.get("from_earlier_run"):
            print(f"  ({r}: numbers from the earlier run of {total['when']}, not measured in this run)")
        for line in route_notes(r, total):
            print(line)
    cpus = results["machine"]["cpus"] or 1
    busy = [r for r, t in routes.items() if t.get("load", 0) > cpus]
    if busy:
        print(
            f"  note: the load average was above the {cpus} CPUs during {' and '.join(busy)}: other work shared the "
            f"CPUs and inflated the walls; cpu s (the tree's own CPU time) is less affected"
        )
    if len(routes) == 2 and not all(t.get("completed", True) for t in routes.values()):
        print("\nno ratios: a route did not complete")
    elif len(routes) == 2:
        print()
        found = checks(routes["plain"], routes["ours"])
        for c in found:
            print(c.line())
        cpu = routes["ours"]["cpu_seconds"] / max(routes["plain"]["cpu_seconds"], 1e-9)
        print(f"{'cpu seconds (ours/plain)':<28}{cpu:>9.2f}x   (no target; for a busy box)")
        results["checks"] = [asdict(c) | {"met": c.met} for c in found]
    if results.get("verify"):
        print()
        print("\n".join(verify_summary(results["verify"])))


def run_route(
    route: str, snapshot: Path, run_dir: Path, workdir: Path, logs: Path, token_embd: str, limit: int | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One route's totals (and for ours its verify.json), under a fresh memory cgroup when limit is set."""
    cgroup = None
    if limit:
        drop_page_cache()
        cgroup = MemoryLimit(f"bench-export-{route}", limit)
    try:
        if route == "plain":
            return run_plain(snapshot, run_dir, workdir / "plain", logs, token_embd, cgroup), None
        return run_ours(run_dir, workdir / "ours", logs, cgroup)
    finally:
        if cgroup:
            cgroup.remove()


def child_stage(a: argparse.Namespace) -> bool:
    """Run the stage a hidden option names (the bench runs itself as each stage's process); False if none."""
    if a.build_model:
        build_into_cache()
    elif a.check_adapter:
        check_adapter(*a.check_adapter)
    elif a.plain_merge:
        plain_merge(*a.plain_merge)
    elif a.nightly_scores:
        nightly_scores(a.nightly_scores)
    else:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1")
    if child_stage(a):
        return 0
    from core.config import load_config  # noqa: PLC0415 (pydantic: not for the child stages above)

    token_embd = load_config(PRODUCTION).export.token_embedding_type or ""
    workdir = a.workdir.expanduser().resolve()
    out = a.out or workdir / "bench_export.json"
    logs = workdir / "logs"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    previous = json.loads(out.read_text()) if a.only and out.is_file() else {}
    snapshot = ensure_model(a.rebuild, logs)
    run_dir = ensure_run(snapshot, a.rebuild, logs)
    results: dict[str, Any] = {
        "when": now,
        "model": {"repo_id": REPO_ID, "snapshot": str(snapshot), "config": GEMMA_2_2B, "seed": SEED},
        "run_dir": str(run_dir),
        "quantizer": quantizer()[0],
        "token_embedding_type": token_embd,
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GiB, 1)},
    }
    for route in ("plain", "ours"):
        if a.only and a.only != route:
            if previous.get(route):
                results[route] = previous[route] | {"from_earlier_run": True, "when": previous["when"]}
                if route == "ours":
                    results["verify"] = previous.get("verify")
            continue
        limit = a.memory_limit
        print(f"\n== {route} route" + (f" (memory cgroup limit {limit / GiB:g} GiB)" if limit else ""))
        results[route], report_ = run_route(route, snapshot, run_dir, workdir, logs, token_embd, limit)
        if route == "ours":
            results["verify"] = report_
            if a.scores:
                print("\n== the nightly job's scores of ours' output")
                results["scores"] = run_scores(workdir / "ours", logs)
                ratio = results["scores"]["peak_rss"] / max(results["ours"]["peak_rss"], 1)
                print(f"scores peak RSS / ours export peak RSS: {ratio:.2f}x (target <= 1.0x)")
        results[route] |= {"when": now, "memory_limit": limit}
        if not a.keep:
            shutil.rmtree(workdir / route, ignore_errors=True)
    report(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nnumbers: {out}; logs: {logs}" + ("" if a.keep else " (route outputs removed; --keep keeps them)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
