"""The scoring layer: the one place that runs a GGUF in llama.cpp (logits, tokens, greedy replies, optionally with an
adapter GGUF), and the one tally that compares its logits with the HF model's (convert/reference.py). Verification,
the adapter GGUF's check, the nightly job's losses and the summary's answers all score through here
(docs/export-and-verify.md, "How files are scored").
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
import torch

from convert.reference import SCRATCH_BUDGET, Reference
from core import signals
from core.errors import LlamaCppError, PipelineError
from core.log import progress
from core.records.render import IGNORE_INDEX

log = logging.getLogger(__name__)

# Positions compared at a time. Each file's llama.cpp context keeps the logits of one chunk (chunk x vocab x 4
# bytes: 128 MB at 256k), and so does the HF reference; smaller chunks cost more calls, not more accuracy.
CHUNK = 128
# Rows turned into float64 log-probabilities at once (8 x 256k x 8 bytes = 16 MB an array): the lowest peak memory
# for the same speed (measured: docs/export-and-verify.md, "Scoring").
BLOCK = 8


@functools.cache
def gpu_layers() -> int:
    """n_gpu_layers of every GGUF opened here: all of them (-1) when the installed llama-cpp-python has a GPU device
    (llama_supports_gpu_offload: built with CUDA or another GPU backend, and a device is visible), else none (0, the
    CPU: the binding `make setup` and the image build is CPU-only). Decided, and logged, once a process."""
    if llama_cpp.llama_supports_gpu_offload():
        log.info("llama.cpp: GPU offload supported by the binding: GGUFs run with every layer on the GPU")
        return -1
    log.info("llama.cpp: no GPU offload in the binding: GGUFs run on the CPU")
    return 0


@contextmanager
def native_output_to(log_path: Path | None) -> Iterator[None]:
    """Run native code with what it prints on stdout/stderr (llama.cpp's load logs, which ignore verbose=False in
    places) sent to a log file, or discarded. Stop signals take effect when the block ends: raised from llama.cpp's
    log callback, their exception would be discarded by ctypes."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with signals.deferred(), open(log_path or os.devnull, "ab") as out:
        for fd in saved:
            os.dup2(out.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


# ----------------------------------------------------------------------------- one GGUF in llama.cpp
class GGUF:
    """One GGUF in llama.cpp: logits of CHUNK positions at a time (llama_decode with a batch of its own: Llama.eval
    with logits_all keeps n_ctx x vocab float32 scores besides llama.cpp's), tokens, greedy replies. lora: an adapter
    GGUF attached to the context at `lora_scale` (Llama(lora_path=) would read the whole GGUF into memory)."""

    def __init__(
        self,
        path: Path,
        n_ctx: int = 512,
        *,
        log_path: Path | None = None,
        lora: Path | None = None,
        lora_scale: float = 1.0,
        vocab_only: bool = False,
    ):
        self.path, self.log_path = Path(path), log_path
        # OMP_NUM_THREADS when set (torch reads it too; the tests give each worker its share of the cores), else every
        # core (llama-cpp-python's default is half of them)
        n = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        with native_output_to(log_path):
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=CHUNK,
                n_ubatch=CHUNK,
                n_threads=n,
                n_threads_batch=n,
                n_gpu_layers=gpu_layers(),
                vocab_only=vocab_only,
                verbose=False,
                seed=0,
            )
        self.adapter = None
        self.batch = None if vocab_only else llama_cpp.llama_batch_init(CHUNK, 0, 1)
        if lora is None:
            return
        with native_output_to(log_path):
            self.adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, str(lora).encode("utf-8"))
        if self.adapter is None:
            self.close()
            raise LlamaCppError(f"llama.cpp could not load the adapter {lora} on {self.path.name}")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapter)
        if llama_cpp.llama_set_adapters_lora(self.llm.ctx, adapters, 1, (ctypes.c_float * 1)(lora_scale)):
            self.close()
            raise LlamaCppError(f"llama.cpp could not apply the adapter {lora} to {self.path.name}")

    def __enter__(self) -> GGUF:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, text: str, bos: bool) -> list[int]:
        """Token ids of `text`, special markers (<start_of_turn>) as the single tokens they are."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True)

    def ends_generation(self, token_id: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(self.llm.model), token_id))

    def start(self) -> None:
        """A new sequence: forget the KV cache."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)

    def logits(self, ids: list[int], pos0: int) -> np.ndarray:
        """float32 logits [len(ids) <= CHUNK, vocab] of positions pos0.. of the current sequence (a view of
        llama.cpp's buffer, valid until the next call)."""
        b = self.batch
        assert b is not None, "a vocab_only GGUF has no logits"
        b.n_tokens = len(ids)
        for i, token in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos0 + i, 1, 1
            b.seq_id[i][0] = 0
        with native_output_to(None):
            rc = llama_cpp.llama_decode(self.llm.ctx, b)
        if rc != 0:
            raise LlamaCppError(f"llama_decode failed on {self.path.name} (code {rc}) at position {pos0}")
        ptr = ctypes.cast(llama_cpp.llama_get_logits(self.llm.ctx), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(len(ids), self.llm.n_vocab()))

    def reply(self, prompt: str, max_tokens: int = 64) -> tuple[str, bool]:
        """Greedy reply to one user turn, rendered with the file's own chat template and stopped by its own
        end-of-turn token (a file that lost either answers visibly wrong); and whether it stopped there."""
        self.llm.reset()
        with native_output_to(self.log_path):
            out = self.llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens
            )
        choice = out["choices"][0]  # type: ignore[index]  # not streamed: one response
        return choice["message"]["content"] or "", choice["finish_reason"] == "stop"

    def close(self) -> None:
        if self.adapter is not None:  # as llama-cpp-python does: the adapter goes first, then context and model
            llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
            llama_cpp.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        self.llm.close()


def answer(path: Path, prompt: str, max_tokens: int = 64) -> str:
    """A GGUF's greedy reply as an application gets it; a reply that never reached <end_of_turn> says so."""
    with GGUF(path) as g:
        text, stopped = g.reply(prompt, max_tokens)
    return text if stopped else text + " [... no <end_of_turn>]"


# ----------------------------------------------------------------------------- what is scored
@dataclass
class Sequence:
    """Token ids scored at every position. A held-out record's carry the labels training puts a loss on
    (IGNORE_INDEX elsewhere) and the record's key, so that its supervised loss is tallied per record."""

    ids: list[int]
    labels: list[int] | None = None
    record: str | None = None

    def targets(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """For positions start..stop: the next token (-1 at the end), and the next token where it is supervised
        (-1 elsewhere): logits at position p predict token p + 1, the shift training applies."""
        nxt = np.array([*self.ids[1:], -1][start:stop])
        if self.labels is None:
            return nxt, np.full(stop - start, -1)
        sup = np.array([*self.labels[1:], IGNORE_INDEX][start:stop])
        return nxt, np.where(sup == IGNORE_INDEX, -1, sup)


def windows(seq: Sequence, bos: int, window: int) -> list[Sequence]:
    """A sequence (starting with <bos>) cut into windows of at most `window` tokens, each starting with <bos> (Gemma
    without <bos> at position 0 is not the model anyone runs); its labels cut alike."""
    body = seq.ids[1:] if seq.ids[:1] == [bos] else seq.ids
    labels = (seq.labels[1:] if seq.ids[:1] == [bos] else seq.labels) if seq.labels is not None else None
    step = window - 1
    return [
        Sequence(
            [bos, *body[i : i + step]],
            [IGNORE_INDEX, *labels[i : i + step]] if labels is not None else None,
            seq.record,
        )
        for i in range(0, max(len(body), 1), step)
    ]


# ----------------------------------------------------------------------------- the reference, chunk by chunk
class ReferenceChunks:
    """The reference's logits chunks for every file: the first pass writes them to an unnamed file in `scratch_dir`
    (disk and page cache, not the process's memory), the passes after it read them back; chunks past `budget` bytes,
    without a scratch_dir or after a failed write, are recomputed. A chunk read back is valid until the next."""

    def __init__(self, reference: Reference, chunk: int, scratch_dir: Path | None, budget: int = SCRATCH_BUDGET):
        self.reference, self.plan, self.chunk, self.budget = reference, reference.plan(chunk), chunk, budget
        # unnamed (O_TMPFILE): gone with the process, however it ends; closed by close()
        self.file = tempfile.TemporaryFile(dir=scratch_dir) if scratch_dir is not None else None  # noqa: SIM115
        self.kept = 0  # chunks 0..kept-1 are in the file, in order
        self.buf: np.ndarray | None = None

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        offset, i = 0, 0
        while i < len(self.plan):
            if self.file is not None and i < self.kept:
                t, start, stop = self.plan[i]
                part = self._read(offset, stop - start)
                yield t, part
                offset, i = offset + part.nbytes, i + 1
                continue
            group = self._group(i)
            logits, row = self.reference.logits_of(group), 0
            for t, start, stop in group:
                part = logits[row : row + stop - start]
                if self.file is not None and i == self.kept and offset + part.nbytes <= self.budget:
                    self._keep(offset, part)
                yield t, part
                offset, row, i = offset + part.nbytes, row + stop - start, i + 1

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
        if self.buf is None or self.buf.shape[0] < rows:
            self.buf = np.empty((rows, self.reference.config.vocab_size), dtype=np.float32)
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


class InStep:
    """A second reference as score()'s candidate (the merge check: a merged model against the model as trained):
    made on the same sequences and chunk size, its chunks come in the order score() asks for positions."""

    def __init__(self, name: str, chunks: ReferenceChunks):
        self.path, self.chunks = Path(name), iter(chunks)

    def start(self) -> None:
        """A new sequence: nothing to forget (each text's positions are independent in the reference)."""

    def logits(self, ids: list[int], pos0: int) -> np.ndarray:
        _, logits = next(self.chunks)
        assert logits.shape[0] == len(ids), "InStep: not made on the same sequences and chunks"
        return logits


# ----------------------------------------------------------------------------- the measures
@dataclass
class Block:
    """Log-probabilities of a block of rows and their argmax."""

    lp: torch.Tensor
    top1: np.ndarray

    @classmethod
    def of(cls, logits: np.ndarray) -> Block:
        """From float32 logits [rows, vocab]. The log-probabilities in float64 (KLDs of f16 files are ~1e-7: float32
        rounding would be of their size), by torch, not numpy: its kernels use every core, numpy's one
        (docs/export-and-verify.md, "Scoring"). The argmax is taken on the logits (log-softmax keeps each row's
        order, and numpy's float32 argmax is ~20x faster than torch's on float64)."""
        lp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)
        return cls(lp, logits.argmax(-1))


@dataclass
class Tally:
    """Running measures of one model's logits, against a reference (add_block) or alone (add_nll)."""

    kld: list[float] = field(default_factory=list)
    top1_hits: int = 0
    nll_sum: float = 0.0
    nll_count: int = 0
    loss: dict[str, list[float]] = field(default_factory=dict)  # record -> [summed NLL, supervised tokens]
    last_nmse: list[float] = field(default_factory=list)
    last_top1: list[float] = field(default_factory=list)

    def add_block(self, ref: Block, got: Block, nxt: np.ndarray, sup: np.ndarray, record: str | None) -> None:
        """ref, got: log-probabilities [rows, vocab]; nxt, sup: the next token, the supervised next token per row
        (-1 where none)."""
        # as Python floats: a tensor per block, kept, would sit between the blocks' ~30 MB temporaries in the
        # malloc heap and keep it from shrinking (RSS grew by ~2 MB per position, measured)
        self.kld.extend((ref.lp - got.lp).mul_(ref.lp.exp()).sum(-1).tolist())
        self.top1_hits += int((ref.top1 == got.top1).sum())
        self.add_nll(got, nxt, sup, record)

    def add_nll(self, block: Block, nxt: np.ndarray, sup: np.ndarray, record: str | None) -> None:
        """The next tokens' negative log-likelihood (perplexity), and the supervised ones' per record (loss)."""
        for targets, into in ((nxt, None), (sup, record)):
            rows = np.flatnonzero(targets >= 0)
            if not len(rows):
                continue
            nll = -float(block.lp[torch.from_numpy(rows), torch.from_numpy(targets[rows])].sum())
            if into is None:
                self.nll_sum, self.nll_count = self.nll_sum + nll, self.nll_count + len(rows)
            else:
                total = self.loss.setdefault(into, [0.0, 0])
                total[0], total[1] = total[0] + nll, total[1] + len(rows)

    def add_last(self, ref: np.ndarray, got: np.ndarray) -> None:
        """Last-token logits of a prompt (raw, float32): NMSE = MSE / Var(reference), and argmax agreement."""
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


def mean_loss(losses: dict[str, list[float]], records: list[str]) -> float:
    """Mean NLL per supervised token over `records` (nats), from a tally's per-record losses; NaN when a record is
    missing or nothing is supervised."""
    if any(r not in losses for r in records):
        return math.nan
    total, count = (sum(losses[r][i] for r in records) for i in (0, 1))
    return total / count if count else math.nan


def score(
    chunks: Iterator[tuple[int, np.ndarray]], sequences: list[Sequence], gguf: GGUF | InStep, prompts: int = 0
) -> tuple[Tally, Tally]:
    """Run one GGUF (or InStep) over `sequences` in step with the reference's chunks. Returns the file's tally
    against the reference and the reference's own (its perplexity and losses). The first `prompts` sequences are
    chat prompts: their last position's logits are compared raw too (NMSE)."""
    tally, ref_tally = Tally(), Tally()
    t_prev, pos = -1, 0
    bar = progress(sum(len(s.ids) for s in sequences), f"score {gguf.path.name}", "tokens")
    for t, ref in chunks:
        seq = sequences[t]
        if t != t_prev:
            t_prev, pos = t, 0
            gguf.start()
        n = ref.shape[0]
        got = gguf.logits(seq.ids[pos : pos + n], pos)
        nxt, sup = seq.targets(pos, pos + n)
        for b in range(0, n, BLOCK):
            rows = slice(b, min(b + BLOCK, n))
            ref_block = Block.of(ref[rows])
            ref_tally.add_nll(ref_block, nxt[rows], sup[rows], seq.record)
            tally.add_block(ref_block, Block.of(got[rows]), nxt[rows], sup[rows], seq.record)
        if t < prompts and pos + n == len(seq.ids):  # this chunk holds the prompt's last position
            tally.add_last(ref[-1], got[-1])
        pos += n
        bar.update(n)
    bar.close()
    return tally, ref_tally


def compare(model_dir: Path, gguf: GGUF, sequences: list[Sequence], device: str = "auto") -> tuple[Tally, Tally]:
    """One GGUF against the HF model in `model_dir` (streamed, float32, on `device`: verify.device) on `sequences`,
    each at most a chunk long for the reference to batch: (the file's tally, the reference's)."""
    reference = ReferenceChunks(Reference(model_dir, [s.ids for s in sequences], device), CHUNK, None)
    return score(iter(reference), sequences, gguf)


def losses(
    model_dir: Path, gguf_path: Path, sequences: list[Sequence], n_ctx: int, device: str = "auto"
) -> tuple[dict, dict]:
    """({record: [NLL, supervised tokens]} through a GGUF, through the HF model), for records no verification has
    scored already (nightly: a champion scored on a new eval set)."""
    with GGUF(gguf_path, n_ctx) as g:
        tally, ref = compare(model_dir, g, sequences, device)
    return tally.loss, ref.loss
