"""The whole path through the real CLIs on the tiny model: train -> adapter -> merge -> GGUF -> verify -> publish.

Most tests read the golden run (tests/conftest.py: 40 steps, exported as f16, q8_0 (the default) and q4_k_m, with the
base model and the adapter GGUF). A test that exports again does it on a copy (`workspace`) through the CLI server:
a trained run is all an export needs, so no test here trains.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.files import sha256_file
from tests.conftest import GOLDEN_RUN, GOLDEN_STEPS, ROOT, TINY_REPO
from tests.support.snapshots import tree_snapshot

pytestmark = pytest.mark.slow

FT, BASE = "gemma_2b_finetuned", "gemma_2b_base"  # export.name, export.base_name
# An export of the golden run again, scored on the prompts, held-out records and reference texts only (683 positions,
# a third of the golden run's 2,098: the verification is most of an export's time here).
EXPORT = ["export", "--config", "config.yaml", "verify.min_scored_tokens=256"]


def run_dir(ws: Path) -> Path:
    return ws / "outputs" / GOLDEN_RUN


def manifest(ws: Path) -> dict:
    return json.loads((run_dir(ws) / "manifest.json").read_text())


def published(gguf_dir: Path, name: str) -> dict[str, str]:
    """{file name: link target} of the names published under `name` in gguf_dir."""
    return {
        p.name: os.readlink(p)
        for p in gguf_dir.iterdir()
        if p.is_symlink() and p.name.split(".")[0] == name and not p.name.startswith(".")
    }


def release_files(name: str, quants: list[str], default: str, lora: bool) -> set[str]:
    """The files a release of `name` holds: each quant's GGUF and its Modelfile, and the adapter GGUF."""
    stems = [name if q == default else f"{name}.{q}" for q in quants]
    return {f"{s}.gguf" for s in stems} | {f"{s}.Modelfile" for s in stems} | ({f"{name}.lora.gguf"} if lora else set())


def test_run_folder_and_published_artifacts(golden):
    run, gguf = run_dir(golden), golden / "models" / "gguf"
    assert {
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
        "loss.png",
        "verify.json",
        "verify.md",
        "adapter",
        "checkpoints",
        "export",
    } <= {p.name for p in run.iterdir()}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-20", "checkpoint-40"]
    # every published name is a link through its name's live release, and the live release is this run's
    quants = ["f16", "q8_0", "q4_k_m"]
    for name, lora in ((FT, True), (BASE, False)):
        links = published(gguf, name)
        assert set(links) == release_files(name, quants, "q8_0", lora)
        assert all(target == f".releases/{name}/live/{file}" for file, target in links.items())
        assert os.readlink(gguf / ".releases" / name / "live") == GOLDEN_RUN
        assert sorted(p.name for p in (gguf / ".releases" / name / GOLDEN_RUN).iterdir()) == sorted(
            [*links, "release.json"]
        )
    assert sorted(p.name for p in gguf.iterdir() if not p.name.startswith(".")) == sorted(
        [*published(gguf, FT), *published(gguf, BASE)]
    )
    for folder in ("adapters", "final_models"):  # the converter needs it; transformers 5 drops it
        assert (golden / "models" / "finetuned" / folder / GOLDEN_RUN / "tokenizer.model").is_file()
    # the float GGUF (f16: listed in export.quants, so export.float_type auto picks it) was published: no f32 file
    # was ever written, and no GGUF is left in the run folder
    assert not list((run / "export").rglob("*.gguf"))
    assert "f32.gguf" not in (run / "export" / FT / "convert.log").read_text()
    out = (golden / "train.out").read_text()
    assert "Traceback" not in out
    # the adapter GGUF's record: where it went and the check it passed, in the manifest and the summary
    lora = manifest(golden)["artifacts"]["lora_gguf"]
    assert lora["passed"] and lora["path"] == f"models/gguf/{FT}.lora.gguf"
    assert lora["measures"]["kld"] <= 1e-4 and lora["check"] == "the merged HF model (base GGUF + adapter)"
    assert f"adapter GGUF: {lora['path']} (" in out


def test_loss_goes_down_and_every_logged_step_is_recorded(golden):
    rows = [json.loads(line) for line in (run_dir(golden) / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in losses] == list(range(5, GOLDEN_STEPS + 1, 5))
    assert losses[-1][1] < 0.6 * losses[0][1]
    assert manifest(golden)["training"]["global_step"] == GOLDEN_STEPS


def test_base_weights_untouched_and_lora_weights_moved(golden, hf_home):
    from safetensors.numpy import load_file

    # the cache names each blob by its sha256 when it is made (scripts/tiny_model.py): a blob the run wrote to
    # would no longer match its name
    blobs = sorted((hf_home / "hub" / "models--tiny-gemma--gemma-2-tiny" / "blobs").iterdir())
    assert len(blobs) >= 5 and all(sha256_file(p) == p.name for p in blobs)
    adapter = load_file(str(golden / "models" / "finetuned" / "adapters" / GOLDEN_RUN / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 4 * 7  # every targeted linear of every layer
    assert all(np.abs(b).max() > 1e-4 for b in lora_b)  # PEFT initialises B to zero: these were trained


def test_merged_model_equals_adapter_model(golden, hf_home):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.hub import resolve_model

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()

    finetuned = golden / "models" / "finetuned"
    base_dir = resolve_model(TINY_REPO, hf_home=hf_home).path
    ids = torch.tensor([[2, 4, 100, 200, 300, 5, 7, 8, 9]])
    with torch.no_grad():
        plain = load(base_dir)(ids).logits
        peft = PeftModel.from_pretrained(load(base_dir), str(finetuned / "adapters" / GOLDEN_RUN)).eval()
        a, b = peft(ids).logits, load(finetuned / "final_models" / GOLDEN_RUN)(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (a - plain).abs().max().item() > 1.0  # the adapter changes the model's outputs


def test_gguf_metadata(golden):
    from convert.llamacpp import read_metadata

    m = manifest(golden)
    meta = read_metadata(golden / "models" / "gguf" / f"{FT}.gguf")
    assert meta["general.architecture"] == "gemma2"
    assert meta["gemma2.block_count"] == 4
    assert meta["gemma2.attn_logit_softcapping"] == 50.0 and meta["gemma2.final_logit_softcapping"] == 30.0
    assert meta["tokenizer.chat_template"] == (ROOT / "core" / "templates" / "gemma.jinja").read_text()
    assert meta["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0: the default quant is <name>.gguf
    assert meta["finetune.llama_cpp.commit"] == m["llama_cpp"]["llama.cpp"] != "unknown"
    assert meta["finetune.adapter_sha256"] == sha256_file(run_dir(golden) / "adapter" / "adapter_model.safetensors")
    assert meta["finetune.base_revision"] == m["base_model"]["revision"]
    assert meta["finetune.run_name"] == GOLDEN_RUN
    assert "finetune.adapter_sha256" not in read_metadata(golden / "models" / "gguf" / f"{BASE}.gguf")


def test_verification_report_within_gates(golden):
    report = json.loads((run_dir(golden) / "verify.json").read_text())
    assert report["passed"] is True
    by_name = {f["path"]: f for f in report["files"]}  # the names they ship under
    assert list(by_name) == [
        f"{FT}.f16.gguf",
        f"{FT}.gguf",
        f"{FT}.q4_k_m.gguf",
        f"{BASE}.f16.gguf",
        f"{BASE}.gguf",
        f"{BASE}.q4_k_m.gguf",
    ]
    f16 = by_name[f"{FT}.f16.gguf"]
    assert f16["measures"]["nmse"] < 1e-4 and f16["measures"]["top1"] == 1.0
    q8, q4 = by_name[f"{FT}.gguf"], by_name[f"{FT}.q4_k_m.gguf"]
    assert (q8["quant"], q4["quant"]) == ("q8_0", "q4_k_m")
    assert {f["reference"] for f in report["files"]} == {"HF model"}  # every file against its HF model
    assert 0 < q8["measures"]["kld"] < 1e-3 and 0 < q4["measures"]["kld"] < 0.05
    assert q8["measures"]["kld"] <= q8["measures"]["kld_p99"] and q4["measures"]["kld"] > q8["measures"]["kld"]
    assert q4["measures"]["size"] < q8["measures"]["size"] < f16["measures"]["size"]
    for f in report["files"]:
        assert {g["name"] for g in f["gates"]} >= {"tokens_identical", "chat_template", "stop_token"}
        assert all(g["passed"] for g in f["gates"])
        assert f["measures"]["positions"] == report["scored_tokens"] >= 2048  # verify.min_scored_tokens
    assert report["short_of_minimum"] is False
    md = (run_dir(golden) / "verify.md").read_text()
    assert f"| {FT}.gguf | q8_0 | HF model |" in md and f"| {BASE}.q4_k_m.gguf | q4_k_m | HF model |" in md
    assert f"Scored positions per file: {report['scored_tokens']}." in md
    best = report["recommended"][FT]  # the smallest file within verify.recommend_max_kld
    assert (
        best
        == min(
            (f for n, f in by_name.items() if n.startswith(FT) and f["measures"]["kld"] <= 0.02),
            key=lambda f: f["measures"]["size"],
        )["path"]
    )
    assert f"{FT}: Recommended: {best} " in md
    [merge] = report["merge"]  # LoRA: one way to merge, into the base as stored (f32 here: rounding only)
    assert merge["path"] == "merged into the full-precision base" and merge["passed"] and merge["quant"] == "merge"
    assert merge["measures"]["kld"] < 1e-6 and merge["measures"]["positions"] == report["scored_tokens"]
    assert "| merged into the full-precision base | merge | as trained: the adapter on its base |" in md
    assert f"recommended:  models/gguf/{best} ({FT}" in (golden / "train.out").read_text()  # the run summary


def test_manifest_records_provenance_and_hashes(golden):
    m = manifest(golden)
    assert m["status"] == "complete"
    assert m["base_model"]["repo_id"] == TINY_REPO and len(m["base_model"]["revision"]) == 40
    data_file = next(iter(m["data"]["train_files"]))
    assert m["data"]["train_files"][data_file] == sha256_file(Path(data_file))
    assert m["packages"]["transformers"] and m["packages"]["llama_cpp_python"] == m["llama_cpp"]["llama-cpp-python"]
    assert m["artifacts"]["merged"]["into"] == "the full-precision base"  # LoRA: the base as stored
    assert list(m["verification"]["merge"]) == ["merged into the full-precision base"]
    gguf = m["artifacts"]["gguf"]
    assert m["default_gguf"] == f"models/gguf/{FT}.gguf"
    for label, name in (("finetuned", FT), ("base", BASE)):
        assert gguf[label]["name"] == name and gguf[label]["release"] == GOLDEN_RUN
        assert list(gguf[label]["files"]) == ["f16", "q8_0", "q4_k_m"]
        for entry in gguf[label]["files"].values():
            assert entry["path"] == f"models/gguf/{entry['file']}"
            assert sha256_file(golden / entry["path"]) == entry["sha256"]
            assert (golden / entry["path"]).stat().st_size == entry["size"]
        release = json.loads((golden / "models/gguf/.releases" / name / GOLDEN_RUN / "release.json").read_text())
        assert release["quants"] == gguf[label]["files"] and release["run"] == GOLDEN_RUN
    adapter = golden / m["artifacts"]["adapter"]["path"]
    assert adapter == golden / "models" / "finetuned" / "adapters" / GOLDEN_RUN
    for rel, entry in m["artifacts"]["adapter"]["files"].items():
        assert sha256_file(adapter / rel) == entry["sha256"]


def test_rerun_of_a_complete_run_reports_without_retraining(workspace, cli):
    before = tree_snapshot(workspace / "outputs"), tree_snapshot(workspace / "models")
    res = cli.run("train", ["--config", "config.yaml"], workspace)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"run {GOLDEN_RUN} is already complete" in res.stdout
    assert f"GGUF finetuned    q8_0: models/gguf/{FT}.gguf" in res.stdout  # the summary, again
    assert "warning" not in res.stdout  # its files are still the ones it published
    assert (tree_snapshot(workspace / "outputs"), tree_snapshot(workspace / "models")) == before


def _swap_tensors(path: Path, a: str, b: str) -> None:
    """Exchange the bytes of two same-shaped tensors in a GGUF file, in place."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    ta, tb = (next(t for t in reader.tensors if t.name == n) for n in (a, b))
    tmp = np.array(ta.data, copy=True)
    ta.data[...] = tb.data
    tb.data[...] = tmp
    reader.data.flush()


def test_a_broken_export_fails_verification(golden, cli, tmp_path):
    good = golden / "models" / "gguf" / f"{FT}.f16.gguf"
    broken = tmp_path / "broken.f16.gguf"
    shutil.copyfile(good, broken)
    _swap_tensors(broken, "blk.0.ffn_up.weight", "blk.1.ffn_up.weight")
    merged = golden / "models" / "finetuned" / "final_models" / GOLDEN_RUN
    res = cli.run("convert", ["verify", "--model", str(merged), str(good), str(broken)], tmp_path)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"FAILED {broken} [f16]: nmse = " in res.stderr
    assert f"FAILED {good}" not in res.stderr  # the intact file still passes in the same run


def test_failed_gate_stops_promotion(workspace, cli):
    before = tree_snapshot(workspace / "models")
    res = cli.run("convert", [*EXPORT, "verify.max_kld.q4_k_m=1e-9", "export.export_base=false"], workspace)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"{FT}.q4_k_m.gguf [q4_k_m]: failed kld = " in res.stderr
    assert "(gate <= 1e-09)" in res.stderr
    assert tree_snapshot(workspace / "models") == before  # nothing published or replaced
    work = run_dir(workspace) / "export" / FT
    assert sorted(p.name for p in work.glob("*.gguf")) == [f"{FT}.f16.gguf", f"{FT}.q4_k_m.gguf", f"{FT}.q8_0.gguf"]
    assert manifest(workspace)["status"] == "export_failed"
    report = json.loads((run_dir(workspace) / "verify.json").read_text())
    assert report["passed"] is False
    assert [f["passed"] for f in report["files"]] == [True, True, False]


def test_a_new_quant_list_replaces_the_whole_release(workspace, cli):
    """export.quants with no float type: the converter writes the merged model's own dtype (f32 for the tiny model),
    the quants are made and scored from it, and it is deleted after verification. The new release replaces the set
    published under the name: the golden run's f16 file is no longer published, nor kept beside the new files."""
    gguf_dir = workspace / "models" / "gguf"
    base_before = tree_snapshot(gguf_dir / ".releases" / BASE), published(gguf_dir, BASE)
    golden_release = tree_snapshot(gguf_dir / ".releases" / FT / GOLDEN_RUN)
    quants = ["q8_0", "q6_k", "q5_k_m", "iq4_xs", "q4_k_m"]
    res = cli.run(
        "convert",
        [*EXPORT, "export.export_base=false", f"export.quants=[{', '.join(quants)}]", "export.default_quant=q8_0"],
        workspace,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = run_dir(workspace)
    assert not list((run / "export").rglob("*.gguf"))  # the f32 intermediate is gone
    report = json.loads((run / "verify.json").read_text())
    by_quant = {f["quant"]: f for f in report["files"]}
    assert list(by_quant) == ["f32", *quants] and report["passed"] is True
    assert by_quant["f32"]["path"] == f"{FT}.f32.gguf" and "deleted" in by_quant["f32"]["notes"][0]
    assert all(by_quant[q]["reference"] == "HF model" for q in quants)
    size = {q: by_quant[q]["measures"]["size"] for q in quants}
    assert size["q8_0"] > size["q6_k"] > size["q5_k_m"] > size["q4_k_m"] > size["iq4_xs"]
    bpw = {q: by_quant[q]["measures"]["bits_per_weight"] for q in quants}
    assert bpw["q8_0"] > bpw["q6_k"] > bpw["q5_k_m"] > bpw["q4_k_m"] > bpw["iq4_xs"] > 4.25  # the whole file
    kld = {q: by_quant[q]["measures"]["kld"] for q in quants}
    assert kld["q8_0"] < kld["q6_k"] < kld["q5_k_m"] < kld["q4_k_m"]
    # the release: exactly the new set under the name, the golden release kept whole (a rollback's target)
    releases = gguf_dir / ".releases" / FT
    links = published(gguf_dir, FT)
    assert set(links) == release_files(FT, quants, "q8_0", lora=True)
    assert all(target == f".releases/{FT}/live/{file}" for file, target in links.items())
    assert all((gguf_dir / file).is_file() for file in links)
    assert os.readlink(releases / "live") == f"{GOLDEN_RUN}.2"
    assert sorted(p.name for p in gguf_dir.iterdir() if not p.name.startswith(".")) == sorted([*links, *base_before[1]])
    assert tree_snapshot(releases / GOLDEN_RUN) == golden_release
    history = [json.loads(line) for line in (releases / "history.jsonl").read_text().splitlines()]
    assert [(h["release"], h["was"]) for h in history] == [(GOLDEN_RUN, None), (f"{GOLDEN_RUN}.2", GOLDEN_RUN)]
    assert (tree_snapshot(gguf_dir / ".releases" / BASE), published(gguf_dir, BASE)) == base_before
    m = manifest(workspace)
    assert m["status"] == "complete" and m["artifacts"]["gguf"]["finetuned"]["release"] == f"{GOLDEN_RUN}.2"
    assert list(m["artifacts"]["gguf"]["finetuned"]["files"]) == quants
