"""The main job's configuration (``scripts/main.py``): one frozen dataclass, a few flags, named configurations.

The command line says what to run, not how the method is built: twenty flags choose the world, the
budgets, the seeds, the evaluation, where it runs and where it goes (:data:`FLAGS`), and ``--config NAME``
picks one of :data:`CONFIGS`, a frozen :class:`MainArgs` that fixes everything else (the CEM search's
design, the logging policy, PPO's and CQL's hyperparameters, the verdicts' tolerances). ``--quick``
shrinks whichever configuration is chosen to a first look on ``tiny`` (:func:`quick_args`). Every field
stays settable from Python (``dataclasses.replace(CONFIGS["main"].args, num_envs=8)``, as the tests do);
:func:`command_line` writes the command that reproduces a run and names the fields no flag reaches.

Configurations (``python scripts/main.py --help`` lists them too):

- ``main`` (default): CEM-tuned vector with guardrails, the agents anchored on the search's mean part way
  (anchor and PPO together spend CEM-tuned's budget), CQL on a log of that system with noise, PPO as a
  residual on it; output ``runs/main``.
- ``from-scratch``: PPO from the zero action and the log around weighted-sum (the setting that does not
  beat the baselines: docs/point7.md); CEM-tuned is still tuned, as a baseline.
- ``discrete``: the main job plus discrete PPO and DiscreteCQL on the knob menu.
- ``cem-unguarded``: the main job with CEM on retention alone (no guardrails; the guardrails' ablation).
- Superseded designs, kept so that the commands of the measurements made with them still run:
  ``cem-unpaired`` (no pairing, no guardrails: the point-7 runs before ``ff3a31c``), ``cem-guard-v1`` (the
  first guardrails: no margin, unpaired), ``two-budgets`` (before ``c2becb8``: CEM 500k requests and the agents
  on its final vector, so the agents had twice CEM-tuned's budget), ``cem-spi50`` (50 requests per CEM
  candidate and iteration instead of 100: did worse).

Each configuration but ``main`` writes to ``runs/main-<name>`` by default, so that no variant resumes from
(or sets aside) another's checkpoints.
"""

from __future__ import annotations

import inspect
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import tyro
from tyro.conf import Suppress

from agents.cem import USERS_PER_CANDIDATE
from agents.cql import CQLParams
from agents.evaluation import check_seeds
from agents.ppo import PPOParams
from agents.verdict import Tolerance

ConfigName = Literal["main", "from-scratch", "discrete", "per-session", "memory", "cem-unguarded", "cem-unpaired",
                     "cem-guard-v1", "two-budgets", "cem-spi50"]
DEFAULT_OUT = Path("runs/main")
DEFAULT_TRAIN_SEED = 12345


@dataclass(frozen=True)
class MainArgs:
    """The main job: tune a static knob vector by CEM, log a dataset around the agents' anchor, train CQL
    (offline) and PPO (online), evaluate them all against weighted-sum and CEM-tuned on the same users, on
    the training preset's worlds and on its ``-shift`` world; print a short table of the verdicts first.
    ``--config`` picks a named configuration (below), the other flags change it."""

    config: ConfigName = "main"
    """Named configuration: everything no flag sets (see the list above; agents/main_configs.py)."""
    quick: bool = False
    """A first look at the chosen configuration: tiny world, small budgets, output in ``<out>_quick``."""
    preset: str = "small"
    """World preset for training and evaluation."""
    pipeline: Literal["preset", "learned", "noisy_oracle"] = "preset"
    """Stages 1-3: the preset's own (learned on small and default), the learned pipeline, or the
    noisy-oracle pipeline (the ablation); the shifted world gets the same."""
    train_reward: str = "churn_expected"
    """Reward the agents and CEM optimise (envs RewardConfig.mode): ``churn_expected`` (minus the churn
    probability at each session end), ``churn`` (-1 at churn) or ``retention`` (+1 per return visit).
    Evaluation is on the world's realised outcomes."""
    train_seeds: Annotated[tuple[int, ...], tyro.conf.arg(aliases=("--train-seed",))] = ()
    """Training seeds (worlds, CEM, the log, PPO, CQL). One seed trains in ``--out``; several train every agent
    once per seed in ``<out>/seed-<s>`` (executor jobs, each resumable) and judge them all on the same
    evaluation worlds, the baselines run once. Empty = one seed, the configuration's (12345)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    """Evaluation seeds: each is one world. Verdicts resample worlds, so more worlds with fewer users each
    beat fewer worlds with more users (README, "how many worlds")."""
    users: int = 128
    """Evaluation users per evaluation seed (one episode each)."""
    baselines: tuple[str, ...] = ("weighted_sum", "engagement", "random", "true_scores")
    """Baselines evaluated beside the agents (weighted_sum, the verdicts' baseline, is required)."""
    timesteps: int = 500_000
    """PPO environment steps (user-requests)."""
    cem_budget: int = 2_500_000
    """CEM-tuned's simulation budget in user-requests (0 = the PPO budget); the agents start from the same
    search's mean after ``cem_budget - timesteps`` of them, so that anchor and PPO spend CEM-tuned's budget."""
    cql_steps: int = 2000
    """CQL gradient steps (0 skips CQL)."""
    only_cem: bool = False
    """Tune the CEM vector (``<out>/cem.json``, e.g. for ``compare.py --agents NAME=<out>/cem.json``) and stop."""
    shift: bool = True
    """Evaluate the trained agents, CEM-tuned and weighted-sum again on ``<preset>-shift`` (unseen users)."""
    shift_users: int = 64
    """Users per evaluation seed on the shifted world."""
    out: Path = DEFAULT_OUT
    """Output directory (default: runs/main, runs/main-<config> for the other configurations)."""
    executor: Literal["local", "ray"] = "local"
    """Where the rollouts, CEM's and the log's worlds and the training seeds run: in this process, or on Ray
    (offline_data.executor: the baselines' rollouts then run while the agents train); results do not
    depend on it."""
    ray_address: str = ""
    """With --executor ray: empty = a private Ray on this machine, ``auto`` or ``host:port`` = a running cluster."""
    workers: int = 0
    """CPUs of a private Ray (0 = every core of this machine; one job per CPU, one torch thread each)."""
    progress: bool = True
    """Progress bars (CEM, collection, CQL, PPO, evaluation); ``--no-progress`` for logs."""

    # ---- fixed by the named configuration (no flag) ----
    headroom: Suppress[Path] = Path("runs/headroom/headroom.json")
    """Where ``scripts/headroom.py`` wrote its table (its default ``--out``): when it is there and measured this
    preset on this env version, the verdicts name the headroom over CEM-tuned (planner, planner without
    foresight, distilled planner, segment-CEM) and each agent's gain over CEM-tuned as a share of the
    planner's; otherwise they say why not."""
    train_seed: Suppress[int] = DEFAULT_TRAIN_SEED
    """The training seed when ``train_seeds`` is empty (the Python API's single seed)."""
    anchor: Suppress[Literal["cem", "weighted_sum"]] = "cem"
    """Where the agents start: ``cem`` = PPO learns a residual on CEM's mean part way and the offline log is
    written by that system with exploration noise; ``weighted_sum`` = PPO from the zero action, the log
    around weighted-sum (``--config from-scratch``)."""
    anchor_budget: Suppress[int] = -1
    """Requests of CEM's search behind the agents' anchor; -1 = ``cem_budget - timesteps``; ``cem_budget`` = the
    CEM-tuned vector itself (``--config two-budgets``)."""
    discrete: Suppress[bool] = False
    """Also train discrete PPO and DiscreteCQL (on an epsilon-menu log) (``--config discrete``)."""
    cem: Suppress[bool] = True
    """Tune CEM at all (only ``anchor="weighted_sum"`` runs without it)."""
    cem_guardrails: Suppress[bool] = True
    """CEM keeps the verdicts' tolerances against weighted-sum in its training worlds (``agents.cem``)."""
    cem_guard_z: Suppress[float] = 1.645
    """Standard errors of margin the guardrails ask for (0 = point estimate)."""
    cem_paired: Suppress[bool] = True
    """CEM compares its candidates on the same users (clones)."""
    cem_steps_per_iter: Suppress[int] = 100
    """Requests each CEM candidate's users make per iteration."""
    num_envs: Suppress[int] = 256
    """Simulated users stepped together while PPO trains."""
    train_worlds: Suppress[int] = 4
    """Worlds the training users are spread over (CEM, the offline log and PPO)."""
    world_days: Suppress[float] = 60.0
    """World days a training world lives before it is rebuilt from its next seed (0 = forever)."""
    dataset_users: Suppress[int] = 128
    """Users logged at once for the offline dataset."""
    dataset_steps: Suppress[int] = 400
    """Batched steps logged (finished users are replaced)."""
    behaviour_sigma: Suppress[float] = 0.3
    """Std of the truncated-normal knob noise of the logging policy around the anchor."""
    ppo: Suppress[PPOParams] = field(default_factory=lambda: PPOParams(gamma=0.999))
    """PPO hyperparameters (SB3's names)."""
    cql: Suppress[CQLParams] = field(default_factory=lambda: CQLParams(gamma=0.999))
    """CQL hyperparameters (d3rlpy's names)."""
    finished: Suppress[Literal["replace", "retire"]] = "replace"
    """What takes the place of a user whose episode ended during evaluation (``agents.rollouts.rollout``)."""
    regret_tol: Suppress[float] = Tolerance.regret_tol
    """Verdict tolerance: largest accepted rise of the regret rate (absolute)."""
    reach_tol: Suppress[float] = Tolerance.reach_tol
    """Verdict tolerance: largest accepted fall of new creators' impression share (absolute)."""
    resume: Suppress[bool] = True
    """Resume PPO and CQL from their checkpoints in the output directory."""
    wandb_mode: Suppress[str] = ""
    """online | offline | disabled; empty = ``WANDB_MODE``, else offline."""


#: The fields the command line sets, as ``--flag`` names (``--train-seed`` is an alias of ``--train-seeds``).
FLAGS: tuple[str, ...] = ("config", "quick", "preset", "pipeline", "train_reward", "train_seeds", "seeds", "users",
                          "baselines", "timesteps", "cem_budget", "cql_steps", "only_cem", "shift", "shift_users",
                          "out", "executor", "ray_address", "workers", "progress")


@dataclass(frozen=True)
class NamedConfig:
    summary: str
    """One line for ``--help``."""
    args: MainArgs
    superseded: bool = False
    """A design the project moved away from, kept so that the documented commands made with it still run."""


def _variant(name: ConfigName, **change: Any) -> MainArgs:
    return replace(MainArgs(), config=name, out=Path(f"runs/main-{name}"), **change)


CONFIGS: dict[str, NamedConfig] = {
    "main": NamedConfig("the main job: CEM with guardrails, the agents anchored on its mean part way (runs/main)",
                        MainArgs()),
    "from-scratch": NamedConfig("PPO from the zero action, the log around weighted-sum (CEM-tuned still a baseline)",
                                _variant("from-scratch", anchor="weighted_sum")),
    "discrete": NamedConfig("the main job plus discrete PPO and DiscreteCQL on the knob menu",
                            _variant("discrete", discrete=True)),
    "per-session": NamedConfig(
        "PPO chooses the knobs when a session starts and holds them (decision=session): 49,152 session-decisions, "
        "about the main job's 500k requests on small (10.5 a session), gamma 0.98 a session; the main job's anchor",
        _variant("per-session", timesteps=49_152, anchor_budget=2_000_000,
                 ppo=PPOParams(gamma=0.98, decision="session", n_steps=16, batch_size=256))),
    "memory": NamedConfig("the main job with PPO seeing its user's last 4 observations (frame stack)",
                          _variant("memory", ppo=PPOParams(gamma=0.999, frame_stack=4))),
    "cem-unguarded": NamedConfig("the main job with CEM on retention alone (no guardrails)",
                                 _variant("cem-unguarded", cem_guardrails=False)),
    "cem-unpaired": NamedConfig("superseded: CEM without pairing or guardrails (point-7 runs before ff3a31c)",
                                _variant("cem-unpaired", cem_guardrails=False, cem_paired=False), True),
    "cem-guard-v1": NamedConfig("superseded: the first guardrails (no margin, unpaired)",
                                _variant("cem-guard-v1", cem_guard_z=0.0, cem_paired=False), True),
    "two-budgets": NamedConfig("superseded: CEM 500k and the agents on its final vector (before c2becb8)",
                               _variant("two-budgets", cem_budget=500_000, anchor_budget=500_000), True),
    "cem-spi50": NamedConfig("superseded: 50 requests per CEM candidate and iteration (did worse)",
                             _variant("cem-spi50", cem_steps_per_iter=50), True),
}
if tuple(CONFIGS) != get_args(ConfigName):  # pragma: no cover - a configuration added to one list only
    raise RuntimeError(f"CONFIGS {tuple(CONFIGS)} and ConfigName {get_args(ConfigName)} must list the same names")


def named_config(name: str, **change: Any) -> MainArgs:
    """The configuration ``name`` with ``change`` applied (an unknown name raises naming ``--config``)."""
    if name not in CONFIGS:
        raise ValueError(f"--config {name!r} is invalid: choose one of {', '.join(CONFIGS)}")
    return replace(CONFIGS[name].args, **change)


def flag(name: str) -> str:
    """How messages name a field: its flag, or that only a configuration sets it."""
    if name in FLAGS:
        return "--" + name.replace("_", "-")
    return f"{name}: a field of the named configuration, no flag"


def _bad(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid ({flag(name)}): {why}")


def train_seeds(args: MainArgs) -> tuple[int, ...]:
    """The job's training seeds: ``train_seeds``, else the single ``train_seed``."""
    return tuple(args.train_seeds) or (args.train_seed,)


def cem_budget(args: MainArgs) -> int:
    """CEM's simulation budget: ``--cem-budget``, else the PPO budget."""
    return args.cem_budget or args.timesteps


def anchor_budget(args: MainArgs, floor: int | None = None) -> int:
    """CEM requests behind the agents' anchor: ``anchor_budget``, else what CEM's budget has beyond PPO's
    (negative when it has less: refused by :func:`check_args`; ``floor`` raises it to that, for
    ``anchor="weighted_sum"``, whose anchor is not used)."""
    n = args.anchor_budget if args.anchor_budget >= 0 else cem_budget(args) - args.timesteps
    return n if floor is None else max(n, floor)


def tolerance(args: MainArgs) -> Tolerance:
    """The verdicts' tolerances (and CEM's guardrails)."""
    return Tolerance(args.regret_tol, args.reach_tol)


def check_args(args: MainArgs) -> None:
    """Refuses a configuration that cannot run, before any work, with an error naming the flag (or the field
    of the configuration no flag sets)."""
    if args.config not in CONFIGS:
        raise ValueError(f"--config {args.config!r} is invalid: choose one of {', '.join(CONFIGS)}")
    check_seeds(args.seeds, "--seeds")
    if args.train_seeds:
        check_seeds(args.train_seeds, "--train-seeds")
    else:
        check_seeds((args.train_seed,), "--train-seed")
    for name in ("regret_tol", "reach_tol"):  # the verdicts' tolerances (inf = no limit)
        v = getattr(args, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise _bad(name, v, "must be a number (inf = no limit)")
    for name, least in (("timesteps", 1), ("users", 2), ("cem_budget", 0), ("cem_steps_per_iter", 1),
                        ("cql_steps", 0), ("num_envs", 1), ("dataset_users", 1), ("dataset_steps", 1),
                        ("train_worlds", 1), ("workers", 0)):
        v = getattr(args, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise _bad(name, v, f"must be an integer >= {least}")
    if args.shift and args.shift_users < 2:
        raise _bad("shift_users", args.shift_users, "must be >= 2 (or --no-shift)")
    if not (math.isfinite(args.world_days) and args.world_days >= 0):
        raise _bad("world_days", args.world_days, "must be a finite number >= 0")
    if not (math.isfinite(args.behaviour_sigma) and args.behaviour_sigma > 0):
        raise _bad("behaviour_sigma", args.behaviour_sigma, "must be a finite number > 0")
    if not (math.isfinite(args.cem_guard_z) and args.cem_guard_z >= 0):
        raise _bad("cem_guard_z", args.cem_guard_z, "must be a finite number >= 0")
    if args.anchor_budget < -1 or args.anchor_budget > cem_budget(args):
        raise _bad("anchor_budget", args.anchor_budget,
                   f"the agents' anchor is CEM's mean after that many of its {cem_budget(args)} requests "
                   f"(--cem-budget), so it must be in 0..{cem_budget(args)}, or -1 for the budget CEM has beyond PPO's")
    if args.anchor == "cem" and args.cem and anchor_budget(args) < 0:
        raise ValueError(f"cem_budget={cem_budget(args)} is below the PPO budget (--cem-budget < --timesteps "
                         f"{args.timesteps}): the agents' anchor and PPO cannot spend CEM-tuned's budget together; "
                         "give a larger --cem-budget (or 0: the PPO budget)")
    if args.anchor == "cem" and not args.cem:
        raise ValueError("anchor='cem' needs the CEM stage (cem=True); --config from-scratch starts from weighted-sum")
    if args.only_cem and not args.cem:
        raise ValueError("--only-cem needs the CEM stage (cem=True)")
    if len(set(args.baselines)) != len(args.baselines):
        raise ValueError(f"--baselines {' '.join(args.baselines)} is invalid: it repeats an entry")
    if "weighted_sum" not in args.baselines and not args.only_cem:
        raise ValueError(f"--baselines {' '.join(args.baselines)} is invalid: weighted_sum, the verdicts' baseline, "
                         "must be one of them")
    if args.train_worlds > min(args.num_envs, args.dataset_users):
        raise _bad("train_worlds", args.train_worlds,
                   f"it must be <= num_envs={args.num_envs} and dataset_users={args.dataset_users}")
    if args.cem and USERS_PER_CANDIDATE % args.train_worlds:
        raise _bad("train_worlds", args.train_worlds, f"CEM gives each candidate {USERS_PER_CANDIDATE} users, "
                   "split evenly over the training worlds, so it must divide that number")


def default_out(args: MainArgs) -> Path:
    """The configuration's own output directory (``runs/main``, ``runs/main-<config>``)."""
    return CONFIGS[args.config].args.out if args.config in CONFIGS else DEFAULT_OUT


def quick_args(args: MainArgs) -> tuple[MainArgs, list[str]]:
    """``args`` shrunk to a first look (tiny world, small budgets, one evaluation world; the configuration's
    design unchanged), and what changed (``name value``). The default output gets its own directory
    (``<out>_quick``), so that a quick look never resumes from (or sets aside) the full job's checkpoints; an
    ``out`` given explicitly is kept."""
    out = args.out.parent / (args.out.name + "_quick") if args.out == default_out(args) else args.out
    budget = min(args.cem_budget, 131_072)
    timesteps = min(args.timesteps, 16_384)
    # the two-budgets design (the anchor is CEM-tuned's own vector) keeps that relation at the smaller budget;
    # another given anchor budget shrinks to what the smaller budget leaves beyond PPO's
    anchor = (budget if args.anchor_budget == cem_budget(args) else
              min(args.anchor_budget, budget - timesteps) if args.anchor_budget >= 0 else args.anchor_budget)
    quick = replace(args, preset="tiny", timesteps=timesteps, num_envs=32, users=64,
                    cem_budget=budget, anchor_budget=anchor, seeds=args.seeds[:1], dataset_users=32,
                    dataset_steps=100, cql_steps=min(args.cql_steps, 500), shift_users=min(args.shift_users, 64),
                    out=out)
    changed = [f"{f.name} {_show(getattr(quick, f.name))}" for f in fields(MainArgs)
               if f.name not in ("quick", "out") and getattr(quick, f.name) != getattr(args, f.name)]
    return quick, changed


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)


def command_line(args: MainArgs) -> str:
    """The command that reproduces ``args``: ``--config`` and the flags that differ from the configuration;
    fields that differ but have no flag (set from Python) follow as ``# and field=value, ...``."""
    base = CONFIGS[args.config].args if args.config in CONFIGS else MainArgs()
    parts = ["python scripts/main.py"]
    hidden = []
    for f in fields(MainArgs):
        v, d = getattr(args, f.name), getattr(base, f.name)
        if f.name == "config":
            if v != "main":
                parts.append(f"--config {v}")
            continue
        if f.name == "train_seeds":
            v, d = train_seeds(args), train_seeds(base)
        elif f.name == "train_seed":
            continue  # spoken by --train-seed(s)
        if v == d:
            continue
        if f.name not in FLAGS:
            hidden.append(f"{f.name}={v!r}")
        elif f.name == "train_seeds":
            parts.append(("--train-seed " if len(v) == 1 else "--train-seeds ") + _show(tuple(v)))
        elif isinstance(v, bool):
            parts.append(flag(f.name) if v else "--no-" + f.name.replace("_", "-"))
        else:
            parts.append(f"{flag(f.name)} {shlex.quote(_show(v)) if not isinstance(v, tuple) else _show(v)}")
    return " ".join(parts) + (f"  # and {', '.join(hidden)} (no flags)" if hidden else "")


def describe_configs() -> str:
    """The named configurations, one line each (``--help``)."""
    width = max(map(len, CONFIGS))
    return "\n".join(f"  {name:<{width}}  {c.summary}" for name, c in CONFIGS.items())


def parse_cli(argv: Sequence[str] | None = None) -> MainArgs:
    """``scripts/main.py``'s command line: ``--config NAME`` (read first) picks the defaults, the other flags
    change them; tyro refuses an unknown flag or value, :func:`check_args` a value that cannot run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = "main"
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--config="):
            name = a.split("=", 1)[1]
    base = CONFIGS[name].args if name in CONFIGS else MainArgs()  # an unknown name: tyro says which are known
    base = replace(base, train_seeds=train_seeds(base))  # --help shows the seed it trains with
    doc = inspect.cleandoc(MainArgs.__doc__ or "")
    description = f"{doc}\n\nNamed configurations (--config):\n{describe_configs()}"
    args = tyro.cli(MainArgs, default=base, args=argv, description=description)
    if not args.train_seeds:
        raise ValueError("--train-seeds is empty: give at least one training seed")
    check_seeds(args.train_seeds, "--train-seeds")
    if len(args.train_seeds) == 1:  # one seed: the single-seed job (trains in --out), as the Python API's train_seed
        args = replace(args, train_seed=args.train_seeds[0], train_seeds=())
    check_args(args)
    return args
