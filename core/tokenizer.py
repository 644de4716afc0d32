"""Saving a Gemma tokenizer so that transformers and llama.cpp's converter both read it as it was trained.

transformers 5's `save_pretrained` drops `tokenizer.model` (the converter reads Gemma's vocab from it:
convert_hf_to_gguf.py, Gemma2Model.set_vocab -> _set_vocab_sentencepiece) and the `add_bos_token` /
`added_tokens_decoder` keys llama.cpp needs; every folder this pipeline writes goes through here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def save_tokenizer(tokenizer, folder: Path, sentencepiece_model: Path) -> None:
    """save_pretrained, then put back what it drops: the SentencePiece file and the special-token keys."""
    tokenizer.save_pretrained(str(folder))
    shutil.copyfile(sentencepiece_model, folder / "tokenizer.model")
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    fix_tokenizer_config(folder, special)


def fix_tokenizer_config(folder: Path, special_tokens: dict[int, str]) -> None:
    """Restore the keys transformers 5's save_pretrained drops but llama.cpp's converter reads.

    Without `add_bos_token` the GGUF does not add <bos>; without `added_tokens_decoder` marking the
    turn markers special, llama.cpp tokenizes "<start_of_turn>" as plain text (the converter's SpecialVocab and
    the token types it writes come from this file: gguf-py vocab.py, SpecialVocab._try_load_from_tokenizer_json).
    """
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["add_bos_token"] = True
    config["add_eos_token"] = False
    config["added_tokens_decoder"] = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in sorted(special_tokens.items())
    }
    config.pop("vocab_file", None)  # an absolute temp path is meaningless once copied
    # How the saving process loaded it (true under HF_HUB_OFFLINE=1), not what the tokenizer is: kept, the same
    # tokenizer saved online and offline differed, and so did the tiny model's revision hash
    config.pop("local_files_only", None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
