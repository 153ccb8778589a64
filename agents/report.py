"""Tables and pictures of a :class:`agents.stats.Comparison`: a rich console table, PNG
plots (metric bars with 95 % intervals, paired differences from the baseline with their IQM,
retention by day, mean knob usage overall and by user state, learning curves from the run's
``metrics.jsonl``) and a markdown summary. Every file is written atomically.

The main job leads with a short table of verdicts (:func:`headline_table`, :func:`print_headline`,
:func:`headline_markdown`; rows from :func:`agents.verdict.headline`): one row per agent, its 30-day retention
difference from weighted-sum and from CEM-tuned with world-level intervals, regret, new creators, the verdicts,
and with several training seeds every seed's difference and how many seeds beat.

:func:`write_report` also saves the comparison itself (``comparison.npz``, :func:`save_comparison`)
so ``scripts/report.py`` can rebuild every file of a finished run without rerunning it.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.rollouts import METRICS, STATE_GROUPS, RunResult
from agents.sinks import METRICS_FILE, read_metrics
from agents.stats import Comparison
from rankers.config import KNOB_NAMES
from rankers.fileio import atomic_write, atomic_write_with

COMPARISON_FILE = "comparison.npz"
COMPARISON_FORMAT = "feedgym-comparison"
COMPARISON_VERSION = 1
#: Series of ``metrics.jsonl`` never drawn as learning curves: one-off evaluation values and
#: d3rlpy's timing counters and SB3's update counter.
CURVE_SKIP_PREFIXES: tuple[str, ...] = ("eval/", "losses/time_", "train/n_updates")

KEY_METRICS: tuple[str, ...] = (
    "retention/retained_30d", "retention/day1_return", "retention/day7_return", "retention/sessions_per_day",
    "engagement/session_minutes", "engagement/session_videos", "engagement/watch_minutes",
    "engagement/first_day_watch_minutes", "engagement/regret_rate", "engagement/skip_rate",
    "slate/topic_entropy", "creators/new_creator_share", "creators/new_creator_follow_conversion",
    "creators/exposure_gini",
)


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Saves a matplotlib figure as PNG through the atomic writer and closes it."""
    import matplotlib.pyplot as plt

    atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return path


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def table_rows(
    rows: Sequence[dict[str, Any]], metrics: Sequence[str] = KEY_METRICS, newline: str = "\n"
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of strings: metric x policy cells ``mean [lo, hi]`` and ``Δ diff*``, then,
    after ``newline``, ``IQM Δ iqm [iqm_lo, iqm_hi]*`` where the row has an IQM."""
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
            if r.get("spread") == "seeds":  # a population metric: one value per world, no bootstrap
                c = f"{_fmt(r['mean'])} (worlds {_fmt(r['lo'])}..{_fmt(r['hi'])})"
                if "diff" in r:
                    c += f" Δ{r['diff']:+.3g} (per world {r['diff_lo']:+.3g}..{r['diff_hi']:+.3g})"
                cells.append(c)
                continue
            c = f"{_fmt(r['mean'])} [{_fmt(r['lo'])}, {_fmt(r['hi'])}]"
            if "diff" in r:
                c += f" Δ{r['diff']:+.3g}{'*' if r['significant'] else ''}{'†' if r.get('world_significant') else ''}"
            if r.get("iqm") is not None:
                c += (f"{newline}IQM Δ{r['iqm']:+.3g} [{r['iqm_lo']:+.3g}, {r['iqm_hi']:+.3g}]"
                      f"{'*' if r.get('iqm_significant') else ''}")
            cells.append(c)
        out.append(cells)
    return header, out


def _print_rich(header: Sequence[str], body: Sequence[Sequence[str]], title: str, note: str) -> None:
    """One table on the console (rich), then its note."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for h in header:
        t.add_column(h, overflow="fold")
    for r in body:
        t.add_row(*r)
    Console(width=200).print(t)
    print(note)


def print_table(rows: Sequence[dict[str, Any]], title: str) -> None:
    _print_rich(*table_rows(rows), title, FOOTNOTE)


FOOTNOTE = ("mean [95% bootstrap CI]; Δ = mean paired per-user difference from the baseline (same users and "
            "noise), * = its 95% CI over users excludes 0, † = its 95% CI with worlds (seeds) resampled before "
            "users excludes 0 (what the verdicts use); IQM Δ = interquartile mean of the same paired differences "
            "[95% stratified bootstrap CI, users resampled within seeds, as rliable], * = excludes 0; no IQM for "
            "0/1 metrics (retention flags), whose paired differences are mostly 0. Population metrics (one value "
            "per world, e.g. creators/exposure_gini): mean (smallest..largest world), Δ = mean per-world difference "
            "from the baseline in the same world (smallest..largest), not bootstrapped.")


def _pp(v: float, digits: int = 1) -> str:
    return f"{100 * v:+.{digits}f}"


def _interval(c: dict[str, Any], digits: int = 1) -> str:
    return f"{_pp(c['diff'], digits)} [{_pp(c['lo'], digits)}, {_pp(c['hi'], digits)}]"


def _seed_marks(c: dict[str, Any]) -> str:
    """Every training seed's retention difference, ✓ where it beats, ✗ where its interval is below 0, and how
    many beat: ``+9.6✓ +2.1 -3.0✗ (1/3)``."""
    cells = [f"{_pp(p['diff'])}{'✓' if p['beats'] else '✗' if p['worse'] else ''}" for p in c["per_seed"]]
    return f"{' '.join(cells)} ({c['passed']}/{c['n']})"


def _verdict_cell(c: dict[str, Any] | None) -> str:
    """A verdict in a word or three: ``BEATS``, ``worse``, ``no (n.s.)``; with several seeds
    ``2/4 seeds; pooled BEATS``."""
    if c is None:
        return "—"
    word = "BEATS" if c["beats"] else "worse" if c["worse"] else f"no ({c['why']})"
    return f"{c['passed']}/{c['n']} seeds; pooled {word}" if c["n"] > 1 else word


def is_multi_seed(hrows: Sequence[dict[str, Any]]) -> bool:
    """Whether the short table's rows judge several training seeds."""
    return any((r.get("vs_baseline") or {}).get("n", 1) > 1 for r in hrows)


def headline_table(hrows: Sequence[dict[str, Any]], baseline: str = "weighted_sum",
                   other: str = "cem_tuned") -> tuple[list[str], list[list[str]]]:
    """(header, rows) of strings of the short table (:func:`agents.verdict.headline` rows): per agent, the
    30-day retention difference from ``baseline`` and from ``other`` with its world-level 95 % interval, the
    regret and new-creator share differences from ``baseline``, the verdicts against each; with several
    training seeds also every seed's retention difference and how many seeds beat, the interval and the verdict
    being the seed-pooled agent's."""
    multi = is_multi_seed(hrows)
    seeds = ", ".join(map(str, hrows[0]["seeds"])) if hrows else ""
    if multi:
        header = ["agent", f"Δ retention vs {baseline}, per seed ({seeds})", "pooled", f"Δ retention vs {other}, "
                  "per seed", "pooled", "Δ regret", "Δ new creators", f"vs {baseline}", f"vs {other}"]
    else:
        header = ["agent", f"Δ 30-day retention vs {baseline}", f"vs {other}", "Δ regret", "Δ new creators",
                  f"verdict vs {baseline}", f"vs {other}"]
    body = []
    for r in hrows:
        b, o = r.get("vs_baseline"), r.get("vs_other")
        cells = [r["agent"]]
        if multi:
            cells += [_seed_marks(b) if b else "—", _interval(b) if b else "—", _seed_marks(o) if o else "—",
                      _interval(o) if o else "—"]
        else:
            cells += [_interval(b) if b else "—", _interval(o) if o else "—"]
        cells += [_interval(r["regret"], 2), _interval(r["reach"]), _verdict_cell(b), _verdict_cell(o)]
        body.append(cells)
    return header, body


def headline_note(tol: Any, multi: bool = False, baseline: str = "weighted_sum") -> str:
    """What the short table's numbers are (``tol``: the verdicts' :class:`agents.verdict.Tolerance`)."""
    return ("Δ = paired difference in percentage points (same users and noise) [95% interval with evaluation worlds "
            f"resampled, then users]; Δ regret (regret rate) and Δ new creators (their impression share) are "
            f"against {baseline}. BEATS = 30-day retention interval above 0 while regret rises by at most "
            f"{100 * tol.regret_tol:.1f} pp and new creators' share falls by at most {100 * tol.reach_tol:.1f} pp "
            "(interval ends); worse = retention interval below 0; no (n.s.) = it includes 0; regret / new creators "
            "in a verdict = the interval's end beyond the tolerance."
            + (" Per seed: ✓ beats, ✗ interval below 0, (k/n) seeds that beat; pooled = the agents of every "
               "training seed averaged user by user (its interval resamples worlds and users, not training seeds)."
               if multi else ""))


def print_headline(hrows: Sequence[dict[str, Any]], title: str, tol: Any, baseline: str = "weighted_sum",
                   other: str = "cem_tuned") -> None:
    """The short table on the console (:func:`headline_table`), with its note."""
    _print_rich(*headline_table(hrows, baseline, other), title, headline_note(tol, is_multi_seed(hrows), baseline))


def headline_markdown(hrows: Sequence[dict[str, Any]], title: str, tol: Any, baseline: str = "weighted_sum",
                      other: str = "cem_tuned") -> str:
    """The short table as markdown (a ``##`` title, the table, its note)."""
    header, body = headline_table(hrows, baseline, other)
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join([*lines, "", headline_note(tol, is_multi_seed(hrows), baseline)])


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header, body = table_rows(rows, newline="<br>")
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
        paths.append(save_figure(fig, out / name))

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
            drs: list[dict[str, Any] | None] = [
                next((r for r in rows if r["metric"] == m and r["policy"] == p), None) for p in others]
            y = np.arange(len(others), dtype=float)
            for key, off, fmt, lab in (("diff", -0.12, "o", "mean Δ"), ("iqm", 0.12, "s", "IQM Δ")):
                ok = [i for i, r in enumerate(drs) if r is not None and r.get(key) is not None]
                if not ok:
                    continue
                got = [drs[i] or {} for i in ok]
                d = np.array([r[key] for r in got])
                lo = np.array([r[f"{key}_lo"] for r in got])
                hi = np.array([r[f"{key}_hi"] for r in got])
                ax.errorbar(d, y[ok] + off, xerr=[d - lo, hi - d], fmt=fmt, ms=3, capsize=2, label=lab,
                            color="C0" if key == "diff" else "C3")
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(range(len(others)), others if ax is np.ravel(axes)[0] else [""] * len(others), fontsize=7)
            ax.set_title(m.split("/")[-1], fontsize=7)
            ax.tick_params(axis="x", labelsize=6)
        legend: dict[str, Any] = {}
        for ax in np.ravel(axes):
            for h, lab in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(lab, h)
        fig.legend(list(legend.values()), list(legend), loc="upper right", fontsize=7)
        fig.suptitle(f"Paired difference from {comp.baseline}: mean and IQM (95% CI)")
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

    if all(r.knob_by_state for r in comp.runs):
        save(_knob_by_state_figure(comp, plt), "knob_usage_by_state.png")
    return paths


def knob_usage_by_state(comp: Comparison, policy: str) -> tuple[list[str], Any, Any]:
    """Mean action per knob and state bucket of ``policy``, pooled over its seeds.

    Returns:
        (labels, means, counts): ``labels`` "group: bucket" for every bucket of every group in
        :data:`STATE_GROUPS`; ``means`` (A, G_total) float64, NaN where no request fell;
        ``counts`` (G_total,) int64 user-requests per bucket.
    """
    labels: list[str] = []
    means, counts = [], []
    runs = [r for r in comp.runs if r.policy == policy]
    for g, buckets in STATE_GROUPS.items():
        n = np.sum([r.state_counts[g] for r in runs], axis=0).astype(np.int64)
        tot = np.sum([np.nan_to_num(r.knob_by_state[g]) * r.state_counts[g][:, None] for r in runs], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append(tot / n[:, None])
        counts.append(n)
        labels += [f"{g}: {b}" for b in buckets]
    return labels, np.concatenate(means).T, np.concatenate(counts)


def _knob_by_state_figure(comp: Comparison, plt: Any) -> Any:
    policies = comp.policies
    cols = min(len(policies), 3)
    nrows = (len(policies) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 5.2 * nrows), squeeze=False, layout="constrained")
    im = None
    for ax, p in zip(axes.ravel(), policies):
        labels, m, n = knob_usage_by_state(comp, p)
        im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(labels)), [f"{lab} ({c})" for lab, c in zip(labels, n)], rotation=60,
                      ha="right", fontsize=6)
        ax.set_yticks(range(len(KNOB_NAMES)), KNOB_NAMES, fontsize=6)
        edge = 0
        for buckets in list(STATE_GROUPS.values())[:-1]:
            edge += len(buckets)
            ax.axvline(edge - 0.5, color="k", lw=0.8)
        ax.set_title(p, fontsize=9)
    for ax in axes.ravel()[len(policies):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="mean action (0 = weighted-sum)")
    fig.suptitle("Knob usage by observable user state (mean action; (n) = user-requests; blank = none)")
    return fig


def curve_series(metrics: dict[str, tuple[list[int], list[float]]]) -> dict[str, tuple[list[int], list[float]]]:
    """The series of a ``metrics.jsonl`` worth a learning-curve panel: at least two steps, not constant,
    not the step counter itself, not in :data:`CURVE_SKIP_PREFIXES`; ordered train/, losses/, others."""
    keep = {}
    for k, (steps, vals) in metrics.items():
        if k.startswith(CURVE_SKIP_PREFIXES) or len(steps) < 2:
            continue
        v = np.asarray(vals)
        if np.all(v == v[0]) or np.array_equal(v, np.asarray(steps, dtype=float)):
            continue
        keep[k] = (steps, vals)
    order = {"train/": 0, "losses/": 1}
    return dict(sorted(keep.items(), key=lambda kv: (order.get(kv[0].split("/")[0] + "/", 2), kv[0])))


def write_learning_curves(metrics_path: Path, out: Path, name: str = "learning_curves.png") -> Path | None:
    """One panel per logged series (x = the step it was logged at) from a ``metrics.jsonl``.

    PPO logs at its environment step (``train/*_per_step`` env metrics and SB3's ``train/`` values,
    its losses as ``losses/*``), CQL at its gradient step (``losses/<d3rlpy name>``), CEM at its
    iteration (``train/cem_*``). Returns the PNG's path, or None when the file is missing or holds
    no series worth drawing.
    """
    if not metrics_path.exists():
        return None
    series = curve_series(read_metrics(metrics_path))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    cols = min(n, 4)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.5 * nrows), squeeze=False)
    for ax, (k, (steps, vals)) in zip(axes.ravel(), series.items()):
        ax.plot(steps, vals, lw=1.0, marker="." if len(steps) < 30 else None)
        ax.set_title(k, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("iteration" if k.startswith("train/cem_") else "step", fontsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(f"Learning curves ({metrics_path.name})")
    fig.tight_layout()
    return save_figure(fig, out / name, dpi=100)


def save_comparison(comp: Comparison, path: Path, meta: dict[str, Any] | None = None) -> Path:
    """Writes every run of ``comp`` (per-user metrics, population metrics, retention by day, knob
    usage overall and by state) to one ``.npz``, atomically. ``meta`` (JSON-able) is stored beside
    (e.g. the report's title and command)."""
    arrays: dict[str, Any] = {}
    runs = []
    for i, r in enumerate(comp.runs):
        runs.append({"policy": r.policy, "seed": int(r.seed), "population": {k: float(v) for k, v in
                                                                             r.population.items()},
                     "per_user": list(r.per_user), "state_groups": list(r.knob_by_state)})
        for j, k in enumerate(r.per_user):
            arrays[f"r{i}_u{j}"] = np.asarray(r.per_user[k])
        arrays[f"r{i}_retention_by_day"] = np.asarray(r.retention_by_day)
        arrays[f"r{i}_knob_means"] = np.asarray(r.knob_means)
        for j, g in enumerate(r.knob_by_state):
            arrays[f"r{i}_ks{j}"] = np.asarray(r.knob_by_state[g])
            arrays[f"r{i}_kn{j}"] = np.asarray(r.state_counts[g])
    header = {"format": COMPARISON_FORMAT, "version": COMPARISON_VERSION, "baseline": comp.baseline, "runs": runs,
              "meta": meta or {}}
    arrays["header"] = np.asarray(json.dumps(header))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(path, buf.getvalue())
    return path


class _FormatError(ValueError):
    pass


def load_comparison(path: Path) -> tuple[Comparison, dict[str, Any]]:
    """Reads a file written by :func:`save_comparison`: (comparison, meta). Raises ``ValueError``
    naming the file when it is not a comparison of this format version or is damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            if header.get("format") != COMPARISON_FORMAT or header.get("version") != COMPARISON_VERSION:
                raise _FormatError(f"{path} is not a {COMPARISON_FORMAT} v{COMPARISON_VERSION} file "
                                   f"(format {header.get('format')!r}, version {header.get('version')!r})")
            comp = Comparison(baseline=header["baseline"])
            for i, h in enumerate(header["runs"]):
                groups = h["state_groups"]
                comp.runs.append(RunResult(
                    policy=h["policy"], seed=int(h["seed"]),
                    per_user={k: z[f"r{i}_u{j}"] for j, k in enumerate(h["per_user"])},
                    population=dict(h["population"]), retention_by_day=z[f"r{i}_retention_by_day"],
                    knob_means=z[f"r{i}_knob_means"],
                    knob_by_state={g: z[f"r{i}_ks{j}"] for j, g in enumerate(groups)},
                    state_counts={g: z[f"r{i}_kn{j}"] for j, g in enumerate(groups)}))
    except _FormatError:
        raise
    except (KeyError, OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{path} is truncated or corrupt ({type(err).__name__}: {err})") from err
    return comp, dict(header.get("meta", {}))


def write_report(comp: Comparison, rows: Sequence[dict[str, Any]], out: Path, title: str, command: str,
                 metrics_path: Path | None = None, save: bool = True, lead: str = "", tail: str = "") -> Path:
    """Everything of a finished comparison into ``out``: ``report.md`` (``lead``, markdown such as the short
    table of :func:`headline_markdown`, after the command and before the full table; ``tail`` after the
    footnote, e.g. the verdicts), ``results.json`` (the rows),
    ``comparison.npz`` (the runs, see :func:`save_comparison`; skipped with ``save=False``), the
    PNG plots of :func:`write_plots` and, when ``metrics_path`` (default ``out/metrics.jsonl``)
    exists, ``learning_curves.png``. Returns the path of ``report.md``."""
    out.mkdir(parents=True, exist_ok=True)
    if save:
        save_comparison(comp, out / COMPARISON_FILE, {"title": title, "command": command})
    atomic_write(out / "results.json", json.dumps(list(rows), indent=1).encode())
    plots = write_plots(comp, rows, out)
    curves = write_learning_curves(metrics_path or out / METRICS_FILE, out)
    if curves is not None:
        plots.append(curves)
    md = [f"# {title}", "", f"Command: `{command}`", ""]
    if lead:
        md += [lead, "", "## All metrics", ""]
    md += [markdown_table(rows), "", FOOTNOTE, ""]
    if tail:
        md += [tail, ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    atomic_write(out / "report.md", ("\n".join(md) + "\n").encode())
    return out / "report.md"
