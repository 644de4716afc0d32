"""Prove a GGUF is the model that was trained, and measure what each quant costs.

Every file is scored against the model that was trained: the HF model in float32, which convert/reference.py
streams layer by layer (never whole in float32). Its decoder runs once over the scored token sequences; then
the files are run by llama.cpp one after another, each in step with the reference's logits CHUNK positions at
a time: per position the KL divergence, top-1 agreement and next-token log-likelihood are computed and the
logits dropped. So one GGUF is mapped at a time and no [tokens, vocab] array for the whole text set is held
in memory (256k vocab: 1 MB per position): the reference's logits go to a scratch file on the first file's
pass and are read back for the others (ReferenceChunks), rather than the output layer (~1/5 of a forward)
running once per file.
(llama.cpp's own llama-perplexity --kl-divergence scores quants against the f16 file instead; scoring each
against the trained model measures what a user gets, and the float file's own distance is in the table.)

Measured per file:
- tokens:       llama.cpp token ids == HF tokenizer ids on a fixed set of hard strings (unicode,
                whitespace runs, emoji, chat markers), with and without <bos>.
- nmse / top1:  last-token logits of chat-rendered prompts; NMSE = MSE / Var(reference), and the share
                of prompts whose argmax agrees (the llama.cpp way of checking a conversion).
- kld, kld_p99, top1_all: mean and 99th percentile of KL(reference || file) and argmax agreement over every
                scored position (the scored set: scored_set()).
- ppl:          perplexity of the scored text under the file's own logits (llama.cpp's).
- size, bits_per_weight: file bytes, and file bytes x 8 / parameters (all of the file: metadata and vocab too).
- chat_template: the GGUF's tokenizer.chat_template equals the tokenizer's.
- stop_token:   llama.cpp treats <end_of_turn> as end of generation.
Float types are gated on nmse and top1, quants on kld (thresholds from the config's verify section).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from convert.gguf_header import read_header
from convert.llamacpp import native_output_to
from convert.reference import Reference
from core.errors import EXIT_VERIFICATION, LlamaCppError, PipelineError
from core.files import human_size
from core.quants import QUANTS

log = logging.getLogger(__name__)

# Positions compared at a time. Each file's llama.cpp context keeps the logits of one chunk (chunk x vocab x 4
# bytes: 128 MB at 256k), and so does the HF reference; smaller chunks cost more calls, not more accuracy.
CHUNK = 128
# Rows turned into float64 log-probabilities at once (8 x 256k x 8 bytes = 16 MB an array). At 16 the scoring
# loop's peak was 226 MiB above its start against 54 MiB at 8, for the same speed (measured at the 256k vocabulary).
BLOCK = 8
# Disk for the reference's logits kept between files (ReferenceChunks): 4,096 positions at a 256k vocabulary.
SCRATCH_BUDGET = 4 << 30

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


# Always scored after the held-out data, so that every export's KL divergence covers some ordinary prose,
# code and a chat exchange.
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

HF_REFERENCE = "HF model"  # FileReport.reference of a file scored against the HF model


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
    reference: str = HF_REFERENCE  # what it was scored against (verify_files: always the HF model)
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


# ----------------------------------------------------------------------------- the scored token sequences


@dataclass
class ScoredSet:
    """The token sequences every file is scored on: chat-rendered prompts (last-token NMSE/top-1), then text
    windows. `positions` counts every scored position; `sources` the positions per origin."""

    prompts: list[list[int]]
    windows: list[list[int]]
    minimum: int
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def sequences(self) -> list[list[int]]:
        return self.prompts + self.windows

    @property
    def positions(self) -> int:
        return sum(len(ids) for ids in self.sequences)

    @property
    def short(self) -> bool:
        return self.positions < self.minimum


def windows_of(ids: list[int], bos: int, window: int) -> list[list[int]]:
    """A text's ids (starting with <bos>) cut into windows of at most `window` tokens, each starting with <bos>
    (Gemma without <bos> at position 0 is not the model anyone runs)."""
    body = ids[1:] if ids[:1] == [bos] else ids
    step = window - 1
    return [[bos, *body[i : i + step]] for i in range(0, max(len(body), 1), step)]


def scored_set(
    tokenizer,
    prompts: list[str],
    heldout: list[str],
    fallback: Iterable[str],
    min_tokens: int,
    window: int,
) -> ScoredSet:
    """Prompts, all held-out texts, REFERENCE_TEXTS, then fallback texts (training data) only while the total
    is short of min_tokens. Texts longer than `window` are scored in several windows, none is cut."""
    bos = tokenizer.bos_token_id

    def ids_of(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if ids[:1] == [bos] else [bos, *ids]

    chat = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts  # chat-rendered, ending in the model header: the next token is the answer
    ]
    scored = ScoredSet([ids_of(t)[:window] for t in chat], [], min_tokens)
    scored.sources["prompts"] = scored.positions
    for name, texts in (("held-out", heldout), ("reference texts", REFERENCE_TEXTS), ("training data", fallback)):
        before = scored.positions
        for text in texts:
            if name == "training data" and not scored.short:
                break
            scored.windows += windows_of(ids_of(text), bos, window)
        if scored.positions > before:
            scored.sources[name] = scored.positions - before
    return scored


# ----------------------------------------------------------------------------- llama.cpp, chunk by chunk


class GGUFRunner:
    """One GGUF in llama.cpp, fed CHUNK positions at a time with logits for every position (llama_decode with a
    batch of its own: Llama.eval with logits_all would keep n_ctx x vocab float32 scores besides llama.cpp's)."""

    def __init__(self, path: Path, n_ctx: int, log_path: Path | None):
        threads = os.cpu_count() or 1  # Llama's default is half the cores
        with native_output_to(log_path):
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=CHUNK,
                n_ubatch=CHUNK,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=False,
                seed=0,
            )
        self.path = path
        self.n_vocab = self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(CHUNK, 0, 1)

    def start(self) -> None:
        """A new sequence: forget the KV cache."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)

    def logits(self, ids: list[int], pos0: int) -> np.ndarray:
        """float32 logits [len(ids), vocab] of positions pos0.. (a view of llama.cpp's buffer, valid until the
        next call)."""
        b = self.batch
        b.n_tokens = len(ids)
        for i, token in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos0 + i, 1, 1
            b.seq_id[i][0] = 0
        with native_output_to(None):
            rc = llama_cpp.llama_decode(self.llm.ctx, b)
        if rc != 0:
            raise LlamaCppError(f"llama_decode failed on {self.path.name} (code {rc}) at position {pos0}")
        ptr = ctypes.cast(llama_cpp.llama_get_logits(self.llm.ctx), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(len(ids), self.n_vocab))

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        self.llm.close()


class ReferenceChunks:
    """The reference's logits chunks for every file: the output layer (~1/5 of a forward) runs for the first
    file, whose pass writes the chunks to an unnamed file in `scratch_dir` (disk and page cache, not the
    process's memory: positions x vocab float32, 2.1 GB at 2,052 positions of a 256k vocabulary); the passes
    after it read them back. Up to `budget` bytes: chunks past it (a large held-out set) are recomputed by
    every pass. Without a scratch_dir, or once a write fails (a full disk), every pass recomputes.
    A chunk read back is a view of one buffer: valid until the next one is asked for."""

    def __init__(self, reference: Reference, chunk: int, scratch_dir: Path | None, budget: int = SCRATCH_BUDGET):
        self.reference, self.plan, self.chunk, self.budget = reference, reference.plan(chunk), chunk, budget
        # unnamed (O_TMPFILE): gone with the process, however it ends; closed by close()
        self.file = tempfile.TemporaryFile(dir=scratch_dir) if scratch_dir is not None else None  # noqa: SIM115
        self.kept = 0  # chunks 0..kept-1 are in the file, in order
        self.buf: np.ndarray | None = None

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        vocab = self.reference.config.vocab_size
        offset, i = 0, 0
        while i < len(self.plan):
            if self.file is not None and i < self.kept:
                t, start, stop = self.plan[i]
                yield t, self._read(offset, stop - start)
                offset += (stop - start) * vocab * 4
                i += 1
                continue
            group = self._group(i)
            logits, row = self.reference.logits_of(group), 0
            for t, start, stop in group:
                part = logits[row : row + stop - start]
                if self.file is not None and i == self.kept and offset + part.nbytes <= self.budget:
                    self._keep(offset, part)
                yield t, part
                offset += (stop - start) * vocab * 4
                row, i = row + stop - start, i + 1

    def _group(self, i: int) -> list[tuple[int, int, int]]:
        """Chunks i.. computed in one call, up to `chunk` rows together: a short text is a chunk of its own, and
        the output layer costs mostly per call (convert.reference.Reference.logits_of)."""
        group, rows = [self.plan[i]], self.plan[i][2] - self.plan[i][1]
        for t, start, stop in self.plan[i + 1 :]:
            if rows + stop - start > self.chunk:
                break
            group.append((t, start, stop))
            rows += stop - start
        return group

    def _keep(self, offset: int, logits: np.ndarray) -> None:
        assert self.file is not None
        try:
            self.file.seek(offset)
            self.file.write(np.ascontiguousarray(logits, dtype=np.float32).data)
            self.kept += 1
        except OSError as e:
            log.warning(f"  reference logits not kept ({e}): each file recomputes them")
            self.close()

    def _read(self, offset: int, rows: int) -> np.ndarray:
        assert self.file is not None
        vocab = self.reference.config.vocab_size
        if self.buf is None or self.buf.shape[0] < rows:
            self.buf = np.empty((rows, vocab), dtype=np.float32)
        view = self.buf[:rows]
        self.file.seek(offset)
        got = self.file.readinto(view.data.cast("B"))
        if got != view.nbytes:
            raise PipelineError(f"reference logits scratch file ended early ({got} of {view.nbytes} bytes)")
        return view

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ----------------------------------------------------------------------------- measures


def log_softmax(x: np.ndarray) -> torch.Tensor:
    """float64 log-probabilities of logits [rows, vocab] (KLDs of f16 files are ~1e-7: float32 rounding would be of
    their size). torch, not numpy: its kernels use every core, where numpy's run on one (per position at a 256k
    vocabulary, the measures cost ~2 ms on this project's 2-core box against 4.7 with numpy, and they run between
    llama.cpp's passes, not beside them)."""
    return torch.log_softmax(torch.as_tensor(x, dtype=torch.float64), dim=-1)


@dataclass
class Block:
    """Log-probabilities of a block of rows, with what every comparison against them reuses."""

    lp: torch.Tensor
    top1: np.ndarray  # argmax per row
    _p: torch.Tensor | None = None

    @classmethod
    def of(cls, logits: np.ndarray) -> Block:
        """From float32 logits [rows, vocab]; the argmax is taken on them (log-softmax keeps each row's order, and
        numpy's float32 argmax is ~20x faster than torch's on float64)."""
        return cls(log_softmax(logits), logits.argmax(-1))

    @property
    def p(self) -> torch.Tensor:
        if self._p is None:
            self._p = self.lp.exp()
        return self._p


@dataclass
class Tally:
    """Running measures of one file against its reference; per-position KLD is kept (a float per position)."""

    kld: list[float] = field(default_factory=list)
    top1_hits: int = 0
    nll_sum: float = 0.0
    nll_count: int = 0
    last_nmse: list[float] = field(default_factory=list)
    last_top1: list[float] = field(default_factory=list)

    def add_block(self, ref: Block, got: Block, next_ids: np.ndarray) -> None:
        """ref, got: log-probabilities [rows, vocab]; next_ids: the next token per row, -1 where none."""
        # as Python floats: a tensor per block, kept, would sit between the blocks' ~30 MB temporaries in the
        # malloc heap and keep it from shrinking (RSS grew by ~2 MB per position, measured)
        self.kld.extend((ref.lp - got.lp).mul_(ref.p).sum(-1).tolist())
        self.top1_hits += int((ref.top1 == got.top1).sum())
        self.add_nll(got, next_ids)

    def add_nll(self, block: Block, next_ids: np.ndarray) -> None:
        """The next tokens' log-likelihood only (the reference's own perplexity)."""
        rows = np.flatnonzero(next_ids >= 0)
        self.nll_sum -= float(block.lp[torch.from_numpy(rows), torch.from_numpy(next_ids[rows])].sum())
        self.nll_count += len(rows)

    def add_last(self, ref: np.ndarray, got: np.ndarray) -> None:
        """Last-token logits of a prompt (raw, float32)."""
        ref, got = ref.astype(np.float64), got.astype(np.float64)
        self.last_nmse.append(float(np.mean((ref - got) ** 2) / max(np.var(ref), 1e-12)))
        self.last_top1.append(float(ref.argmax() == got.argmax()))

    def measures(self) -> dict[str, float]:
        kld = np.asarray(self.kld, dtype=np.float64)
        return {
            "nmse": float(np.mean(self.last_nmse)) if self.last_nmse else math.nan,
            "top1": float(np.mean(self.last_top1)) if self.last_top1 else math.nan,
            "kld": float(kld.mean()) if len(kld) else math.nan,
            "kld_p99": float(np.percentile(kld, 99)) if len(kld) else math.nan,
            "top1_all": self.top1_hits / max(len(kld), 1),
            "ppl": math.exp(self.nll_sum / self.nll_count) if self.nll_count else math.nan,
            "positions": int(len(kld)),
        }


def score(
    hf_chunks: Iterator[tuple[int, np.ndarray]], sequences: list[list[int]], n_prompts: int, runner: GGUFRunner
) -> tuple[Tally, Tally]:
    """Run one GGUF over `sequences` in step with the HF reference's chunks. Returns the file's tally against the
    reference and the reference's own (its perplexity)."""
    tally, hf_tally = Tally(), Tally()
    t_prev, pos = -1, 0
    progress = tqdm(total=sum(len(ids) for ids in sequences), desc=f"verify {runner.path.name}", unit="tok")
    for t, hf in hf_chunks:
        ids = sequences[t]
        if t != t_prev:
            t_prev, pos = t, 0
            runner.start()
        n = hf.shape[0]
        got = runner.logits(ids[pos : pos + n], pos)
        nxt = np.array([ids[p + 1] if p + 1 < len(ids) else -1 for p in range(pos, pos + n)])
        for b in range(0, n, BLOCK):
            rows = slice(b, min(b + BLOCK, n))
            hf_block = Block.of(hf[rows])
            hf_tally.add_nll(hf_block, nxt[rows])
            tally.add_block(hf_block, Block.of(got[rows]), nxt[rows])
        if t < n_prompts and pos + n == len(ids):  # this chunk holds the prompt's last position
            tally.add_last(hf[-1], got[-1])
        pos += n
        progress.update(n)
    progress.close()
    return tally, hf_tally


def _checks(runner: GGUFRunner, meta: dict[str, object], tokenizer, report: FileReport) -> None:
    """Tokens, chat template (from the file's metadata, `meta`) and stop token, as an application loading the file
    sees them."""
    llm = runner.llm
    mismatches = []
    for text in TOKENIZER_PROBES:
        hf = tokenizer(text, add_special_tokens=False)["input_ids"]
        cpp = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if hf != cpp:
            mismatches.append(text)
    hf_bos = tokenizer("Hi")["input_ids"]
    cpp_bos = llm.tokenize(b"Hi", add_bos=True, special=True)
    if hf_bos != cpp_bos:
        mismatches.append(f"<bos> handling: HF {hf_bos} vs llama.cpp {cpp_bos}")
    report.gates.append(Gate("tokens_identical", not mismatches, True, not mismatches))
    report.notes += [f"token mismatch on {m!r}" for m in mismatches]
    template_ok = meta.get("tokenizer.chat_template") == tokenizer.chat_template and tokenizer.chat_template is not None
    report.gates.append(Gate("chat_template", template_ok, True, template_ok))
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    stops = bool(llama_cpp.llama_vocab_is_eog(vocab, tokenizer.convert_tokens_to_ids("<end_of_turn>")))
    report.gates.append(Gate("stop_token", stops, True, stops))


def _gates(report: FileReport, verify_cfg) -> None:
    m, quant = report.measures, report.quant
    if QUANTS[quant].is_float:
        nmse_max, top1_min = verify_cfg.max_nmse[quant], verify_cfg.min_top1[quant]
        report.gates.append(Gate("nmse", m["nmse"], nmse_max, m["nmse"] <= nmse_max))
        report.gates.append(Gate("top1", m["top1"], top1_min, m["top1"] >= top1_min))
    else:
        kld_max = verify_cfg.max_kld[quant]
        report.gates.append(Gate("kld", m["kld"], kld_max, m["kld"] <= kld_max))


def verify_files(
    model_dir: Path,
    files: list[tuple[str, Path]],
    verify_cfg,
    texts: list[str],
    log_path: Path | None = None,
    fallback_texts: Iterable[str] = (),
    scratch_dir: Path | None = None,
) -> list[FileReport]:
    """Verify several GGUFs ((quant name, path) pairs) of one HF model, every one against the HF model.

    The reference's decoder runs once; the files are scored one after another (one GGUF mapped at a time).
    `texts` (held-out) are scored in full; `fallback_texts` (training data) only while short of
    verify.min_scored_tokens. scratch_dir: where the reference's logits are kept between files (ReferenceChunks;
    None: recomputed for each file)."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    context = getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", None) or 8192
    window = min(verify_cfg.max_tokens_per_text, context)
    scored = scored_set(
        tokenizer, list(verify_cfg.prompts), texts, fallback_texts, verify_cfg.min_scored_tokens, window
    )
    log.info(
        f"  scoring {len(files)} file(s) on {scored.positions} positions ({len(scored.sequences)} sequences of "
        f"<= {window} tokens; {', '.join(f'{k} {v}' for k, v in scored.sources.items())})"
    )
    if scored.short:
        log.warning(
            f"  only {scored.positions} positions to score, fewer than verify.min_scored_tokens="
            f"{scored.minimum}: gated on what there is (give verify.heldout_files more records)"
        )
    log.info("  reference: the HF model in float32, layer by layer")
    reference = ReferenceChunks(Reference(model_dir, scored.sequences), CHUNK, scratch_dir)
    try:
        return [_verify_file(q, path, reference, scored, window, verify_cfg, tokenizer, log_path) for q, path in files]
    finally:
        reference.close()


def _verify_file(
    quant: str, path: Path, reference: ReferenceChunks, scored: ScoredSet, window: int, verify_cfg, tokenizer, log_path
) -> FileReport:
    """One GGUF scored against the reference, measured, gated and checked."""
    start = time.monotonic()
    report = FileReport(str(path), quant)
    runner = GGUFRunner(path, window, log_path)
    try:
        tally, hf_tally = score(iter(reference), scored.sequences, len(scored.prompts), runner)
        size, header = path.stat().st_size, read_header(path)
        report.measures = tally.measures() | {
            "size": size,
            "bits_per_weight": size * 8 / header.parameter_count,
            "reference_ppl": hf_tally.measures()["ppl"],
        }
        _gates(report, verify_cfg)
        _checks(runner, header.metadata, tokenizer, report)
    finally:
        runner.close()
    if scored.short:
        report.notes.append(
            f"scored on {scored.positions} positions, short of verify.min_scored_tokens={scored.minimum}: "
            f"the data holds no more (gated on what there is)"
        )
    log.info(f"  {path.name}: {'passed' if report.passed else 'FAILED'} in {time.monotonic() - start:.0f} s")
    return report


# ----------------------------------------------------------------------------- reports


def recommend(reports: list[FileReport], max_kld: float) -> FileReport | None:
    """The smallest file that passed with mean KLD within the budget (its own reference's KLD), or None."""
    within = [r for r in reports if r.passed and r.measures.get("kld", math.inf) <= max_kld]
    return min(within, key=lambda r: r.measures["size"], default=None)


def recommendation_line(reports: list[FileReport], max_kld: float) -> str:
    best = recommend(reports, max_kld)
    if best is None:
        return f"Recommended: none (no file passed with mean KLD <= {max_kld:g}; verify.recommend_max_kld)"
    m = best.measures
    return (
        f"Recommended: {Path(best.path).name} ({best.quant}, {human_size(int(m['size']))}, "
        f"mean KLD {m['kld']:.2e} <= {max_kld:g}): the smallest file within verify.recommend_max_kld"
    )


def _gate_text(r: FileReport) -> str:
    shown = [g for g in r.gates if g.name in ("nmse", "top1", "kld")]
    return ", ".join(f"{g.name} {'<=' if g.name != 'top1' else '>='} {g.threshold:g}" for g in shown)


def to_table(reports: list[FileReport]) -> str:
    """A Markdown table: one row per file, quality measures and gates."""
    head = (
        "| file | type | scored against | size | bits/weight | mean KLD | p99 KLD | same top-1 | ppl "
        "| NMSE (last) | tokens | chat template | stop token | gate | result |"
    )
    rows = [head, "|" + "---|" * 15]
    for r in reports:
        g = {x.name: x for x in r.gates}
        m = r.measures

        def mark(name: str, gates=g) -> str:
            return "-" if name not in gates else ("ok" if gates[name].passed else "FAIL")

        nan = math.nan
        rows.append(
            f"| {Path(r.path).name} | {r.quant} | {r.reference} | {human_size(int(m.get('size', 0)))} | "
            f"{m.get('bits_per_weight', nan):.2f} | {m.get('kld', nan):.2e} | {m.get('kld_p99', nan):.2e} | "
            f"{m.get('top1_all', nan):.1%} | {m.get('ppl', nan):.4g} | {m.get('nmse', nan):.2e} | "
            f"{mark('tokens_identical')} | {mark('chat_template')} | {mark('stop_token')} | {_gate_text(r)} | "
            f"{'PASS' if r.passed else 'FAIL: ' + '; '.join(r.failures())} |"
        )
    return "\n".join(rows)


def to_json(reports: list[FileReport]) -> list[dict]:
    return [{**asdict(r), "passed": r.passed} for r in reports]
