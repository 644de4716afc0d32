"""convert/gguf_header.py reads what gguf-py's GGUFReader reads, and refuses what is not a whole GGUF header."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from convert.gguf_header import read_header
from core.errors import InvalidInput


@pytest.fixture(scope="module")
def exported_gguf(tiny_gguf: tuple[Path, Path]) -> Path:
    """The tiny model's f32 GGUF: written by the real converter, with provenance keys and a chat template."""
    return tiny_gguf[1]


def write_gguf(path: Path) -> Path:
    """A GGUF with every value type, string and nested arrays, and tensors of several types and ranks."""
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "Grüße 😀 <start_of_turn>")
    w.add_string("t.empty", "")
    w.add_array("t.tokens", ["<pad>", "▁the", "日本", "", "👨‍👩‍👧"] * 1000)
    w.add_array("t.scores", [0.5, -1.25, 3.0] * 7)
    w.add_array("t.nested", [[1, 2, 3], [4]])
    w.add_tensor("a.weight", np.ones((4, 32), dtype=np.float32))
    w.add_tensor("b.weight", np.ones((8, 3, 32), dtype=np.float16))
    w.add_tensor("c.bias", np.arange(7, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reader_view(path: Path) -> tuple[dict, list]:
    """What verification reads, as gguf-py gives it: scalars and strings, arrays by length, the tensor table."""
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for f in reader.fields.values():
        if f.name.startswith("GGUF."):
            continue
        is_array = f.types and f.types[0] == gguf.GGUFValueType.ARRAY
        meta[f.name] = f"[{len(f.data)} items]" if is_array else f.contents()
    tensors = [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_elements)) for t in reader.tensors]
    return meta, tensors


def test_header_equals_gguf_readers(tmp_path):
    path = write_gguf(tmp_path / "all.gguf")
    meta, tensors = reader_view(path)
    header = read_header(path)
    assert header.version == 3
    # gguf-py's field.data indexes the leaves of a nested array (4 here); the header says its own length
    assert meta.pop("t.nested") == "[4 items]" and header.metadata.pop("t.nested") == "[2 items]"
    assert header.metadata == meta
    assert header.metadata["t.tokens"] == "[5000 items]" and header.metadata["t.str"] == "Grüße 😀 <start_of_turn>"
    assert [(t.name, t.shape, t.type, t.n_elements) for t in header.tensors] == tensors
    assert header.parameter_count == 4 * 32 + 8 * 3 * 32 + 7


def test_exported_gguf_header(exported_gguf):
    """A file the real converter wrote: the vocabulary arrays, its file type, the model's tensors."""
    meta, tensors = reader_view(exported_gguf)
    header = read_header(exported_gguf)
    assert header.metadata == meta
    assert header.metadata["general.file_type"] == 0  # llama_ftype ALL_F32
    vocab = next(t.shape[1] for t in header.tensors if t.name == "token_embd.weight")  # ggml order: [hidden, vocab]
    assert header.metadata["tokenizer.ggml.tokens"] == f"[{vocab} items]"
    assert [(t.name, t.shape, t.type, t.n_elements) for t in header.tensors] == tensors


@pytest.mark.parametrize("keep", [0, 3, 4, 10, 30, 200, 1000, -200, -1, "data"])
def test_cut_files_are_refused(tmp_path, keep):
    """A file cut anywhere in its header (or before the tensor data ends in it) is named and refused."""
    whole = write_gguf(tmp_path / "all.gguf").read_bytes()
    header_end = whole.index(b"c.bias") + len(b"c.bias") + 4 + 8 + 4 + 8  # name, n_dims, dim, type, offset
    cut = tmp_path / "cut.gguf"
    if keep == "data":  # a whole header, the last tensor's data cut short
        cut.write_bytes(whole[:-8])  # 4 bytes of alignment padding, then data
    else:
        cut.write_bytes(whole[: keep if keep >= 0 else header_end + keep])
    with pytest.raises(InvalidInput) as err:
        read_header(cut)
    expected = {0: "an empty file", 3: "not a GGUF file"}.get(keep, "truncated or damaged")
    assert expected in str(err.value) and str(cut) in str(err.value)


def test_not_a_gguf(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 10)
    with pytest.raises(InvalidInput, match="not a GGUF file"):
        read_header(text)
    with pytest.raises(InvalidInput, match="is missing"):
        read_header(tmp_path / "missing.gguf")
