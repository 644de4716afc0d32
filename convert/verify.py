"""Prove a GGUF is the model that was trained, and measure what each quant costs: every file is scored against the
HF model in float32 (convert/reference.py, convert/score.py), checked as an application loading it sees it, and gated
(the config's verify section; docs/export-and-verify.md has every measure and gate).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from convert.gguf_header import read_header
from convert.merge import Merge, nf4_weights
from convert.reference import Reference, reference_device
from convert.score import CHUNK, GGUF, InStep, ReferenceChunks, Sequence, score, windows
from core.errors import EXIT_VERIFICATION, PipelineError
from core.files import atomic_write_json, atomic_write_text, human_size
from core.gates import Gate, at_least, at_most, check, failures
from core.quants import QUANTS
from core.records.heldout import HeldOut

log = logging.getLogger(__name__)

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

MERGE = "merge"  # FileReport.quant of the merge check's reports (verify_merge)
CHECKS = ("tokens_identical", "chat_template", "stop_token")  # every file's, whatever its type (_checks)
HF_REFERENCE = "HF model"  # FileReport.reference of a file scored against the HF model


@dataclass
class FileReport:
    path: str
    quant: str
    reference: str = HF_REFERENCE  # what it was scored against (verify_files: always the HF model)
    measures: dict[str, float] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)  # held-out record -> [NLL, supervised tokens]
    reference_losses: dict[str, list[float]] = field(default_factory=dict)  # the same through the HF model

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def failures(self) -> list[str]:
        return failures(self.gates)

    def describe(self) -> str:
        """One line: `x.lora.gguf [f32] vs <reference>: kld = 2e-06 (gate <= 0.0001); top1 = 1 (gate >= 0.99), 512
        positions`."""
        shown = "; ".join(g.describe() for g in self.gates)
        positions = int(self.measures.get("positions", 0))
        return f"{Path(self.path).name} [{self.quant}] vs {self.reference}: {shown}, {positions} positions"


class VerificationFailed(PipelineError):
    """A GGUF, or the merge, failed a gate: nothing was published; the report is in the run folder."""

    exit_code = EXIT_VERIFICATION

    def __init__(self, reports: list[FileReport]):
        self.reports = reports
        lines = [f"{Path(r.path).name} [{r.quant}]: failed " + "; ".join(r.failures()) for r in reports if not r.passed]
        super().__init__("verification failed, nothing was published:\n  " + "\n  ".join(lines))

    def cli_message(self) -> str:
        return f"error: {self}\n  the report is in the run folder (verify.md)"


# ----------------------------------------------------------------------------- the scored token sequences
@dataclass
class ScoredSet:
    """The token sequences every file is scored on (scored_set); `sources` counts the positions per origin."""

    prompts: list[Sequence]
    windows: list[Sequence]
    minimum: int
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def sequences(self) -> list[Sequence]:
        return self.prompts + self.windows

    @property
    def positions(self) -> int:
        return sum(len(s.ids) for s in self.sequences)

    @property
    def short(self) -> bool:
        return self.positions < self.minimum


def scored_set(
    tokenizer, prompts: list[str], heldout: list[HeldOut], fallback: list[list[int]], min_tokens: int, window: int
) -> ScoredSet:
    """Chat-rendered prompts (last-token NMSE/top-1), every held-out record, REFERENCE_TEXTS, then training records
    (token ids) only while the total is short of min_tokens; longer than `window`, in several windows, none cut."""
    bos = tokenizer.bos_token_id

    def ids_of(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if ids[:1] == [bos] else [bos, *ids]

    chat = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts  # chat-rendered, ending in the model header: the next token is the answer
    ]
    scored = ScoredSet([Sequence(ids_of(t)[:window]) for t in chat], [], min_tokens)
    scored.sources["prompts"] = scored.positions
    origins = (
        ("held-out", [Sequence(r.ids, r.labels, r.key) for r in heldout]),
        ("reference texts", [Sequence(ids_of(t)) for t in REFERENCE_TEXTS]),
        ("training data", [Sequence(ids) for ids in fallback]),
    )
    for name, sequences in origins:
        before = scored.positions
        for seq in sequences:
            if name == "training data" and not scored.short:
                break
            scored.windows += windows(seq, bos, window)
        if scored.positions > before:
            scored.sources[name] = scored.positions - before
    return scored


def _checks(gguf: GGUF, meta: dict[str, object], tokenizer) -> tuple[list[Gate], list[str]]:
    """Tokens, chat template (from the file's metadata, `meta`) and stop token, as an application loading the file
    sees them; and what differed."""
    mismatches = [
        t for t in TOKENIZER_PROBES if tokenizer(t, add_special_tokens=False)["input_ids"] != gguf.tokenize(t, False)
    ]
    hf_bos, cpp_bos = tokenizer("Hi")["input_ids"], gguf.tokenize("Hi", True)
    if hf_bos != cpp_bos:
        mismatches.append(f"<bos> handling: HF {hf_bos} vs llama.cpp {cpp_bos}")
    template = tokenizer.chat_template
    return [
        check("tokens_identical", not mismatches),
        check("chat_template", template is not None and meta.get("tokenizer.chat_template") == template),
        check("stop_token", gguf.ends_generation(tokenizer.convert_tokens_to_ids("<end_of_turn>"))),
    ], [f"token mismatch on {m!r}" for m in mismatches]


def quality_gates(quant: str, measures: dict[str, float], verify_cfg) -> list[Gate]:
    """A file type's numeric gates (config section verify): float types on last-token logits, quants on KLD."""
    if QUANTS[quant].is_float:
        return [
            at_most("nmse", measures.get("nmse"), verify_cfg.max_nmse[quant]),
            at_least("top1", measures.get("top1"), verify_cfg.min_top1[quant]),
        ]
    return [at_most("kld", measures.get("kld"), verify_cfg.max_kld[quant])]


def verify_files(
    model_dir: Path,
    files: list[tuple[str, Path]],
    verify_cfg,
    heldout: list[HeldOut],
    log_path: Path | None = None,
    fallback: list[list[int]] | None = None,
    scratch_dir: Path | None = None,
    merge: MergeCheck | None = None,
) -> list[FileReport]:
    """Verify several GGUFs ((quant name, path) pairs) of the HF model in `model_dir`. `heldout` records are scored
    in full; `fallback` (training records' ids) only while short of verify.min_scored_tokens. scratch_dir: where the
    reference's logits are kept between files (ReferenceChunks; None: recomputed for each file). merge: the merge
    check that made model_dir, whose reference of it (on the same scored set) is used rather than computed again."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    device = reference_device(verify_cfg.device).type
    if merge is None:
        scored, window = _scored_set(model_dir, tokenizer, verify_cfg, heldout, fallback or [], f"{len(files)} file(s)")
        log.info(f"  reference: the HF model in float32, layer by layer, on the {device.upper()} (verify.device)")
        model = Reference(model_dir, [s.ids for s in scored.sequences], device)
    else:
        scored, window, model = merge.scored, merge.window, merge.reference
        log.info(f"  reference: the merged model in float32 as the merge check computed it, on the {device.upper()}")
    reference = ReferenceChunks(model, CHUNK, scratch_dir)
    try:
        return [_verify_file(q, path, reference, scored, window, verify_cfg, tokenizer, log_path) for q, path in files]
    finally:
        reference.close()


def _scored_set(
    model_dir: Path, tokenizer, verify_cfg, heldout: list[HeldOut], fallback: list[list[int]], what: str
) -> tuple[ScoredSet, int]:
    """The scored set of verify_cfg for the model in `model_dir`, and its window (logged: `what` is scored on it)."""
    context = getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", None) or 8192
    window = min(verify_cfg.max_tokens_per_text, context)
    scored = scored_set(tokenizer, list(verify_cfg.prompts), heldout, fallback, verify_cfg.min_scored_tokens, window)
    log.info(
        f"  scoring {what} on {scored.positions} positions ({len(scored.sequences)} sequences of "
        f"<= {window} tokens; {', '.join(f'{k} {v}' for k, v in scored.sources.items())})"
    )
    if scored.short:
        log.warning(
            f"  only {scored.positions} positions to score, fewer than verify.min_scored_tokens="
            f"{scored.minimum}: gated on what there is (give verify.heldout_files more records)"
        )
    return scored, window


# The merges the merge check measures: into the base as stored, and (QLoRA) into the 4-bit base dequantized.
W16, DEQUANTIZED = "the full-precision base", "the dequantized 4-bit base"


@dataclass
class MergeCheck:
    """verify_merge's result: a report per way of merging (the closest gated), the nf4 weight names of that way
    (merge_adapter's `nf4`), and its reference on the scored set, which the verification of the merged model's
    GGUFs reuses (verify_files): its decoder pass is the one the merged folder would give, computed already."""

    reports: list[FileReport]
    way: str  # the base merged into: W16 or DEQUANTIZED
    nf4: frozenset[str]
    reference: Reference
    scored: ScoredSet
    window: int


def verify_merge(
    base_dir: Path,
    adapter_dir: Path,
    qlora: bool,
    verify_cfg,
    heldout: list[HeldOut],
    fallback: list[list[int]],
    scratch_dir: Path | None = None,
) -> MergeCheck:
    """The merge checked before it is written: each way of merging, computed as the reference reads the base (Merge
    applied to each weight, no folder written), scored against the model as trained (the adapter added in float32
    to the base training saw: for QLoRA its weights' nf4 round trip) on the verification's scored set."""
    nf4 = nf4_weights(base_dir) if qlora else frozenset()
    trained = Merge(adapter_dir, nf4)
    ways = {W16: Merge(adapter_dir)} | ({DEQUANTIZED: trained} if qlora else {})
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    scored, window = _scored_set(base_dir, tokenizer, verify_cfg, heldout, fallback, f"{len(ways)} merge(s)")
    ids, device = [s.ids for s in scored.sequences], verify_cfg.device
    as_trained = functools.partial(trained.weight, dtype=torch.float32)
    what = f"the adapter on {'the nf4 base training used' if qlora else 'its base'}"
    reference = ReferenceChunks(Reference(base_dir, ids, device, as_trained), CHUNK, scratch_dir)
    reports, merged = [], []
    try:
        for way, merge in ways.items():
            start, name = time.monotonic(), f"merged into {way}"
            merged.append(Reference(base_dir, ids, device, merge.weight))
            candidate = InStep(name, ReferenceChunks(merged[-1], CHUNK, None))
            tally, ref_tally = score(iter(reference), scored.sequences, candidate, len(scored.prompts))
            measures = tally.measures() | {"reference_ppl": ref_tally.measures()["ppl"]}
            reports.append(FileReport(name, MERGE, f"as trained: {what}", measures, [], [], tally.loss, ref_tally.loss))
            log.info(f"  {name}: mean KLD {measures['kld']:.2e} against {what} ({time.monotonic() - start:.0f} s)")
    finally:
        reference.close()
    best = min(range(len(reports)), key=lambda i: reports[i].measures["kld"])
    shipped = reports[best]
    shipped.gates = [at_most("kld", shipped.measures["kld"], verify_cfg.max_merge_kld)]
    for r in reports:
        if r is not shipped:
            r.notes.append(f"not shipped: {shipped.path} is closer to the model as trained")
    way = list(ways)[best]
    return MergeCheck(reports, way, nf4 if way == DEQUANTIZED else frozenset(), merged[best], scored, window)


def _verify_file(
    quant: str, path: Path, reference: ReferenceChunks, scored: ScoredSet, window: int, verify_cfg, tokenizer, log_path
) -> FileReport:
    """One GGUF scored against the reference, measured, gated and checked."""
    start = time.monotonic()
    report = FileReport(str(path), quant)
    with GGUF(path, window, log_path=log_path) as gguf:
        tally, ref_tally = score(iter(reference), scored.sequences, gguf, prompts=len(scored.prompts))
        size, header = path.stat().st_size, read_header(path)
        report.measures = tally.measures() | {
            "size": size,
            "bits_per_weight": size * 8 / header.parameter_count,
            "reference_ppl": ref_tally.measures()["ppl"],
        }
        report.losses, report.reference_losses = tally.loss, ref_tally.loss
        checks, report.notes = _checks(gguf, header.metadata, tokenizer)
    report.gates = quality_gates(quant, report.measures, verify_cfg) + checks
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


def gate_text(gates: list[Gate]) -> str:
    """The numeric gates as the table and verify.md state them: `kld <= 0.05`."""
    return ", ".join(f"{g.name} {g.limit}" for g in gates if g.threshold is not None)


def to_table(reports: list[FileReport]) -> str:
    """A Markdown table: one row per file, quality measures and gates."""
    head = (
        "| file | type | scored against | size | bits/weight | mean KLD | p99 KLD | same top-1 | ppl "
        "| NMSE (last) | tokens | chat template | stop token | gate | result |"
    )
    rows = [head, "|" + "---|" * 15]
    for r in reports:
        g, m, nan = {x.name: x for x in r.gates}, r.measures, math.nan
        marks = [("ok" if g[n].passed else "FAIL") if n in g else "-" for n in CHECKS]
        size = human_size(int(m["size"])) if "size" in m else "-"  # the merge check's rows are no files
        bits = f"{m['bits_per_weight']:.2f}" if "bits_per_weight" in m else "-"
        result = "PASS" if r.passed else "FAIL: " + "; ".join(r.failures())
        rows.append(
            f"| {Path(r.path).name} | {r.quant} | {r.reference} | {size} | "
            f"{bits} | {m.get('kld', nan):.2e} | {m.get('kld_p99', nan):.2e} | "
            f"{m.get('top1_all', nan):.1%} | {m.get('ppl', nan):.4g} | {m.get('nmse', nan):.2e} | "
            f"{' | '.join(marks)} | {gate_text(r.gates)} | {result if r.gates else 'not shipped'} |"
        )
    return "\n".join(rows)


def file_report(run_dir: Path, file: str) -> dict | None:
    """The report of one file, by the name it ships under, in a run's verify.json (write_reports): its measures and
    per-record losses; None without one."""
    try:
        reports = json.loads((run_dir / "verify.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None
    return next((r for r in reports if Path(r["path"]).name == file), None)


def write_reports(
    run_dir: Path, groups: dict[str, list[FileReport]], verify_cfg, passed: bool, reference: Path | None = None
) -> dict:
    """verify.json (machine-readable, returned) and verify.md (the quality table, the reference, the scored token
    count, the gates and a recommendation per exported model) in the run folder. groups: each model's reports, and
    the merge check's (verify_merge: first in the table, under "merge" in verify.json)."""
    reports = [r for group in groups.values() for r in group]
    merges, files = [r for r in reports if r.quant == MERGE], [r for r in reports if r.quant != MERGE]
    scored = min((int(r.measures.get("positions", 0)) for r in reports), default=0)
    minimum, budget = verify_cfg.min_scored_tokens, verify_cfg.recommend_max_kld
    groups = {name: [r for r in group if r.quant != MERGE] for name, group in groups.items()}
    recommended = {name: recommend(group, budget) for name, group in groups.items() if group}
    summary = {
        "passed": passed and all(r.passed for r in reports),
        "reference": str(reference) if reference else None,
        "scored_tokens": scored,
        "min_scored_tokens": minimum,
        "short_of_minimum": scored < minimum,
        "recommend_max_kld": budget,
        "recommended": {n: (Path(r.path).name if r else None) for n, r in recommended.items()},
        "merge": to_json(merges),
        "files": to_json(files),
    }
    atomic_write_json(run_dir / "verify.json", summary)
    head = ["# Verification", ""]
    if reference:
        head += [
            f"Reference: {reference} (Hugging Face, float32, streamed layer by layer): every file,",
            "the float GGUF and each quant, is scored against the model that was trained.",
            "",
        ]
    short = f" (SHORT of verify.min_scored_tokens={minimum}: the data holds no more)" if scored < minimum else ""
    gates = [f"- {q}: {gate_text(quality_gates(q, {}, verify_cfg))}" for q in dict.fromkeys(r.quant for r in files)]
    if merges:
        gates.append(f"- merge: kld <= {verify_cfg.max_merge_kld:g} against the model as trained (the shipped merge)")
    head += [f"Scored positions per file: {scored}{short}.", "", "Gates:", *gates]
    head += ["- every type: tokens identical, chat template equal, <end_of_turn> stops generation", ""]
    lines = [to_table(merges + files), ""]
    lines += [(f"{n}: " if len(recommended) > 1 else "") + recommendation_line(groups[n], budget) for n in recommended]
    notes = [f"- {Path(r.path).name}: {n}" for r in reports for n in r.notes]
    legend = [
        "",
        "size: file bytes; bits/weight: file bytes x 8 / parameters (the whole file, vocabulary and metadata "
        "included); KLD: KL(reference || file) per position; same top-1: argmax agreement; ppl: perplexity of the "
        "scored text under the file's own logits (llama.cpp).",
    ]
    if merges:
        legend.append("merge: the merged HF model, before conversion, against the model as trained (float32).")
    tail = ["", "Notes:", *notes] if notes else []
    atomic_write_text(run_dir / "verify.md", "\n".join([*head, *lines, *legend, *tail]) + "\n")
    return summary


def to_json(reports: list[FileReport]) -> list[dict]:
    return [{**asdict(r), "gates": [g.to_json() for g in r.gates], "passed": r.passed} for r in reports]
