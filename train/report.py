"""What a run prints: the dry-run plan and the closing summary."""

from __future__ import annotations

import json
from pathlib import Path

from train.artifacts import human_size, sha256_file
from train.config import to_yaml


def manifest_status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def describe_plan(cfg, paths, base, train_stats, eval_stats, example: str) -> str:
    lines = [
        "dry run: config, model and data are valid; nothing was written.",
        "",
        "--- resolved config",
        to_yaml(cfg).rstrip(),
        "",
        f"--- base model: {base.repo_id or base.path} (revision {base.revision or 'local'})",
        f"    {base.path}",
        "--- data",
    ]
    from train.data import describe_data

    lines += describe_data(cfg.data, train_stats, eval_stats, paths.root)
    lines += [
        "--- first training example, as tokens decoded ([[...]] is what the loss sees)",
        example,
        "",
        "--- would write",
        f"    run folder   {paths.root}/ (config.yaml, checkpoints/, metrics.jsonl, loss.png, manifest.json)",
        f"    adapter      {paths.adapter_out}/",
    ]
    if cfg.export.enabled:
        from convert.export import gguf_filename

        names = [gguf_filename(cfg.export.name, q, cfg.export.default_quant) for q in cfg.export.quants]
        lines += [
            f"    merged model {paths.merged_out}/",
            f"    GGUF         {cfg.export.gguf_dir}/{{{', '.join(names)}}}",
        ]
    return "\n".join(lines)


def _answers(cfg, manifest: dict) -> list[str]:
    """The demo prompt answered by the base and the fine-tuned GGUF through llama.cpp."""
    from convert.chat import answer

    prompt = cfg.verify.demo_prompt
    gguf = manifest.get("artifacts", {}).get("gguf", {})
    default = cfg.export.default_quant
    if not prompt or "finetuned" not in gguf:
        return []
    lines = ["", f"--- prompt (through llama.cpp, {default}): {prompt!r}"]
    replies = {}
    for label in ("base", "finetuned"):
        entry = gguf.get(label, {}).get(default)
        if entry and Path(entry["path"]).is_file():
            replies[label] = answer(Path(entry["path"]), prompt)
            shown = repr(replies[label])
            lines.append(f"    {label:>9}: {shown if len(shown) <= 100 else shown[:60] + ' ... ' + shown[-30:]}")
    if cfg.verify.demo_expected and "finetuned" in replies:
        same = replies["finetuned"].strip() == cfg.verify.demo_expected.strip()
        lines.append(f"    fine-tuned answer {'matches' if same else 'DOES NOT match'} the training target")
    return lines


def print_summary(paths, cfg, manifest: dict, say=print) -> None:
    art = manifest.get("artifacts", {})
    lines = ["", f"=== run {cfg.run_name}: {manifest.get('status')}", f"run folder:   {paths.root}"]
    if "adapter" in art:
        size = sum(f["size"] for f in art["adapter"]["files"].values())
        lines.append(f"adapter:      {art['adapter']['path']} ({human_size(size)})")
    if "merged" in art:
        size = sum(f["size"] for f in art["merged"]["files"].values())
        lines.append(f"merged model: {art['merged']['path']} ({human_size(size)})")
    for label, files in art.get("gguf", {}).items():
        for quant, entry in files.items():
            lines.append(f"GGUF {label:>9} {quant:>7}: {entry['path']} ({human_size(entry['size'])})")
    t = manifest.get("training", {})
    if art.get("loss_plot") and t.get("first_logged_loss") is not None:
        lines.append(
            f"loss:         {t['first_logged_loss']:.4g} -> {t['last_logged_loss']:.4g} "
            f"({t.get('global_step')} steps; curve {art['loss_plot']})"
        )
    verify_md = paths.root / "verify.md"
    if verify_md.is_file():
        lines += ["", verify_md.read_text().strip()]
    lines += _answers(cfg, manifest)
    say("\n".join(lines))


def finished_summary(paths, cfg, say=print) -> dict:
    """A rerun of a complete run: check its promoted files are still the ones it made, then report."""
    manifest = json.loads(paths.manifest.read_text())
    say(
        f"run {cfg.run_name} is already complete ({paths.manifest}); not training again. "
        f"Pass --fresh to retrain from scratch, or choose another run_name."
    )
    for label, files in manifest.get("artifacts", {}).get("gguf", {}).items():
        for quant, entry in files.items():
            p = Path(entry["path"])
            if not p.is_file() or sha256_file(p) != entry["sha256"]:
                say(
                    f"warning: {p} ({label} {quant}) is no longer the file this run exported "
                    f"(missing or replaced, e.g. by another run); `python -m convert export` re-exports it"
                )
    print_summary(paths, cfg, manifest, say)
    return manifest
