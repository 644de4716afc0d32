"""The closing summary of a run: where each artifact is, the recommended GGUF, the verification report (quality
table per file), the demo prompt answered."""

from __future__ import annotations

import logging
from pathlib import Path

from convert.score import answer
from core.config import Config
from core.files import human_size
from core.runfolder import Manifest, RunFolder

log = logging.getLogger(__name__)


def _answers(cfg: Config, manifest: Manifest) -> list[str]:
    """The demo prompt answered by the base and the fine-tuned GGUF through llama.cpp."""
    prompt = cfg.verify.demo_prompt
    gguf = manifest.artifacts.get("gguf", {})
    default = cfg.export.default_quant
    if not prompt or "finetuned" not in gguf:
        return []
    lines = ["", f"--- prompt (through llama.cpp, {default}): {prompt!r}"]
    replies = {}
    for label in ("base", "finetuned"):
        entry = gguf.get(label, {}).get("files", {}).get(default)
        if entry and Path(entry["path"]).is_file():
            replies[label] = answer(Path(entry["path"]), prompt)
            shown = repr(replies[label])
            lines.append(f"    {label:>9}: {shown if len(shown) <= 100 else shown[:60] + ' ... ' + shown[-30:]}")
    if cfg.verify.demo_expected and "finetuned" in replies:
        same = replies["finetuned"].strip() == cfg.verify.demo_expected.strip()
        lines.append(f"    fine-tuned answer {'matches' if same else 'DOES NOT match'} the training target")
    return lines


def _artifact_lines(art: dict) -> list[str]:
    """Where the adapter, the merged model, each GGUF and the adapter GGUF went (with sizes)."""
    lines = []
    for key, label in (("adapter", "adapter:     "), ("merged", "merged model:")):
        if key in art:
            size = human_size(sum(f["size"] for f in art[key]["files"].values()))
            lines.append(f"{label} {art[key]['path']} ({size})")
    for label, export in art.get("gguf", {}).items():
        for quant, entry in export["files"].items():
            lines.append(f"GGUF {label:>9} {quant:>7}: {entry['path']} ({human_size(entry['size'])})")
    lora = art.get("lora_gguf")
    if lora and lora["path"]:
        size = human_size(Path(lora["path"]).stat().st_size) if Path(lora["path"]).is_file() else "missing"
        lines.append(f"adapter GGUF: {lora['path']} ({size}, for the base GGUF; checked against {lora['check']})")
    elif lora:
        lines.append(f"adapter GGUF: not shipped, its check failed: {lora['summary']}")
    return lines


def print_summary(paths: RunFolder, cfg: Config, manifest: Manifest, answers: bool = True) -> None:
    art = manifest.artifacts
    lines = ["", f"=== run {cfg.run_name}: {manifest.status}", f"run folder:   {paths.root}"]
    lines += _artifact_lines(art)
    where = Path(cfg.export.gguf_dir) if manifest.status == "complete" else paths.export_dir
    for label, file in ((manifest.verification or {}).get("recommended") or {}).items():
        shown = where / file if file else "none within verify.recommend_max_kld"
        lines.append(f"recommended:  {shown} ({label}; quality table below)")
    t = manifest.training or {}
    if art.get("loss_plot") and t.get("first_logged_loss") is not None:
        lines.append(
            f"loss:         {t['first_logged_loss']:.4g} -> {t['last_logged_loss']:.4g} "
            f"({t.get('global_step')} steps; curve {art['loss_plot']})"
        )
    verify_md = paths.verify_md
    if verify_md.is_file():
        lines += ["", verify_md.read_text().strip()]
    if answers:
        lines += _answers(cfg, manifest)
    elif cfg.verify.demo_prompt:
        lines += ["", "(no demo answers: the promoted GGUFs are no longer this run's files; see the warnings above)"]
    log.info("\n".join(lines))
