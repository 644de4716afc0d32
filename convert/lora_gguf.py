"""The LoRA adapter as a GGUF (llama.cpp's convert_lora_to_gguf.py), verified on the base GGUF before it ships.

An adapter GGUF is a few MB where a merged model is GBs: llama.cpp applies it at load time on the base GGUF
(`Llama(model_path=base.gguf, lora_path=<name>.lora.gguf)`, `llama-cli -m base.gguf --lora ...`). It is
promoted only if base + adapter, run by llama.cpp, gives the logits of the merged model's float GGUF, which
verification has just proven equal to the merged HF model. When the export made no base GGUF of that float type
(export.export_base off), converting the base (5 GB at the 2B's size) just for this check is avoided: the
adapter is applied at scale -1 to the merged GGUF, which must then give the base HF model's logits (float32,
convert/reference.py). merged - s*BA = base holds exactly when base + s*BA = merged, so it is the same identity,
checked through llama.cpp's own LoRA path; what a user runs (base GGUF + adapter) differs only in the sign.

The gate (LORA_MAX_KLD, LORA_MIN_TOP1): the two sides differ only in where the low-rank product is added (into
the weights before they are rounded to the GGUF's float type, or at run time), so they differ by that float
type's rounding: mean KLD 1.2e-8 measured on the tiny model in f32 (tests/unit/test_lora_gguf.py). The gate is
1e-4 for f32/f16 (ten times under q8_0's) and 1e-3 for bf16 (3 fewer mantissa bits, as verify's NMSE gates);
a dropped delta measures > 1e-2 there, and a wrong scale (rsLoRA read as plain LoRA) far above the gate; the
same gates hold for the scale -1 check (its float32 reference has no rounding of its own).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from convert.export import ExportResult
from convert.gguf_header import read_header
from convert.llamacpp import native_output_to, read_metadata, run_child
from convert.reference import Reference
from convert.tools import tree
from convert.verify import BLOCK, Block, ReferenceChunks, Tally
from core.errors import LlamaCppError
from core.files import move_into_place
from core.locks import promotion_lock
from core.quants import quant_of_file_type

log = logging.getLogger(__name__)

LORA_MAX_KLD = {"f32": 1e-4, "f16": 1e-4, "bf16": 1e-3}  # mean KL(merged || base + adapter), every position
LORA_MIN_TOP1 = 0.99  # share of positions whose argmax agrees
# Scored positions: the failures this catches (a dropped module, a wrong scale) move every position, so a few
# hundred suffice, and each costs two forward passes of the 2B on the CPU.
CHECK_TOKENS = 512
ADAPTER_TYPES = ("f32", "f16", "bf16")  # convert_lora_to_gguf.py --outtype choices that are float


@dataclass
class LoraReport:
    path: str
    outtype: str
    measures: dict[str, float] = field(default_factory=dict)
    passed: bool = False
    against: str = "base GGUF + adapter vs the merged GGUF"  # which check ran (verify_lora or verify_lora_removed)

    def describe(self) -> str:
        m = self.measures
        gate = LORA_MAX_KLD.get(self.outtype, math.nan)
        return (
            f"{Path(self.path).name} [lora {self.outtype}] {self.against}: mean KLD "
            f"{m.get('kld', math.nan):.2e} (gate <= {gate:g}), top-1 {m.get('top1', math.nan):.2%} "
            f"(gate >= {LORA_MIN_TOP1:.0%}), {int(m.get('positions', 0))} positions"
        )


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str, log_path: Path | None) -> Path:
    """convert_lora_to_gguf.py of the pinned tree, offline (`--base` gives the config the Hub would), into `out`.

    llama.cpp scales an adapter by alpha / r; PEFT's rsLoRA scales by alpha / sqrt(r): such an adapter is
    converted with alpha * sqrt(r), which gives llama.cpp PEFT's scale."""
    if outtype not in ADAPTER_TYPES:
        raise ValueError(f"adapter GGUF type {outtype!r}: one of {', '.join(ADAPTER_TYPES)}")
    out = out.resolve()
    stage = out.with_name(f".{out.name}.adapter")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        if config.get("use_rslora"):
            config["lora_alpha"] = config["lora_alpha"] * math.sqrt(config["r"])
            config["use_rslora"] = False
        (stage / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (stage / "adapter_model.safetensors").symlink_to((adapter_dir / "adapter_model.safetensors").resolve())
        folder = tree()
        cmd = [sys.executable, str(folder / "convert_lora_to_gguf.py"), "--base", str(base_dir.resolve())]
        cmd += ["--outtype", outtype, "--outfile", str(tmp), str(stage)]
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"HF_HUB_OFFLINE": "1"}
        rc = run_child(cmd, log_path, cwd=folder, env=env)
        if rc != 0 or not tmp.is_file():
            where = f"; its output is in {log_path}" if log_path else ""
            raise LlamaCppError(f"convert_lora_to_gguf.py failed on {adapter_dir} (exit {rc}){where}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
    return out


def _add(tally: Tally, ref: np.ndarray, got: np.ndarray) -> None:
    """One text's logits from both sides into the tally, verify's BLOCK positions at a time (no text's logits are
    kept once scored; perplexity is not measured here: no next tokens)."""
    if ref.shape != got.shape:
        raise LlamaCppError(f"adapter check: logits of shape {got.shape} against a reference of {ref.shape}")
    no_next = np.full(len(ref), -1)
    for i in range(0, len(ref), BLOCK):
        rows = slice(i, i + BLOCK)
        tally.add_block(Block.of(ref[rows]), Block.of(got[rows]), no_next[rows])


def _judge(report: LoraReport, tally: Tally, against: str) -> LoraReport:
    """Mean KL(reference || candidate) and argmax agreement over every scored position, against the gates."""
    m = tally.measures()
    if not m["positions"]:
        raise LlamaCppError("adapter check: no position was scored")
    report.measures = {"kld": m["kld"], "top1": m["top1_all"], "positions": m["positions"]}
    report.against = against
    gate = LORA_MAX_KLD.get(report.outtype, 0.0)  # a type without a gate never passes
    report.passed = report.measures["kld"] <= gate and report.measures["top1"] >= LORA_MIN_TOP1
    return report


@contextmanager
def _llama(model: Path, n_ctx: int, log_path: Path | None, lora: Path | None = None, scale: float = 1.0):
    """llama.cpp on `model` with logits at every position, and the adapter `lora` attached at `scale`.

    The adapter is attached here rather than through Llama(lora_path=...): llama-cpp-python then turns mmap off
    (a rule from when llama.cpp merged an adapter into the weights at load), which reads the whole GGUF into
    anonymous memory (5.2 GB for the 2B in f16; what made the export's peak) although llama.cpp applies the
    adapter at run time, to weights it can keep mapped."""
    with native_output_to(log_path):
        llm = llama_cpp.Llama(
            model_path=str(model),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            logits_all=True,
            verbose=False,
        )
    adapter = None
    try:
        if lora is not None:
            with native_output_to(log_path):
                adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(lora).encode("utf-8"))
            if adapter is None:
                raise LlamaCppError(f"llama.cpp could not load the adapter {lora} on {model.name}")
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            if llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, (ctypes.c_float * 1)(scale)):
                raise LlamaCppError(f"llama.cpp could not apply the adapter {lora} to {model.name}")
        yield llm
    finally:
        if adapter is not None:  # as llama-cpp-python does: the adapter goes first, then context and model
            llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
            llama_cpp.llama_adapter_lora_free(adapter)
        llm.close()


def _token_ids(llm, texts: list[str], n_ctx: int, budget: int) -> list[list[int]]:
    """<bos> + each text (special markers as tokens), cut to n_ctx, for texts until `budget` positions (0: all)."""
    out: list[list[int]] = []
    for text in texts:
        if budget and sum(len(ids) for ids in out) >= budget:
            break
        out.append(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)[:n_ctx])
    return out


def _logits(llm, ids: list[int], log_path: Path | None) -> np.ndarray:
    """llama.cpp's float32 logits at every position of one sequence (a copy)."""
    llm.reset()
    with native_output_to(log_path):
        llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _adapter_report(lora_gguf: Path) -> LoraReport:
    header = read_header(lora_gguf)
    meta = header.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise LlamaCppError(f"{lora_gguf} is not a LoRA adapter GGUF (general.type {meta.get('general.type')})")
    # an adapter GGUF has no general.file_type: its type is its tensors' (lora_a/lora_b, all of one type)
    return LoraReport(str(lora_gguf), gguf.GGMLQuantizationType(header.tensors[0].type).name.lower())


def _texts(texts: list[str]) -> list[str]:
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("verify_lora needs at least one non-empty text")
    return texts


def verify_lora(
    base_gguf: Path,
    lora_gguf: Path,
    merged_gguf: Path,
    texts: list[str],
    log_path: Path | None,
    n_ctx: int = 256,
    budget: int = CHECK_TOKENS,
) -> LoraReport:
    """Base GGUF + adapter GGUF vs the merged float GGUF on the texts (about `budget` positions); the gates decide
    `passed`. The merged GGUF's logits are kept (budget x vocab floats), the other side is scored text by text."""
    texts = _texts(texts)
    report = _adapter_report(lora_gguf)
    with _llama(merged_gguf, n_ctx, log_path) as llm:
        ids = _token_ids(llm, texts, n_ctx, budget)
        ref = [_logits(llm, x, log_path) for x in ids]
    tally = Tally()
    with _llama(base_gguf, n_ctx, log_path, lora=lora_gguf) as llm:
        for x, r in zip(ids, ref, strict=True):
            _add(tally, r, _logits(llm, x, log_path))
    return _judge(report, tally, "base GGUF + adapter vs the merged GGUF")


def verify_lora_removed(
    merged_gguf: Path,
    lora_gguf: Path,
    base_dir: Path,
    texts: list[str],
    log_path: Path | None,
    n_ctx: int = 256,
    budget: int = CHECK_TOKENS,
) -> LoraReport:
    """Without a base GGUF: the merged float GGUF with the adapter applied at scale -1 vs the base HF model
    (float32, streamed by convert/reference.py) on the texts. merged - s*BA = base holds exactly when
    base + s*BA = merged: the same identity, through llama.cpp's own LoRA path, with no base GGUF written.
    Scored text by text: one text's logits from each side at a time."""
    texts = _texts(texts)
    report = _adapter_report(lora_gguf)
    tally = Tally()
    with _llama(merged_gguf, n_ctx, log_path, lora=lora_gguf, scale=-1.0) as llm:
        ids = _token_ids(llm, texts, n_ctx, budget)
        # one chunk a text (<= n_ctx tokens); short texts' logits computed together, up to n_ctx rows a call
        reference = ReferenceChunks(Reference(base_dir, ids), n_ctx, None)
        for x, (_, ref) in zip(ids, reference, strict=True):
            _add(tally, ref, _logits(llm, x, log_path))
    return _judge(report, tally, "merged GGUF - adapter vs the base HF model")


def export_lora_gguf(
    adapter_dir: Path,
    base_dir: Path,
    merged_gguf: Path,
    out: Path,
    texts: list[str],
    log_path: Path | None,
    base_gguf: Path | None = None,
) -> LoraReport:
    """Convert the adapter to `out` (in the float type of merged_gguf) and verify it.

    base_gguf: the base model's GGUF in that same float type: base + adapter must give the merged GGUF's logits.
    If None (export.export_base off), rather than converting the base (5 GB at the 2B's size) for the check, the
    adapter is removed from the merged GGUF (scale -1), which must give the base HF model's logits
    (verify_lora_removed). On a failed gate `out` is deleted and the report says why (passed False)."""
    file_type = read_metadata(merged_gguf).get("general.file_type")
    merged_type = quant_of_file_type(file_type) if isinstance(file_type, int) else None
    outtype = merged_type if merged_type in ADAPTER_TYPES else "f32"
    try:
        convert_lora(adapter_dir, base_dir, out, outtype, log_path)
        if base_gguf is not None:
            report = verify_lora(base_gguf, out, merged_gguf, texts, log_path)
        else:
            report = verify_lora_removed(merged_gguf, out, base_dir, texts, log_path)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if not report.passed:
        out.unlink(missing_ok=True)
    return report


def export_run_lora(adapter_dir: Path, base_dir: Path, results: list[ExportResult], texts: list[str]) -> LoraReport:
    """The pipeline's call: the adapter of a run whose fine-tuned export is results[0], into its work folder as
    <name>.lora.gguf, checked against its float GGUF; a base export of the same float type in `results` is
    reused as the base GGUF (else the adapter is checked by removing it from the merged GGUF)."""
    merged = results[0]
    same = [r for r in results[1:] if r.float_type == merged.float_type]
    base_gguf = same[0].candidates[same[0].float_type] if same else None
    work_dir = merged.candidates[merged.float_type].parent
    out = work_dir / f"{merged.name}.lora.gguf"
    how = "on the base GGUF" if base_gguf else "by removing it from the merged GGUF (no base GGUF in this export)"
    log.info(f"  adapter -> {out.name} (convert_lora_to_gguf.py), checked {how}")
    report = export_lora_gguf(
        adapter_dir, base_dir, merged.candidates[merged.float_type], out, texts, work_dir / "convert.log", base_gguf
    )
    if not report.passed:
        log.warning(f"adapter GGUF not shipped: {report.describe()}")
    return report


def promote_lora(report: LoraReport | None, gguf_dir: Path, name: str, run_name: str) -> Path | None:
    """A verified adapter GGUF to <gguf_dir>/<name>.lora.gguf (one rename, under the name's promotion lock);
    None when there is none or it failed its check (then any older one there is left as it was)."""
    if report is None or not report.passed:
        return None
    dst = gguf_dir / f"{name}.lora.gguf"
    with promotion_lock(gguf_dir / name, run_name):
        move_into_place(Path(report.path), dst)
    report.path = str(dst)
    return dst
