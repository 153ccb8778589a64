"""The main job: tune a static knob vector by CEM, log a dataset with the system CEM's search had reached
one PPO budget before its end plus exploration noise, train CQL (offline, on that dataset) and PPO (online,
a residual on that anchor; anchor and PPO together spend CEM-tuned's budget), evaluate everything against the
weighted-sum baseline on the same users and noise, lead with a short table (per agent: 30-day retention
against weighted-sum and CEM-tuned with world-level 95 % intervals, regret, new creators, the verdict of
agents/verdict.py), then evaluate the agents again on the ``<preset>-shift`` world (users no agent was trained
on); the full table, the verdicts and the plots go to report.md.

The flags say what to run; ``--config NAME`` picks a named configuration for everything else
(agents/main_configs.py: ``main``, ``from-scratch``, ``discrete``, ``cem-unguarded`` and the superseded designs
kept to reproduce documented runs); ``--help`` lists both.

The agents and CEM optimise the ``churn_expected`` reward by default (at each session end, minus the
probability that the user churns there given the hidden state: ``churn``'s expectation with a fraction
of its variance). With ``churn`` (-1 when a user churns) CEM's candidates are told apart by a handful of
churn events, and one search in three drifts to a vector that starves new creators (docs/point7.md:
three CEM seeds per reward); the per-request ``retention`` reward pays for shorter sessions.
``--config from-scratch`` trains PPO from the zero action and logs the dataset around the weighted-sum
baseline instead (the from-scratch setting, which does not beat the baselines: docs/point7.md).

    python scripts/main.py                          # small world, about the budget stated in README
    python scripts/main.py --quick                  # a first look in about two minutes
    python scripts/main.py --train-seeds 0 1 2 3    # every agent trained on four seeds, judged per seed and pooled
    python scripts/main.py --only-cem --train-seed 1 --out runs/cem-seeds/churn_expected-1   # CEM alone

Outputs go to ``runs/main/`` (checkpoint, report.md, verdicts.json, results.json, PNG plots, offline wandb run);
with several training seeds each seed trains in ``runs/main/seed-<s>/`` (its checkpoints, cem.json, dataset,
metrics.jsonl) while the rollouts, the report and the verdicts stay in ``runs/main/``.
A run that is interrupted resumes when started again: the CEM vector is reused from ``cem.json`` if it
matches the config and budget, the dataset if it loads and matches the config and the logging policy,
PPO and CQL continue from their last checkpoints, finished rollouts are read from ``rollouts/``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agents.cem import cem_tune
from agents.evaluation import PendingRollouts, run_jobs
from agents.headroom import headroom_line, read_headroom
from agents.main_configs import (
    MainArgs,
    anchor_budget,
    cem_budget,
    check_args,
    command_line,
    parse_cli,
    quick_args,
    tolerance,
    train_seeds,
)
from agents.main_job import (
    Trained,
    TrainJob,
    pooled_comparison,
    renamed,
    seed_args,
    train,
    train_job,
    tune_cem,
)
from agents.policies import make_baseline
from agents.report import headline_markdown, print_headline, write_report
from agents.rollout_store import RolloutStore
from agents.rollouts import RolloutJob, models_for
from agents.sinks import make_sink
from agents.stats import Comparison, summarize
from agents.threads import one_thread_default
from agents.verdict import REACH, REGRET, RETENTION, Tolerance, headline, judge, verdict_lines, verdicts
from envs.config import PRESETS, FeedConfig, make_config
from envs.learned import with_pipeline
from offline_data.executor import Executor, exit_on_sigterm, make_executor
from offline_data.provision import ensure_rankers_all
from rankers.fileio import atomic_write

Args = MainArgs
"""The main job's configuration (agents.main_configs.MainArgs): ``Args(preset="tiny", ...)`` from Python."""
VERDICT_METRICS = (RETENTION, REGRET, REACH)


def main(args: Args) -> list[dict]:
    """Runs the job ``args`` describes; returns the rows of the full table (:func:`agents.stats.summarize`) of the
    training world ([] with ``only_cem``)."""
    cmd = command_line(args)  # the command as given (a quick look's included), before --quick shrinks it
    if args.quick:
        args, changed = quick_args(args)
        print(f"--quick: {', '.join(changed)} (a 7-day world: 'retained_30d' is retention at its horizon); "
              f"output in {args.out}")
    check_args(args)  # every value is checked before any work
    if len(args.train_seeds) == 1:  # one seed: the single-seed job, trained in --out
        args = replace(args, train_seed=args.train_seeds[0], train_seeds=())
    cfg = _world(args.preset, args.pipeline, "--preset")
    try:
        tcfg = cfg.replace(reward={"mode": args.train_reward})  # what the agents and CEM optimise
    except ValueError as err:
        raise ValueError(f"--train-reward {args.train_reward!r} is invalid: {err}") from None
    baselines = [make_baseline(b, seed=1000 + i) for i, b in enumerate(args.baselines)]
    shift_name = f"{args.preset}-shift"
    scfg = _world(shift_name, args.pipeline, "--preset") if args.shift and shift_name in PRESETS else None
    sink = make_sink(args.wandb_mode or os.environ.get("WANDB_MODE", "") or "offline", project="feedgym",
                     config={"args": {k: str(v) for k, v in vars(args).items()}, "env": cfg.to_dict()},
                     group=f"main-{args.preset}", job_type="main", out_dir=args.out)
    t0 = time.perf_counter()
    tb = time.perf_counter()  # the learned rankers of both worlds, built at once on a fresh checkout (one per core)
    built = ensure_rankers_all([cfg] if args.only_cem or scfg is None else [cfg, scfg], progress=args.progress)
    if built:
        print(f"      learned rankers built for {', '.join(built)} ({time.perf_counter() - tb:.0f}s; cached for later "
              "runs)")
    store = _store(args)
    base_jobs = [RolloutJob(p, cfg, args.users, s, args.finished, store) for s in args.seeds for p in baselines]
    base_jobs += [RolloutJob(p, scfg, args.shift_users, s, args.finished, store) for s in args.seeds for p in baselines
                  if scfg is not None and p.name == "weighted_sum"]
    _say_stored(base_jobs, "baseline")
    # wandb is written here only (the driver); an error or a signal stops every task and a private Ray
    with make_executor(args.executor, args.ray_address, args.workers) as ex:
        background: list[PendingRollouts] = []
        if base_jobs and not args.only_cem:  # on Ray they run while the agents train; in-process, after training
            if ex.kind != "local":
                print(f"      evaluating the {len(baselines)} baselines on the {ex.describe()} while the agents "
                      "train")
            background.append(PendingRollouts(base_jobs, ex))
        try:
            return _train_and_evaluate(args, _Setup(cfg, tcfg, scfg, sink, baselines, background, t0, ex, cmd))
        finally:
            for b in background:
                b.cancel()


def _world(preset: str, pipeline: str, flag: str) -> FeedConfig:
    try:
        return with_pipeline(make_config(preset), pipeline)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{flag} {preset!r} is invalid: {err}") from None


@dataclass
class _Setup:
    """What :func:`main` prepared for :func:`_train_and_evaluate`."""

    cfg: FeedConfig
    """The evaluation world."""
    tcfg: FeedConfig
    """The training world: ``cfg`` with the reward the agents and CEM optimise."""
    scfg: FeedConfig | None
    """The shifted world (``<preset>-shift``), or None without ``--shift``."""
    sink: Any
    baselines: list
    background: list[PendingRollouts]
    """The baselines' rollouts, handed to the executor before training."""
    t0: float
    """When the job started (``time.perf_counter``)."""
    executor: Executor
    """Where the rollouts, the log's worlds and the training seeds run."""
    command: str
    """The command line that reproduces the job."""


def _train(args: Args, setup: _Setup) -> list[Trained]:
    """Every training seed's agents: one seed in this process (the driver's sink and executor), several as
    executor jobs, each in ``<out>/seed-<s>`` with its own metrics.jsonl."""
    seeds = train_seeds(args)
    if len(seeds) == 1:
        return [train(args, setup.tcfg, setup.sink, setup.executor, tune=cem_tune)]
    ex = setup.executor
    jobs = [TrainJob(seed_args(args, s, progress=args.progress and ex.kind == "local"), setup.tcfg, f"_s{s}")
            for s in seeds]
    print(f"training seeds {', '.join(map(str, seeds))}: one job each on the {ex.describe()}, in "
          f"{args.out}/seed-<s>")
    return ex.map(train_job, jobs, common=models_for([setup.tcfg]))


def _train_and_evaluate(args: Args, setup: _Setup) -> list[dict]:
    cfg, scfg, sink, baselines, t0 = setup.cfg, setup.scfg, setup.sink, setup.baselines, setup.t0
    trained = _train(args, setup)
    if args.only_cem:
        sink.finish()
        return []
    multi = len(trained) > 1
    tick = time.perf_counter()
    agent_names = [_canonical(p.name, trained[0]) for p in trained[0].agents]
    policies = [p for t in trained for p in t.policies]  # every seed's agents and CEM-tuned
    shifted = [*policies, *(p for p in baselines if p.name == "weighted_sum")]  # agents, CEM-tuned, weighted-sum
    print(f"[4/4] evaluating on {args.users} users x seeds {args.seeds}"
          + (f", and {', '.join(p.name for p in shifted)} on {scfg.preset} ({args.shift_users} users x the same "
             "seeds): users no agent was trained on" if scfg is not None else ""))
    store = _store(args)
    jobs = [RolloutJob(p, cfg, args.users, s, args.finished, store) for s in args.seeds for p in policies]
    if scfg is not None:
        jobs += [RolloutJob(p, scfg, args.shift_users, s, args.finished, store) for s in args.seeds for p in policies]
    _say_stored(jobs, "agent")
    # keys are unique: seeds and baselines were checked for repeats, agents' names are not baselines'
    keys = [(j.cfg.preset, j.policy.name, j.seed) for j in [*jobs, *(j for b in setup.background for j in b.jobs)]]
    runs = dict(zip(keys, run_jobs(jobs, setup.executor, progress=args.progress, background=setup.background),
                    strict=True))
    stages = {f"seed-{t.seed}/{k}" if multi else k: v for t in trained for k, v in t.stages.items()}
    stages["evaluation"] = time.perf_counter() - tick
    step = trained[0].steps
    sink.log({f"perf/stage_s/{k}": v for k, v in stages.items()}, step=step)

    def comparison(preset: str, pols: list) -> Comparison:
        return Comparison(runs=[runs[(preset, p.name, s)] for s in args.seeds for p in pols])

    tol = tolerance(args)
    comp = comparison(cfg.preset, [*policies, *baselines])
    rows = summarize(comp)
    start = (f"from CEM's mean after {anchor_budget(args)} steps, " if args.cem and args.anchor == "cem" else "")
    budgets = f"CEM-tuned {cem_budget(args) if args.cem else 0} steps; PPO {start}{args.timesteps} steps"
    seeds_text = f"; training seeds {', '.join(map(str, train_seeds(args)))}" if multi else ""
    title = (f"feedgym main job: {budgets}; CQL ({args.cql_steps} steps) vs baselines"
             f" — {args.preset}, "
             f"{args.users} users x {len(args.seeds)} seeds{seeds_text}")
    vs, heads = _judge_world(trained, comparison, cfg.preset, [*baselines], agent_names, tol,
                             rows if not multi else None)
    lead_title = (f"At a glance: {args.preset}, {args.users} users x {_n(len(args.seeds), 'world')}"
                  + (f", {len(trained)} training seeds" if multi else ""))
    print_headline(heads, lead_title, tol)
    verdict_text = _lines(vs, tol)
    if args.headroom.exists():
        try:
            verdict_text.append(headroom_line(read_headroom(args.headroom, cfg.preset), heads))
        except ValueError as err:
            verdict_text.append(f"headroom not named: {err}")
    else:
        verdict_text.append(f"headroom not named: no {args.headroom} (scripts/headroom.py --preset {cfg.preset} "
                            "writes it)")
    print(verdict_text[-1])
    shift_heads: list[dict] = []
    if scfg is not None:
        comp_s = comparison(scfg.preset, shifted)
        rows_s = summarize(comp_s)
        title_s = (f"the same agents on {scfg.preset} (unseen user population), {args.shift_users} users x "
                   f"{len(args.seeds)} seeds{seeds_text}")
        vs_s, shift_heads = _judge_world(trained, comparison, scfg.preset,
                                         [p for p in baselines if p.name == "weighted_sum"], agent_names, tol,
                                         rows_s if not multi else None, f" ({scfg.preset})")
        lead_s = (f"At a glance: {scfg.preset} (users no agent was trained on), {args.shift_users} users x "
                  f"{_n(len(args.seeds), 'world')}" + (f", {len(trained)} training seeds" if multi else ""))
        print_headline(shift_heads, lead_s, tol)
        lines_s = _lines(vs_s, tol)
        write_report(comp_s, rows_s, args.out / "shift", title_s, f"{setup.command} (shift stage)",
                     lead=headline_markdown(shift_heads, lead_s, tol), tail=_verdicts_markdown(lines_s, tol))
        vs += vs_s
        verdict_text += lines_s
    vcols = list(dict.fromkeys(c for v in vs for c in v))
    # one type per column (wandb's tables refuse a mix): the training seed is an int or "pooled"
    sink.log_table("eval/verdicts", vcols, [[str(v[c]) if c == "train_seed" else v.get(c) for c in vcols] for v in vs])
    atomic_write(args.out / "verdicts.json", json.dumps(
        {"tolerance": asdict(tol), "train_seeds": list(train_seeds(args)), "verdicts": vs, "lines": verdict_text,
         "headline": {cfg.preset: heads, **({scfg.preset: shift_heads} if scfg is not None else {})}},
        indent=1).encode())
    cols = ["metric", "policy", "mean", "lo", "hi", "diff", "diff_lo", "diff_hi", "significant", "iqm", "iqm_lo",
            "iqm_hi", "iqm_significant"]
    # the shifted world's rows as eval/<preset>/<metric>/<policy> and their own table, beside the main world's
    for where, table in (("", rows), *(((f"{scfg.preset}/", rows_s),) if scfg is not None else ())):
        sink.log({f"eval/{where}{r['metric'].replace('/', '.')}/{r['policy']}": r["mean"] for r in table}, step=step)
        sink.log_table(f"eval/{where}table", cols, [[r.get(c) for c in cols] for r in table])
    for t in trained:
        for path, kind, typ in t.artifacts:
            sink.log_artifact(path, f"{kind}-{args.preset}" + (f"-s{t.seed}" if multi else ""), typ)
    sink.finish()
    report = write_report(comp, rows, args.out, title, setup.command, lead=headline_markdown(heads, lead_title, tol),
                          tail=_verdicts_markdown(verdict_text, tol))
    print(f"full table, verdicts and plots: {report}" + (f" and {args.out / 'shift' / 'report.md'}" if scfg else "")
          + f"  (train+CEM {tick - t0:.0f}s, eval {time.perf_counter() - tick:.0f}s)")
    return rows


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


def _canonical(name: str, t: Trained) -> str:
    """An agent's name without its training seed's suffix (``ppo_s1`` -> ``ppo``)."""
    suffix = f"_s{t.seed}"
    return name[: -len(suffix)] if name.endswith(suffix) and name != suffix else name


def _judge_world(trained: list[Trained], comparison: Any, preset: str, baselines: list, agent_names: list[str],
                 tol: Tolerance, rows: list[dict] | None, suffix: str = "") -> tuple[list[dict], list[dict]]:
    """The verdicts of one world (every training seed's agents against weighted-sum and their seed's CEM-tuned;
    with several seeds also the seed-pooled agents', ``train_seed`` = "pooled") and its short table's rows.
    ``rows``: the full table's rows of the single seed's comparison (reused), None to summarize each seed's."""
    multi = len(trained) > 1
    by_seed: dict[int, list[dict]] = {}
    comps: list[Comparison] = []
    out: list[dict] = []
    for t in trained:
        names = {p.name: _canonical(p.name, t) for p in t.policies}
        comp = Comparison(runs=renamed(comparison(preset, [*t.policies, *baselines]).runs, names))
        seed_rows = rows if rows is not None else summarize(comp, metrics=VERDICT_METRICS)
        vs = judge(comp, seed_rows, agent_names, tol)
        by_seed[t.seed] = vs + _cem_verdicts(comp, seed_rows, tol)
        out += [{**v, "baseline": v["baseline"] + suffix, **({"train_seed": t.seed} if multi else {})} for v in vs]
        comps.append(comp)
    pooled = None
    if multi:
        pooled_comp = pooled_comparison(comps, VERDICT_METRICS)
        pooled_rows = summarize(pooled_comp, metrics=VERDICT_METRICS)
        vs = judge(pooled_comp, pooled_rows, agent_names, tol)
        pooled = vs + _cem_verdicts(pooled_comp, pooled_rows, tol)
        out += [{**v, "baseline": v["baseline"] + suffix, "train_seed": "pooled"} for v in vs]
    return out, headline(by_seed, agent_names, pooled)


def _cem_verdicts(comp: Comparison, rows: list[dict], tol: Tolerance) -> list[dict]:
    """CEM-tuned against the comparison's baseline (for the short table's CEM-tuned row), if it ran."""
    return verdicts(rows, ["cem_tuned"], comp.baseline, tol) if "cem_tuned" in comp.policies else []


def _lines(vs: list[dict], tol: Tolerance) -> list[str]:
    """The verdicts' lines, each seed's agents named with their seed when there are several."""
    return verdict_lines([{**v, "agent": f"{v['agent']} [train seed {v['train_seed']}]"} if "train_seed" in v else v
                          for v in vs], tol)


def _verdicts_markdown(lines: list[str], tol: Tolerance) -> str:
    return "\n".join(["## Verdicts", "", "beats = world-level paired 95 % CI of 30-day retention above 0, regret rise "
                      f"<= {100 * tol.regret_tol:.1f} pp, new-creator share fall <= {100 * tol.reach_tol:.1f} pp:", "",
                      *(f"- {line}" for line in lines)])


def _store(args: Args) -> Path:
    """The rollout store of the job (agents.rollout_store.RolloutStore): an interrupted evaluation resumes from it."""
    return args.out / "rollouts"


def _say_stored(jobs: list[RolloutJob], what: str) -> None:
    """Says how many of ``jobs`` the rollout store already holds (they are read, not run again)."""
    n = sum(j.store is not None and RolloutStore(j.store).holds(j) for j in jobs)
    if n:
        print(f"      {n} of the {len(jobs)} {what} rollouts are in {jobs[0].store} (same policy, world, users, seed "
              "and code): read, not run again")


def _cem(args: Args, cfg: FeedConfig, sink: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`agents.main_job.tune_cem` with this module's ``cem_tune`` (which tests replace)."""
    return tune_cem(args, cfg, sink, tune=cem_tune)


if __name__ == "__main__":
    one_thread_default()
    exit_on_sigterm()  # SIGTERM stops every task and process the job started (a private Ray too), and cleans up
    main(parse_cli())
