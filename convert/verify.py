"""Prove a GGUF is the model that was trained: compare llama.cpp against the HF model it came from.

Measured per GGUF file, against the HF model run in float32 on the CPU (the reference):
- tokens:       llama.cpp token ids == HF tokenizer ids on a fixed set of hard strings (unicode,
                whitespace runs, emoji, chat markers), with and without <bos>.
- nmse / top1:  last-token logits of chat-rendered prompts; NMSE = MSE / Var(reference), and the share
                of prompts whose argmax agrees (the llama.cpp way of checking a conversion).
- kld / top1_all: mean KL(reference || gguf) and argmax agreement over every position of the prompts
                and held-out texts (llama-perplexity --kl-divergence's measure).
- chat_template: the GGUF's tokenizer.chat_template equals the tokenizer's.
- stop_token:   llama.cpp treats <end_of_turn> as end of generation.
Float types are gated on nmse and top1, quants on kld (thresholds from the config's verify section).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.llamacpp import native_output_to, read_metadata
from core.errors import EXIT_VERIFICATION, PipelineError
from core.quants import FLOAT_TYPES

# Strings that break careless tokenizer conversions: byte fallback, whitespace runs, emoji with
# joiners, right-to-left and CJK text, digits, and the chat markers (must be single special tokens).
TOKENIZER_PROBES = [
    "Hello world",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\t\ttabs, newlines\n\n\nand  double  spaces",
    "Grüße, ünïcödé façade – naïve “quotes” ‘single’",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "日本語のテキスト 中文 한국어 العربية עברית",
    "numbers 0123456789 3.14159 -42 1e-4 50%",
    'code: def f(x):\n    return {"a": [1, 2]}  # comment',
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    "",
]


# Always measured besides the configured prompts and held-out data, so that every export's KL divergence
# covers a few hundred positions of ordinary prose, code and a chat exchange.
REFERENCE_TEXTS = [
    "The nightly job trains a small adapter on yesterday's conversations, merges it into the base model "
    "and exports a quantized file. Before the file replaces the one in production, it is compared with the "
    "model it came from, token by token, so that a broken conversion never reaches the agent loop.",
    "def moving_average(values, window):\n    total = sum(values[:window])\n    out = [total / window]\n"
    "    for i in range(window, len(values)):\n        total += values[i] - values[i - window]\n"
    "        out.append(total / window)\n    return out\n",
    "<start_of_turn>user\nWhich disk is almost full?<end_of_turn>\n<start_of_turn>model\n"
    "The data volume is at 91%; the system disk has 40 GB free.<end_of_turn>\n",
]


@dataclass
class Gate:
    name: str
    value: float | bool
    threshold: float | bool | None
    passed: bool

    def describe(self) -> str:
        if isinstance(self.value, bool):
            return f"{self.name} = {self.value}"
        op = "<=" if self.name in ("nmse", "kld") else ">="
        return f"{self.name} = {self.value:.3g} (gate {op} {self.threshold:g})"


@dataclass
class FileReport:
    path: str
    quant: str
    measures: dict[str, float] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def failures(self) -> list[str]:
        return [g.describe() for g in self.gates if not g.passed]


class VerificationFailed(PipelineError):
    """A GGUF failed a gate: nothing was promoted; the report is in the run folder."""

    exit_code = EXIT_VERIFICATION

    def __init__(self, reports: list[FileReport]):
        self.reports = reports
        lines = [f"{Path(r.path).name} [{r.quant}]: failed " + "; ".join(r.failures()) for r in reports if not r.passed]
        super().__init__("verification failed, nothing was promoted:\n  " + "\n  ".join(lines))

    def cli_message(self) -> str:
        return f"error: {self}\n  the report is in the run folder (verify.md)"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Measures between two (positions, vocab) logit arrays."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return {
        "kld_sum": float(kld.sum()),
        "positions": int(len(kld)),
        "top1_hits": int((ref.argmax(-1) == got.argmax(-1)).sum()),
        "last_nmse": float(np.mean((ref[-1] - got[-1]) ** 2) / max(np.var(ref[-1]), 1e-12)),
        "last_top1": float(ref[-1].argmax() == got[-1].argmax()),
    }


class Reference:
    """The HF model and tokenizer the GGUF must match, with its logits computed once per text."""

    def __init__(self, model_dir: Path, prompts: list[str], texts: list[str], max_tokens_per_text: int = 256):
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
        model.eval()
        tok = self.tokenizer
        sequences = []
        for p in prompts:  # chat-rendered, ending in the model header: the next token is the answer
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            sequences.append(("prompt", text))
        sequences += [("text", t) for t in REFERENCE_TEXTS + list(texts)]
        self.sequences = []
        with torch.no_grad():
            for kind, text in sequences:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                if ids[:1] != [tok.bos_token_id]:
                    ids = [tok.bos_token_id] + ids
                ids = ids[:max_tokens_per_text]
                logits = model(torch.tensor([ids])).logits[0].float().numpy()
                self.sequences.append((kind, ids, logits))
        self.end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
        self.chat_template = tok.chat_template


def verify_file(ref: Reference, gguf_path: Path, quant: str, verify_cfg, log_path: Path | None = None) -> FileReport:
    """Measure one GGUF against the reference and apply the configured gates."""
    report = FileReport(str(gguf_path), quant)
    n_ctx = max(len(ids) for _, ids, _ in ref.sequences) + 8
    with native_output_to(log_path):
        llm = llama_cpp.Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            logits_all=True,
            verbose=False,
            seed=0,
        )
    try:
        # Tokens: same ids as the HF tokenizer, special markers parsed as single tokens.
        mismatches = []
        for text in TOKENIZER_PROBES:
            hf = ref.tokenizer(text, add_special_tokens=False)["input_ids"]
            cpp = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if hf != cpp:
                mismatches.append(text)
        hf_bos = ref.tokenizer("Hi")["input_ids"]
        cpp_bos = llm.tokenize(b"Hi", add_bos=True, special=True)
        if hf_bos != cpp_bos:
            mismatches.append(f"<bos> handling: HF {hf_bos} vs llama.cpp {cpp_bos}")
        report.gates.append(Gate("tokens_identical", not mismatches, True, not mismatches))
        report.notes += [f"token mismatch on {m!r}" for m in mismatches]

        # Logits on every reference sequence.
        totals = {"kld_sum": 0.0, "positions": 0, "top1_hits": 0}
        last_nmse, last_top1 = [], []
        for kind, ids, ref_logits in ref.sequences:
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)], dtype=np.float32)
            m = compare_logits(ref_logits, got)
            for k in totals:
                totals[k] += m[k]
            if kind == "prompt":
                last_nmse.append(m["last_nmse"])
                last_top1.append(m["last_top1"])
        report.measures = {
            "nmse": float(np.mean(last_nmse)) if last_nmse else math.nan,
            "top1": float(np.mean(last_top1)) if last_top1 else math.nan,
            "kld": totals["kld_sum"] / max(totals["positions"], 1),
            "top1_all": totals["top1_hits"] / max(totals["positions"], 1),
            "positions": totals["positions"],
        }
        if quant in FLOAT_TYPES:
            nmse_max, top1_min = verify_cfg.max_nmse[quant], verify_cfg.min_top1[quant]
            report.gates.append(Gate("nmse", report.measures["nmse"], nmse_max, report.measures["nmse"] <= nmse_max))
            report.gates.append(Gate("top1", report.measures["top1"], top1_min, report.measures["top1"] >= top1_min))
        else:
            kld_max = verify_cfg.max_kld[quant]
            report.gates.append(Gate("kld", report.measures["kld"], kld_max, report.measures["kld"] <= kld_max))

        # Chat template and stop token, as an application loading the file sees them.
        meta = read_metadata(gguf_path)
        template_ok = meta.get("tokenizer.chat_template") == ref.chat_template and ref.chat_template is not None
        report.gates.append(Gate("chat_template", template_ok, True, template_ok))
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        stops = bool(llama_cpp.llama_vocab_is_eog(vocab, ref.end_of_turn))
        report.gates.append(Gate("stop_token", stops, True, stops))
    finally:
        llm.close()
    return report


def verify_files(
    model_dir: Path, files: list[tuple[str, Path]], verify_cfg, texts: list[str], log_path: Path | None = None
) -> list[FileReport]:
    """Verify several GGUFs ((quant name, path) pairs) of one HF model; the reference is computed once."""
    ref = Reference(model_dir, list(verify_cfg.prompts), texts, verify_cfg.max_tokens_per_text)
    reports = []
    for quant, path in tqdm(files, desc="verify", unit="file"):
        reports.append(verify_file(ref, path, quant, verify_cfg, log_path))
    return reports


def to_table(reports: list[FileReport]) -> str:
    """A Markdown table of every measure and gate."""
    head = (
        "| file | type | tokens | NMSE (last) | top-1 (last) | mean KLD | top-1 (all) "
        "| chat template | stop token | result |"
    )
    rows = [head, "|" + "---|" * 10]
    for r in reports:
        g = {x.name: x for x in r.gates}
        m = r.measures

        def mark(name: str, gates=g) -> str:
            return "-" if name not in gates else ("ok" if gates[name].passed else "FAIL")

        rows.append(
            f"| {Path(r.path).name} | {r.quant} | {mark('tokens_identical')} | {m.get('nmse', math.nan):.2e} | "
            f"{m.get('top1', math.nan):.0%} | {m.get('kld', math.nan):.2e} | {m.get('top1_all', math.nan):.1%} | "
            f"{mark('chat_template')} | {mark('stop_token')} | "
            f"{'PASS' if r.passed else 'FAIL: ' + '; '.join(r.failures())} |"
        )
    return "\n".join(rows)


def to_json(reports: list[FileReport]) -> list[dict]:
    return [{**asdict(r), "passed": r.passed} for r in reports]
