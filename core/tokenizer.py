"""Saving a Gemma tokenizer so that transformers and llama.cpp's converter both read it as it was trained; every
folder this pipeline writes goes through here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def save_tokenizer(tokenizer, folder: Path, sentencepiece_model: Path) -> None:
    """save_pretrained, then put back what transformers 5 drops: the SentencePiece file (the converter reads Gemma's
    vocab from it: convert_hf_to_gguf.py, Gemma2Model.set_vocab -> _set_vocab_sentencepiece) and the token keys."""
    tokenizer.save_pretrained(str(folder))
    shutil.copyfile(sentencepiece_model, folder / "tokenizer.model")
    added = {i: {k: getattr(t, k) for k in ADDED_TOKEN_FIELDS} for i, t in tokenizer.added_tokens_decoder.items()}
    fix_tokenizer_config(folder, added)


# tokenizers' AddedToken, as tokenizer_config.json's added_tokens_decoder spells each one
ADDED_TOKEN_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def fix_tokenizer_config(folder: Path, added_tokens: dict[int, dict]) -> None:
    """Restore the keys transformers 5's save_pretrained drops but llama.cpp's converter reads (gguf-py vocab.py,
    SpecialVocab._try_load_from_tokenizer_json): without `add_bos_token` the GGUF adds no <bos>; without
    `added_tokens_decoder` marking the turn markers special, llama.cpp reads "<start_of_turn>" as plain text. Each
    added token keeps its own flag: the converter makes every special one a CONTROL token, which the real Gemma 3's
    whitespace runs and HTML tags must not become (llama.cpp would stop making them from text)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["add_bos_token"] = True
    config["add_eos_token"] = False
    config["added_tokens_decoder"] = {str(i): added_tokens[i] for i in sorted(added_tokens)}
    config.pop("vocab_file", None)  # an absolute temp path is meaningless once copied
    config.pop("local_files_only", None)  # how it was loaded (HF_HUB_OFFLINE), not what it is
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
