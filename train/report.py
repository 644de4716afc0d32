"""What a run prints: the dry-run plan, the training line, and the report of an already complete run."""

from __future__ import annotations

import logging
from pathlib import Path

from convert.ggufs import gguf_filename
from convert.summary import print_summary
from core import releases
from core.config import REPORTED, Config, changed_keys, load_config, to_yaml
from core.errors import RunError
from core.files import human_size
from core.hub import ResolvedModel
from core.runfolder import Manifest, RunFolder
from train.data import PreparedData, describe_data

log = logging.getLogger(__name__)


def describe_plan(cfg: Config, paths: RunFolder, base: ResolvedModel, data: PreparedData, example: str) -> str:
    lines = [
        "dry run: config, model, data and trainer settings are valid; nothing was written.",
        "",
        "--- resolved config",
        to_yaml(cfg).rstrip(),
        "",
        f"--- base model: {base.repo_id or base.path} (revision {base.revision or 'local'})",
        f"    {base.path}",
        "--- data",
    ]
    lines += describe_data(cfg.data, data.train_stats, data.eval_stats, paths.root)
    lines += [
        "--- first training example, as tokens decoded ([[...]] is what the loss sees)",
        example,
        "",
        "--- would write",
        f"    run folder   {paths.root}/ (config.yaml, checkpoints/, metrics.jsonl, loss.png, manifest.json)",
        f"    adapter      {paths.adapter_out}/",
    ]
    if cfg.export.enabled:
        names = [gguf_filename(cfg.export.name, q, cfg.export.default_quant) for q in cfg.export.quants]
        lines += [
            f"    merged model {paths.merged_out}/",
            f"    GGUF         {cfg.export.gguf_dir}/{{{', '.join(names)}}}",
        ]
    return "\n".join(lines)


def trained_line(manifest: Manifest, adapter_out: Path) -> str:
    t = manifest.training or {}
    first, last = t.get("first_logged_loss"), t.get("last_logged_loss")
    adapter_bytes = sum(f["size"] for f in manifest.artifacts["adapter"]["files"].values())
    return (
        f"trained {t['global_step']} steps in {t['seconds']} s; "
        + (f"loss {first:.4g} -> {last:.4g}; " if first is not None else "no loss logged; ")
        + f"adapter: {adapter_out} ({human_size(adapter_bytes)})"
    )


def check_complete_run_config(paths: RunFolder, cfg: Config) -> None:
    """A complete run is only reported, so a key changed since it ran would be ignored: refuse instead."""
    if not paths.config.is_file():
        return
    old = load_config(paths.config)
    changed = changed_keys(old, cfg, REPORTED)
    if not changed:
        return
    export_only = not changed_keys(old, cfg, ("trained",))
    hint = (
        "python -m convert export --config ... exports the trained adapter again with them"
        if export_only
        else f"pass --fresh to retrain with them, or keep this run and use another run_name (run_name={cfg.run_name}-2)"
    )
    raise RunError(
        f"run {cfg.run_name} is complete ({paths.manifest}) and was made with a different config; these changes "
        f"would be ignored:\n    " + "\n    ".join(changed) + f"\n  fix: {hint}"
    )


def finished_summary(paths: RunFolder, cfg: Config, manifest: Manifest) -> Manifest:
    """A rerun of a complete run: check its config and promoted files are still the ones it made, then report."""
    check_complete_run_config(paths, cfg)
    log.info(
        f"run {cfg.run_name} is already complete ({paths.manifest}); not training again. "
        f"Pass --fresh to retrain from scratch, or choose another run_name."
    )
    replaced = False
    gguf_dir = Path(cfg.export.gguf_dir)
    for export in manifest.artifacts.get("gguf", {}).values():
        live = releases.live(gguf_dir, export["name"])
        problems = [] if live is None or live.id != export["release"] else live.problems()
        if live is None or live.id != export["release"] or problems:
            replaced = True
            now = "nothing" if live is None else f"{live.run}'s files" if live.id != export["release"] else "damaged"
            log.warning(
                f"warning: {gguf_dir / export['name']}.gguf and its other files are no longer what this run "
                f"published (now: {now}{'; ' + '; '.join(problems) if problems else ''}); "
                f"`python -m convert export` publishes this run's again"
            )
    # The demo answers come from the promoted files: once replaced, they would be another run's answers.
    print_summary(paths, cfg, manifest, answers=not replaced)
    return manifest
