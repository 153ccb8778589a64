"""The A/B-testing lab: run overlapping experiments as a platform would, and set each readout beside the truth.

Randomises the users of one world into the arms of each experiment (independent hashes per experiment:
overlapping layers), runs everyone's life, reads every experiment out after each of ``--days`` days (Welch's
t-test, CUPED on the pre-period's watch time, sample-ratio check, Benjamini-Hochberg over the readout), then
runs the same users under each arm for everyone (and both first treatments together) with the same noise:
the true effect at launch at each readout day, and the interaction of the first two experiments. Prints one
table; writes ``ab.json``, ``report.md`` and ``ab.png`` to ``--out``. See agents/abtest.py and docs/abtest.md.

    python scripts/ab_test.py --preset small --users 2000
    python scripts/ab_test.py --spec my_experiments.json     # [{"name": ..., "start_day": 2, "arms": [...]}]

The world's horizon is lengthened by the experiments' start, so the last readout (day 30) lies inside every
user's life.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from agents.abtest import Arm, Experiment, ExperimentError, check_experiments, readout, run_lab, true_effects
from agents.report import save_figure
from agents.threads import one_thread_default
from envs.config import PRESETS, make_config
from offline_data.executor import exit_on_sigterm
from offline_data.provision import ensure_rankers_all
from rankers.fileio import atomic_write

ENGAGEMENT = {"weight.watch_time": 1.0, "weight.p_complete": 1.0, "weight.p_regret": -1.0,
              "diversity_strength": -1.0, "explore_share": -1.0, "break_prompt": -1.0}
"""The knob-level 'pure engagement' arm: watch time and completion weighted up, regret down, the diversity
rules, exploration and break prompts at their minimum (the pipeline itself stays the same for every arm)."""

EXAMPLE: tuple[Experiment, ...] = (
    Experiment("engagement_vs_weighted_sum", (Arm("weighted_sum", 0.5), Arm("engagement", 0.5, ENGAGEMENT)),
               start_day=2.0),
    Experiment("break_prompts", (Arm("control", 0.5), Arm("prompt_more", 0.5, {"break_prompt": 1.0})),
               start_day=2.0),
)
"""Pure engagement vs weighted-sum at 50/50, overlapping a break-prompt experiment at 50/50; both start on
day 2 so the two days before give CUPED its covariate."""


@dataclass
class Args:
    preset: str = "small"
    """World preset."""
    users: int = 2000
    """Users in the experiment's world (each is in one arm of every experiment)."""
    seed: int = 0
    """The world and its users."""
    days: tuple[float, ...] = (1.0, 7.0, 30.0)
    """Readout days after each experiment's start."""
    pre_days: float = 2.0
    """Pre-period whose watch time adjusts the readouts (CUPED); 0 turns it off."""
    spec: Path | None = None
    """A JSON list of experiments (name, arms: [{name, share, knobs}], start_day, days); default: EXAMPLE."""
    out: Path = Path("runs/ab_test")
    progress: bool = True


def load_spec(path: Path) -> tuple[Experiment, ...]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ExperimentError(f"--spec {path}: cannot read a JSON list of experiments ({err})") from err
    if not isinstance(raw, list):
        raise ExperimentError(f"--spec {path}: expected a JSON list of experiments, got {type(raw).__name__}")
    try:
        return tuple(Experiment(e["name"], tuple(Arm(a["name"], float(a["share"]), dict(a.get("knobs", {})))
                                                 for a in e["arms"]),
                                float(e.get("start_day", 0.0)), float(e.get("days", float("inf"))))
                     for e in raw)
    except (KeyError, TypeError) as err:
        raise ExperimentError(f"--spec {path}: an experiment or arm lacks a field or has a wrong type "
                              f"({err!r})") from err


def _fmt(r: dict[str, Any]) -> str:
    scale = 100.0 if r["metric"] == "retained" else 1.0
    return f"{scale * r['diff']:+7.2f} [{scale * r['lo']:+7.2f}, {scale * r['hi']:+7.2f}]"


def table(platform: list[dict[str, Any]], truth: list[dict[str, Any]]) -> str:
    """One line per (experiment, arm, metric, day): the platform's readout and decision beside the truth."""
    head = (f"{'experiment':<28} {'arm':<13} {'metric':<14} {'day':>4} {'experiment says':>27} {'decision':>8}"
            f" {'truth at launch':>27}")
    lines = [head, "-" * len(head)]
    index = {(t["experiment"], t["arm"], t["metric"], t["day"]): t for t in truth}
    for r in platform:
        t = index[(r["experiment"], r["arm"], r["metric"], r["day"])]
        lines.append(f"{r['experiment']:<28} {r['arm']:<13} {r['metric']:<14} {r['day']:>4g} {_fmt(r):>27}"
                     f" {r['decision']:>8} {_fmt(t):>27}")
    for t in truth:
        if t["arm"] == "interaction":
            lines.append(f"{t['experiment']:<28} {'interaction':<13} {t['metric']:<14} {t['day']:>4g} {'':>27}"
                         f" {'':>8} {_fmt(t):>27}")
    lines.append("watch_minutes: minutes per exposed user since the start; retained: pp of exposed users not churned")
    return "\n".join(lines)


def plot(platform: list[dict[str, Any]], truth: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["experiment"], r["arm"], r["metric"]) for r in platform})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, (e, a, m) in zip(axes[0], keys, strict=True):
        scale = 100.0 if m == "retained" else 1.0
        for rows, label, dx in ((platform, "experiment", -0.15), (truth, "truth at launch", 0.15)):
            sel = [r for r in rows if (r["experiment"], r["arm"], r["metric"]) == (e, a, m)]
            x = np.arange(len(sel)) + dx
            y = np.array([r["diff"] for r in sel]) * scale
            err = np.array([[r["diff"] - r["lo"], r["hi"] - r["diff"]] for r in sel]).T * scale
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=label)
            ax.set_xticks(np.arange(len(sel)), [f"day {r['day']:g}" for r in sel])
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(f"{a} ({e})\n{m}" + (" (pp)" if m == "retained" else " (min/user)"), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def main(args: Args) -> dict[str, Any]:
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} unknown: choose from {PRESETS}")
    if args.users < 4 or not args.days or min(args.days) <= 0 or args.pre_days < 0:
        raise ValueError(f"--users >= 4, --days > 0 and --pre-days >= 0 needed; got {args.users}, {args.days}, "
                         f"{args.pre_days}")
    experiments = EXAMPLE if args.spec is None else load_spec(args.spec)
    check_experiments(experiments)
    one_thread_default()
    base_cfg = make_config(args.preset)
    start = max(e.start_day for e in experiments)
    cfg = make_config(args.preset, horizon_days=max(base_cfg.horizon_days, start + max(args.days)))
    ensure_rankers_all([cfg], progress=args.progress)  # the learned rankers the preset serves (built once, cached)
    t0 = time.perf_counter()
    lab = run_lab(cfg, experiments, args.users, args.seed, progress=args.progress, desc="experiment")
    platform = [r for d in args.days for r in readout(lab, experiments, d, args.pre_days)]
    truth, _ = true_effects(cfg, experiments, args.users, args.seed, args.days, progress=args.progress)
    text = table(platform, truth)
    print(text)
    srm = {r["experiment"]: r["srm_p"] for r in platform}
    print("sample-ratio check p: " + ", ".join(f"{k} {v:.2f}" for k, v in srm.items()))
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "horizon_days": cfg.horizon_days,
              "platform": platform, "truth": truth, "seconds": time.perf_counter() - t0}
    atomic_write(args.out / "ab.json", json.dumps(report, indent=1).encode())
    atomic_write(args.out / "report.md", (f"# A/B lab: {args.preset}, {args.users} users, seed {args.seed}\n\n```\n"
                                          f"{text}\n```\n").encode())
    plot(platform, truth, args.out / "ab.png")
    return report


if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM ends the job and every process it started
    main(tyro.cli(Args))
