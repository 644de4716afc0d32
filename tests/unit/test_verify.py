"""Verification on the tiny model: the chunked file-by-file scoring equals the whole-array computation, the scored set
reaches verify.min_scored_tokens (or says it cannot), and the recommendation picks the smallest file in budget."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from convert.score import CHUNK, Sequence, windows
from convert.verify import HF_REFERENCE, FileReport, recommend, scored_set, verify_files
from core.config import Config
from core.gates import at_most
from core.records.heldout import HeldOut
from core.records.render import IGNORE_INDEX
from tests.conftest import TINY_GGUF_KEYS

WINDOW = 300  # > CHUNK and not a multiple of it: chunks of 128, 128, 44 cross the windows' boundaries


@pytest.fixture(scope="module")
def exported(tiny_gguf: tuple[Path, Path], tmp_path_factory) -> dict:
    """The tiny model with the chat template, its f32 GGUF and two quants of it."""
    from convert.llamacpp import quantize

    model, f32 = tiny_gguf
    work = tmp_path_factory.mktemp("verify")
    files = {"f32": f32}
    for q in ("q8_0", "q4_k_m"):
        files[q] = work / f"t.{q}.gguf"
        quantize(f32, files[q], q, "q8_0")
    return {"model": model, "files": files}


def test_the_converter_writes_the_provenance_keys_and_quants_inherit_them(exported):
    from convert.llamacpp import read_metadata

    for quant in ("f32", "q8_0"):
        meta = read_metadata(exported["files"][quant])
        assert {k: meta.get(k) for k in TINY_GGUF_KEYS} == TINY_GGUF_KEYS
        assert meta["general.architecture"] == "gemma2" and meta["tokenizer.chat_template"]


def _verify_cfg(**changes):
    return Config().verify.model_copy(update={"max_tokens_per_text": WINDOW, **changes})


def _whole_array(model: Path, gguf: Path, sequences: list[list[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every sequence's full logits from HF (float32, eager, whole model) and from llama.cpp (logits_all)."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32, attn_implementation="eager").eval()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, verbose=False)
    ref, got = [], []
    with torch.no_grad():
        for ids in sequences:
            ref.append(hf(torch.tensor([ids])).logits[0].numpy())
            llm.reset()
            llm.eval(ids)
            got.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    return ref, got


def _lsm(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def _heldout(tok, n: int) -> list[HeldOut]:
    """n records with a supervised answer each, one longer than a window."""
    out = []
    for i in range(n):
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"Question {i}?"}], tokenize=False, add_generation_prompt=True
        )
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        assert prompt[0] == tok.bos_token_id
        answer = tok(f"Answer number {i}. " * (40 if i == 0 else 2) + "<end_of_turn>\n", add_special_tokens=False)
        ids = list(prompt) + answer["input_ids"]
        out.append(HeldOut(f"heldout:{i}", ids, [IGNORE_INDEX] * len(prompt) + answer["input_ids"]))
    return out


def test_chunked_scoring_equals_the_whole_array_computation(exported, tok, monkeypatch, tmp_path):
    import convert.verify as verify

    files = exported["files"]
    cfg = _verify_cfg(min_scored_tokens=700)
    heldout = _heldout(tok, 3)
    text = [f"record {i}: " + "the backup finished and every snapshot verified. " * 30 for i in range(10)]
    fallback = [tok(t)["input_ids"] for t in text]
    open_now, most_open = [], []  # GGUFs mapped at once: one (the point of scoring file by file)

    class Counted(verify.GGUF):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            open_now.append(self)
            most_open.append(len(open_now))

        def close(self):
            super().close()
            open_now.remove(self)

    monkeypatch.setattr(verify, "GGUF", Counted)
    computed = []  # the reference's logits chunks: computed for the first file, read back for the second
    logits_of = verify.Reference.logits_of
    monkeypatch.setattr(
        verify.Reference, "logits_of", lambda self, spans: computed.extend(spans) or logits_of(self, spans)
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    reports = verify_files(
        exported["model"],
        [("f32", files["f32"]), ("q4_k_m", files["q4_k_m"])],
        cfg,
        heldout,
        fallback=fallback,
        scratch_dir=scratch,
    )
    assert most_open == [1, 1] and not open_now
    assert computed and len(set(computed)) == len(computed)  # each chunk once
    assert not list(scratch.iterdir())  # the scratch file had no name
    f32, q4 = reports
    assert f32.reference == q4.reference == HF_REFERENCE
    scored = scored_set(tok, list(cfg.prompts), heldout, fallback, 700, WINDOW)
    assert max(len(s.ids) for s in scored.sequences) == WINDOW > CHUNK and WINDOW % CHUNK  # chunk boundaries crossed
    assert f32.measures["positions"] == q4.measures["positions"] == scored.positions >= 700

    # independently: whole-sequence logits, KL(HF model || q4_k_m GGUF) over all positions, q4's perplexity, and
    # each held-out record's loss on its supervised tokens through both models
    sequences = [s.ids for s in scored.sequences]
    hf_logits, q4_logits = _whole_array(exported["model"], files["q4_k_m"], sequences)
    kld, hits, nll = [], 0, []
    loss: dict[str, list[float]] = {}
    hf_loss: dict[str, list[float]] = {}
    for seq, p, q in zip(scored.sequences, hf_logits, q4_logits, strict=True):
        ids, lp, lq = seq.ids, _lsm(p), _lsm(q)
        kld.append((np.exp(lp) * (lp - lq)).sum(-1))
        hits += int((p.argmax(-1) == q.argmax(-1)).sum())
        nll += [-lq[i, ids[i + 1]] for i in range(len(ids) - 1)]
        for into, logp in ((loss, lq), (hf_loss, lp)):
            sup = [i for i in range(len(ids) - 1) if seq.labels is not None and seq.labels[i + 1] != IGNORE_INDEX]
            if seq.record is not None:
                total = into.setdefault(seq.record, [0.0, 0])
                total[0] += -sum(logp[i, ids[i + 1]] for i in sup)
                total[1] += len(sup)
    kld_all = np.concatenate(kld)
    m = q4.measures
    assert m["kld"] == pytest.approx(kld_all.mean(), rel=2e-3) and m["kld"] > 1e-4
    assert m["kld_p99"] == pytest.approx(np.percentile(kld_all, 99), rel=2e-3)
    assert m["top1_all"] == pytest.approx(hits / len(kld_all), abs=2 / len(kld_all))
    assert m["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-3)
    assert sorted(q4.losses) == sorted(r.key for r in heldout) and len(heldout[0].ids) > WINDOW  # windowed, kept
    for key, (total, count) in loss.items():
        assert q4.losses[key][1] == count > 0 and q4.losses[key][0] == pytest.approx(total, rel=1e-4)
        assert q4.reference_losses[key][0] == pytest.approx(hf_loss[key][0], rel=1e-4)
    assert f32.measures["nmse"] < 1e-4 and f32.measures["top1"] == 1.0 and f32.measures["kld"] < 1e-5
    assert m["size"] == files["q4_k_m"].stat().st_size
    assert 4.5 < m["bits_per_weight"] < f32.measures["bits_per_weight"] / 4  # whole file x 8 / parameters
    assert all(r.passed for r in reports) and not any("short" in n for r in reports for n in r.notes)


def test_quants_alone_are_scored_against_the_hf_model(exported):
    files = exported["files"]
    (q8,) = verify_files(exported["model"], [("q8_0", files["q8_0"])], _verify_cfg(min_scored_tokens=64), [])
    assert q8.reference == HF_REFERENCE and q8.passed
    assert 0 < q8.measures["kld"] < 1e-3


def test_too_little_data_is_reported_and_gated_on_what_there_is(exported):
    files = exported["files"]
    cfg = _verify_cfg(min_scored_tokens=100_000)
    reports = verify_files(exported["model"], [("f32", files["f32"]), ("q8_0", files["q8_0"])], cfg, [])
    for r in reports:
        assert r.passed and 0 < r.measures["positions"] < 100_000
        assert any("short of verify.min_scored_tokens=100000" in n for n in r.notes), r.notes


def test_scored_set_windows_and_fallback(tok):
    bos = tok.bos_token_id
    cut = windows(Sequence([bos, *range(10, 20)], [IGNORE_INDEX, *range(110, 120)], "r"), bos, 4)
    assert [w.ids for w in cut] == [[bos, 10, 11, 12], [bos, 13, 14, 15], [bos, 16, 17, 18], [bos, 19]]
    assert [w.labels for w in cut][:2] == [[IGNORE_INDEX, 110, 111, 112], [IGNORE_INDEX, 113, 114, 115]]
    assert {w.record for w in cut} == {"r"}
    body = tok("word " * 80, add_special_tokens=False)["input_ids"]
    long_record = HeldOut("h:1", [bos, *body], [IGNORE_INDEX, *body])
    fallback = [tok(f"training record {i}")["input_ids"] for i in range(1000)]
    s = scored_set(tok, ["Hi"], [long_record], fallback, 900, 64)
    assert all(w.ids[0] == bos and len(w.ids) <= 64 for w in s.windows)
    long_windows = windows(Sequence(long_record.ids, long_record.labels, long_record.key), bos, 64)
    assert s.windows[: len(long_windows)] == long_windows  # the held-out record first, in windows
    assert sum(len(w.ids) - 1 for w in long_windows) == len(body) > 64  # nothing cut
    assert s.positions >= 900 and not s.short
    used = s.sources["training data"]
    assert used < sum(len(ids) for ids in fallback)  # fallback stops once the minimum is reached
    assert s.positions - used < 900  # and was needed
    enough = scored_set(tok, ["Hi"], [long_record] * 10, fallback, 900, 64)
    assert "training data" not in enough.sources  # held-out data alone reaches the minimum


def _report(name: str, quant: str, size: int, kld: float, passed: bool = True) -> FileReport:
    r = FileReport(name, quant, measures={"size": size, "kld": kld})
    r.gates.append(at_most("kld", kld, 1.0 if passed else 0.0))
    return r


def test_recommend_picks_the_smallest_passing_file_within_budget():
    reports = [
        _report("a.f16.gguf", "f16", 1000, 1e-7),
        _report("a.q8_0.gguf", "q8_0", 500, 1e-3),
        _report("a.q4_k_m.gguf", "q4_k_m", 300, 0.03),
        _report("a.iq4_xs.gguf", "iq4_xs", 250, 0.01, passed=False),
    ]
    assert recommend(reports, 0.02).path == "a.q8_0.gguf"
    assert recommend(reports, 0.05).path == "a.q4_k_m.gguf"
    assert recommend(reports[2:], 0.001) is None


class FakeReference:
    """Known logits for texts of given lengths, counting the chunks computed (ReferenceChunks' own logic only)."""

    def __init__(self, lengths: list[int], vocab: int = 11):
        self.lengths, self.computed, self.calls = lengths, 0, []
        self.config = type("Config", (), {"vocab_size": vocab})()

    def plan(self, chunk: int) -> list[tuple[int, int, int]]:
        return [(t, a, min(a + chunk, n)) for t, n in enumerate(self.lengths) for a in range(0, n, chunk)]

    def logits(self, t: int, start: int, stop: int) -> np.ndarray:
        vocab = self.config.vocab_size
        return (np.arange(start * vocab, stop * vocab, dtype=np.float32) + 1000 * t).reshape(stop - start, vocab)

    def logits_of(self, spans: list[tuple[int, int, int]]) -> np.ndarray:
        self.computed += 1
        self.calls.append(spans)
        return np.concatenate([self.logits(*span) for span in spans])


def _passes(chunks, n: int) -> list[list[tuple[int, np.ndarray]]]:
    return [[(t, a.copy()) for t, a in chunks] for _ in range(n)]


def _expected(fake: FakeReference, chunk: int) -> list[tuple[int, np.ndarray]]:
    return [(t, FakeReference(fake.lengths).logits(t, a, b)) for t, a, b in fake.plan(chunk)]


def _same(got, expected) -> bool:
    return len(got) == len(expected) and all(
        t == u and np.array_equal(a, b) for (t, a), (u, b) in zip(got, expected, strict=True)
    )


def test_reference_chunks_are_computed_once_and_read_back(tmp_path):
    from convert.score import ReferenceChunks

    fake = FakeReference([5, 4, 3])  # chunks of 4: 4+1, 4, 3
    cached = ReferenceChunks(fake, 4, tmp_path)
    passes = _passes(cached, 3)
    cached.close()
    assert fake.computed == 4 and not list(tmp_path.iterdir())  # 4 chunks, computed by the first pass only
    assert all(_same(p, _expected(fake, 4)) for p in passes)


def test_short_chunks_are_computed_together_up_to_a_chunk_of_rows(tmp_path):
    from convert.score import ReferenceChunks

    fake = FakeReference([1, 2, 1, 5, 3])  # chunks of 4: 1, 2, 1 | 4 | 1, 3
    cached = ReferenceChunks(fake, 4, tmp_path)
    passes = _passes(cached, 2)
    assert fake.calls == [[(0, 0, 1), (1, 0, 2), (2, 0, 1)], [(3, 0, 4)], [(3, 4, 5), (4, 0, 3)]]
    assert all(_same(p, _expected(fake, 4)) for p in passes)  # read back chunk by chunk from the one file

    row = 11 * 4
    fake = FakeReference([1, 2, 1, 5, 3])
    partly = ReferenceChunks(fake, 4, tmp_path, budget=3 * row)  # keeps the first two chunks of the first call
    passes = _passes(partly, 2)
    assert partly.kept == 2 and fake.calls[3:] == [[(2, 0, 1)], [(3, 0, 4)], [(3, 4, 5), (4, 0, 3)]]
    assert all(_same(p, _expected(fake, 4)) for p in passes)


def test_reference_chunks_past_the_budget_are_recomputed(tmp_path):
    from convert.score import ReferenceChunks

    fake = FakeReference([5, 4, 3])
    row = 11 * 4  # bytes per position
    cached = ReferenceChunks(
        fake, 4, tmp_path, budget=8 * row
    )  # the first two chunks (4 + 1 rows); the third (4) would pass 8
    passes = _passes(cached, 3)
    assert cached.kept == 2 and fake.computed == 4 + 2 * 2
    assert all(_same(p, _expected(fake, 4)) for p in passes)


def test_reference_chunks_recompute_when_the_scratch_file_fails(tmp_path, caplog):
    from convert.score import ReferenceChunks

    fake = FakeReference([2, 3])
    cached = ReferenceChunks(fake, 4, tmp_path)

    class FullDisk:
        def seek(self, *a):
            pass

        def write(self, b):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    cached.file = FullDisk()  # type: ignore[assignment]
    passes = _passes(cached, 2)
    assert fake.computed == 4 and "No space left" in caplog.text and cached.file is None  # each pass computes
    assert all(_same(p, _expected(fake, 4)) for p in passes)
    none = ReferenceChunks(fake, 4, None)
    assert none.file is None and _same(_passes(none, 1)[0], _expected(fake, 4)) and fake.computed == 6


@pytest.mark.parametrize("noise", [1e-3, 0.5])  # KLD ~1e-7 (an f16 file's size) and ~0.1 (a coarse quant's)
def test_tally_measures_equal_the_float64_definitions(noise):
    from convert.score import Block, Tally

    rng = np.random.default_rng(0)
    rows, vocab = 40, 5000
    ref = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    got = (ref + rng.standard_normal((rows, vocab)) * noise).astype(np.float32)
    ref[3, [7, 9]] = got[3, [7, 9]] = 50.0  # a tie for the top: the first index counts on both sides
    got[5] = ref[5]
    got[5, ref[5].argmax()] -= 40.0  # one row whose top-1 moves
    next_ids = rng.integers(0, vocab, rows)
    next_ids[::9] = -1  # rows without a next token (last of a text)
    supervised = np.where(np.arange(rows) % 3 == 0, next_ids, -1)  # a third of them carry a loss
    tally = Tally()
    for a in range(0, rows, 16):
        rows_ = slice(a, a + 16)
        tally.add_block(Block.of(ref[rows_]), Block.of(got[rows_]), next_ids[rows_], supervised[rows_], "r")

    lp, lq = _lsm(ref), _lsm(got)
    kld = (np.exp(lp) * (lp - lq)).sum(-1)
    has = next_ids >= 0
    m = tally.measures()
    assert m["positions"] == rows
    assert m["kld"] == pytest.approx(kld.mean(), rel=1e-9) and m["kld_p99"] == pytest.approx(np.percentile(kld, 99))
    assert m["top1_all"] == (ref.argmax(-1) == got.argmax(-1)).mean() < 1
    assert m["ppl"] == pytest.approx(math.exp(-lq[has, next_ids[has]].mean()), rel=1e-12)
    assert tally.nll_count == has.sum() < rows
    sup = supervised >= 0
    assert tally.loss["r"][1] == sup.sum() and tally.loss["r"][0] == pytest.approx(-lq[sup, supervised[sup]].sum())


def test_scoring_many_blocks_does_not_grow_the_heap():
    """Per-block results kept as tensors pinned the malloc heap under the blocks' ~30 MB temporaries: RSS grew by
    ~30 MB a block at the 2B's vocabulary (a 9 GiB export peak). Kept as Python floats, the heap is reused."""
    from convert.score import Block, Tally

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((16, 256_000)).astype(np.float32)
    got = ref + np.float32(1e-3)
    next_ids = rng.integers(0, 256_000, 16)
    none = np.full(16, -1)
    tally = Tally()
    for _ in range(5):  # the allocator's steady state
        tally.add_block(Block.of(ref), Block.of(got), next_ids, none, None)
    before = rss()
    for _ in range(35):  # kept tensors: ~30 MB a block (1.9 GB over 60, measured); kept floats: -0.1 to +0.3 GB
        tally.add_block(Block.of(ref), Block.of(got), next_ids, none, None)
    assert rss() - before < 600 << 20 and tally.measures()["positions"] == 40 * 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (verify.device=cuda)")
def test_verdicts_and_measures_are_the_same_on_cpu_and_cuda(exported, monkeypatch):
    """The tiny export verified twice: all on the CPU (reference on the CPU, llama.cpp without offload), then on the
    GPU (reference on CUDA, llama.cpp offloaded when the binding can). Same gates passed, and every gated measure
    within 1% of its gate of the CPU's: the device never decides a verdict."""
    import llama_cpp

    import convert.score as score_module

    files = [(q, exported["files"][q]) for q in ("f32", "q8_0", "q4_k_m")]
    runs = {}
    for device in ("cpu", "cuda"):
        if device == "cpu":
            monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
        else:
            monkeypatch.undo()
        score_module.gpu_layers.cache_clear()
        runs[device] = verify_files(exported["model"], files, _verify_cfg(min_scored_tokens=256, device=device), [])
    score_module.gpu_layers.cache_clear()
    for cpu, cuda in zip(runs["cpu"], runs["cuda"], strict=True):
        assert [(g.name, g.passed) for g in cpu.gates] == [(g.name, g.passed) for g in cuda.gates], cpu.quant
        assert cpu.passed and cuda.passed, (cpu.failures(), cuda.failures())
        assert cpu.measures["positions"] == cuda.measures["positions"] >= 256
        for a, b in zip(cpu.gates, cuda.gates, strict=True):
            if a.threshold is not None:
                assert abs(a.value - b.value) <= 0.01 * a.threshold, (cpu.quant, a.describe(), b.describe())
        assert cuda.measures["reference_ppl"] == pytest.approx(cpu.measures["reference_ppl"], rel=1e-4)
