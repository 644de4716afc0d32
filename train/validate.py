"""Checks that need transformers but no training, run by --dry-run and before a real run writes anything: a
setting that only fails once training starts would otherwise crash after the run folder was created.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer
from transformers.integrations import get_available_reporting_integrations, get_reporting_integration_callbacks

from core.config import Config
from core.errors import PathError, RunError
from core.hub import ResolvedModel, model_family
from core.paths import creatable_dir
from core.runfolder import RunFolder
from train.trainer import training_arguments


def _trainer_settings(cfg: Config, folder: RunFolder, evaluating: bool) -> list[str]:
    problems = []
    try:
        with warnings.catch_warnings():  # their warnings are the real run's to give, once
            warnings.simplefilter("ignore")
            args = training_arguments(cfg, folder, evaluating)
    except ValueError as e:  # an unknown OptimizerNames / SchedulerType value: transformers lists the valid ones
        return [f"training: {str(e).splitlines()[0]}"]
    try:
        Trainer.get_optimizer_cls_and_kwargs(args)  # imports the optimizer's package (bitsandbytes, ...)
    except (ImportError, ValueError) as e:
        problems.append(f"training.optim: {cfg.training.optim}: {str(e).splitlines()[0]}")
    try:
        get_reporting_integration_callbacks(args.report_to)  # an unknown name: ValueError listing the known ones
    except ValueError as e:
        return [*problems, f"training.report_to: {str(e).splitlines()[0]}"]
    # Known but not installed: the Trainer would fail in the integration's __init__ (not instantiated here: a
    # half-built MLflowCallback prints a traceback from its __del__).
    wanted = args.report_to if isinstance(args.report_to, list) else []  # "none"/"all" already resolved
    missing = [r for r in wanted if r not in get_available_reporting_integrations()]
    if missing:
        problems.append(
            f"training.report_to: {', '.join(missing)} not installed (installed: "
            f"{', '.join(get_available_reporting_integrations()) or 'none'}); pip install it, or remove it"
        )
    return problems


def _lora_targets(base: ResolvedModel, cfg: Config) -> list[str]:
    targets = cfg.lora.target_modules
    if targets == ["all-linear"]:  # PEFT's shorthand: every linear layer but the output head
        return []
    config = AutoConfig.from_pretrained(str(base.path), trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):  # from config.json alone: no weights read
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    names = {name for name, _ in model.named_modules()}
    # PEFT matches a target against the end of a dotted module name (tuners_utils.check_target_module_exists)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return []
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
    return [
        f"lora.target_modules: {', '.join(missing)} match no module of {base.repo_id or base.path} "
        f"(its module names: {', '.join(leaves)})"
    ]


def _output_folders(cfg: Config) -> list[str]:
    problems = []
    folders = {"paths.output_dir": cfg.paths.output_dir, "paths.models_dir": cfg.paths.models_dir}
    if cfg.export.enabled:
        folders["export.gguf_dir"] = cfg.export.gguf_dir
    for key, path in folders.items():
        try:
            creatable_dir(path, key)
        except PathError as e:
            problems.append(str(e).splitlines()[0])
    return problems


def validate_training_setup(cfg: Config, folder: RunFolder, base: ResolvedModel, evaluating: bool) -> None:
    """Raise RunError listing every setting the real run would crash on (ModelNotFoundError first for a model family
    the export could not convert or verify)."""
    model_family(base.path)
    problems = _output_folders(cfg) + _trainer_settings(cfg, folder, evaluating) + _lora_targets(base, cfg)
    if problems:
        raise RunError(
            f"{len(problems)} setting(s) the run would fail on:\n  " + "\n  ".join(problems) + "\n  nothing was written"
        )
