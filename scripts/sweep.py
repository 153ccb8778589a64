"""A sweep on the executor: one world parameter, or one flag of another script, over a list of values; every point
is an independent job (``--executor ray`` runs them side by side), and the results are one table and one plot.

- ``--world PARAM``: a field of the world's config (dotted, e.g. ``users.patience_videos``, ``horizon_days``) set to
  each value; every baseline of ``--policies`` runs on every value x seed, all rollouts as one list of jobs, and
  the table gives ``--metric`` per policy and value with its paired difference from weighted-sum and the
  world-level 95 % interval.
- ``--script NAME --flag FLAG``: ``scripts/NAME.py`` (``main`` or ``compare``) run once per value of ``--FLAG``
  with ``--args`` (a hyperparameter, or the main job's training seed: the verdicts over several seeds), each run
  in its own ``--out/<flag>=<value>`` folder with wandb off and the in-process executor inside its job; the table
  gives each run's ``--metric`` difference from weighted-sum per policy and its verdicts.

Grid points with fixed budgets gain nothing from Ray Tune's schedulers (no trial is stopped early on a partial
result), so the points are plain tasks. wandb is written here only (the driver): the table, as ``sweep/table``.

    python scripts/sweep.py --world users.patience_videos --values 40 80 160 --preset tiny --users 64 --seeds 0 1
    python scripts/sweep.py --script main --flag train-seed --values 12345 1 2 --args "--quick" --executor ray
    python scripts/sweep.py --script main --flag cem-budget --values 1000000 2500000 --args "--only-cem"
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro

from agents.evaluation import check_seeds, run_jobs
from agents.policies import make_baseline
from agents.report import save_figure
from agents.rollouts import METRICS, RolloutJob
from agents.sinks import make_sink
from agents.stats import Comparison, summarize
from agents.threads import one_thread_default
from envs.config import make_config, setting_value
from offline_data.executor import exit_on_sigterm, make_executor
from rankers.fileio import atomic_write

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("main", "compare")


@dataclass
class Args:
    values: tuple[str, ...] = ()
    """The values swept (numbers or words, parsed as JSON where they parse)."""
    world: str = ""
    """A world-config field to sweep (dotted: ``users.patience_videos``); excludes --script."""
    script: Literal["", "main", "compare"] = ""
    """A script to run once per value of --flag; excludes --world."""
    flag: str = ""
    """The script's flag that takes the values (without ``--``), e.g. ``train-seed`` or ``cem-budget``."""
    args: str = ""
    """Further flags of every script run, as one shell-quoted string (e.g. ``"--quick"``)."""
    preset: str = "tiny"
    """--world: the world preset."""
    policies: tuple[str, ...] = ("weighted_sum", "engagement", "random")
    """--world: the baselines evaluated at every value (weighted-sum first: the reference)."""
    users: int = 64
    """--world: users per seed."""
    seeds: tuple[int, ...] = (0, 1)
    """--world: evaluation seeds (worlds)."""
    metric: str = "retention/retained_30d"
    """The per-user metric tabulated and plotted."""
    bootstrap_reps: int = 1000
    """Bootstrap resamples per interval."""
    out: Path = Path("runs/sweep")
    """Output folder: sweep.json, sweep.md, sweep.png (and each script run's folder)."""
    wandb_mode: str = ""
    """online | offline | disabled; empty = offline unless WANDB_MODE says otherwise (the driver's run only)."""
    executor: Literal["local", "ray"] = "local"
    """Where the points run: in this process, or on Ray (offline_data.executor); results do not depend on it."""
    ray_address: str = ""
    """With --executor ray: empty = a private Ray on this machine, ``auto`` or ``host:port`` = a running cluster."""
    workers: int = 0
    """CPUs of a private Ray (0 = every core of this machine)."""
    progress: bool = True
    """Show progress bars."""


@dataclass(frozen=True)
class ScriptRun:
    """One point of a script sweep: ``scripts/<script>.py`` with ``argv`` (picklable; run by :func:`run_script`)."""

    root: str
    script: str
    argv: tuple[str, ...]
    value: str

    @property
    def label(self) -> str:
        return f"{self.script} {self.value}"


def run_script(job: ScriptRun) -> dict[str, Any]:
    """Runs one script sweep point in this process: its ``main`` on its flags; returns its table rows and, where it
    wrote them, its verdicts."""
    import importlib.util

    one_thread_default()
    path = Path(job.root) / "scripts" / f"{job.script}.py"
    spec = importlib.util.spec_from_file_location(f"sweep_{job.script}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: the sweep's script is not there (clone the repository at the same path "
                                "on every machine of the cluster)")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    a = parse_point(mod, job)
    rows = mod.main(a)
    verdicts = Path(a.out) / "verdicts.json"
    return {"rows": rows, "verdicts": json.loads(verdicts.read_text())["verdicts"] if verdicts.is_file() else []}


def parse_point(mod: Any, job: ScriptRun) -> Any:
    """The arguments of one script sweep point: ``job.argv`` parsed as the script ``mod`` parses its command line
    (its ``parse_cli`` where it has one: ``main.py``'s ``--config`` picks the defaults the other flags change), and
    wandb off where the script writes to it (wandb is the driver's; ``main.py`` takes no flag for it)."""
    parse = getattr(mod, "parse_cli", None)
    a = parse(list(job.argv)) if parse is not None else tyro.cli(mod.Args, args=list(job.argv))
    return replace(a, wandb_mode="disabled") if any(f.name == "wandb_mode" for f in fields(a)) else a


def _check(args: Args) -> None:
    if not args.values:
        raise ValueError("--values is empty: give the values to sweep")
    if len(set(args.values)) != len(args.values):
        raise ValueError(f"--values {' '.join(args.values)} is invalid: it repeats a value")
    if bool(args.world) == bool(args.script):
        raise ValueError("give exactly one of --world PARAM and --script NAME --flag FLAG")
    if args.script and not args.flag:
        raise ValueError(f"--script {args.script} needs --flag (the flag that takes the values)")
    if args.metric not in METRICS:
        raise ValueError(f"--metric {args.metric!r} is not a per-user metric: choose from {sorted(METRICS)}")


def sweep_world(args: Args, ex: Any) -> list[dict[str, Any]]:
    """Every baseline on every value x seed (one job list); one row per (value, policy)."""
    check_seeds(args.seeds)
    base = make_config(args.preset)
    cfgs = {v: base.with_settings([f"{args.world}={v}"]) for v in args.values}
    policies = [make_baseline(p, seed=1000 + i) for i, p in enumerate(args.policies)]
    jobs = [RolloutJob(p, cfgs[v], args.users, s) for v in args.values for s in args.seeds for p in policies]
    runs = run_jobs(jobs, ex, progress=args.progress, desc="sweep")
    out = []
    per_value = len(args.seeds) * len(policies)
    for k, v in enumerate(args.values):
        comp = Comparison(runs=runs[k * per_value:(k + 1) * per_value], baseline=args.policies[0])
        for r in summarize(comp, [args.metric], reps=args.bootstrap_reps):
            if r["metric"] != args.metric:  # summarize adds the population metrics' rows
                continue
            out.append({"value": v, "policy": r["policy"], "mean": r["mean"], "lo": r["lo"], "hi": r["hi"],
                        "diff": r.get("diff"), "world_lo": r.get("world_lo"), "world_hi": r.get("world_hi")})
    return out


def sweep_script(args: Args, ex: Any) -> list[dict[str, Any]]:
    """The script once per value (one job each); one row per (value, policy) of its main table."""
    extra = shlex.split(args.args)
    if any(a in ("--out", "--executor", "--ray-address", f"--{args.flag}") for a in extra):
        raise ValueError(f"--args {args.args!r}: the sweep sets --out, --executor, --ray-address and "
                         f"--{args.flag} of each run itself")
    jobs = []
    for v in args.values:
        argv = [*extra, f"--{args.flag}", v, "--out", str((args.out / f"{args.flag}={v}").resolve()),
                "--executor", "local", "--no-progress"]
        jobs.append(ScriptRun(str(ROOT), args.script, tuple(argv), v))
    if ex.kind == "ray":  # this module is not installed on the workers: send run_script by value
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    done = ex.map(run_script, jobs, progress=args.progress, desc="sweep")
    out = []
    for v, res in zip(args.values, done, strict=True):
        beats = {d["agent"]: d.get("beats") for d in res["verdicts"] if "shift" not in str(d.get("baseline", ""))}
        for r in res["rows"]:
            if r["metric"] == args.metric:
                out.append({"value": v, "policy": r["policy"], "mean": r["mean"], "lo": r["lo"], "hi": r["hi"],
                            "diff": r.get("diff"), "world_lo": r.get("world_lo"), "world_hi": r.get("world_hi"),
                            "beats_weighted_sum": beats.get(r["policy"])})
    return out


def table_md(rows: list[dict[str, Any]], what: str, metric: str) -> str:
    """The sweep as one markdown table: a row per value, a column per policy (mean, and the paired difference from
    weighted-sum with its world-level 95 % interval)."""
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    values = list(dict.fromkeys(r["value"] for r in rows))
    cell = {(r["value"], r["policy"]): r for r in rows}
    lines = [f"{metric} by {what} (mean; Δ vs weighted-sum in pp, world-level 95 % interval)", "",
             "| " + " | ".join([what, *pols]) + " |", "|" + "---|" * (len(pols) + 1)]
    for v in values:
        parts = [str(v)]
        for p in pols:
            r = cell.get((v, p))
            if r is None:
                parts.append("")
                continue
            text = f"{r['mean']:.3f}"
            if r.get("diff") is not None and r.get("world_lo") is not None:
                text += f" ({100 * r['diff']:+.1f} [{100 * r['world_lo']:+.1f}, {100 * r['world_hi']:+.1f}])"
            if r.get("beats_weighted_sum"):
                text += " beats"
            parts.append(text)
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], what: str, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(dict.fromkeys(r["value"] for r in rows))
    numeric = all(isinstance(setting_value(v), (int, float)) for v in values)
    xs = {v: (float(setting_value(v)) if numeric else i) for i, v in enumerate(values)}
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, p in enumerate(dict.fromkeys(r["policy"] for r in rows)):
        pr = [r for r in rows if r["policy"] == p]
        x = np.array([xs[r["value"]] for r in pr])
        m = np.array([r["mean"] for r in pr])
        ax.errorbar(x, m, yerr=[m - [r["lo"] for r in pr], [r["hi"] for r in pr] - m], marker="o", capsize=3,
                    label=p, color=f"C{k}")
    if not numeric:
        ax.set_xticks(list(xs.values()), values)
    ax.set_xlabel(what)
    ax.set_ylabel(f"{metric} (95 % CI)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(args: Args) -> list[dict[str, Any]]:
    _check(args)
    what = args.world or f"--{args.flag}"
    with make_executor(args.executor, args.ray_address, args.workers) as ex:
        rows = sweep_world(args, ex) if args.world else sweep_script(args, ex)
    args.out.mkdir(parents=True, exist_ok=True)
    md = table_md(rows, what, args.metric)
    print(md)
    atomic_write(args.out / "sweep.md", md.encode())
    atomic_write(args.out / "sweep.json", json.dumps({"args": {k: str(v) for k, v in asdict(args).items()},
                                                      "rows": rows}, indent=1, default=float).encode())
    plot(rows, what, args.metric, args.out / "sweep.png")
    import os

    sink = make_sink(args.wandb_mode or os.environ.get("WANDB_MODE", "") or "offline", project="feedgym",
                     config={"args": {k: str(v) for k, v in asdict(args).items()}}, group="sweep", job_type="sweep",
                     out_dir=args.out)
    cols = ["value", "policy", "mean", "lo", "hi", "diff", "world_lo", "world_hi"]
    sink.log_table("sweep/table", cols, [[r.get(c) for c in cols] for r in rows])
    sink.finish()
    print(f"wrote {args.out / 'sweep.md'}, sweep.json and sweep.png")
    return rows


if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM ends the job and every process it started (a private Ray too)
    one_thread_default()
    main(tyro.cli(Args))
