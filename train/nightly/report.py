"""What the nightly job shows: the night's report in the candidate's run folder (nightly.md, nightly_scores.png)
and `status` (what is live, since when, its scores, the last nights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from core import releases
from core.config import Config
from core.files import atomic_write_text
from core.gates import Gate, table
from core.runfolder import Layout
from train.callbacks import save_figure
from train.nightly.retention import registry
from train.nightly.scores import number

SHOWN = ("hf_loss", "gguf_loss", "quant_gap", "task_accuracy", "hf_perplexity", "gguf_perplexity")


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else "-" if x is None else str(x)


def scores_line(scores: dict[str, Any] | None) -> str:
    return "  ".join(f"{k} {_fmt(scores[k])}" for k in SHOWN if k in scores) if scores else "-"


def night_line(r: dict[str, Any]) -> str:
    run = r.get("run") or r.get("champion") or "-"
    why = r.get("reason") or (f"{run} live again, was {r['from_run']}" if r.get("event") == "rollback" else "")
    if r.get("recovered"):
        why += f" (recorded at {r['recovered']}, after an interrupted promotion)"
    return f"{r['time'][:16]}  {r.get('decision', r.get('event')):<16} {run:<32} {why}"


# ----------------------------------------------------------------------------- the night's report


def plot_history(lines: list[dict[str, Any]], out: Path) -> Path | None:
    """nightly_scores.png: each decided night's candidate losses; promoted nights filled, the others hollow."""
    nights = [r for r in lines if r.get("event") == "night" and r.get("decision") in ("promoted", "rejected")][-60:]
    if not nights:
        return None
    fig = Figure(figsize=(8, 4), dpi=100)  # no pyplot: no global state, no GUI backend to pick
    ax = fig.subplots()
    xs = list(range(len(nights)))
    champion = [number((r["scores"].get("champion") or {}).get("gguf_loss")) for r in nights]  # NaN: a gap
    ax.step(xs, champion, "--", where="mid", color="gray", label="champion gguf_loss (before the night)")
    for metric, color in (("hf_loss", "tab:blue"), ("gguf_loss", "tab:orange")):
        ys = [number(r["scores"]["candidate"].get(metric)) for r in nights]
        ax.plot(xs, ys, "-", color=color, alpha=0.4)
        for x, y, r in zip(xs, ys, nights, strict=True):
            ax.plot([x], [y], "o", color=color, markerfacecolor=color if r["decision"] == "promoted" else "white")
        ax.plot([], [], "o-", color=color, label=metric)
    ax.set_xticks(xs, [r["time"][5:16].replace("T", " ") for r in nights], rotation=45, fontsize=8)
    ax.set_ylabel("loss on the eval set (nats/token)")
    ax.set_title("nightly candidates (filled: promoted, hollow: rejected)")
    return save_figure(fig, ax, out)


def score_table(record: dict[str, Any]) -> list[str]:
    cand, champ = record["scores"]["candidate"], record["scores"].get("champion") or {}
    rows = [
        f"| metric | candidate {record['run']} | champion {record.get('champion_before') or '-'} |",
        "|---|---|---|",
    ]
    rows += [f"| {k} | {_fmt(cand.get(k))} | {_fmt(champ.get(k))} |" for k in SHOWN if k in cand or k in champ]
    failures = cand.get("task_failures") or []
    if failures:
        rows += ["", "Task checks the candidate failed:", ""]
        rows += [f"- {f['prompt']!r}: expected {f['expected']!r}, got {f['got']!r}" for f in failures[:20]]
    return rows


def write_report(folder: Path, record: dict[str, Any], lines: list[dict[str, Any]]) -> Path:
    """nightly.md and nightly_scores.png in the run folder; `lines`: the registry, this night's line included."""
    png = plot_history(lines, folder / "nightly_scores.png")
    gates = [Gate.from_json(g) for g in record["gates"]]
    changed = f"changed since the champion: {', '.join(record['changed'])}" if record["champion_before"] else None
    md = [
        f"# Nightly {record['run']}: {record['decision']}",
        "",
        f"{record['reason']}",
        "",
        f"- inputs `{record['inputs'][:16]}`; {changed or 'first champion'}",
        f"- champion before: {record.get('champion_before') or 'none'}; eval set `{record['eval_set']}`",
        "",
        "## Gates",
        "",
        *table(gates),
        "",
        "## Scores",
        "",
        *score_table(record),
        "",
        "## Last nights",
        "",
        "```",
        *[night_line(r) for r in lines[-14:]],
        "```",
    ]
    if png:
        md += ["", f"![score history]({png.name})"]
    out = folder / "nightly.md"
    atomic_write_text(out, "\n".join(md) + "\n")
    return out


# ----------------------------------------------------------------------------- status


def status_text(cfg: Config, layout: Layout, nights: int = 7) -> str:
    """What applications load now, what a rollback returns to, and the last nights."""
    name = cfg.export.name
    live = releases.live(layout.gguf_dir, name)
    lines = []
    if live is None:
        lines.append(f"live:      nothing published as {layout.gguf_dir / name}.gguf yet (registry {layout.registry})")
    else:
        switches = [h["time"] for h in releases.history(layout.gguf_dir, name) if h["release"] == live.id]
        since = switches[-1] if switches else live.record["time"]  # a switch a kill left unrecorded: its staging
        decided = live.record.get("nightly") or {}
        problems = live.problems()
        lines += [
            f"live:      {live.run}, since {since}, published by {live.record.get('by', '?')}",
            f"scores:    {scores_line((decided.get('scores') or {}).get('candidate'))}",
            f"files:     {live.folder} ({len(live.files)} files, "
            + ("intact)" if not problems else "NOT the files published: " + "; ".join(problems) + ")"),
        ]
    stack = releases.stack(layout.gguf_dir, name)
    lines.append(f"rollback:  {stack[-2] if len(stack) > 1 else 'none (no previous model)'}")
    events = registry(layout, name)[-nights:]
    lines += ["last nights (newest first):", *[f"  {night_line(r)}" for r in reversed(events)]]
    return "\n".join(lines)


def status_json(cfg: Config, layout: Layout, nights: int = 7) -> dict[str, Any]:
    live = releases.live(layout.gguf_dir, cfg.export.name)
    stack = releases.stack(layout.gguf_dir, cfg.export.name)
    return {
        "live": live.run if live else None,
        "release": live.id if live else None,
        "scores": ((live.record.get("nightly") or {}).get("scores") or {}).get("candidate") if live else None,
        "files_intact": not live.problems() if live else None,
        "rollback_to": stack[-2] if len(stack) > 1 else None,
        "last_events": registry(layout, cfg.export.name)[-nights:],
    }
