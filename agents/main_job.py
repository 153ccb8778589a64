"""The main job's training stages (``scripts/main.py``), for one training seed: CEM, the logged dataset, CQL, PPO.

:func:`train` runs them in this process (the single-seed job, with the driver's wandb sink and executor);
:func:`train_job` is the same as an executor job (``offline_data.executor``), so that several training seeds run
as jobs (in this process one after another, or on Ray side by side), each in its own output directory, each with
its own ``metrics.jsonl``, and each resumable: the CEM vector is reused from ``cem.json`` if it matches the
config and budget, the dataset if it loads and matches the config and the logging policy, PPO and CQL continue
from their checkpoints. The trained policies come back to the driver (pickled bit for bit), which evaluates them.

:func:`pooled_comparison` averages the agents of several training seeds user by user on the same evaluation
worlds (the baselines' runs are the same in every seed), the "pooled" row of the multi-seed table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agents import cem as cem_module
from agents.checkpoints import set_aside
from agents.cql import D3RLPolicy, critic_landscape, train_cql
from agents.main_configs import MainArgs, anchor_budget, cem_budget, tolerance
from agents.policies import ConstantKnobs, MenuKnobs, SessionHeld
from agents.ppo import SB3Policy, train_ppo
from agents.rollouts import RunResult, WorldModels, provide
from agents.sinks import MetricsSink, make_sink
from agents.stats import Comparison
from envs.config import ENV_VERSION, FeedConfig
from envs.feed_env import knob_names
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
from offline_data.executor import Executor
from offline_data.provision import CODE_PACKAGES, code_digest
from rankers.fileio import atomic_write

CEM_FILE = "cem.json"


@dataclass
class Trained:
    """What one training seed produced."""

    seed: int
    out: Path
    """Where its checkpoints, cem.json, dataset and metrics.jsonl are."""
    agents: list = field(default_factory=list)
    """The trained agents (PPO, discrete PPO, CQL, DiscreteCQL, as trained), named ``<kind><suffix>``."""
    cem_policy: ConstantKnobs | None = None
    """CEM-tuned (None without CEM)."""
    anchor: np.ndarray | None = None
    """The agents' anchor (None = weighted-sum, the zero action)."""
    steps: int = 0
    """PPO's environment steps (the step the evaluation is logged at)."""
    stages: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each training stage (a resumed one is quick)."""
    artifacts: list[tuple[Path, str, str]] = field(default_factory=list)
    """(path, name, type) of what the sink keeps as artifacts."""

    @property
    def policies(self) -> list:
        """The agents, then CEM-tuned."""
        return [*self.agents, *([self.cem_policy] if self.cem_policy is not None else [])]


def world_steps(args: MainArgs, cfg: FeedConfig) -> int:
    """A training world's life in steps (``world_days`` on the world's clock)."""
    return round(args.world_days / cfg.world_days_per_step)


def tune_cem(args: MainArgs, cfg: FeedConfig, sink: MetricsSink, tune: Callable[..., Any] | None = None,
             say: Callable[[str], None] = print, executor: Executor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The CEM-tuned knob vector and the agents' anchor (the search's mean after ``anchor_budget`` requests):
    reused from ``cem.json`` when it was tuned on this config, budget, seed and code, else tuned by ``tune``
    (default :func:`agents.cem.cem_tune`; its training worlds run on ``executor``, the same bytes on any) and
    written atomically, with the mean after every iteration, so that another anchor budget needs no new search."""
    tune = tune or cem_module.cem_tune
    path = args.out / CEM_FILE
    guard = tolerance(args) if args.cem_guardrails else None
    # everything the search's result depends on, the code that ran it included (a fresh clone must not reuse a
    # vector that other code tuned)
    key = {"env_version": ENV_VERSION, "preset": cfg.preset, "config": cfg.to_json(), "budget_steps": cem_budget(args),
           "seed": args.train_seed, "worlds": args.train_worlds, "world_steps": world_steps(args, cfg),
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
                anchor = cem_module.mean_after(stored["means"], int(stored["iter_steps"]), anchor_budget(args, 0))
                say(f"      reusing the CEM vector in {path}")
                return np.asarray(stored["action"], np.float32), anchor
            why = f"{path} was tuned on another config, budget, seed or code"
        except (OSError, ValueError, KeyError, TypeError) as err:
            why = f"{path} unreadable ({err})"
        say(f"      {why}; tuning again (it is kept until the new vector replaces it)")
    cem = tune(cfg, cem_budget(args), seed=args.train_seed, progress=args.progress, worlds=args.train_worlds,
               world_steps=world_steps(args, cfg), constraints=guard, guard_z=args.cem_guard_z,
               paired=args.cem_paired, steps_per_iter=args.cem_steps_per_iter, executor=executor)
    for h in cem.history:
        sink.log({f"train/cem_{k}": v for k, v in h.items()}, step=int(h["iter"]))
    if why is not None:
        set_aside(path, why, then=f"the new one is at {path}")
    atomic_write(path, json.dumps({**key, "action": [float(x) for x in cem.best_action], "iter_steps": cem.iter_steps,
                                   "means": [[float(x) for x in m] for m in cem.means]}).encode())
    return cem.best_action, cem.mean_after(anchor_budget(args, 0))


def logged_dataset(args: MainArgs, cfg: FeedConfig, discrete: bool = False, anchor: np.ndarray | None = None,
                   executor: Executor | None = None, say: Callable[[str], None] = print) -> LoggedDataset:
    """The logged dataset: reused when it loads cleanly and matches the config, the logging policy, the training
    seed, the size and the digest of the code that logs it (``meta["code"]``), else
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
            elif ds.meta.get("seed") != args.train_seed + 1:
                why = f"dataset at {path} was logged with another training seed"
            elif (collection.get("n_users"), collection.get("n_steps")) != (args.dataset_users, args.dataset_steps):
                why = f"dataset at {path} was logged with another size (users, steps)"
            elif ds.meta.get("code") != code_digest(packages=CODE_PACKAGES):
                why = f"dataset at {path} was logged by other code (its digest differs from this code's)"
            else:
                say(f"      reusing the dataset in {path}")
                return ds
        except DatasetError as err:
            why = f"dataset at {path} not reusable ({err})"
        say(f"      {why}; collecting again (it is kept until the new one is collected)")
    ds = collect(policy, cfg, n_users=args.dataset_users, n_steps=args.dataset_steps,
                 seed=args.train_seed + 1, progress=args.progress, worlds=args.train_worlds, executor=executor,
                 extra_meta={"code": code_digest(packages=CODE_PACKAGES)})
    if why is not None:
        set_aside(path, why, then=f"the new one is at {path}")
    save_dataset(ds, path)
    return ds


def dataset_id(ds: LoggedDataset) -> dict[str, Any]:
    """What CQL's checkpoint records of its dataset: a checkpoint trained on another log is not resumed."""
    return {k: ds.meta.get(k) for k in ("seed", "behaviour", "collection", "counts")}


def say_landscape(algo: Any, ds: LoggedDataset, anchor: np.ndarray | None, sink: MetricsSink,
                  say: Callable[[str], None] = print) -> None:
    """Prints and logs (``train/cql_landscape/...``) what CQL's critic says about moving each knob by 0.3 from
    the logging policy's centre, on 2,000 logged states (agents.cql.critic_landscape)."""
    obs = ds.transitions.observations
    pick = np.random.default_rng(0).choice(len(obs), min(2000, len(obs)), replace=False)
    centre = np.zeros(algo.action_size, np.float32) if anchor is None else anchor
    land = critic_landscape(algo, obs[np.sort(pick)], centre)
    names = knob_names()
    k = int(np.argmax(np.abs(land["down"] - land["up"])))
    say(f"      CQL critic around the logging centre: Q {land['q']:.3g} (sd over states {land['q_sd']:.2g}); moving "
        f"one knob by -/+0.3 changes it by {land['down'].mean():+.3g} / {land['up'].mean():+.3g} on average, most "
        f"unevenly {names[k]} ({land['down'][k]:+.3g} / {land['up'][k]:+.3g})"
        + (": every move lowers Q, a bump where the log's actions are (docs/point7.md: why CQL serves its anchor)"
           if bool(np.all(land["down"] < 0) and np.all(land["up"] < 0)) else ""))
    sink.log({"train/cql_landscape/q": land["q"], "train/cql_landscape/q_sd": land["q_sd"],
              **{f"train/cql_landscape/{d}/{n}": float(land[d][i]) for d in ("down", "up")
                 for i, n in enumerate(names)}}, step=0)


def train(args: MainArgs, tcfg: FeedConfig, sink: MetricsSink, executor: Executor | None = None,
          tune: Callable[..., Any] | None = None, suffix: str = "", tag: str = "") -> Trained:
    """CEM, the log, CQL and PPO of one training seed (``args.train_seed``) in ``args.out``, on the training
    world ``tcfg``; with ``only_cem``, CEM alone. ``suffix`` is appended to the agents' names (``ppo_s1``),
    ``tag`` to every line printed; ``executor`` runs CEM's and the log's worlds (default: this process)."""

    def say(msg: str) -> None:
        print(tag + msg if tag else msg)

    out = Trained(seed=args.train_seed, out=args.out)
    tick = time.perf_counter()
    t0 = tick

    def lap(stage: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        out.stages[stage] = now - tick
        tick = now
        say(f"      ({stage}: {out.stages[stage]:.0f}s)")

    anchor: np.ndarray | None = None
    if args.cem:
        say(f"[1/4] tuning a static knob vector by CEM on {cem_budget(args)} steps"
            + (f"; the agents start from its mean after {anchor_budget(args)}" if args.anchor == "cem" else ""))
        vector, anchor = tune_cem(args, tcfg, sink, tune=tune, say=say, executor=executor)
        out.cem_policy = ConstantKnobs(vector, "cem_tuned" + suffix)
        say(f"      CEM action: {[round(float(x), 2) for x in vector]}"
            + (f"; the agents' anchor: {[round(float(x), 2) for x in anchor]}" if args.anchor == "cem" else ""))
        lap("cem")
        if args.only_cem:
            say(f"      --only-cem: the vector is in {args.out / CEM_FILE}; nothing else is trained")
            return out
    if args.anchor == "weighted_sum":
        anchor = None
    out.anchor = anchor
    where = (f"CEM's mean after {anchor_budget(args)} steps" if anchor is not None else "the weighted-sum baseline")
    offline: list = []
    if args.cql_steps > 0:
        say(f"[2/4] logging {args.dataset_users} users x {args.dataset_steps} steps around {where} "
            f"(sigma {args.behaviour_sigma}), then CQL for {args.cql_steps} steps")
        ds = logged_dataset(args, tcfg, anchor=anchor, executor=executor, say=say)
        lap("dataset")
        algo = train_cql(to_mdp_dataset(ds), tcfg, args.cql_steps, args.out / "cql", seed=args.train_seed,
                         params=args.cql, sink=sink, resume=args.resume, progress=args.progress,
                         restart_mismatched=True, dataset_id=dataset_id(ds))
        offline.append(D3RLPolicy(algo, discrete=False, name="cql" + suffix))
        say_landscape(algo, ds, anchor, sink, say=say)
        out.artifacts += [(args.out / "cql", "cql", "model"), (args.out / "dataset", "dataset", "dataset")]
        if args.discrete:
            dds = logged_dataset(args, tcfg, discrete=True, executor=executor, say=say)
            dalgo = train_cql(to_mdp_dataset(dds), tcfg, args.cql_steps, args.out / "cql_discrete",
                              seed=args.train_seed, discrete=True, params=args.cql, sink=sink, resume=args.resume,
                              progress=args.progress, restart_mismatched=True, dataset_id=dataset_id(dds))
            offline.append(D3RLPolicy(dalgo, discrete=True, name="cql_discrete" + suffix))
        lap("cql")
    say(f"[3/4] training PPO on {args.preset} for {args.timesteps} steps ({args.num_envs} users at once), "
        f"starting from {where}")
    model = train_ppo(tcfg, args.timesteps, args.out / "ppo", seed=args.train_seed, num_envs=args.num_envs,
                      params=args.ppo, sink=sink, resume=args.resume, progress=args.progress, restart_mismatched=True,
                      anchor=anchor, worlds=args.train_worlds, world_steps=world_steps(args, tcfg))
    ppo: Any = SB3Policy(model, "ppo" + suffix, anchor=anchor, frames=args.ppo.frame_stack)
    online: list = [SessionHeld(ppo) if args.ppo.decision == "session" else ppo]
    out.artifacts.insert(0, (args.out / "ppo", "ppo", "model"))
    if args.discrete:
        dmodel = train_ppo(tcfg, args.timesteps, args.out / "ppo_discrete", seed=args.train_seed,
                           num_envs=args.num_envs, params=args.ppo, sink=sink, resume=args.resume,
                           discrete=True, progress=args.progress, restart_mismatched=True, worlds=args.train_worlds,
                           world_steps=world_steps(args, tcfg))
        dppo: Any = MenuKnobs(SB3Policy(dmodel, "ppo_discrete" + suffix, frames=args.ppo.frame_stack),
                              "ppo_discrete" + suffix)
        online.append(SessionHeld(dppo) if args.ppo.decision == "session" else dppo)
    lap("ppo")
    say(f"      trained in {time.perf_counter() - t0:.0f}s")
    out.agents = [*online, *offline]
    out.steps = int(model.num_timesteps)
    return out


@dataclass(frozen=True)
class TrainJob:
    """One training seed as an executor job (picklable): :func:`train` with ``args`` (its ``train_seed`` and
    ``out`` set) on ``tcfg``."""

    args: MainArgs
    tcfg: FeedConfig
    suffix: str = ""

    @property
    def label(self) -> str:
        return f"training seed {self.args.train_seed}"


def train_job(models: WorldModels, job: TrainJob) -> Trained:
    """What the executor runs for each training seed: the models its world serves are provided to the process
    (a worker is a fresh process), then :func:`train` with a sink of its own (``<out>/metrics.jsonl``; the
    driver's wandb run is the driver's alone) and the log's worlds in that process."""
    provide(models)
    job.args.out.mkdir(parents=True, exist_ok=True)
    sink = make_sink("disabled", out_dir=job.args.out)
    try:
        return train(job.args, job.tcfg, sink, suffix=job.suffix, tag=f"[train seed {job.args.train_seed}] ")
    finally:
        sink.finish()


def seed_args(args: MainArgs, seed: int, progress: bool | None = None) -> MainArgs:
    """``args`` for one of several training seeds: that seed, its own ``<out>/seed-<s>`` (its checkpoints,
    CEM vector, dataset and metrics)."""
    return replace(args, train_seed=seed, train_seeds=(), out=args.out / f"seed-{seed}",
                   progress=args.progress if progress is None else progress)


def renamed(runs: Sequence[RunResult], names: dict[str, str]) -> list[RunResult]:
    """``runs`` with their policies renamed by ``names`` (others kept): a seed's ``ppo_s1`` judged as ``ppo``."""
    return [replace(r, policy=names.get(r.policy, r.policy)) for r in runs]


def pooled_comparison(comps: Sequence[Comparison], metrics: Sequence[str]) -> Comparison:
    """The training-seed average of several comparisons of the same policies on the same evaluation worlds and
    users (one per training seed; the baselines' runs are the same in each): per evaluation world and policy, the
    per-user ``metrics`` averaged over the comparisons. Its paired differences are the seed-averaged agent's;
    a world-level interval on it resamples evaluation worlds and users, not training seeds (the per-seed
    verdicts carry that spread)."""
    if not comps:
        raise ValueError("pooled_comparison needs at least one comparison")
    first = comps[0]
    runs = []
    for r in first.runs:
        same = [next(x for x in c.runs if x.policy == r.policy and x.seed == r.seed) for c in comps]
        if any(s.per_user[m].shape != r.per_user[m].shape for s in same for m in metrics):
            raise ValueError(f"pooled_comparison: {r.policy} on seed {r.seed} has other users in another comparison")
        per_user = {m: np.mean([np.asarray(s.per_user[m], np.float64) for s in same], axis=0) for m in metrics}
        runs.append(RunResult(policy=r.policy, seed=r.seed, per_user=per_user, population={},
                              retention_by_day=np.mean([s.retention_by_day for s in same], axis=0),
                              knob_means=np.mean([s.knob_means for s in same], axis=0)))
    return Comparison(runs=runs, baseline=first.baseline)
