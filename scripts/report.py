"""Rebuild the report of a finished run: report.md, results.json and every PNG plot (metric bars,
paired differences with their IQM, retention by day, knob usage overall and by user state,
learning curves) from what the run saved, without rerunning anything.

It reads ``<run>/comparison.npz`` (every policy's per-user results, written by
``agents.report.write_report`` at the end of ``scripts/main.py`` and ``scripts/compare.py``),
``<run>/results.json`` (the summary rows; recomputed from the comparison with ``--recompute`` or
when missing) and ``<run>/metrics.jsonl`` (every scalar the run logged, for the learning curves).
A run still training has no comparison yet: then only ``learning_curves.png`` is drawn.
With ``--recompute`` the verdicts (``agents/verdict.py``) of every policy that is not a baseline are
judged again and printed (and written to ``verdicts-recomputed.json``), e.g. after the verdict rule
changed.

    python scripts/report.py                       # runs/main
    python scripts/report.py --run runs/main_quick --recompute
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tyro

from agents.evaluation import check_reps
from agents.policies import BASELINES
from agents.report import COMPARISON_FILE, load_comparison, print_table, write_learning_curves, write_report
from agents.sinks import METRICS_FILE
from agents.stats import summarize
from agents.threads import one_thread_default
from agents.verdict import RETENTION, judge, verdict_lines
from rankers.fileio import atomic_write


@dataclass
class Args:
    run: Path = Path("runs/main")
    """Run directory holding comparison.npz, results.json and/or metrics.jsonl."""
    out: Path | None = None
    """Where to write report.md and the plots (default: the run directory itself)."""
    recompute: bool = False
    """Recompute the summary rows (bootstrap intervals, IQM) from the comparison instead of reading
    results.json."""
    bootstrap_reps: int = 2000
    """Bootstrap resamples per interval when recomputing."""
    title: str = ""
    """Report title (default: the one the run saved)."""
    print_table: bool = True
    """Print the comparison table."""


def main(args: Args) -> list[Path]:
    """Writes the report files; returns the paths written (report.md first when there is one)."""
    check_reps(args.bootstrap_reps)
    out = args.out or args.run
    comp_path = args.run / COMPARISON_FILE
    metrics_path = args.run / METRICS_FILE
    if not comp_path.exists():
        if not metrics_path.exists():
            raise FileNotFoundError(f"{args.run} has neither {COMPARISON_FILE} (written by write_report at the end "
                                    f"of scripts/main.py or scripts/compare.py) nor {METRICS_FILE} (written while "
                                    "training)")
        curves = write_learning_curves(metrics_path, out)
        print(f"no {COMPARISON_FILE} in {args.run} yet: learning curves only -> {curves}")
        return [curves] if curves is not None else []
    comp, meta = load_comparison(comp_path)
    rows_path = args.run / "results.json"
    if args.recompute or not rows_path.exists():
        rows = summarize(comp, reps=args.bootstrap_reps)
        base = comp.baseline
        seeds = sorted({r.seed for r in comp.runs})
        print(f"30-day retention difference from {base} per world (seed), pp:")
        for pol in (p for p in comp.policies if p != base):
            diffs = [100 * d.mean() for d in comp.paired_per_seed(pol, RETENTION)]
            print(f"  {pol:>14}: " + "  ".join(f"{s}: {d:+5.1f}" for s, d in zip(seeds, diffs)))
        agents = [p for p in comp.policies if p not in BASELINES and p != "cem_tuned"]
        if agents and comp.baseline in comp.policies:
            vs = judge(comp, rows, agents)
            lines = verdict_lines(vs)
            print("verdicts (recomputed):\n  " + "\n  ".join(lines))
            atomic_write(out / "verdicts-recomputed.json",
                         json.dumps({"verdicts": vs, "lines": lines}, indent=1).encode())
    else:
        try:
            rows = json.loads(rows_path.read_text())
        except ValueError as err:  # a results.json written by hand or by another tool
            raise ValueError(f"{rows_path} is not valid JSON ({err}); rerun with --recompute to rebuild the rows "
                             "from the comparison") from None
    title = args.title or meta.get("title") or f"feedgym report of {args.run}"
    command = meta.get("command") or ""
    if args.print_table:
        print_table(rows, title)
    same_dir = out.resolve() == args.run.resolve()
    report = write_report(comp, rows, out, title, command, metrics_path=metrics_path, save=not same_dir)
    written = [report, out / "results.json", *sorted(out.glob("*.png"))]
    print(f"report and plots: {out}")
    return written


if __name__ == "__main__":
    one_thread_default()
    main(tyro.cli(Args))
