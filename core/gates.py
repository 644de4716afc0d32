"""A gate: one comparison a model must pass before it ships (verification) or replaces the live one (nightly).

A value that could not be measured, or is not finite, never passes: a NaN must not promote anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from core.files import jsonable


@dataclass(frozen=True)
class Gate:
    name: str  # what is compared: "kld", "gguf_loss <= champion + 2%", "chat_template"
    value: float | bool | None  # what was measured; None: nothing could be
    threshold: float | None = None  # None: a check that holds (value True) or not
    op: Literal["<=", ">="] = "<="

    @property
    def passed(self) -> bool:
        if self.threshold is None:
            return self.value is True
        v, t = self.value, self.threshold
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not math.isfinite(t):
            return False
        return v <= t if self.op == "<=" else v >= t

    @property
    def limit(self) -> str:
        return "" if self.threshold is None else f"{self.op} {self.threshold:.4g}"

    def describe(self) -> str:
        """One line: `kld = 0.0612 (gate <= 0.05)`, `chat_template: no`."""
        if self.threshold is None:
            return f"{self.name}: {'yes' if self.value is True else 'no'}"
        shown = "missing" if self.value is None else f"{self.value:.4g}"
        return f"{self.name} = {shown} (gate {self.limit})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | jsonable({"value": self.value}) | {"passed": self.passed}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Gate:
        """The gate to_json wrote; a non-finite value comes back as the float it was ("nan", "inf")."""
        v = d["value"]
        return cls(d["name"], float(v) if isinstance(v, str) else v, d["threshold"], d["op"])


def at_most(name: str, value: Any, limit: float | None) -> Gate:
    return Gate(name, _number(value), _number(limit) if limit is not None else math.nan, "<=")


def at_least(name: str, value: Any, limit: float | None) -> Gate:
    return Gate(name, _number(value), _number(limit) if limit is not None else math.nan, ">=")


def check(name: str, holds: bool) -> Gate:
    return Gate(name, bool(holds))


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def failures(gates: list[Gate]) -> list[str]:
    return [g.describe() for g in gates if not g.passed]


def summary(gates: list[Gate]) -> str:
    failed = failures(gates)
    return f"all {len(gates)} gates passed" if not failed else "failed " + "; ".join(failed)


def table(gates: list[Gate]) -> list[str]:
    rows = ["| gate | value | limit | result |", "|---|---|---|---|"]
    for g in gates:
        value = g.value if isinstance(g.value, bool) else "missing" if g.value is None else f"{g.value:.4g}"
        rows.append(f"| {g.name} | {value} | {g.limit or '-'} | {'pass' if g.passed else 'FAIL'} |")
    return rows
