"""bench/bench_imatrix.py's own logic, without models: which texts are scored (held-out first, whole records up to
the cap, every position labelled under its origin), the held-out perplexity from convert.score's tally, which
variants each quant type gets, and the table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from convert.score import Block, Tally
from core.records.render import IGNORE_INDEX
from tests.conftest import bench_module

bench = bench_module("bench_imatrix")


class CharTokenizer:
    """One id per character; "^" is <bos> (id 2), as the rendered chat template's leading <bos>."""

    bos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert not add_special_tokens  # the template already wrote <bos>: the bench must not add a second
        return {"input_ids": [2 if c == "^" else ord(c) for c in text]}


def test_scored_sequences_heldout_first_whole_records_up_to_the_cap():
    tok = CharTokenizer()
    seqs = bench.scored_sequences(tok, [("heldout", ["^ab", "cde"]), ("chat", ["fg"])], max_positions=6)
    # "^ab" (3 positions, <bos> from the text), "cde" (4, <bos> added) reaches 7 >= 6: the chat record is not scored
    assert [s.ids for s in seqs] == [[2, 97, 98], [2, 99, 100, 101]]
    # every next token counts towards the PPL (<bos> is no one's next token)
    assert [s.labels for s in seqs] == [[IGNORE_INDEX, *s.ids[1:]] for s in seqs]
    assert [s.record for s in seqs] == ["heldout", "heldout"]
    seqs = bench.scored_sequences(tok, [("heldout", ["ab"]), ("chat", ["fg"])], max_positions=10**9)
    assert [(s.ids, s.record) for s in seqs] == [([2, 97, 98], "heldout"), ([2, 102, 103], "chat")]


def test_scored_sequences_first_record_even_past_the_cap_and_windowed():
    seqs = bench.scored_sequences(CharTokenizer(), [("heldout", ["abcdefg", "h"])], max_positions=1, window=4)
    # one record, in windows of 4 that each start with <bos>; the cap stops before the next record
    assert [s.ids for s in seqs] == [[2, 97, 98, 99], [2, 100, 101, 102], [2, 103]]
    assert [s.labels for s in seqs] == [[IGNORE_INDEX, *s.ids[1:]] for s in seqs]


def test_perplexity_of_one_origin_from_the_tally():
    tally = Tally()
    seq_a = bench.Sequence([2, 5, 6, 7], [2, 5, 6, 7], "heldout")
    seq_b = bench.Sequence([2, 1], [2, 1], "chat")
    uniform8 = Block.of(np.zeros((4, 8), dtype=np.float32))  # every token at 1/8: NLL log 8
    half = Block.of(np.array([[0.0, 0.0], [0.0, 0.0]], dtype=np.float32))  # 2 tokens at 1/2: NLL log 2
    tally.add_nll(uniform8, *seq_a.targets(0, 4), seq_a.record)
    tally.add_nll(half, *seq_b.targets(0, 2), seq_b.record)
    assert tally.loss["heldout"][1] == 3 and tally.loss["chat"][1] == 1  # the last position predicts nothing
    assert math.isclose(bench.perplexity(tally.loss, "heldout"), 8.0, rel_tol=1e-12)
    assert math.isclose(bench.perplexity(tally.loss, "chat"), 2.0, rel_tol=1e-12)
    # the tally's own PPL mixes both origins: (3 log 8 + log 2) / 4 = 10/4 log 2
    assert math.isclose(tally.measures()["ppl"], 2 ** (10 / 4), rel_tol=1e-12)


def test_variants_follow_the_quant_table():
    assert bench.variants("f16") == [("n/a", False)]
    assert bench.variants("q4_k_m") == [("no", False), ("yes", True)]
    assert bench.variants("iq4_xs") == [("no", False), ("yes", True)]  # llama.cpp quantizes it without a matrix
    assert bench.variants("iq3_xxs") == [("no", None), ("yes", True)]  # refused without one: not made


def test_markdown_rows_ratios_and_refusals():
    m = {"size": 1234567, "kld": 0.02, "kld_p99": 0.2, "top1_all": 0.9, "ppl_heldout": 12.3456}
    rows = [
        bench.Row("q4_k_m", "no", Path("a"), measures=m),
        bench.Row("q4_k_m", "yes", Path("b"), measures=m | {"kld": 0.015}),
        bench.Row("iq3_xxs", "no", note="refused without an imatrix"),
    ]
    lines = bench.markdown(rows, 11.0, 3000, 500).splitlines()
    assert lines[2] == "| HF float32 (reference) | | | 0 | 0 | 100% | 11.000 |"
    assert lines[3] == "| q4_k_m | no | 1,234,567 | 2.000e-02 | 2.000e-01 | 90.00% | 12.346 |"
    assert lines[4] == "| q4_k_m | yes | 1,234,567 | 1.500e-02 (0.75x) | 2.000e-01 | 90.00% | 12.346 |"
    assert lines[5] == "| iq3_xxs | no | refused without an imatrix | | | | |"
    assert "(500 pos.)" in lines[0]
