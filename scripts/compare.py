"""Compare policies against the seed's weighted-sum baseline on the same users and noise.

Runs every baseline and trained agent (PPO / CQL checkpoint directories, a CEM ``cem.json``, e.g.
from the main job's ``runs/main/``) for one episode per user on each seed (common random numbers),
prints the metric table with 95 % bootstrap intervals and paired differences from the weighted-sum
baseline and the verdicts of ``agents/verdict.py``, and writes plots and a markdown report to
``runs/compare/``. Agents can be evaluated on another world than they were trained on (``--preset
small-shift``).

    python scripts/compare.py --preset small --agents runs/main/ppo runs/main/cql runs/main/cem.json
    python scripts/compare.py --agents cem_a=runs/a/cem.json cem_b=runs/b/cem.json --policies weighted_sum
    python scripts/compare.py --agents runs/main/ppo anchor=runs/main/cem.json@1500000 --against anchor \
        --policies weighted_sum   # PPO against the point of CEM's search it started from
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from agents.evaluation import check_policies, check_reps, check_seeds, evaluate
from agents.loading import load_agent
from agents.policies import make_baseline
from agents.report import print_table, write_report
from agents.stats import summarize
from agents.threads import one_thread_default
from agents.verdict import judge, verdict_lines
from envs.config import make_config
from envs.learned import with_pipeline
from offline_data.executor import exit_on_sigterm, make_executor
from offline_data.provision import learned_models
from rankers.fileio import atomic_write


@dataclass
class Args:
    preset: str = "small"
    """World preset: tiny, small, default, large (and their ``-shift`` worlds)."""
    pipeline: Literal["preset", "learned", "noisy_oracle"] = "preset"
    """Stages 1-3: the preset's own (learned on small and default), the learned or the noisy-oracle pipeline."""
    users: int = 1000
    """Users per seed (one episode each)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Seeds; each builds the same world and users for every policy."""
    policies: tuple[str, ...] = ("weighted_sum", "engagement", "random", "true_scores")
    """Baselines to run: weighted_sum, engagement, random, true_scores, placebo (weighted-sum nudged by 0.1 %:
    the noise floor of a comparison)."""
    agents: tuple[str, ...] = ()
    """Trained agents: PPO or CQL checkpoint directories, or a CEM ``cem.json`` (agents.loading.load_agent);
    ``NAME=PATH`` names one in the tables (e.g. two CEM vectors: ``cem_a=runs/a/cem.json cem_b=runs/b/cem.json``);
    ``cem.json@STEPS`` is the search's mean after STEPS of its requests (``agents.cem.mean_after``: the main
    job's agents start from ``@<cem budget - PPO budget>``), named ``cem_anchor`` unless named."""
    against: tuple[str, ...] = ("cem_tuned",)
    """Besides weighted-sum, the policies every other agent is judged against where they ran (e.g.
    ``anchor`` for ``anchor=runs/main/cem.json@1500000``: whether PPO improved on where it started)."""
    executor: Literal["local", "ray"] = "local"
    """Where the rollouts run: in this process, or on Ray (offline_data.executor); results do not depend on it."""
    ray_address: str = ""
    """With --executor ray: empty = a private Ray on this machine, ``auto`` or ``host:port`` = a running cluster."""
    workers: int = 0
    """CPUs of a private Ray (0 = every core of this machine; one rollout per CPU, one torch thread each)."""
    finished: Literal["replace", "retire"] = "replace"
    """What takes the place of a user whose episode ended: ``replace`` = a new, unmeasured user (a steady
    population, as in training), ``retire`` = nobody (faster; the traffic drifts to survivors)."""
    out: Path = Path("runs/compare")
    """Output directory for report.md, results.json, PNG plots and ``rollouts/`` (each finished rollout, read
    back instead of run again by a later or resumed comparison of the same policy, world, users, seed and code)."""
    bootstrap_reps: int = 2000
    """Bootstrap resamples per interval."""
    progress: bool = True
    """Show progress bars."""


def main(args: Args) -> list[dict]:
    if args.users < 2:
        raise ValueError(f"--users={args.users} is invalid: need at least 2 users for intervals")
    check_seeds(args.seeds)
    check_reps(args.bootstrap_reps)
    if not args.policies and not args.agents:
        raise ValueError("nothing to compare: --policies and --agents are both empty")
    cfg = with_pipeline(make_config(args.preset), args.pipeline)
    learned_models(cfg, progress=args.progress)  # the world's learned rankers, if it has any: built once, cached
    agents = [load_agent(*_agent_spec(spec)) for spec in args.agents]
    names = [a.name for a in agents]
    if len(set(names)) != len(names):
        raise ValueError(f"--agents gives two agents the same name: {names}")
    if clash := sorted(set(names) & set(args.policies)):
        raise ValueError(f"--agents names {clash} are baselines' names too (--policies); name them NAME=PATH")
    policies = [*agents, *(make_baseline(p, seed=1000 + i) for i, p in enumerate(args.policies))]
    check_policies(policies, "--policies / --agents")
    if args.against != Args.against and (missing := [b for b in args.against if b not in {p.name for p in policies}]):
        raise ValueError(f"--against {' '.join(missing)}: no policy of that name runs (--agents / --policies)")
    store = args.out / "rollouts"  # an interrupted comparison resumes from the rollouts it finished
    with make_executor(args.executor, args.ray_address, args.workers) as ex:
        comp = evaluate(policies, cfg, args.users, args.seeds, progress=args.progress, executor=ex,
                        finished=args.finished, store=store)
    rows = summarize(comp, reps=args.bootstrap_reps)
    title = f"feedgym: policies vs weighted-sum ({args.preset}, {args.users} users x {len(args.seeds)} seeds)"
    print_table(rows, title)
    if agents and "weighted_sum" in comp.policies:
        learned = [n for n in names if n not in args.against and n != "cem_tuned"]
        vs = judge(comp, rows, learned, against=args.against, reps=args.bootstrap_reps)
        lines = verdict_lines(vs)
        for line in lines:
            print("  " + line)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "verdicts.json", json.dumps({"verdicts": vs, "lines": lines}, indent=1).encode())
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv) if sys.argv and sys.argv[0].endswith(".py") else ""
    report = write_report(comp, rows, args.out, title, cmd or f"scripts/compare.py {args}")
    print(f"report: {report}")
    return rows


def _agent_spec(spec: str | Path) -> tuple[Path, str | None]:
    """``PATH`` or ``NAME=PATH`` -> (path, name or None)."""
    name, sep, path = str(spec).partition("=")
    if sep and name and "/" not in name:
        return Path(path), name
    return Path(spec), None


if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM ends the job and every process it started (a private Ray too)
    one_thread_default()
    main(tyro.cli(Args))
