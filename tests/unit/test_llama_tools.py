"""llama.cpp's tools built from the pinned tree, the importance matrix from the run's data, and quants that use it.

The tools are built by `make setup` (scripts/build_llama_cpp.sh); these tests run the real binaries on the
tiny model's f32 GGUF.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import llama_cpp
import pytest

from convert.imatrix import compute_imatrix
from convert.llamacpp import TOOLS, quantize, read_metadata, tool, tools_dir, tree, version_info
from core.errors import InvalidInput, LlamaCppError
from core.quants import QUANTS
from tests.conftest import DEMO_DATA, ROOT


@pytest.fixture(scope="module")
def f32_gguf(tiny_gguf):
    return tiny_gguf[1]


@pytest.fixture(scope="module")
def training_texts(tok) -> list[str]:
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines() if line.strip()]
    return [tok.apply_chat_template(r["messages"], tokenize=False).removeprefix(tok.bos_token) for r in rows]


def test_a_missing_tool_names_the_make_target_and_the_commit_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TOOLS_DIR", str(tmp_path))
    commit = version_info(tree())["llama.cpp"]
    with pytest.raises(LlamaCppError, match="make setup") as e:
        tool("llama-imatrix")
    assert str(tmp_path / commit / "bin" / "llama-imatrix") in str(e.value)
    fake = tmp_path / commit / "bin" / "llama-imatrix"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    with pytest.raises(LlamaCppError):  # not executable: not a tool
        tool("llama-imatrix")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert tool("llama-imatrix") == fake
    with pytest.raises(ValueError, match="unknown llama.cpp tool"):
        tool("llama-server")


def test_the_built_tools_are_this_commits(monkeypatch):
    monkeypatch.delenv("LLAMA_TOOLS_DIR", raising=False)
    info = version_info(tree())
    stamp = (tools_dir().parent / "BUILD-INFO").read_text()
    assert f"llama-cpp-python={info['llama-cpp-python']} llama.cpp={info['llama.cpp']}" in stamp
    assert "-DGGML_NATIVE=OFF" in stamp
    for name in TOOLS:
        run = subprocess.run([str(tool(name)), "--help"], capture_output=True, text=True, timeout=60)
        assert "usage" in (run.stdout + run.stderr).lower(), name


def test_a_build_without_cmake_says_what_to_install_before_downloading_anything(tmp_path):
    """scripts/build_llama_cpp.sh on a machine without cmake: exit 2 naming the package, nothing written."""
    path = tmp_path / "path"  # the commands the script runs before it compiles, and no cmake
    path.mkdir()
    for name in ("cat", "dirname", "grep", "mkdir", "sed"):
        (path / name).symlink_to(shutil.which(name))
    root = tmp_path / "cache"
    script = ROOT / "scripts" / "build_llama_cpp.sh"
    run = subprocess.run(
        [shutil.which("bash"), str(script), str(tree()), str(root), sys.executable],
        env={"PATH": str(path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "error: cmake not found" in run.stderr and "apt-get install cmake build-essential" in run.stderr
    assert not root.exists()


def test_the_binding_runs_the_library_the_tools_were_built_with(monkeypatch):
    """One compilation: the libllama.so the binding loaded is the tools' own, byte for byte."""
    monkeypatch.delenv("LLAMA_TOOLS_DIR", raising=False)
    loaded = Path(llama_cpp.llama_cpp._lib._name)
    assert loaded.parent != tools_dir()  # a copy in the installed wheel, not a path into the cache
    assert loaded.read_bytes() == (tools_dir() / "libllama.so").read_bytes()


QUANTIZED = [name for name, q in QUANTS.items() if not q.is_float and not q.needs_imatrix]


@pytest.mark.parametrize("quant", QUANTIZED)
def test_quantize_writes_the_tables_file_type_with_token_embd_as_asked(quant, f32_gguf, tmp_path):
    """What the quant is, read back from the file: general.file_type is the table's (core/quants.py), token_embd the
    type export.token_embedding_type asks for, the layers' weights the table's tensor type (the tiny model's rows
    are 256 or 512 wide: no k-quant fallback), and nothing is left beside the output."""
    out = tmp_path / f"tiny.{quant}.gguf"
    quantize(f32_gguf, out, quant, "q8_0", tmp_path / "log")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["log", out.name])
    assert read_metadata(out)["general.file_type"] == QUANTS[quant].file_type
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    layers = Counter(t for name, t in types.items() if name.startswith("blk.") and not name.endswith("norm.weight"))
    assert layers.most_common(1)[0][0] == QUANTS[quant].tensor_type, layers


def test_without_a_token_embedding_type_llama_cpp_picks_token_embd(f32_gguf, tmp_path):
    """The flag is what keeps token_embd at Q8_0: without it q4_k_m's recipe stores the tied embedding as the output
    layer's Q6_K (llama.cpp's llama_tensor_get_type)."""
    out = tmp_path / "tiny.q4_k_m.gguf"
    quantize(f32_gguf, out, "q4_k_m", None)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q6_K


def test_importance_matrix_from_the_runs_data_calibrates_q4_k_m(f32_gguf, training_texts, tmp_path):
    log = tmp_path / "convert.log"
    out = compute_imatrix(f32_gguf, training_texts, tmp_path / "work" / "m.imatrix.gguf", log, max_tokens=2048)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.imatrix.gguf"]  # no calibration text, no tmp left
    reader = gguf.GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    for layer in range(4):  # every matrix the quantizer weighs, in every layer of the tiny model
        for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert f"blk.{layer}.{m}.weight.in_sum2" in names and f"blk.{layer}.{m}.weight.counts" in names
    chunks = int(reader.get_field("imatrix.chunk_count").contents())
    size = int(reader.get_field("imatrix.chunk_size").contents())
    assert size == 512 and 2048 // size <= chunks <= 2048 // size + 1  # the token budget, in whole chunks

    plain, calibrated = tmp_path / "plain.gguf", tmp_path / "imatrix.gguf"
    quantize(f32_gguf, plain, "q4_k_m", "q8_0", log)
    quantize(f32_gguf, calibrated, "q4_k_m", "q8_0", log, imatrix=out)
    meta = read_metadata(calibrated)
    assert meta["quantize.imatrix.file"] == str(out) and meta["quantize.imatrix.chunks_count"] == chunks
    assert "quantize.imatrix.file" not in read_metadata(plain)
    tensors = [{t.name: t for t in gguf.GGUFReader(str(p)).tensors} for p in (plain, calibrated)]
    assert {n: t.tensor_type for n, t in tensors[0].items()} == {n: t.tensor_type for n, t in tensors[1].items()}
    assert tensors[0]["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    # same types, so the same tensor bytes (the files differ by the quantize.imatrix.* keys); other values
    assert sum(int(t.n_bytes) for t in tensors[0].values()) == sum(int(t.n_bytes) for t in tensors[1].values())
    changed = [n for n, t in tensors[0].items() if t.data.tobytes() != tensors[1][n].data.tobytes()]
    assert "blk.0.attn_q.weight" in changed and "blk.3.ffn_down.weight" in changed


def test_too_little_calibration_text_is_refused_before_anything_is_written(f32_gguf, training_texts, tmp_path):
    with pytest.raises(InvalidInput, match="at least 128 tokens"):
        compute_imatrix(f32_gguf, training_texts[:1], tmp_path / "m.imatrix.gguf", tmp_path / "log")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_imatrix_run_leaves_nothing(f32_gguf, training_texts, tmp_path, monkeypatch):
    broken = tmp_path / "bin"
    broken.mkdir()
    fake = broken / "llama-imatrix"
    fake.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr("convert.imatrix.tool", lambda name: fake)
    out = tmp_path / "work" / "m.imatrix.gguf"
    with pytest.raises(LlamaCppError, match=r"llama-imatrix failed .* \(exit 3\)"):
        compute_imatrix(f32_gguf, training_texts, out, tmp_path / "log")
    assert list(out.parent.iterdir()) == [] and "boom" in (tmp_path / "log").read_text()


def test_a_missing_imatrix_file_is_a_clear_error(f32_gguf, tmp_path):
    with pytest.raises(InvalidInput, match="importance matrix"):
        quantize(f32_gguf, tmp_path / "q.gguf", "q4_k_m", "q8_0", imatrix=tmp_path / "nope.gguf")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert os.listdir(tmp_path) == []
