"""One rollout: a policy for one episode per user on the world of one seed, and what it measures.

Every policy on a seed meets a fresh :class:`FeedSimulator` built from that seed: the same world, the same users
and the same per-step random draws (common random numbers). A rollout depends only on its :class:`RolloutJob`, so
it gives the same bits wherever it runs (this process, a Ray worker).

Each rollout also records which knobs a policy turns in which observable user state (:data:`STATE_GROUPS`:
cold-start flag, tenure, time into the session, episode day), decoded from the observation by its named slices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.policies import Policy
from envs.config import FeedConfig
from envs.learned import models_key, provide_models, served_models
from envs.metrics import DEFINITIONS, EpisodeMetrics
from envs.observation import ObservationLayout
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS
from rankers.types import Array

#: Episode metrics per user: name -> (definition, higher is better?), defined once in envs/metrics.py.
METRICS: dict[str, tuple[str, bool | None]] = DEFINITIONS
#: Metrics over the whole population of a run (one value per seed).
POPULATION_METRICS: dict[str, tuple[str, bool | None]] = {
    "creators/exposure_gini": ("Gini of impressions over creators", False),
    "perf/request_ms_p50": ("median batched step time per user (ms; wall time, so it depends on what else the "
                            "machine runs: the main job evaluates its baselines beside training)", False),
    "perf/request_ms_p99": ("99th percentile batched step time per user (ms; wall time, as above)", False),
    "perf/rollout_requests": ("batched requests the rollout took: it ends when the last measured user's episode "
                              "does, so a policy that keeps users longer makes longer, costlier rollouts", None),
}
#: Observable user-state groups and their bucket labels, in the order of ``RunResult.knob_by_state``
#: rows. Each bucket is decoded from the observation the policy acted on (see :func:`state_buckets`).
STATE_GROUPS: dict[str, tuple[str, ...]] = {
    "user": ("cold_start", "established"),
    "tenure": ("signup<7d", "signup 7-30d", "signup>=30d"),
    "session": ("session<10min", "session 10-30min", "session>=30min"),
    "day": ("day 0", "days 1-6", "day>=7"),
}
_TENURE_EDGES_DAYS = (7.0, 30.0)
_SESSION_EDGES_MIN = (10.0, 30.0)
_DAY_EDGES = (1.0, 7.0)
_EPS = 1e-4  # float32 round trip of the normalised observation (e.g. day 7 / 30 * 30)


@dataclass
class RunResult:
    """One policy on one seed: per-user metrics (B,) and population metrics."""

    policy: str
    seed: int
    per_user: dict[str, Array]
    population: dict[str, float]
    retention_by_day: Array  # (H + 1,) share of users active on each day
    knob_means: Array  # (A,) mean action over active user-requests
    knob_by_state: dict[str, Array] = field(default_factory=dict)
    """Group name in :data:`STATE_GROUPS` -> (G, A) float64 mean action per bucket (NaN where empty)."""
    state_counts: dict[str, Array] = field(default_factory=dict)
    """Group name -> (G,) int64 number of active user-requests that fell in each bucket."""


def gini(x: Array) -> float:
    """Gini coefficient of a non-negative vector."""
    x = np.sort(np.asarray(x, np.float64))
    if x.sum() <= 0:
        return 0.0
    n = x.size
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def decode_state(obs: Array, layout: ObservationLayout) -> dict[str, Array]:
    """Natural units of the observed fields the state buckets use, read by name from ``layout``.

    Inverts the normalisation of :meth:`envs.observation.ObservationLayout.build` (a test checks
    the round trip against the simulator's own view). Returns (B,) float64 arrays:
    ``cold_start`` (0/1 flag), ``days_since_signup``, ``session_minutes``, ``episode_day``.
    """
    o = np.asarray(obs, np.float64)

    def col(name: str) -> Array:
        return o[:, layout[name]][:, 0]

    return {
        "cold_start": col("user.cold_start"),
        "days_since_signup": np.expm1(col("user.days_since_signup") * 7.0),
        "session_minutes": col("session.minutes") * 60.0,
        "episode_day": col("episode.day") * layout.horizon,
    }


def state_buckets(obs: Array, layout: ObservationLayout) -> dict[str, Array]:
    """(B, D) observations -> group name -> (B,) int64 bucket index into ``STATE_GROUPS[group]``."""
    v = decode_state(obs, layout)
    return {
        "user": np.where(v["cold_start"] > 0.5, 0, 1).astype(np.int64),
        "tenure": np.searchsorted(np.asarray(_TENURE_EDGES_DAYS) - _EPS, v["days_since_signup"], side="right"),
        "session": np.searchsorted(np.asarray(_SESSION_EDGES_MIN) - _EPS, v["session_minutes"], side="right"),
        "day": np.searchsorted(np.asarray(_DAY_EDGES) - _EPS, v["episode_day"], side="right"),
    }


FINISHED: tuple[str, ...] = ("replace", "retire")
"""What happens to a user whose episode ended (churn or horizon) while others run on (:func:`rollout`)."""


def check_finished(who: str, finished: str) -> None:
    if finished not in FINISHED:
        raise ValueError(f"{who}: finished={finished!r} is invalid: must be one of {FINISHED}")


def rollout(policy: Policy, cfg: FeedConfig, n_users: int, seed: int, finished: str = "replace") -> RunResult:
    """Runs ``policy`` for one episode per user on a simulator built from ``seed``; the rollout ends when
    the last user's episode does.

    ``finished`` says what takes the place of a user whose episode ended:

    - ``replace`` (default): a new user (``FeedSimulator.reset``), served by the same policy and
      moving the world's counters but not measured. The platform keeps a steady population, as in
      the training environment (autoreset), and the world's traffic keeps its composition.
    - ``retire``: nobody (``FeedSimulator.retire``); the users left stand for the whole population.
      About 3x fewer user-requests on ``small``, but the world's traffic drifts to the heaviest
      survivors, and that changes what policies achieve (README, "Treatment of finished users").
    """
    check_finished("rollout", finished)
    pcfg = cfg.replace(**policy.env_overrides) if policy.env_overrides else cfg
    sim = FeedSimulator(pcfg, n_users, seed=seed)
    obs = sim.reset()
    policy.bind(sim)
    em = EpisodeMetrics(n_users, pcfg.horizon_days)
    creator_imp = np.zeros(sim.corpus.catalog.n_creators)
    step_ms: list[float] = []
    knob_sum = np.zeros(N_KNOBS)
    state_sum = {g: np.zeros((len(labels), N_KNOBS)) for g, labels in STATE_GROUPS.items()}
    state_n = {g: np.zeros(len(labels), np.int64) for g, labels in STATE_GROUPS.items()}
    n_act = 0
    steps = 0
    while not em.done and steps < pcfg.max_steps:
        active = em.active[sim.uid]  # rows of measured users still in their episode
        action = np.asarray(policy.act(obs), np.float32)
        t0 = sim.latency["total"]
        res = sim.step(action)
        step_ms.append((sim.latency["total"] - t0) * 1000.0 / sim.n_users)
        em.update(res.info, res.terminated, res.truncated, rows=None if sim.n_users == n_users else sim.uid)
        shown = res.info["slate"].item[active]
        np.add.at(creator_imp, sim.corpus.catalog.creator[shown[shown >= 0]], 1.0)
        knob_sum += action[active].sum(axis=0)
        for g, idx in state_buckets(obs[active], sim.layout).items():
            np.add.at(state_sum[g], idx, action[active])
            state_n[g] += np.bincount(idx, minlength=len(STATE_GROUPS[g]))
        n_act += int(active.sum())
        obs = res.obs
        steps += 1
        ended = res.terminated | res.truncated
        if not ended.any() or em.done:
            continue
        if finished == "replace":
            obs = np.where(ended[:, None], sim.reset(ended), obs)
        else:
            sim.retire(ended)
            obs = obs[~ended]
    per_user = em.per_user()
    ms = np.asarray(step_ms)
    population = {"creators/exposure_gini": gini(creator_imp),
                  "perf/request_ms_p50": float(np.percentile(ms, 50)) if ms.size else 0.0,
                  "perf/request_ms_p99": float(np.percentile(ms, 99)) if ms.size else 0.0,
                  "perf/rollout_requests": float(steps)}
    with np.errstate(invalid="ignore", divide="ignore"):
        by_state = {g: state_sum[g] / state_n[g][:, None] for g in STATE_GROUPS}
    return RunResult(policy.name, seed, per_user, population, em.day_active.mean(axis=0), knob_sum / max(n_act, 1),
                     by_state, state_n)



@dataclass(frozen=True)
class RolloutJob:
    """One rollout to run: a policy on the world of ``seed`` (:func:`rollout`'s arguments), picklable (it is sent
    to the executor's workers). ``store``: the :class:`agents.rollout_store.RolloutStore` directory where
    :func:`agents.evaluation.run_jobs` looks for its result before running it and writes it once it has run."""

    policy: Policy
    cfg: FeedConfig
    n_users: int
    seed: int
    finished: str = "replace"
    store: Path | None = None

    @property
    def label(self) -> str:
        """How progress bars and errors name the job."""
        return f"{self.policy.name} on {self.cfg.preset} seed {self.seed}"

    @property
    def served(self) -> FeedConfig:
        """The config the rollout serves: ``cfg`` with the policy's ``env_overrides``."""
        return self.cfg.replace(**self.policy.env_overrides) if self.policy.env_overrides else self.cfg

    def run(self) -> RunResult:
        """The rollout, in this process (the store is the caller's business)."""
        return rollout(self.policy, self.cfg, self.n_users, self.seed, self.finished)


WorldModels = list[tuple[FeedConfig, dict[str, Any]]]
"""Trained models this process serves, per world: ``[(a config of that world, {kind: module})]``."""


def models_for(cfgs: Iterable[FeedConfig]) -> WorldModels:
    """The trained models this process serves to the simulators of ``cfgs`` (:func:`envs.learned.served_models`:
    provided by the driver's provisioning), one entry per world with every kind any of them asks for: what an
    executor's worker, a fresh process, is given before it builds one (:func:`provide`)."""
    out: dict[str, tuple[FeedConfig, dict[str, Any]]] = {}
    for cfg in cfgs:
        models = served_models(cfg)
        if models:
            key = models_key(cfg)
            out[key] = (out.get(key, (cfg, {}))[0], {**out.get(key, (cfg, {}))[1], **models})
    return list(out.values())


def provide(models: WorldModels) -> None:
    """Serves ``models`` (:func:`models_for`) to every simulator this process builds for their worlds."""
    for cfg, m in models:
        provide_models(cfg, m)


def run_rollout(models: WorldModels, job: RolloutJob) -> RunResult:
    """What the executor runs for each job: the models its world serves are provided to the process that runs it
    (a worker is a fresh process: the driver's provisioning is not there), then :meth:`RolloutJob.run`."""
    provide(models)
    return job.run()
