"""The LoRA adapter as a GGUF (llama.cpp's convert_lora_to_gguf.py), shipped only if llama.cpp applying it gives the
HF model's logits: base GGUF + adapter = merged model, or without a base GGUF of that type, merged GGUF - adapter =
base model, the same identity (docs/export-and-verify.md, "Adapter GGUF").
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import gguf

from convert.gguf_header import read_header
from convert.llamacpp import replaced_when_done, run_converter
from convert.score import GGUF, Sequence, compare, windows
from convert.verify import FileReport
from core.errors import LlamaCppError
from core.gates import at_least, at_most

log = logging.getLogger(__name__)

# Mean KL(merged || base + adapter) over every position. llama.cpp's side differs from the float32 reference by the
# float type's rounding only, as the float GGUFs' NMSE gates say: ten times under q8_0's gate for f32/f16, bf16 (3
# fewer mantissa bits) as verify.max_nmse. A dropped delta or a wrong scale (rsLoRA read as plain LoRA) measures
# far above (docs/export-and-verify.md, "Adapter GGUF").
LORA_MAX_KLD = {"f32": 1e-4, "f16": 1e-4, "bf16": 1e-3}
LORA_MIN_TOP1 = 0.99  # share of positions whose argmax agrees
# Scored positions: the failures this catches (a dropped module, a wrong scale) move every position, so a few
# hundred suffice, and each costs two forward passes of the 2B on the CPU; in windows of CHECK_WINDOW tokens.
CHECK_TOKENS, CHECK_WINDOW = 512, 256


def convert_lora(
    adapter_dir: Path, base_dir: Path, out: Path, outtype: str, log_path: Path | None, keys: dict[str, str] | None
) -> None:
    """convert_lora_to_gguf.py of the pinned tree, offline (`--base` gives the config the Hub would), into `out`;
    `keys` (the run's provenance) written into the file as the merged model's GGUF carries them.

    llama.cpp scales an adapter by alpha / r; PEFT's rsLoRA scales by alpha / sqrt(r): such an adapter is
    converted with alpha * sqrt(r), which gives llama.cpp PEFT's scale."""
    out = out.resolve()
    # the converter names the file after the adapter's folder (general.name, general.finetune): the staged copy's
    # folder is named as the file, inside a hidden work folder
    work = out.with_name(f".{out.name}.adapter")
    stage = work / out.name.removesuffix(".gguf")
    shutil.rmtree(work, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        if config.get("use_rslora"):
            config["lora_alpha"] = config["lora_alpha"] * math.sqrt(config["r"])
            config["use_rslora"] = False
        (stage / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (stage / "adapter_model.safetensors").symlink_to((adapter_dir / "adapter_model.safetensors").resolve())
        with replaced_when_done(out) as tmp:
            args = ["--base", str(base_dir.resolve()), "--outtype", outtype, "--outfile", str(tmp), str(stage)]
            run_converter("convert_lora_to_gguf.py", str(adapter_dir), args, tmp, log_path, keys)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_lora_gguf(
    adapter_dir: Path,
    base_dir: Path,
    merged_dir: Path,
    merged_gguf: Path,
    outtype: str,
    out: Path,
    ids: list[list[int]],
    log_path: Path | None,
    base_gguf: Path | None = None,
    keys: dict[str, str] | None = None,
    device: str = "auto",
) -> FileReport:
    """Convert the adapter to `out` in `outtype`, the float type of merged_gguf, and check it: llama.cpp running
    base_gguf (of that type) with the adapter applied, against the merged HF model; or without one, merged_gguf with
    it applied at scale -1, against the base HF model; over about CHECK_TOKENS positions of `ids` (token sequences
    starting with <bos>). On a failed gate `out` is deleted and the report says why."""
    runtime, scale, reference_dir = (base_gguf, 1.0, merged_dir) if base_gguf else (merged_gguf, -1.0, base_dir)
    try:
        convert_lora(adapter_dir, base_dir, out, outtype, log_path, keys)
        header = read_header(out)
        meta = header.metadata
        if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
            raise LlamaCppError(f"{out} is not a LoRA adapter GGUF (general.type {meta.get('general.type')})")
        # an adapter GGUF has no general.file_type: its type is its tensors' (lora_a/lora_b, all of one type)
        written = gguf.GGMLQuantizationType(header.tensors[0].type).name.lower()
        sequences: list[Sequence] = []
        for seq in ids:
            if sum(len(s.ids) for s in sequences) >= CHECK_TOKENS:
                break
            sequences += windows(Sequence(seq), seq[0], CHECK_WINDOW)
        if not sequences:
            raise ValueError("the adapter check needs at least one token sequence")
        with GGUF(runtime, CHECK_WINDOW, log_path=log_path, lora=out, lora_scale=scale) as g:
            tally, _ = compare(reference_dir, g, sequences, device)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    m = tally.measures()
    gate = LORA_MAX_KLD.get(written, math.nan)  # a type without a gate never passes
    gates = [at_most("kld", m["kld"], gate), at_least("top1", m["top1_all"], LORA_MIN_TOP1)]
    what = "base GGUF + adapter" if scale > 0 else "merged GGUF - adapter"
    reference = f"the {'merged' if scale > 0 else 'base'} HF model ({what})"
    measures = {"kld": m["kld"], "top1": m["top1_all"], "positions": m["positions"]}
    report = FileReport(str(out), written, reference, measures, gates)
    if not report.passed:
        out.unlink(missing_ok=True)
    return report
