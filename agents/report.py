"""Tables and pictures of a :class:`agents.evaluation.Comparison`: a rich console table, PNG
plots (metric bars with 95 % intervals, paired differences from the baseline, retention by day,
mean knob usage) and a markdown summary. Every file is written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.evaluation import METRICS, Comparison
from offline_data.dataset import _atomic_write
from rankers.config import KNOB_NAMES

KEY_METRICS: tuple[str, ...] = (
    "retention/retained_30d", "retention/day1_return", "retention/day7_return", "retention/sessions_per_day",
    "engagement/session_minutes", "engagement/session_videos", "engagement/watch_minutes",
    "engagement/first_day_watch_minutes", "engagement/regret_rate", "engagement/skip_rate",
    "slate/topic_entropy", "creators/new_creator_share", "creators/new_creator_follow_conversion",
    "creators/exposure_gini",
)


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temp file beside it, fsync, ``os.replace``): the one
    atomic writer of the project lives in ``offline_data.dataset``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: f.write(data))


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def table_rows(
    rows: Sequence[dict[str, Any]], metrics: Sequence[str] = KEY_METRICS
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of strings: metric x policy cells ``mean [lo, hi]`` and ``Δ diff*``."""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    header = ["metric", *policies]
    out = []
    for m in metrics:
        cells = [m]
        for p in policies:
            r = next((x for x in rows if x["metric"] == m and x["policy"] == p), None)
            if r is None:
                cells.append("")
                continue
            c = f"{_fmt(r['mean'])} [{_fmt(r['lo'])}, {_fmt(r['hi'])}]"
            if "diff" in r:
                c += f" Δ{r['diff']:+.3g}{'*' if r['significant'] else ''}"
            cells.append(c)
        out.append(cells)
    return header, out


def print_table(rows: Sequence[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    header, body = table_rows(rows)
    t = Table(title=title, show_lines=False)
    for h in header:
        t.add_column(h, overflow="fold")
    for r in body:
        t.add_row(*r)
    Console(width=200).print(t)
    print("mean [95% bootstrap CI]; Δ = paired difference from the baseline, * = its 95% CI excludes 0")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header, body = table_rows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def write_plots(comp: Comparison, rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Writes the PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    policies = comp.policies
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        p = out / name
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, p)
        paths.append(p)

    metrics = [m for m in KEY_METRICS if m in METRICS]
    n = len(metrics)
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 2.8 * ((n + cols - 1) // cols)))
    for ax, m in zip(np.ravel(axes), metrics):
        rs = [next(r for r in rows if r["metric"] == m and r["policy"] == p) for p in policies]
        mean = np.array([r["mean"] for r in rs])
        err = np.array([[r["mean"] - r["lo"] for r in rs], [r["hi"] - r["mean"] for r in rs]])
        ax.bar(range(len(policies)), mean, yerr=err, capsize=3, color=[f"C{i}" for i in range(len(policies))])
        ax.set_xticks(range(len(policies)), policies, rotation=30, ha="right", fontsize=7)
        ax.set_title(m, fontsize=8)
    for ax in np.ravel(axes)[n:]:
        ax.axis("off")
    fig.suptitle("Metrics per policy (mean, 95% bootstrap CI)")
    fig.tight_layout()
    save(fig, "metrics.png")

    others = [p for p in policies if p != comp.baseline]
    if others:
        fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 * len(metrics), 3.2), sharey=False)
        for ax, m in zip(np.ravel(axes), metrics):
            rs = [next((r for r in rows if r["metric"] == m and r["policy"] == p), None) for p in others]
            d = np.array([r.get("diff", 0.0) if r else 0.0 for r in rs])
            lo = np.array([r.get("diff_lo", 0.0) if r else 0.0 for r in rs])
            hi = np.array([r.get("diff_hi", 0.0) if r else 0.0 for r in rs])
            ax.errorbar(d, range(len(others)), xerr=[d - lo, hi - d], fmt="o", capsize=3)
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(range(len(others)), others if ax is np.ravel(axes)[0] else [""] * len(others), fontsize=7)
            ax.set_title(m.split("/")[-1], fontsize=7)
            ax.tick_params(axis="x", labelsize=6)
        fig.suptitle(f"Paired difference from {comp.baseline} (95% CI)")
        fig.tight_layout()
        save(fig, "paired_differences.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, p in enumerate(policies):
        curves = np.stack([r.retention_by_day for r in comp.runs if r.policy == p])
        ax.plot(curves.mean(axis=0), label=p, color=f"C{i}")
    ax.set_xlabel("day")
    ax.set_ylabel("share of users active")
    ax.set_title("Retention by day")
    ax.legend(fontsize=7)
    save(fig, "retention_by_day.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(len(policies), 1)
    for i, p in enumerate(policies):
        k = np.stack([r.knob_means for r in comp.runs if r.policy == p]).mean(axis=0)
        ax.bar(np.arange(len(KNOB_NAMES)) + i * width, k, width, label=p, color=f"C{i}")
    ax.set_xticks(np.arange(len(KNOB_NAMES)) + 0.4, KNOB_NAMES, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("mean action")
    ax.set_title("Knob usage")
    ax.legend(fontsize=7)
    save(fig, "knob_usage.png")
    return paths


def write_report(comp: Comparison, rows: Sequence[dict[str, Any]], out: Path, title: str, command: str) -> Path:
    """Markdown summary + JSON rows + plots into ``out``."""
    plots = write_plots(comp, rows, out)
    md = [f"# {title}", "", f"Command: `{command}`", "", markdown_table(rows), "",
          "mean [95% bootstrap CI]; Δ = paired per-user difference from the baseline (common random numbers), "
          "* = its 95% CI excludes 0.", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    atomic_write(out / "report.md", ("\n".join(md) + "\n").encode())
    atomic_write(out / "results.json", json.dumps(list(rows), indent=1).encode())
    return out / "report.md"
