"""The tiny Gemma 2 is a real hub-cache entry, deterministic, and shaped like the 2B where it matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from scripts import tiny_model
from tests.conftest import DEMO_DATA, ROOT, TINY_REPO, cli_env, small_config

REPO_DIR = "models--tiny-gemma--gemma-2-tiny"


def test_cache_entry_layout(hf_home: Path):
    repo = hf_home / "hub" / REPO_DIR
    rev = (repo / "refs" / "main").read_text().strip()
    snapshot = repo / "snapshots" / rev
    names = sorted(p.name for p in snapshot.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    for p in snapshot.iterdir():  # snapshot files are symlinks into blobs/, as huggingface_hub writes them
        assert p.is_symlink() and p.resolve().parent == (repo / "blobs").resolve()


def test_architecture_matches_the_2b_features(hf_home: Path):
    repo = hf_home / "hub" / REPO_DIR
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
    cfg = json.loads((snapshot / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma2ForCausalLM"]
    assert cfg["attn_logit_softcapping"] == 50.0 and cfg["final_logit_softcapping"] == 30.0
    assert cfg["tie_word_embeddings"] is True
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert cfg["query_pre_attn_scalar"] == cfg["head_dim"]  # llama.cpp scales by 1/sqrt(head_dim)
    for width in (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"] * cfg["head_dim"]):
        assert width % 256 == 0  # k-quants apply to every matrix
    tok = json.loads((snapshot / "tokenizer_config.json").read_text())
    assert tok["add_bos_token"] is True
    specials = {v["content"]: int(k) for k, v in tok["added_tokens_decoder"].items() if v["special"]}
    assert specials == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 4, "<end_of_turn>": 5}


def test_build_is_deterministic(hf_home: Path, tmp_path: Path):
    """The command's main() again, in this process: the session's build ran in a process of its own with
    HF_HUB_OFFLINE=1 (tests/conftest.py cli_env), this one in the test process's environment; the bytes must not
    depend on it."""
    with torch.random.fork_rng():  # it seeds torch's global generator
        assert tiny_model.main(["--hf-home", str(tmp_path / "again"), "--data", str(DEMO_DATA)]) == 0
    rev = lambda home: (home / "hub" / REPO_DIR / "refs" / "main").read_text()  # noqa: E731
    assert rev(tmp_path / "again") == rev(hf_home)  # the revision is a hash of every file's bytes


def test_loads_by_repo_id_offline_and_tokenizes_gemma_style(hf_home: Path):
    """A process of its own: HF_HOME and HF_HUB_OFFLINE=1 are read when transformers is imported (in this process,
    online, the same load waits ~25 s on the network it does not have)."""
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained('{TINY_REPO}')\n"
        f"t = AutoTokenizer.from_pretrained('{TINY_REPO}')\n"
        "ids = t('<start_of_turn>user\\nHi').input_ids\n"
        "print(type(m).__name__, ids[:2], t.pad_token_id, t.eos_token_id)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(hf_home), capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split("\n")[0] == "Gemma2ForCausalLM [2, 4] 0 1"  # one <bos>, marker is one token


def test_missing_model_names_the_cache_and_the_download_command(cli, tmp_path: Path):
    empty = tmp_path / "empty_home"
    empty.mkdir()
    cfg = small_config(tmp_path, model={"name_or_path": "google/gemma-2-2b", "dtype": "float32"})
    res = cli.run("train", ["--config", str(cfg), "--dry-run"], tmp_path, env={"HF_HOME": str(empty)})
    assert res.returncode == 2
    assert "model 'google/gemma-2-2b' (revision main) is not in the Hugging Face cache" in res.stderr
    assert str(empty / "hub" / "models--google--gemma-2-2b") in res.stderr
    assert "hf download google/gemma-2-2b" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "outputs").exists()
    assert os.listdir(empty) == []  # nothing downloaded or created
