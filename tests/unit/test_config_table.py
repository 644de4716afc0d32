"""One table says what each config key affects (core.config: field metadata), and every use reads it: resume safety,
the refusal of a changed complete run, the nightly job's inputs and the reuse of a live base export. For every key
of the schema, a change is tried against each use; what the use does must follow the key's kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from convert import export
from core.config import BASE_EXPORT, FINGERPRINTED, REPORTED, RESUME, Config, Section, field_affects, to_yaml
from core.errors import RunError
from core.runfolder import RunFolder
from train.nightly import inputs
from train.report import check_complete_run_config
from train.resume import prepare_run_folder

# A valid other value for keys whose type alone does not give one (cross-field rules, patterns, choices).
OTHER: dict[str, Any] = {
    "run_name": "another",
    "model.name_or_path": "acme/other",
    "model.revision": "v2",
    "model.chat_template": None,
    "data.train_files": ["other.jsonl"],
    "data.eval_files": ["eval.jsonl"],
    "data.eval_fraction": 0.1,
    "training.eval_steps": None,
    "training.max_steps": 10,
    "training.fused_lm_head": True,
    "export.default_quant": "q8_0",
    "export.quants": ["f16", "q8_0", "q4_k_m", "q6_k"],
    "export.token_embedding_type": None,
    "export.imatrix": True,
    "verify.prompts": ["Another prompt?"],
    "nightly.run_prefix": "nightly2",
    "nightly.task_checks": "tasks.jsonl",
}


def other_value(key: str, value: Any, annotation: Any) -> Any:
    if key in OTHER:
        return OTHER[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int) and not isinstance(value, bool):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, dict):
        return {k: v / 2 for k, v in value.items()}
    if isinstance(value, list):
        return [*value, value[-1]] if value and isinstance(value[0], str) else ["x"]
    options = [a for t in get_args(annotation) if get_origin(t) is Literal for a in get_args(t)]
    options += list(get_args(annotation)) if get_origin(annotation) is Literal else []
    if options:
        return next(o for o in options if o != value)
    if value is None:
        args = [a for a in get_args(annotation) if a is not type(None)]
        return {int: 3, float: 0.5, str: "x"}.get(args[0] if args else str, "x")
    if isinstance(value, str):
        return value + "x"
    raise AssertionError(f"no other value for {key}={value!r}")


def every_key() -> list[tuple[str, str]]:
    """(dotted key, its kind) for every leaf field of the schema."""
    out = []

    def walk(section: type[BaseModel], prefix: str) -> None:
        for name, field in section.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Section):
                walk(ann, f"{prefix}{name}.")
            else:
                assert issubclass(section, Section)
                out.append((prefix + name, field_affects(section, name)))

    walk(Config, "")
    return out


def changed(cfg: Config, key: str) -> Config:
    raw = cfg.model_dump(mode="json")
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    field = Config
    for p in parents:
        field = field.model_fields[p].annotation  # type: ignore[assignment]
    node[leaf] = other_value(key, node[leaf], field.model_fields[leaf].annotation)
    if key == "data.eval_fraction":  # held out by fraction instead of the eval files
        raw["data"]["eval_files"] = []
    return Config.model_validate(raw)


BASE = Config.model_validate({"data": {"eval_files": ["e.jsonl"]}, "training": {"eval_steps": 5}})


def test_every_key_has_a_kind_and_the_uses_name_real_ones():
    kinds = {kind for _, kind in every_key()}
    assert kinds == {"trained", "exported", "verified", "nightly", "placed"}
    assert {*RESUME, *REPORTED, *FINGERPRINTED, *BASE_EXPORT} <= kinds
    assert len(every_key()) > 80


@pytest.mark.parametrize(("key", "kind"), every_key(), ids=[k for k, _ in every_key()])
def test_each_use_follows_the_table(key: str, kind: str, tmp_path: Path, monkeypatch):
    new = changed(BASE, key)
    assert new != BASE, key

    # resume: a run folder with a committed checkpoint and the old config; the new one is refused iff trained
    folder = RunFolder.of(
        BASE.model_copy(update={"paths": BASE.paths.model_copy(update={"output_dir": str(tmp_path)})})
    )
    (folder.checkpoints / "checkpoint-1").mkdir(parents=True)
    (folder.checkpoints / "checkpoint-1" / "COMMITTED.json").write_text("{}")
    folder.config.write_text(to_yaml(BASE))
    refused = True
    try:
        prepare_run_folder(folder, new, fresh=False, identity={})
        refused = False
    except RunError as e:
        assert "unsafe" in str(e) and key.split(".")[-1] in str(e), str(e)
    assert refused == (kind in RESUME), key

    # a complete run only reports: a change it would ignore is refused iff trained, exported or verified
    folder.config.write_text(to_yaml(BASE))  # the run's own config (prepare_run_folder wrote the new one)
    try:
        check_complete_run_config(folder, new)
        refused = False
    except RunError as e:
        refused = "would be ignored" in str(e)
    assert refused == (kind in REPORTED), key

    # the nightly job trains again iff the night's inputs change: trained or exported
    assert (inputs.config_part(new) != inputs.config_part(BASE)) == (kind in FINGERPRINTED), key

    # the live base export is reused while its keys match: exported
    monkeypatch.setattr(export, "version_info", lambda: {"llama.cpp": "test"})
    same = export.base_export_keys(new, "rev") == export.base_export_keys(BASE, "rev")
    assert (not same) == (kind in BASE_EXPORT), key
