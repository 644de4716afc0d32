"""The gates a candidate must pass to replace the champion (config section `nightly`).

Every gate is a comparison that must be True; a missing or non-finite value makes it False, so a NaN or
a metric that could not be measured never promotes. Without a champion (the first night) only the
absolute gates and the presence of every metric apply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from core.config import NightlySection

LOSSES = ("hf_loss", "gguf_loss")


@dataclass
class Gate:
    name: str  # e.g. "gguf_loss <= champion + 2%"
    value: float | None
    threshold: float | None
    passed: bool

    def describe(self) -> str:
        shown = "missing" if self.value is None else f"{self.value:.4g}"
        limit = "" if self.threshold is None else f" (limit {self.threshold:.4g})"
        return f"{self.name}: {shown}{limit}"


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _at_most(name: str, value: Any, limit: float | None) -> Gate:
    v, t = _finite(value), _finite(limit)
    return Gate(name, v, t, v is not None and t is not None and v <= t)


def _at_least(name: str, value: Any, limit: float | None) -> Gate:
    v, t = _finite(value), _finite(limit)
    return Gate(name, v, t, v is not None and t is not None and v >= t)


def required_metrics(has_tasks: bool) -> list[str]:
    return [*LOSSES, *(["task_accuracy"] if has_tasks else [])]


def evaluate_gates(
    candidate: dict[str, Any], champion: dict[str, Any] | None, cfg: NightlySection, has_tasks: bool
) -> list[Gate]:
    gates = [
        Gate(f"{m} measured and finite", _finite(candidate.get(m)), None, _finite(candidate.get(m)) is not None)
        for m in required_metrics(has_tasks)
    ]
    absolute = [
        ("hf_loss", cfg.max_hf_loss, _at_most),
        ("gguf_loss", cfg.max_gguf_loss, _at_most),
        ("quant_gap", cfg.max_quant_gap, _at_most),
        ("task_accuracy", cfg.min_task_accuracy, _at_least),
    ]
    for metric, limit, check in absolute:
        if limit is not None:
            gates.append(
                check(f"{metric} {'<=' if check is _at_most else '>='} {limit:g}", candidate.get(metric), limit)
            )
    if champion is None:
        return gates
    margin = cfg.max_loss_regression
    for metric in LOSSES:
        best = _finite(champion.get(metric))
        limit = best * (1 + margin) if best is not None else None
        gates.append(_at_most(f"{metric} <= champion + {margin:.0%}", candidate.get(metric), limit))
    if has_tasks:
        best = _finite(champion.get("task_accuracy"))
        limit = best - cfg.max_accuracy_drop if best is not None else None
        gates.append(
            _at_least(f"task_accuracy >= champion - {cfg.max_accuracy_drop:g}", candidate.get("task_accuracy"), limit)
        )
    return gates


def as_records(gates: list[Gate]) -> list[dict[str, Any]]:
    return [asdict(g) for g in gates]


def summary(gates: list[Gate]) -> str:
    failed = [g.describe() for g in gates if not g.passed]
    return f"all {len(gates)} gates passed" if not failed else "failed " + "; ".join(failed)
