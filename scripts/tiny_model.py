"""Build a tiny, real Gemma 2 offline and store it as a Hugging Face hub-cache entry.

The demo and the tests cannot download google/gemma-2-2b, so they use this model instead: a
`Gemma2ForCausalLM` with the 2B's architecture features switched on (attention and final logit
softcapping, tied embeddings, alternating sliding-window layers) and a SentencePiece tokenizer trained
on the spot with Gemma's special-token layout. It is written the way `huggingface_hub` writes a
download (`hub/models--ORG--NAME/{blobs,snapshots/<rev>,refs/main}`), so it loads through exactly
the code path the real model does: `from_pretrained("tiny-gemma/gemma-2-tiny")` with HF_HUB_OFFLINE=1.

Deterministic: the same seed gives the same bytes and therefore the same revision hash.

    python -m scripts.tiny_model [--cache-dir models/.cache/huggingface] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

from core.files import sha256_file
from core.hub import default_hf_home, hub_cache_dir, repo_folder_name
from core.tokenizer import ADDED_TOKEN_FIELDS, fix_tokenizer_config

TINY_REPO_ID = "tiny-gemma/gemma-2-tiny"

# Gemma's special-token layout (ids 0-3 as in google/gemma-2-2b's tokenizer.model); the turn markers
# are user-defined pieces so SentencePiece never splits them.
SPECIAL_PIECES = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
TURN_MARKERS = ["<start_of_turn>", "<end_of_turn>"]
# Fixed by the SentencePiece trainer: user-defined symbols follow the four control pieces.
TURN_MARKER_IDS = {m: 4 + i for i, m in enumerate(TURN_MARKERS)}

# google/gemma-2-2b's config.json, architecture fields: the full-shape random models of the benches
# (bench/gpu_train.py, bench/bench_export.py) are built from it.
GEMMA_2_2B_CONFIG: dict[str, Any] = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    query_pre_attn_scalar=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
    tie_word_embeddings=True,
    initializer_range=0.02,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# Shapes: every width a multiple of 256 so llama.cpp's k-quants (256-wide blocks) apply to every
# matrix, as they do on the 2B (hidden 2304 = 9 x 256). query_pre_attn_scalar must equal head_dim:
# llama.cpp scales attention by 1/sqrt(head_dim) for this architecture (llama.cpp's
# llm_build_gemma2: kq_scale = 1/sqrt(n_embd_head_k); transformers uses query_pre_attn_scalar**-0.5).
TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    query_pre_attn_scalar=64,
    sliding_window=64,  # short enough that the demo's prompts cross it
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    max_position_embeddings=1024,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    # 0.1, not the usual 0.02: tied embeddings of norm ~0.3 cap logits near 5 after the final norm,
    # so no token could reach high probability and the demo could not learn its answers (loss stalls ~2).
    initializer_range=0.1,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# Text the tokenizer is trained on besides the demo data: enough variety for byte-level fallbacks to be
# rare on ordinary English, code and numbers.
_GENERIC_TEXT = """\
The quick brown fox jumps over the lazy dog. A model is only as good as the data it was trained on.
Training loss went down from 6.3 to 1.2 over 200 steps; evaluation loss followed closely.
def main(argv: list[str]) -> int:\n    return 0\n
{"name": "read_file", "arguments": {"path": "/etc/hosts"}}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026 3.14 -1 1e-4 50% 12:30 GB MB ms
Questions and answers: What? Why? How much? Where is it? When does it run? Who is there?
Tabs\tand  double  spaces,   runs of whitespace, and new
lines are kept as they are.
"""


def _tokenizer_corpus(data_file: Path | None) -> list[str]:
    lines = _GENERIC_TEXT.splitlines()
    if data_file is not None and data_file.is_file():
        for row in data_file.read_text(encoding="utf-8").splitlines():
            for m in json.loads(row).get("messages", []):
                lines.append(m["content"])
    return lines * 4  # repetition lets BPE learn merges from a small corpus


def train_tokenizer(out_dir: Path, data_file: Path | None, vocab_size: int = 768) -> Path:
    """Train a Gemma-style SentencePiece BPE model into out_dir/tokenizer.model."""
    # model_writer instead of model_prefix: the prefix (a temp path) would be stored in the model's
    # trainer spec and make every build's bytes differ.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus(data_file)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,  # any unseen character becomes <0xNN> pieces, as in Gemma
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece=SPECIAL_PIECES["pad"],
        eos_piece=SPECIAL_PIECES["eos"],
        bos_piece=SPECIAL_PIECES["bos"],
        unk_piece=SPECIAL_PIECES["unk"],
        user_defined_symbols=TURN_MARKERS,
        # Gemma keeps text verbatim: no dummy prefix, no whitespace folding, no NFKC.
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_digits=True,
        hard_vocab_limit=False,
        num_threads=1,  # determinism
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return out_dir / "tokenizer.model"


def write_tokenizer_files(folder: Path) -> None:
    """Create tokenizer.json/tokenizer_config.json from folder/tokenizer.model the way Gemma ships them."""
    special = [SPECIAL_PIECES[k] for k in ("pad", "eos", "bos", "unk")] + TURN_MARKERS
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "right",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    # every one special (the turn markers included): matched whole in any text, never normalized
    flags = dict.fromkeys(ADDED_TOKEN_FIELDS, False) | {"special": True}
    fix_tokenizer_config(folder, {tok.get_vocab()[t]: flags | {"content": t} for t in special})


def build_weights(folder: Path, vocab_size: int, seed: int) -> None:
    config = Gemma2Config(vocab_size=vocab_size, **TINY_CONFIG)
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config).float()
    model.generation_config.eos_token_id = [1, TURN_MARKER_IDS["<end_of_turn>"]]
    model.save_pretrained(str(folder), safe_serialization=True)


def store_in_hub_cache(staging: Path, hub_dir: Path, repo_id: str) -> Path:
    """Lay staging/* out as huggingface_hub does: blobs named by hash, snapshot symlinks, refs/main.

    The revision is a content hash of the files, so identical builds get identical revisions.
    """
    repo_dir = hub_dir / repo_folder_name(repo_id)
    files = sorted(p for p in staging.iterdir() if p.is_file())
    hashes = {p.name: sha256_file(p) for p in files}
    revision = hashlib.sha1(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    blobs = repo_dir / "blobs"
    snapshot = repo_dir / "snapshots" / revision
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot_tmp = Path(tempfile.mkdtemp(dir=repo_dir, prefix=".snapshot-"))
    for p in files:
        blob = blobs / hashes[p.name]
        if not blob.exists():
            shutil.copyfile(p, blob)
        (snapshot_tmp / p.name).symlink_to(os.path.relpath(blob, snapshot))
    if snapshot.exists():
        shutil.rmtree(snapshot)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot_tmp.rename(snapshot)
    refs = repo_dir / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main.tmp").write_text(revision)
    (refs / "main.tmp").rename(refs / "main")  # refs/main last: the entry exists only when complete
    return snapshot


def build(
    hf_home: Path, repo_id: str = TINY_REPO_ID, seed: int = 0, data_file: Path | None = None, force: bool = False
) -> Path:
    """Build the tiny model into hf_home's hub cache (idempotent); return its snapshot folder."""
    hub_dir = hub_cache_dir(hf_home)
    ref = hub_dir / repo_folder_name(repo_id) / "refs" / "main"
    if ref.is_file() and not force:
        snapshot = ref.parent.parent / "snapshots" / ref.read_text().strip()
        if (snapshot / "model.safetensors").exists():
            print(f"tiny model {repo_id} already in the cache: {snapshot}")
            return snapshot
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        train_tokenizer(staging, data_file)
        write_tokenizer_files(staging)
        vocab_size = spm.SentencePieceProcessor(model_file=str(staging / "tokenizer.model")).vocab_size()
        build_weights(staging, vocab_size, seed)
        snapshot = store_in_hub_cache(staging, hub_dir, repo_id)
    print(f"built tiny Gemma 2 {repo_id} (vocab {vocab_size}, seed {seed}) into {snapshot}")
    return snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tiny_model",
        description="Build the tiny offline Gemma 2 used by the demo and the tests into the HF cache.",
    )
    parser.add_argument(
        "--hf-home",
        type=Path,
        default=None,
        help="HF_HOME to write into (default: $HF_HOME, else models/.cache/huggingface)",
    )
    parser.add_argument("--repo-id", default=TINY_REPO_ID, help=f"cache entry name (default {TINY_REPO_ID})")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/demo/chat.jsonl"),
        help="chat JSONL whose text the tokenizer is also trained on",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the entry exists")
    args = parser.parse_args(argv)
    build(args.hf_home or default_hf_home(), args.repo_id, args.seed, args.data, args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
