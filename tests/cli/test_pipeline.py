"""The whole path through the real CLIs on the tiny model: train -> adapter -> merge -> GGUF -> verify.

One trained run (module fixture) is shared by the assertions; each test checks values a bug would change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.files import sha256_file
from tests.conftest import ROOT, TINY_REPO, run_cli, small_config

pytestmark = pytest.mark.slow

STEPS = 40


@pytest.fixture(scope="module")
def trained(hf_home: Path, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("e2e")
    blobs = hf_home / "hub" / "models--tiny-gemma--gemma-2-tiny" / "blobs"
    base_hashes = {p.name: sha256_file(p) for p in blobs.iterdir()}
    cfg = small_config(
        work,
        run_name="e2e",
        training={
            "max_steps": STEPS,
            "per_device_train_batch_size": 8,
            "logging_steps": 5,
            "save_steps": 20,
            "warmup_steps": 4,
        },
        export={"enabled": True, "quants": ["f16", "q8_0", "q4_k_m"], "default_quant": "q8_0"},
    )
    res = run_cli("train", ["--config", str(cfg)], work, hf_home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = work / "outputs" / "e2e"
    return {
        "work": work,
        "cfg": cfg,
        "run": run,
        "res": res,
        "base_hashes": base_hashes,
        "blobs": blobs,
        "manifest": json.loads((run / "manifest.json").read_text()),
        "models": work / "models",
    }


def test_run_folder_and_promoted_artifacts(trained):
    run, models = trained["run"], trained["models"]
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
    assert sorted(p.name for p in (models / "gguf").glob("*.gguf")) == [
        "gemma_2b_base.f16.gguf",
        "gemma_2b_base.gguf",
        "gemma_2b_base.q4_k_m.gguf",
        "gemma_2b_finetuned.f16.gguf",
        "gemma_2b_finetuned.gguf",
        "gemma_2b_finetuned.lora.gguf",
        "gemma_2b_finetuned.q4_k_m.gguf",
    ]
    # an Ollama Modelfile next to every promoted model GGUF (the adapter is not a model)
    models_ggufs = [p for p in (models / "gguf").glob("*.gguf") if not p.name.endswith(".lora.gguf")]
    assert sorted(p.name for p in (models / "gguf").glob("*.Modelfile")) == sorted(
        f"{p.stem}.Modelfile" for p in models_ggufs
    )
    for folder in (models / "finetuned" / "adapters" / "e2e", models / "finetuned" / "final_models" / "e2e"):
        assert (folder / "tokenizer.model").is_file()  # the converter needs it; transformers 5 drops it
    # the float GGUF (f16: listed in export.quants, so export.float_type auto picks it) was promoted: no f32
    # file was ever written, and no GGUF is left in the run folder
    assert not list((run / "export").rglob("*.gguf"))
    assert "f32.gguf" not in (run / "export" / "gemma_2b_finetuned" / "convert.log").read_text()
    assert "Traceback" not in trained["res"].stderr
    # the adapter GGUF's record: where it went and the check it passed, in the manifest and the summary
    lora = trained["manifest"]["artifacts"]["lora_gguf"]
    assert lora["passed"] and Path(lora["path"]) == models / "gguf" / "gemma_2b_finetuned.lora.gguf"
    assert lora["size"] == Path(lora["path"]).stat().st_size and lora["measures"]["kld"] <= 1e-4
    assert f"adapter GGUF: {lora['path']}" in trained["res"].stdout


def test_loss_goes_down_and_every_logged_step_is_recorded(trained):
    rows = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in losses] == list(range(5, STEPS + 1, 5))
    assert losses[-1][1] < 0.6 * losses[0][1]
    assert trained["manifest"]["training"]["global_step"] == STEPS


def test_base_weights_untouched_and_lora_weights_moved(trained):
    from safetensors.numpy import load_file

    blobs = trained["blobs"]
    assert {p.name: sha256_file(p) for p in blobs.iterdir()} == trained["base_hashes"]
    adapter = load_file(str(trained["models"] / "finetuned" / "adapters" / "e2e" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 4 * 7  # every targeted linear of every layer
    assert all(np.abs(b).max() > 1e-4 for b in lora_b)  # PEFT initialises B to zero: these were trained


def test_merged_model_equals_adapter_model(trained, hf_home):
    import subprocess
    import sys

    from tests.conftest import cli_env

    models = trained["models"] / "finetuned"
    code = f"""
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
ids = torch.tensor([[2, 4, 100, 200, 300, 5, 7, 8, 9]])
base = AutoModelForCausalLM.from_pretrained("{TINY_REPO}", dtype=torch.float32, attn_implementation="eager")
peft = PeftModel.from_pretrained(base, "{models / "adapters" / "e2e"}").eval()
merged = AutoModelForCausalLM.from_pretrained("{models / "final_models" / "e2e"}", dtype=torch.float32,
                                              attn_implementation="eager").eval()
with torch.no_grad():
    a, b = peft(ids).logits, merged(ids).logits
    plain = AutoModelForCausalLM.from_pretrained("{TINY_REPO}", dtype=torch.float32,
                                                 attn_implementation="eager")(ids).logits
print((a - b).abs().max().item(), (a - plain).abs().max().item())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(hf_home), cwd=ROOT, capture_output=True, text=True, check=True
    )
    merged_diff, lora_effect = map(float, out.stdout.split())
    assert merged_diff < 1e-4
    assert lora_effect > 1.0  # the adapter changes the model's outputs


def test_gguf_metadata(trained):
    from convert.llamacpp import read_metadata

    meta = read_metadata(trained["models"] / "gguf" / "gemma_2b_finetuned.gguf")
    assert meta["general.architecture"] == "gemma2"
    assert meta["gemma2.block_count"] == 4
    assert meta["gemma2.attn_logit_softcapping"] == 50.0 and meta["gemma2.final_logit_softcapping"] == 30.0
    assert meta["tokenizer.chat_template"] == (ROOT / "core" / "templates" / "gemma.jinja").read_text()
    assert meta["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0: the default quant is <name>.gguf
    assert meta["finetune.llama_cpp.commit"] == trained["manifest"]["llama_cpp"]["llama.cpp"] != "unknown"
    assert meta["finetune.adapter_sha256"] == sha256_file(
        trained["models"] / "finetuned" / "adapters" / "e2e" / "adapter_model.safetensors"
    )
    assert meta["finetune.base_revision"] == trained["manifest"]["base_model"]["revision"]


def test_verification_report_within_gates(trained):
    report = json.loads((trained["run"] / "verify.json").read_text())
    assert report["passed"] is True
    by_name = {Path(f["path"]).name: f for f in report["files"]}
    assert len(by_name) == 6  # f16 (the float GGUF) + 2 quants, for fine-tuned and base
    f16 = by_name["gemma_2b_finetuned.f16.gguf"]
    assert f16["measures"]["nmse"] < 1e-4 and f16["measures"]["top1"] == 1.0 and f16["reference"] == "HF model"
    q8, q4 = by_name["gemma_2b_finetuned.gguf"], by_name["gemma_2b_finetuned.q4_k_m.gguf"]
    assert q8["reference"] == q4["reference"] == "HF model"  # every file against the trained model
    assert by_name["gemma_2b_base.q4_k_m.gguf"]["reference"] == "HF model"
    assert 0 < q8["measures"]["kld"] < 1e-3 and 0 < q4["measures"]["kld"] < 0.05
    assert q8["measures"]["kld"] <= q8["measures"]["kld_p99"] and q4["measures"]["kld"] > q8["measures"]["kld"]
    assert q4["measures"]["size"] < q8["measures"]["size"] < f16["measures"]["size"]
    for f in report["files"]:
        assert {g["name"] for g in f["gates"]} >= {"tokens_identical", "chat_template", "stop_token"}
        assert all(g["passed"] for g in f["gates"])
        assert f["measures"]["positions"] == report["scored_tokens"] >= 2048  # verify.min_scored_tokens
    assert report["short_of_minimum"] is False
    md = (trained["run"] / "verify.md").read_text()
    assert "| gemma_2b_finetuned.gguf | q8_0 | HF model |" in md
    assert f"Scored positions per file: {report['scored_tokens']}." in md
    best = report["recommended"]["gemma_2b_finetuned"]  # the smallest file within verify.recommend_max_kld
    assert (
        best
        == min(
            (f for n, f in by_name.items() if n.startswith("gemma_2b_finetuned") and f["measures"]["kld"] <= 0.02),
            key=lambda f: f["measures"]["size"],
        )["path"].split("/")[-1]
    )
    assert f"gemma_2b_finetuned: Recommended: {best} " in md
    assert "recommended:" in trained["res"].stderr + trained["res"].stdout  # the run summary


def test_manifest_records_provenance_and_hashes(trained):
    m = trained["manifest"]
    assert m["status"] == "complete"
    assert m["base_model"]["repo_id"] == TINY_REPO and len(m["base_model"]["revision"]) == 40
    data_file = next(iter(m["data"]["train_files"]))
    assert m["data"]["train_files"][data_file] == sha256_file(Path(data_file))
    assert m["packages"]["transformers"] and m["packages"]["llama_cpp_python"] == m["llama_cpp"]["llama-cpp-python"]
    for entry in m["artifacts"]["gguf"]["finetuned"].values():
        assert sha256_file(Path(entry["path"])) == entry["sha256"]
    adapter = Path(m["artifacts"]["adapter"]["path"])
    for rel, entry in m["artifacts"]["adapter"]["files"].items():
        assert sha256_file(adapter / rel) == entry["sha256"]


def test_rerun_of_a_complete_run_reports_without_retraining(trained, hf_home):
    metrics = (trained["run"] / "metrics.jsonl").read_bytes()
    res = run_cli("train", ["--config", str(trained["cfg"])], trained["work"], hf_home)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already complete" in res.stdout
    assert (trained["run"] / "metrics.jsonl").read_bytes() == metrics


def _swap_tensors(path: Path, a: str, b: str) -> None:
    """Exchange the bytes of two same-shaped tensors in a GGUF file, in place."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    ta, tb = (next(t for t in reader.tensors if t.name == n) for n in (a, b))
    tmp = np.array(ta.data, copy=True)
    ta.data[...] = tb.data
    tb.data[...] = tmp
    reader.data.flush()


def test_a_broken_export_fails_verification(trained, hf_home, tmp_path):
    good = trained["models"] / "gguf" / "gemma_2b_finetuned.f16.gguf"
    broken = tmp_path / "broken.f16.gguf"
    shutil.copyfile(good, broken)
    _swap_tensors(broken, "blk.0.ffn_up.weight", "blk.1.ffn_up.weight")
    merged = trained["models"] / "finetuned" / "final_models" / "e2e"
    res = run_cli("convert", ["verify", "--model", str(merged), str(good), str(broken)], tmp_path, hf_home)
    assert res.returncode == 3, res.stderr[-2000:]
    assert f"FAILED {broken} [f16]: nmse = " in res.stderr
    assert f"FAILED {good}" not in res.stderr  # the intact file still passes in the same run


def test_failed_gate_stops_promotion(trained, hf_home, tmp_path):
    # On a copy of the trained run: the shared one must stay complete for the other tests, in any order.
    shutil.copytree(trained["run"], tmp_path / "outputs" / "e2e")
    shutil.copytree(trained["models"], tmp_path / "models")
    run, gguf_dir = tmp_path / "outputs" / "e2e", tmp_path / "models" / "gguf"
    before = {p.name: sha256_file(p) for p in gguf_dir.glob("*.gguf")}
    paths = [f"paths.output_dir={tmp_path / 'outputs'}", f"paths.models_dir={tmp_path / 'models'}"]
    res = run_cli(
        "convert",
        ["export", "--config", str(trained["cfg"]), *paths, f"export.gguf_dir={gguf_dir}"]
        + ["verify.max_kld.q4_k_m=1e-9", "export.export_base=false"],
        tmp_path,
        hf_home,
    )
    assert res.returncode == 3
    assert "gemma_2b_finetuned.q4_k_m.gguf [q4_k_m]: failed kld = " in res.stderr
    assert "(gate <= 1e-09)" in res.stderr
    assert {p.name: sha256_file(p) for p in gguf_dir.glob("*.gguf")} == before  # nothing promoted or replaced
    assert (run / "export" / "gemma_2b_finetuned" / "gemma_2b_finetuned.q4_k_m.gguf").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "export_failed"
    assert json.loads((run / "verify.json").read_text())["passed"] is False
    assert json.loads((trained["run"] / "manifest.json").read_text())["status"] == "complete"  # the original


def test_export_without_a_listed_float_type_and_the_new_quants(trained, hf_home, tmp_path):
    """export.quants with no float type: the converter writes the merged model's own dtype (f32 for the tiny model),
    the quants are made and scored from it, and it is deleted after verification."""
    shutil.copytree(trained["run"], tmp_path / "outputs" / "e2e")
    gguf_dir = tmp_path / "models" / "gguf"
    quants = ["q8_0", "q6_k", "q5_k_m", "iq4_xs", "q4_k_m"]
    res = run_cli(
        "convert",
        ["export", "--config", str(trained["cfg"]), f"paths.output_dir={tmp_path / 'outputs'}"]
        + [f"paths.models_dir={tmp_path / 'models'}", f"export.gguf_dir={gguf_dir}", "export.export_base=false"]
        + [f"export.quants=[{', '.join(quants)}]", "export.default_quant=q8_0"],
        tmp_path,
        hf_home,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "outputs" / "e2e"
    assert not list((run / "export").rglob("*.gguf"))  # the f32 intermediate is gone
    report = json.loads((run / "verify.json").read_text())
    by_quant = {f["quant"]: f for f in report["files"]}
    assert list(by_quant) == ["f32", *quants] and report["passed"] is True
    assert by_quant["f32"]["path"] == "gemma_2b_finetuned.f32.gguf" and "deleted" in by_quant["f32"]["notes"][0]
    assert all(by_quant[q]["reference"] == "HF model" for q in quants)
    size = {q: by_quant[q]["measures"]["size"] for q in quants}
    assert size["q8_0"] > size["q6_k"] > size["q5_k_m"] > size["q4_k_m"] > size["iq4_xs"]
    bpw = {q: by_quant[q]["measures"]["bits_per_weight"] for q in quants}
    assert bpw["q8_0"] > bpw["q6_k"] > bpw["q5_k_m"] > bpw["q4_k_m"] > bpw["iq4_xs"] > 4.25  # the whole file
    kld = {q: by_quant[q]["measures"]["kld"] for q in quants}
    assert kld["q8_0"] < kld["q6_k"] < kld["q5_k_m"] < kld["q4_k_m"]
    assert sorted(p.name for p in gguf_dir.glob("*.gguf")) == sorted(
        ["gemma_2b_finetuned.gguf", "gemma_2b_finetuned.lora.gguf"]
        + [f"gemma_2b_finetuned.{q}.gguf" for q in quants[1:]]
    )
