"""The main job: tune a static knob vector by CEM, log a dataset with the system CEM's search had reached
one PPO budget before its end plus exploration noise, train CQL (offline, on that dataset) and PPO (online,
a residual on that anchor; anchor and PPO together spend CEM-tuned's budget), evaluate
everything against the weighted-sum baseline on the same users and noise, print the comparison
table and the verdicts (agents/verdict.py) against the weighted-sum and the CEM-tuned baselines,
then evaluate the agents again on the ``<preset>-shift`` world (users no agent was trained on),
write the plots. ``--discrete`` adds discrete PPO and DiscreteCQL on the knob menu.

The agents and CEM optimise the ``churn_expected`` reward by default (at each session end, minus the
probability that the user churns there given the hidden state: ``churn``'s expectation with a fraction
of its variance). With ``churn`` (-1 when a user churns) CEM's candidates are told apart by a handful of
churn events, and one search in three drifts to a vector that starves new creators (docs/point7.md:
three CEM seeds per reward); the per-request ``retention`` reward pays for shorter sessions.
``--anchor weighted_sum`` trains PPO from the zero action and logs the dataset around the weighted-sum
baseline instead (the from-scratch setting, which does not beat the baselines: docs/point7.md).

    python scripts/main.py            # small world, about the budget stated in README
    python scripts/main.py --quick    # a first look in about two minutes
    python scripts/main.py --only-cem --train-seed 1 --out runs/cem-seeds/churn_expected-1   # CEM alone

Outputs go to ``runs/main/`` (checkpoint, report.md, results.json, PNG plots, offline wandb run).
A run that is interrupted resumes when started again: the CEM vector is reused from ``cem.json`` if it
matches the config and budget, the dataset if it loads and matches the config and the logging policy,
PPO and CQL continue from their last checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro

from agents.cem import cem_tune, mean_after
from agents.checkpoints import set_aside
from agents.cql import CQLParams, D3RLPolicy, critic_landscape, train_cql
from agents.evaluation import PendingRollouts, check_seeds, run_jobs
from agents.policies import ConstantKnobs, MenuKnobs, make_baseline
from agents.ppo import PPOParams, SB3Policy, train_ppo
from agents.report import print_table, write_report
from agents.rollout_store import RolloutStore
from agents.rollouts import RolloutJob
from agents.sinks import make_sink
from agents.stats import Comparison, summarize
from agents.threads import one_thread_default
from agents.verdict import Tolerance, judge, verdict_lines
from envs.config import ENV_VERSION, PRESETS, FeedConfig, make_config
from envs.feed_env import knob_names
from envs.learned import with_pipeline
from offline_data import (
    DatasetError,
    EpsilonMenu,
    GaussianKnobs,
    LoggedDataset,
    collect,
    load_dataset,
    save_dataset,
    to_mdp_dataset,
)
from offline_data.executor import Executor, exit_on_sigterm, make_executor
from offline_data.provision import CODE_PACKAGES, code_digest, ensure_rankers_all
from rankers.fileio import atomic_write


@dataclass
class Args:
    preset: str = "small"
    """World preset for training and evaluation."""
    pipeline: Literal["preset", "learned", "noisy_oracle"] = "preset"
    """Stages 1-3: the preset's own (learned on small and default), the learned pipeline, or the
    noisy-oracle pipeline (the ablation); the shifted world gets the same."""
    timesteps: int = 500_000
    """PPO environment steps (user-requests)."""
    cem_budget: int = 2_500_000
    """CEM-tuned's simulation budget in user-requests (0 = the PPO budget), and every agent's: with ``--anchor
    cem`` the agents start from the mean of the same search after ``--anchor-budget`` requests, and PPO spends
    the rest (README, "One budget for CEM-tuned and the agents")."""
    anchor_budget: int = -1
    """Requests of CEM's search behind the agents' anchor (its first ``anchor_budget // (16 x 32 x
    --cem-steps-per-iter)`` iterations: 2M and 39 by default);
    -1 = ``cem_budget - timesteps``, so that anchor and PPO together spend CEM-tuned's budget; ``cem_budget``
    = the CEM-tuned vector itself (the design before this option, which gave the agents twice CEM's budget)."""
    num_envs: int = 256
    """Simulated users stepped together during training (larger batches simulate faster per user-step)."""
    users: int = 128
    """Evaluation users per seed (one episode each)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    """Evaluation seeds (not the training seed): each is one world. Verdicts resample worlds, so more
    worlds with fewer users each beat fewer worlds with more users (README, "how many worlds")."""
    executor: Literal["local", "ray"] = "local"
    """Where the evaluation rollouts and the log's worlds run: in this process (one after another, after training),
    or on Ray (offline_data.executor: the baselines' rollouts then run while the agents train); results do not
    depend on it."""
    ray_address: str = ""
    """With --executor ray: empty = a private Ray on this machine, ``auto`` or ``host:port`` = a running cluster."""
    workers: int = 0
    """CPUs of a private Ray (0 = every core of this machine; one rollout per CPU, one torch thread each)."""
    finished: Literal["replace", "retire"] = "replace"
    """What takes the place of a user whose episode ended during evaluation: ``replace`` = a new, unmeasured
    user (a steady population, as in training), ``retire`` = nobody (faster; the traffic drifts to survivors)."""
    train_seed: int = 12345
    """Seed of the training worlds (``envs.world_mix.world_seed``), CEM, the logging policy and PPO."""
    train_worlds: int = 4
    """Worlds the training users are spread over (CEM, the offline log and PPO): an agent trained on one
    world learns that world's corpus, which does not carry to the evaluation worlds (docs/point7.md)."""
    world_days: float = 60.0
    """World days a training world lives before it is rebuilt from its next seed (CEM and PPO; 0 = forever);
    an evaluation world runs from its first day until its last measured user's 30 days are over."""
    baselines: tuple[str, ...] = ("weighted_sum", "engagement", "random", "true_scores")
    """Baselines evaluated beside the agent."""
    out: Path = Path("runs/main")
    """Output directory."""
    wandb_mode: str = ""
    """online | offline | disabled; empty = offline unless an API key is configured."""
    quick: bool = False
    """A first look: tiny world, small budgets."""
    resume: bool = True
    """Resume PPO from ``out/ppo`` if a checkpoint is there."""
    dataset_users: int = 128
    """Users logged at once for the offline dataset."""
    dataset_steps: int = 400
    """Batched steps logged (finished users are replaced)."""
    behaviour_sigma: float = 0.3
    """Std of the truncated-normal knob noise of the logging policy around the anchor."""
    anchor: Literal["cem", "weighted_sum"] = "cem"
    """Where the agents start: ``cem`` = PPO learns a residual on the CEM-tuned vector and the offline log
    is written by the CEM-tuned system with exploration noise (needs ``--cem``); ``weighted_sum`` = PPO
    starts from the zero action and the log is written around the weighted-sum baseline."""
    cql_steps: int = 2000
    """CQL gradient steps (0 skips CQL)."""
    train_reward: str = "churn_expected"
    """Reward the agents and CEM optimise (envs RewardConfig.mode): ``churn_expected`` (minus the churn
    probability at each session end), ``churn`` (-1 at churn; its undiscounted return is minus the churn flag)
    or ``retention`` (+1 per return visit). Evaluation is on the world's realised outcomes."""
    ppo: PPOParams = field(default_factory=lambda: PPOParams(gamma=0.999))
    """PPO hyperparameters (SB3's names), e.g. ``--ppo.gamma 0.999``."""
    cql: CQLParams = field(default_factory=lambda: CQLParams(gamma=0.999))
    """CQL hyperparameters (d3rlpy's names), e.g. ``--cql.conservative-weight 10``."""
    cem: bool = True
    """Also tune a static knob vector by the cross-entropy method on the same simulation budget."""
    cem_guardrails: bool = True
    """CEM keeps the verdicts' tolerances (``--regret-tol``, ``--reach-tol``) against weighted-sum served in the
    same training worlds: candidates that lower new creators' share or raise the regret rate beyond them (at
    ``--cem-guard-z`` standard errors) rank after those that do not (``agents.cem``); the agents start from
    the vector CEM finds, so they inherit its reach. ``--no-cem-guardrails``: retention alone."""
    cem_guard_z: float = 1.645
    """Standard errors of margin the guardrails ask for: a candidate keeps one when its shortfall's upper bound
    at this many standard errors (over the iteration's users) is inside the tolerance (0 = point estimate)."""
    cem_steps_per_iter: int = 100
    """Requests each CEM candidate's users make per iteration: the budget buys budget / (16 candidates x 32
    users x this) iterations (100: 48 at 2.5M, 39 at 2M, 9 at 500k). Fewer requests give more, noisier
    iterations (docs/point7.md, "Does a larger budget settle CEM's search?": 50 did worse)."""
    cem_paired: bool = True
    """CEM compares its candidates on the same users (clones: same hidden state, same random numbers);
    ``--no-cem-paired`` gives every candidate its own users (the search before this option)."""
    only_cem: bool = False
    """Tune the CEM vector (``out/cem.json``, e.g. for ``compare.py --agents NAME=out/cem.json``) and stop."""
    discrete: bool = False
    """Also train discrete PPO (ForYouFeedDiscrete) and DiscreteCQL (on an epsilon-preset log)."""
    shift: bool = True
    """Evaluate the trained agents, CEM-tuned and weighted-sum again on ``<preset>-shift`` (unseen users)."""
    shift_users: int = 64
    """Users per evaluation seed for the shifted-world evaluation (on every evaluation seed)."""
    regret_tol: float = Tolerance.regret_tol
    """Verdict tolerance: largest accepted rise of the regret rate (absolute)."""
    reach_tol: float = Tolerance.reach_tol
    """Verdict tolerance: largest accepted fall of new creators' impression share (absolute)."""
    progress: bool = True
    """Progress bars (CEM, collection, CQL, PPO, evaluation); ``--no-progress`` for logs."""


def main(args: Args) -> list[dict]:
    if args.quick:
        # the default output gets its own directory, so that a quick look never resumes from (or sets aside) the
        # full job's checkpoints; an --out given explicitly is used as it is
        out = args.out.parent / (args.out.name + "_quick") if args.out == Args().out else args.out
        quick = replace(args, preset="tiny", timesteps=min(args.timesteps, 16_384), num_envs=32, users=64,
                        cem_budget=min(args.cem_budget, 131_072),
                        seeds=args.seeds[:1], dataset_users=32, dataset_steps=100, cql_steps=min(args.cql_steps, 500),
                        shift_users=min(args.shift_users, 64), out=out)
        changed = [f"--{f.name.replace('_', '-')} {_show(getattr(quick, f.name))}" for f in fields(Args)
                   if f.name not in ("quick", "out") and getattr(quick, f.name) != getattr(args, f.name)]
        print(f"--quick: {', '.join(changed)} (a 7-day world: 'retained_30d' is retention at its horizon); "
              f"output in {out}")
        args = quick
    check_seeds(args.seeds)
    _tolerance(args)  # the verdicts' tolerances are checked before any work
    if args.timesteps < 1 or args.users < 2 or args.cem_budget < 0 or args.cem_steps_per_iter < 1:
        raise ValueError(f"timesteps={args.timesteps}, users={args.users}, cem_budget={args.cem_budget} and "
                         f"cem_steps_per_iter={args.cem_steps_per_iter} must be >= 1, >= 2, >= 0 and >= 1")
    if args.anchor_budget < -1 or args.anchor_budget > _cem_budget(args):
        raise ValueError(f"anchor_budget={args.anchor_budget} is invalid: the agents' anchor is CEM's mean after that "
                         f"many of its {_cem_budget(args)} requests (--cem-budget), so it must be in "
                         f"0..{_cem_budget(args)}, or -1 for the budget CEM has beyond PPO's")
    if args.anchor == "cem" and args.cem and _anchor_budget(args) < 0:
        raise ValueError(f"cem_budget={_cem_budget(args)} is below the PPO budget (timesteps={args.timesteps}): the "
                         "agents' anchor and PPO cannot spend CEM-tuned's budget together; give --anchor-budget "
                         "(0 = start from the zero action) or a larger --cem-budget")
    if len(set(args.baselines)) != len(args.baselines):
        raise ValueError(f"--baselines {' '.join(args.baselines)} is invalid: it repeats an entry")
    if not (np.isfinite(args.cem_guard_z) and args.cem_guard_z >= 0):
        raise ValueError(f"cem_guard_z={args.cem_guard_z} is invalid: must be a finite number >= 0")
    if args.train_worlds < 1 or args.world_days < 0:
        raise ValueError(f"train_worlds={args.train_worlds} must be >= 1 and world_days={args.world_days} >= 0")
    if args.train_worlds > min(args.num_envs, args.dataset_users):
        raise ValueError(f"train_worlds={args.train_worlds} is invalid: it must be <= num_envs={args.num_envs} and "
                         f"dataset_users={args.dataset_users}")  # CEM checks its own users per candidate first
    cfg = with_pipeline(make_config(args.preset), args.pipeline)
    tcfg = cfg.replace(reward={"mode": args.train_reward})  # what the agents and CEM optimise
    sink = make_sink(args.wandb_mode or os.environ.get("WANDB_MODE", "") or "offline", project="feedgym",
                     config={"args": {k: str(v) for k, v in vars(args).items()}, "env": cfg.to_dict()},
                     group=f"main-{args.preset}", job_type="main", out_dir=args.out)
    if args.anchor == "cem" and not args.cem:
        raise ValueError("--anchor cem needs the CEM stage (--cem); use --anchor weighted_sum with --no-cem")
    if args.only_cem and not args.cem:
        raise ValueError("--only-cem needs the CEM stage (--cem)")
    t0 = time.perf_counter()
    baselines = [make_baseline(b, seed=1000 + i) for i, b in enumerate(args.baselines)]
    shift_name = f"{args.preset}-shift"
    scfg = with_pipeline(make_config(shift_name), args.pipeline) if args.shift and shift_name in PRESETS else None
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
            return _train_and_evaluate(args, _Setup(cfg, tcfg, scfg, sink, baselines, background, t0, ex))
        finally:
            for b in background:
                b.cancel()


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
    """Where the rollouts and the log's worlds run."""


def _train_and_evaluate(args: Args, setup: _Setup) -> list[dict]:
    cfg, tcfg, scfg, sink = setup.cfg, setup.tcfg, setup.scfg, setup.sink
    baselines, background, t0 = setup.baselines, setup.background, setup.t0
    anchor: np.ndarray | None = None
    cem_policy = None
    stages: dict[str, float] = {}  # wall seconds of each training stage (a resumed one is quick)
    tick = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        stages[stage] = now - tick
        tick = now
        print(f"      ({stage}: {stages[stage]:.0f}s)")

    if args.cem:
        print(f"[1/4] tuning a static knob vector by CEM on {_cem_budget(args)} steps"
              + (f"; the agents start from its mean after {_anchor_budget(args)}" if args.anchor == "cem" else ""))
        vector, anchor = _cem(args, tcfg, sink)
        cem_policy = ConstantKnobs(vector, "cem_tuned")
        print(f"      CEM action: {[round(float(x), 2) for x in vector]}"
              + (f"; the agents' anchor: {[round(float(x), 2) for x in anchor]}" if args.anchor == "cem" else ""))
        lap("cem")
        if args.only_cem:
            print(f"      --only-cem: the vector is in {args.out / 'cem.json'}; nothing else is trained")
            sink.finish()
            return []
    if args.anchor == "weighted_sum":
        anchor = None
    where = (f"CEM's mean after {_anchor_budget(args)} steps" if anchor is not None else "the weighted-sum baseline")
    policies: list = []
    if args.cql_steps > 0:
        print(f"[2/4] logging {args.dataset_users} users x {args.dataset_steps} steps around {where} "
              f"(sigma {args.behaviour_sigma}), then CQL for {args.cql_steps} steps")
        ds = _dataset(args, tcfg, anchor=anchor, executor=setup.executor)
        lap("dataset")
        algo = train_cql(to_mdp_dataset(ds), tcfg, args.cql_steps, args.out / "cql", seed=args.train_seed,
                         params=args.cql, sink=sink, resume=args.resume, progress=args.progress,
                         restart_mismatched=True, dataset_id=_dataset_id(ds))
        policies.append(D3RLPolicy(algo, discrete=False, name="cql"))
        _say_landscape(algo, ds, anchor, sink)
        if args.discrete:
            dds = _dataset(args, tcfg, discrete=True, executor=setup.executor)
            dalgo = train_cql(to_mdp_dataset(dds), tcfg, args.cql_steps, args.out / "cql_discrete",
                              seed=args.train_seed, discrete=True, params=args.cql, sink=sink, resume=args.resume,
                              progress=args.progress, restart_mismatched=True, dataset_id=_dataset_id(dds))
            policies.append(D3RLPolicy(dalgo, discrete=True, name="cql_discrete"))
        lap("cql")
    print(f"[3/4] training PPO on {args.preset} for {args.timesteps} steps ({args.num_envs} users at once), "
          f"starting from {where}")
    model = train_ppo(tcfg, args.timesteps, args.out / "ppo", seed=args.train_seed, num_envs=args.num_envs,
                      params=args.ppo, sink=sink, resume=args.resume, progress=args.progress, restart_mismatched=True,
                      anchor=anchor, worlds=args.train_worlds, world_steps=_world_steps(args, tcfg))
    agents = [SB3Policy(model, "ppo", anchor=anchor)]
    if args.discrete:
        dmodel = train_ppo(tcfg, args.timesteps, args.out / "ppo_discrete", seed=args.train_seed,
                           num_envs=args.num_envs, params=args.ppo, sink=sink, resume=args.resume,
                           discrete=True, progress=args.progress, restart_mismatched=True, worlds=args.train_worlds,
                           world_steps=_world_steps(args, tcfg))
        agents.append(MenuKnobs(SB3Policy(dmodel, "ppo_discrete"), "ppo_discrete"))
    lap("ppo")
    print(f"      trained in {time.perf_counter() - t0:.0f}s")
    policies = [*agents, *policies]
    agent_names = [p.name for p in policies]
    if cem_policy is not None:
        policies.append(cem_policy)
    t1 = time.perf_counter()
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
    keys = [(j.cfg.preset, j.policy.name, j.seed) for j in [*jobs, *(j for b in background for j in b.jobs)]]
    runs = dict(zip(keys, run_jobs(jobs, setup.executor, background=background), strict=True))
    lap("evaluation")
    sink.log({f"perf/stage_s/{k}": v for k, v in stages.items()}, step=int(model.num_timesteps))
    policies += baselines

    def comparison(preset: str, pols: list) -> Comparison:
        return Comparison(runs=[runs[(preset, p.name, s)] for s in args.seeds for p in pols])

    comp = comparison(cfg.preset, policies)
    rows = summarize(comp)
    start = (f"from CEM's mean after {_anchor_budget(args)} steps, " if args.cem and args.anchor == "cem" else "")
    budgets = f"CEM-tuned {_cem_budget(args) if args.cem else 0} steps; PPO {start}{args.timesteps} steps"
    title = (f"feedgym main job: {budgets}; CQL ({args.cql_steps} steps) vs baselines"
             f" — {args.preset}, "
             f"{args.users} users x {len(args.seeds)} seeds")
    print_table(rows, title)
    tol = _tolerance(args)
    vs = judge(comp, rows, agent_names, tol)
    if scfg is not None:
        comp_s = comparison(scfg.preset, shifted)
        rows_s = summarize(comp_s)
        title_s = (f"the same agents on {scfg.preset} (unseen user population), {args.shift_users} users x "
                   f"{len(args.seeds)} seeds")
        print_table(rows_s, title_s)
        vs += judge(comp_s, rows_s, agent_names, tol, f" ({scfg.preset})")
        write_report(comp_s, rows_s, args.out / "shift", title_s, f"{_command(args)} (shift stage)")
    verdict_text = verdict_lines(vs, tol)
    print("verdicts (beats = world-level paired 95 % CI of 30-day retention above 0, regret rise <= "
          f"{100 * tol.regret_tol:.1f} pp, new-creator share fall <= {100 * tol.reach_tol:.1f} pp):")
    for line in verdict_text:
        print("  " + line)
    vcols = list(vs[0]) if vs else []
    sink.log_table("eval/verdicts", vcols, [[v[c] for c in vcols] for v in vs])
    atomic_write(args.out / "verdicts.json", json.dumps({"tolerance": asdict(tol), "verdicts": vs,
                                                         "lines": verdict_text}, indent=1).encode())
    cols = ["metric", "policy", "mean", "lo", "hi", "diff", "diff_lo", "diff_hi", "significant", "iqm", "iqm_lo",
            "iqm_hi", "iqm_significant"]
    # the shifted world's rows as eval/<preset>/<metric>/<policy> and their own table, beside the main world's
    for where, table in (("", rows), *(((f"{scfg.preset}/", rows_s),) if scfg is not None else ())):
        sink.log({f"eval/{where}{r['metric'].replace('/', '.')}/{r['policy']}": r["mean"] for r in table},
                 step=int(model.num_timesteps))
        sink.log_table(f"eval/{where}table", cols, [[r.get(c) for c in cols] for r in table])
    sink.log_artifact(args.out / "ppo", f"ppo-{args.preset}", "model")
    if args.cql_steps > 0:
        sink.log_artifact(args.out / "cql", f"cql-{args.preset}", "model")
        sink.log_artifact(args.out / "dataset", f"dataset-{args.preset}", "dataset")
    sink.finish()
    cmd = _command(args)
    report = write_report(comp, rows, args.out, title, cmd)
    print(f"report and plots: {report.parent}  (train+CEM {t1 - t0:.0f}s, eval {time.perf_counter() - t1:.0f}s)")
    return rows


def _say_landscape(algo: Any, ds: LoggedDataset, anchor: np.ndarray | None, sink: Any) -> None:
    """Prints and logs (``train/cql_landscape/...``) what CQL's critic says about moving each knob by 0.3 from
    the logging policy's centre, on 2,000 logged states (agents.cql.critic_landscape)."""
    obs = ds.transitions.observations
    pick = np.random.default_rng(0).choice(len(obs), min(2000, len(obs)), replace=False)
    centre = np.zeros(algo.action_size, np.float32) if anchor is None else anchor
    land = critic_landscape(algo, obs[np.sort(pick)], centre)
    names = knob_names()
    k = int(np.argmax(np.abs(land["down"] - land["up"])))
    print(f"      CQL critic around the logging centre: Q {land['q']:.3g} (sd over states {land['q_sd']:.2g}); moving "
          f"one knob by -/+0.3 changes it by {land['down'].mean():+.3g} / {land['up'].mean():+.3g} on average, most "
          f"unevenly {names[k]} ({land['down'][k]:+.3g} / {land['up'][k]:+.3g})"
          + (": every move lowers Q, a bump where the log's actions are (docs/point7.md: why CQL serves its anchor)"
             if bool(np.all(land["down"] < 0) and np.all(land["up"] < 0)) else ""))
    sink.log({"train/cql_landscape/q": land["q"], "train/cql_landscape/q_sd": land["q_sd"],
              **{f"train/cql_landscape/{d}/{n}": float(land[d][i]) for d in ("down", "up")
                 for i, n in enumerate(names)}}, step=0)


def _store(args: Args) -> Path:
    """The rollout store of the job (agents.rollout_store.RolloutStore): an interrupted evaluation resumes from it."""
    return args.out / "rollouts"


def _say_stored(jobs: list[RolloutJob], what: str) -> None:
    """Says how many of ``jobs`` the rollout store already holds (they are read, not run again)."""
    n = sum(j.store is not None and RolloutStore(j.store).holds(j) for j in jobs)
    if n:
        print(f"      {n} of the {len(jobs)} {what} rollouts are in {jobs[0].store} (same policy, world, users, seed "
              "and code): read, not run again")


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _command(args: Args) -> str:
    """The command line that reproduces this run (fields that differ from the defaults)."""
    if args.quick:
        return "python scripts/main.py --quick" + (f" --out {args.out}" if args.out != Path("runs/main_quick") else "")
    parts = ["python scripts/main.py"]

    def add(obj: Any, default: Any, prefix: str) -> None:
        for f in fields(obj):
            v, d = getattr(obj, f.name), getattr(default, f.name)
            name = prefix + f.name.replace("_", "-")
            if is_dataclass(v):
                add(v, d, name + ".")
            elif v != d:
                if isinstance(v, bool):
                    parts.append(f"--{name}" if v else f"--{prefix}no-{f.name.replace('_', '-')}")
                else:
                    parts.append(f"--{name} {' '.join(map(str, v)) if isinstance(v, tuple) else v}")

    add(args, Args(), "")
    return " ".join(parts)


def _cem(args: Args, cfg: FeedConfig, sink: Any) -> tuple[np.ndarray, np.ndarray]:
    """The CEM-tuned knob vector and the agents' anchor (the search's mean after ``--anchor-budget`` requests):
    reused from ``cem.json`` when it was tuned on this config, budget, seed and code, else tuned (and written
    atomically, with the mean after every iteration, so that another anchor budget needs no new search)."""
    path = args.out / "cem.json"
    guard = _tolerance(args) if args.cem_guardrails else None
    # everything the search's result depends on, the code that ran it included (a fresh clone must not reuse a
    # vector that other code tuned)
    key = {"env_version": ENV_VERSION, "preset": cfg.preset, "config": cfg.to_json(), "budget_steps": _cem_budget(args),
           "seed": args.train_seed, "worlds": args.train_worlds, "world_steps": _world_steps(args, cfg),
           "guardrails": None if guard is None else {**asdict(guard), "z": args.cem_guard_z},
           "paired": args.cem_paired, "steps_per_iter": args.cem_steps_per_iter,
           "code": code_digest(packages=(*CODE_PACKAGES, "agents"))}
    why = None
    if path.exists() or path.is_symlink():
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise ValueError(f"it holds a JSON {type(stored).__name__}, not an object")
            if {k: stored.get(k) for k in key} == json.loads(json.dumps(key)):
                if "means" not in stored:
                    raise ValueError("it does not keep the search's mean after every iteration")
                anchor = mean_after(stored["means"], int(stored["iter_steps"]), _anchor_budget(args, 0))
                print(f"      reusing the CEM vector in {path}")
                return np.asarray(stored["action"], np.float32), anchor
            why = f"{path} was tuned on another config, budget, seed or code"
        except (OSError, ValueError, KeyError, TypeError) as err:
            why = f"{path} unreadable ({err})"
        print(f"      {why}; tuning again (it is kept until the new vector replaces it)")
    cem = cem_tune(cfg, _cem_budget(args), seed=args.train_seed, progress=args.progress, worlds=args.train_worlds,
                   world_steps=_world_steps(args, cfg), constraints=guard, guard_z=args.cem_guard_z,
                   paired=args.cem_paired, steps_per_iter=args.cem_steps_per_iter)
    for h in cem.history:
        sink.log({f"train/cem_{k}": v for k, v in h.items()}, step=int(h["iter"]))
    if why is not None:
        set_aside(path, why, then=f"the new one is at {path}")
    atomic_write(path, json.dumps({**key, "action": [float(x) for x in cem.best_action], "iter_steps": cem.iter_steps,
                                   "means": [[float(x) for x in m] for m in cem.means]}).encode())
    return cem.best_action, cem.mean_after(_anchor_budget(args, 0))


def _dataset(args: Args, cfg: FeedConfig, discrete: bool = False, anchor: np.ndarray | None = None,
             executor: Executor | None = None) -> LoggedDataset:
    """The logged dataset: reused when it loads cleanly and matches the config and the logging policy, else
    collected again; the one that is not reused is set aside (``<path>.stale-<n>``) once the new one is
    collected, never overwritten."""
    path = args.out / ("dataset_discrete" if discrete else "dataset")
    policy = EpsilonMenu(0.3) if discrete else GaussianKnobs(args.behaviour_sigma, 0.0 if anchor is None else anchor)
    why = None
    if path.exists() or path.is_symlink():
        try:
            ds = load_dataset(path, expected_config=cfg)
            collection = ds.meta.get("collection")
            if ds.discrete != discrete:
                why = f"dataset at {path} has the wrong action type"
            elif ds.meta.get("behaviour") != json.loads(json.dumps(policy.describe())):
                why = f"dataset at {path} was logged by another policy"
            elif not isinstance(collection, dict) or collection.get("worlds", 1) != args.train_worlds:
                why = f"dataset at {path} was logged on another number of worlds"
            else:
                print(f"      reusing the dataset in {path}")
                return ds
        except DatasetError as err:
            why = f"dataset at {path} not reusable ({err})"
        print(f"      {why}; collecting again (it is kept until the new one is collected)")
    ds = collect(policy, cfg, n_users=args.dataset_users, n_steps=args.dataset_steps,
                 seed=args.train_seed + 1, progress=args.progress, worlds=args.train_worlds, executor=executor)
    if why is not None:
        set_aside(path, why, then=f"the new one is at {path}")
    save_dataset(ds, path)
    return ds


def _dataset_id(ds: LoggedDataset) -> dict[str, Any]:
    """What CQL's checkpoint records of its dataset: a checkpoint trained on another log is not resumed."""
    return {k: ds.meta.get(k) for k in ("seed", "behaviour", "collection", "counts")}


def _cem_budget(args: Args) -> int:
    """CEM's simulation budget: ``--cem-budget``, else the PPO budget."""
    return args.cem_budget or args.timesteps


def _anchor_budget(args: Args, floor: int | None = None) -> int:
    """CEM requests behind the agents' anchor: ``--anchor-budget``, else what CEM's budget has beyond PPO's
    (negative when it has less: refused by :func:`main`; ``floor`` raises it to that, for ``--anchor weighted_sum``,
    whose anchor is not used)."""
    n = args.anchor_budget if args.anchor_budget >= 0 else _cem_budget(args) - args.timesteps
    return n if floor is None else max(n, floor)


def _tolerance(args: Args) -> Tolerance:
    """The verdicts' tolerances (and CEM's guardrails with ``--cem-guardrails``)."""
    return Tolerance(args.regret_tol, args.reach_tol)


def _world_steps(args: Args, cfg: FeedConfig) -> int:
    """A training world's life in steps (``--world-days`` on the world's clock)."""
    return round(args.world_days / cfg.world_days_per_step)


if __name__ == "__main__":
    one_thread_default()
    exit_on_sigterm()  # SIGTERM stops every task and process the job started (a private Ray too), and cleans up
    main(tyro.cli(Args))
