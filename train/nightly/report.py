"""What the nightly job shows: the night's report in the candidate's run folder (nightly.md, nightly_scores.png)
and `status` (what is live, since when, its scores, the last nights)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from core.files import atomic_write_text, sha256_file
from train.nightly.places import Places
from train.nightly.promote import live_run
from train.nightly.registry import History

SHOWN = ("hf_loss", "gguf_loss", "quant_gap", "task_accuracy", "hf_perplexity", "gguf_perplexity")


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else "-" if x is None else str(x)


def scores_line(scores: dict[str, Any] | None) -> str:
    if not scores:
        return "-"
    return "  ".join(f"{k} {_fmt(scores[k])}" for k in SHOWN if k in scores)


def night_line(r: dict[str, Any]) -> str:
    """One registry line as `time  decision  run  why`."""
    run = r.get("run") or r.get("champion") or "-"
    why = r.get("reason") or (f"{run} live again, was {r['from_run']}" if r.get("event") == "rollback" else "")
    if r.get("recovered"):
        why += f" (recorded at {r['recovered']}, after an interrupted promotion)"
    return f"{r['time'][:16]}  {r.get('decision', r.get('event')):<16} {run:<32} {why}"


# ----------------------------------------------------------------------------- the night's report


def _number(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else float("nan")  # "nan" and None plot as gaps


def plot_history(history: History, out: Path) -> Path | None:
    """nightly_scores.png: each decided night's candidate losses; promoted nights filled, the others hollow."""
    nights = [r for r in history.nights(60) if r.get("decision") in ("promoted", "rejected")]
    if not nights:
        return None
    fig = Figure(figsize=(8, 4), dpi=100)  # no pyplot: no global state, no GUI backend to pick
    ax = fig.subplots()
    xs = list(range(len(nights)))
    champion = [_number((r["scores"].get("champion") or {}).get("gguf_loss")) for r in nights]
    ax.step(xs, champion, "--", where="mid", color="gray", label="champion gguf_loss (before the night)")
    for metric, color in (("hf_loss", "tab:blue"), ("gguf_loss", "tab:orange")):
        ys = [_number(r["scores"]["candidate"].get(metric)) for r in nights]
        ax.plot(xs, ys, "-", color=color, alpha=0.4)
        for x, y, r in zip(xs, ys, nights, strict=True):
            filled = r["decision"] == "promoted"
            ax.plot([x], [y], "o", color=color, markerfacecolor=color if filled else "white")
        ax.plot([], [], "o-", color=color, label=metric)
    ax.set_xticks(xs, [r["time"][5:16].replace("T", " ") for r in nights], rotation=45, fontsize=8)
    ax.set_ylabel("loss on the eval set (nats/token)")
    ax.set_title("nightly candidates (filled: promoted, hollow: rejected)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")  # a reader never sees half a picture
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out


def gate_table(record: dict[str, Any]) -> list[str]:
    rows = ["| gate | value | limit | result |", "|---|---|---|---|"]
    for g in record.get("gates", []):
        rows.append(
            f"| {g['name']} | {_fmt(g['value'])} | {_fmt(g['threshold'])} | {'pass' if g['passed'] else 'FAIL'} |"
        )
    return rows


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


def write_report(folder: Path, record: dict[str, Any], history: History) -> Path:
    """nightly.md (decision, gates, scores, the last nights) and nightly_scores.png in the run folder."""
    png = plot_history(history, folder / "nightly_scores.png")
    lines = [
        f"# Nightly {record['run']}: {record['decision']}",
        "",
        f"{record['reason']}",
        "",
        f"- fingerprint `{record['fingerprint'][:16]}`; "
        + (
            f"changed since the champion: {', '.join(record['changed'])}"
            if record["champion_before"]
            else "first champion"
        ),
        f"- champion before: {record.get('champion_before') or 'none'}; eval set `{record['eval_set']}`",
        "",
        "## Gates",
        "",
        *gate_table(record),
        "",
        "## Scores",
        "",
        *score_table(record),
        "",
        "## Last nights",
        "",
        "```",
        *[night_line(r) for r in history.events(14)],
        "```",
    ]
    if png:
        lines += ["", f"![score history]({png.name})"]
    out = folder / "nightly.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


# ----------------------------------------------------------------------------- status


def live_file_checks(places: Places, files: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, entry in files.items():
        p = places.gguf_dir / name
        ok = p.is_file() and sha256_file(p) == entry["sha256"]
        state = "ok" if ok else "NOT the champion's file (missing, or replaced outside the nightly job)"
        lines.append(f"    {p}  {entry['quant']}  {entry['size']:,} bytes  sha256 {entry['sha256'][:12]}  {state}")
    return lines


def status_text(places: Places, history: History, nights: int = 7) -> str:
    champion = history.champion
    if champion is None:
        lines = [f"live:      no champion yet (registry {places.registry})"]
    else:
        r = champion.record
        lines = [
            f"live:      {champion.run}, since {champion.live_since}",
            f"           fingerprint {r['fingerprint'][:16]}, eval set {r['eval_set']}",
            f"scores:    {scores_line(r['scores']['candidate'])}",
            "files:",
            *live_file_checks(places, r["files"]),
        ]
        if live_run(places) != champion.run:
            lines.append(f"WARNING:   {places.live} does not point at .releases/{champion.run}")
    previous = history.previous
    lines.append(f"rollback:  {previous.run if previous else 'none (no previous champion)'}")
    if places.journal.is_file():
        lines.append(f"pending:   an interrupted promotion ({places.journal}); the next command finishes it")
    lines += ["last nights (newest first):", *[f"  {night_line(r)}" for r in reversed(history.events(nights))]]
    return "\n".join(lines)


def status_json(places: Places, history: History, nights: int = 7) -> dict[str, Any]:
    champion, previous = history.champion, history.previous
    return {
        "live": champion.run if champion else None,
        "live_since": champion.live_since if champion else None,
        "scores": champion.record["scores"]["candidate"] if champion else None,
        "live_link": live_run(places),
        "rollback_to": previous.run if previous else None,
        "pending_promotion": places.journal.is_file(),
        "last_events": history.events(nights),
    }
