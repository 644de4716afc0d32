"""Two ranks on the CPU (gloo) under torchrun, through the real CLI (issue 11: several GPUs; issue 24: several
machines), in one lineage that is the golden run's at 2 ranks x half its batch:

1. two "nodes" on localhost (`--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d`, one run folder on the storage
   both share), SIGTERM to rank 1 alone mid-run: both stop at the same step with one committed checkpoint;
2. one process cannot resume what two trained (refused, nothing moved);
3. the one-machine launch (`--standalone --nproc-per-node 2`) resumes both ranks to the end: a checkpoint binds the
   number of processes, not the machines. Rank 0 alone wrote the folder, the adapter and the export.

The loss curve and the step-20 adapter are the golden run's (1 process x 8 examples a step): the sampler deals one
seeded permutation's batches of 4 to the ranks in turn and the loss is normalized by the supervised tokens of both.
A second test points the two nodes at two run folders (storage they do not share): every rank refuses, nothing
trains.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from core.locks import read_holder
from tests.conftest import GOLDEN_RUN, ROOT, golden_config
from tests.support.processes import Proc, start, wait_for_step
from tests.support.snapshots import tree_snapshot
from train.checkpoint import COMMIT_FILE, verify_checkpoint

SLOW_CHILDREN = ROOT / "tests" / "support" / "slow_children"
RUN = "t"
STEPS = 40  # the golden run's


def lineage_config() -> dict:
    """The golden run at 2 ranks x 4 examples; a lighter export (one quant, no base model, no adapter GGUF): the
    export's settings do not touch the weights."""
    return golden_config(
        run_name=RUN,
        training={"per_device_train_batch_size": 4},
        export={"quants": ["q8_0"], "default_quant": "q8_0", "export_base": False, "lora_gguf": False},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(dirs: tuple[Path, Path], hf_home: Path) -> list[Proc]:
    """Each dir's `torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint localhost:PORT -m
    train --config config.yaml`, as on two machines. Which node gets rank 0 is the rendezvous' choice.
    One OpenMP thread each: the two "machines" share this one's cores (torchrun sets it for --nproc-per-node > 1)."""
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", "two-nodes"]
    launch = ["--nnodes", "2", "--nproc-per-node", "1", *rdzv, "-m", "train", "--config", "config.yaml"]
    return [start(d, hf_home, "torch.distributed.run", launch, env={"OMP_NUM_THREADS": "1"}) for d in dirs]


def rank_exit_codes(out: str) -> dict[int, int]:
    """torchrun's failure report: `rank : N (local_rank: N)` then `exitcode : C` for each rank that failed."""
    return {int(r): int(c) for r, c in re.findall(r"rank\s*:\s*(\d+) \(local_rank.*?\n\s*exitcode\s*:\s*(-?\d+)", out)}


def no_traceback_from_us(out: str) -> None:
    """torchrun prints its own traceback when a rank exits non-zero; none may come from the pipeline."""
    assert not re.search(r'File "[^"]*/(train|core|convert)/[^"]*\.py"', out), out[-4000:]


def rows(run: Path) -> dict[int, dict]:
    """metrics.jsonl's training rows by step; a step logged twice fails."""
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: r for r in logged if "loss" in r}


def expected_rows(stop: int, last: int) -> list[int]:
    """The steps logged up to `last`: every logging_steps (5), and the step the stop logged at."""
    return sorted({*range(5, last + 1, 5), stop})


def tokens_left(*folders: Path) -> list[Path]:
    """check_shared's token files, which rank 0 removes once every rank has looked."""
    return [p for f in folders for p in f.glob(".shared-*")]


def ranks_of(nodes: list[Proc]) -> dict[int, int]:
    """{rank: pid} of the training processes the launchers started."""
    ranks = {}
    for node in nodes:
        for task in Path(f"/proc/{node.pid}/task").iterdir():
            for pid in map(int, (task / "children").read_text().split()):
                environ = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
                env = dict(kv.split("=", 1) for kv in environ if "=" in kv)
                ranks[int(env["RANK"])] = pid
    return ranks


@dataclass
class Stopped:
    work: Path
    step: int  # the step both ranks stopped after
    out: dict[int, str]  # the output of each rank's node
    exit_codes: dict[int, int]  # each rank's, from its torchrun's failure report


@pytest.fixture(scope="module")
def stopped(hf_home: Path, tmp_path_factory) -> Stopped:
    """Part 1: two nodes on one shared run folder, SIGTERM to rank 1 only once step 5 is logged. Rank 0 learns of
    it through the all-reduce at the next step boundary. Read-only: the next parts copy it."""
    work = tmp_path_factory.mktemp("two_nodes")
    (work / "config.yaml").write_text(yaml.safe_dump(lineage_config(), sort_keys=False))
    nodes = two_nodes((work, work), hf_home)
    wait_for_step(nodes[0], work / "outputs" / RUN / "metrics.jsonl", 5)
    ranks = ranks_of(nodes)
    assert set(ranks) == {0, 1}
    os.kill(ranks[1], signal.SIGTERM)  # to the training process alone, not to its launcher
    for node in nodes:
        node.popen.wait(timeout=300)
    outs = [node.output() for node in nodes]
    assert [node.popen.returncode for node in nodes] == [1, 1], outs  # torchrun's own status when a rank fails
    codes = {rank: code for out in outs for rank, code in rank_exit_codes(out).items()}
    manifest = json.loads((work / "outputs" / RUN / "manifest.json").read_text())
    by_rank = {rank: out for out in outs for rank in rank_exit_codes(out)}
    return Stopped(work, manifest["stopped"]["after_step"], by_rank, codes)


def test_sigterm_to_one_node_stops_both_with_one_committed_checkpoint(stopped: Stopped):
    step, run = stopped.step, stopped.work / "outputs" / RUN
    assert stopped.exit_codes == {0: 143, 1: 143}, stopped.out  # what `python -m train` exits with on SIGTERM
    for out in stopped.out.values():
        no_traceback_from_us(out)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stopped"]["reason"] == "SIGTERM", manifest["stopped"]
    assert 5 < step < 20 and manifest["stopped"]["last_committed_checkpoint"] == f"checkpoint-{step}"
    assert f"stopped by SIGTERM after step {step}; checkpoint-{step} is committed" in stopped.out[0]
    assert f"rank 1: stopped by SIGTERM after step {step}; checkpoint-{step} is committed" in stopped.out[1]
    ckpt = run / "checkpoints" / f"checkpoint-{step}"
    assert [p.name for p in (run / "checkpoints").iterdir()] == [ckpt.name] and (ckpt / COMMIT_FILE).is_file()
    assert verify_checkpoint(ckpt, world_size=2) == [], "both ranks' RNG states, from both nodes"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    assert list(rows(run)) == expected_rows(step, step)
    assert read_holder(run / ".lock") == {}
    assert tokens_left(run, stopped.work / "models") == []


def test_one_process_cannot_resume_what_two_trained(stopped: Stopped, cli, tmp_path: Path):
    """The global batch would change: refused before anything is loaded, nothing moved aside."""
    work = shutil.copytree(stopped.work, tmp_path / "work")
    before = tree_snapshot(work)
    single = cli.run("train", ["--config", "config.yaml"], work)
    assert single.returncode == 2, single.stdout[-3000:] + single.stderr[-3000:]
    assert f"checkpoint-{stopped.step} was trained by 2 process(es) and this run has 1" in single.stderr
    assert "torchrun --nproc-per-node 2 -m train" in single.stderr
    assert tree_snapshot(work) == before


@pytest.fixture(scope="module")
def resumed(stopped: Stopped, hf_home: Path, tmp_path_factory) -> tuple[Path, str, list[str]]:
    """Part 3, on a copy: `torchrun --standalone --nproc-per-node 2 -m train --config config.yaml` to the end and
    through the export; (work folder, torchrun's output, the pid of each llama.cpp conversion)."""
    work = shutil.copytree(stopped.work, tmp_path_factory.mktemp("resumed") / "work")
    pids = work / "pids"  # the test hook records every convert_hf_to_gguf.py child, at once (0 s delay)
    hook = {"TEST_SLOW_CHILD": "0", "TEST_SLOW_CHILD_KIND": "convert", "TEST_SLOW_CHILD_PIDS": str(pids)}
    launch = ["--standalone", "--nproc-per-node", "2", "-m", "train", "--config", "config.yaml"]
    proc = start(work, hf_home, "torch.distributed.run", launch, env=hook, path_first=SLOW_CHILDREN)
    proc.popen.wait(timeout=600)
    assert proc.popen.returncode == 0, proc.output()[-4000:]
    return work, proc.output(), pids.read_text().split() if pids.is_file() else []


def test_the_one_machine_launch_resumes_both_ranks_to_the_end(stopped: Stopped, resumed):
    work, out, _ = resumed
    run = work / "outputs" / RUN
    assert f"resuming from checkpoint-{stopped.step}" in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["training"]["global_step"] == STEPS
    assert manifest["training"]["resumed_from"] == f"checkpoint-{stopped.step}"
    assert list(rows(run)) == expected_rows(stopped.step, STEPS), "each step logged once"
    # each checkpoint holds both ranks' RNG states and verifies for a 2-rank resume (save_total_limit keeps 3)
    kept = sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in kept] == [f"checkpoint-{s}" for s in (stopped.step, 20, STEPS)]
    assert all(verify_checkpoint(p, world_size=2) == [] for p in kept)


def test_rank0_alone_writes_the_folder_the_adapter_and_the_export(resumed):
    work, out, conversions = resumed
    run = work / "outputs" / RUN
    # one export: one llama.cpp conversion (the merged model's), one summary, one GGUF promoted
    assert len(conversions) == 1, conversions
    assert out.count(f"=== run {RUN}: complete") == 1 and out.count("merging adapter into") == 1
    assert sorted(p.name for p in (work / "models" / "gguf").glob("*.gguf")) == ["gemma_2b_finetuned.gguf"]
    assert (work / "models" / "gguf" / "gemma_2b_finetuned.gguf").resolve().is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    promoted = work / "models" / "finetuned" / "adapters" / RUN / "adapter_model.safetensors"
    assert promoted.read_bytes() == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert not (run / ".adapter.partial").exists()
    assert read_holder(run / ".lock") == {}, "the lock is released and names nobody"
    assert tokens_left(run, work / "models") == []


def test_loss_curve_and_adapter_are_the_golden_runs(stopped: Stopped, resumed, golden: Path):
    """2 ranks x 4 examples a step = 1 process x 8 (the golden run), through the stop and the resume.

    Compared up to step 35: the epoch (300 examples) ends in step 38, where one process takes the last 4 examples
    and accelerate's even_batches gives rank 1 the epoch's first 4 again, so the runs part there. A logged loss is
    the mean since the previous log: the row the resumed run logs first after the stop averages fewer steps."""
    got, want = rows(resumed[0] / "outputs" / RUN), rows(golden / "outputs" / GOLDEN_RUN)
    assert set(want) <= set(got)
    for step, ref in want.items():
        assert got[step]["learning_rate"] == ref["learning_rate"], step
        if step > 35:
            continue
        assert got[step]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), step
        if not step - 5 < stopped.step < step:
            assert got[step]["loss"] == pytest.approx(ref["loss"], rel=1e-5), step
    adapter = "checkpoints/checkpoint-20/adapter_model.safetensors"
    mine = load_file(resumed[0] / "outputs" / RUN / adapter)
    theirs = load_file(golden / "outputs" / GOLDEN_RUN / adapter)
    assert mine.keys() == theirs.keys()
    for name, ref in theirs.items():  # measured: 2e-5 of the largest weight
        assert (mine[name] - ref).abs().max() <= 1e-4 * ref.abs().max(), name


def test_two_nodes_without_shared_storage_are_refused(hf_home: Path, tmp_path: Path):
    """Each node's config points at its own folder: every rank stops with the refusal (exit 2), nothing trained."""
    dirs = (tmp_path / "a", tmp_path / "b")
    for d in dirs:
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(lineage_config(), sort_keys=False))
    nodes = two_nodes(dirs, hf_home)
    for node in nodes:
        node.popen.wait(timeout=300)
    outs = [node.output() for node in nodes]
    assert [node.popen.returncode for node in nodes] == [1, 1], outs
    # torchrun reports each failed rank's exit code, unless its agent lost the rendezvous store first (the store
    # lives in the other node's agent, which may already have exited): torchrun's race, not the pipeline's
    codes = {rank: code for out in outs for rank, code in rank_exit_codes(out).items()}
    assert codes and set(codes.values()) == {2}, outs
    main, other = dirs if (dirs[0] / "outputs").exists() else dirs[::-1]
    host = socket.gethostname()
    refusal = (
        f"the nodes do not share the run's storage: rank 1 on host {host} cannot see {other / 'outputs' / RUN} or "
        f"{other / 'models'} (rank 0 on host {host} has them: run folder {main / 'outputs' / RUN}, models_dir "
        f"{main / 'models'})"
    )
    fix = "fix: put paths.output_dir and paths.models_dir on storage every node mounts at the same path"
    for out in outs:
        assert refusal in out and fix in out, out[-4000:]
        no_traceback_from_us(out)
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml", "torch.distributed.run-0.out"]
    run = main / "outputs" / RUN
    assert [p.name for p in run.iterdir()] == [".lock"] and read_holder(run / ".lock") == {}
    assert tokens_left(main / "models") == []
