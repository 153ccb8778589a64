"""Evaluation with common random numbers: every policy meets the same users and the same noise.

For each seed, each policy runs a fresh :class:`FeedSimulator` built from that seed (same world,
same users, same per-step random draws) for one episode per user. Per-user episode metrics are
then compared with 95 % bootstrap intervals (``scipy.stats.bootstrap``), and each policy's
*paired* per-user difference from the weighted-sum baseline gets its own interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from agents.policies import Policy
from envs.config import FeedConfig
from envs.metrics import DEFINITIONS, EpisodeMetrics
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS
from rankers.types import Array

#: Episode metrics per user: name -> (definition, higher is better?), defined once in envs/metrics.py.
METRICS: dict[str, tuple[str, bool | None]] = DEFINITIONS
#: Metrics over the whole population of a run (one value per seed).
POPULATION_METRICS: dict[str, tuple[str, bool | None]] = {
    "creators/exposure_gini": ("Gini of impressions over creators", False),
    "perf/request_ms_p50": ("median batched step time per user (ms)", False),
    "perf/request_ms_p99": ("99th percentile batched step time per user (ms)", False),
}


@dataclass
class RunResult:
    """One policy on one seed: per-user metrics (B,) and population metrics."""

    policy: str
    seed: int
    per_user: dict[str, Array]
    population: dict[str, float]
    retention_by_day: Array  # (H + 1,) share of users active on each day
    knob_means: Array  # (A,) mean action


@dataclass
class Comparison:
    """All runs, grouped by policy; ``summary`` holds intervals."""

    runs: list[RunResult] = field(default_factory=list)
    baseline: str = "weighted_sum"

    def per_user(self, policy: str, metric: str) -> Array:
        rs = sorted((r for r in self.runs if r.policy == policy), key=lambda r: r.seed)
        return np.concatenate([r.per_user[metric] for r in rs])

    @property
    def policies(self) -> list[str]:
        return list(dict.fromkeys(r.policy for r in self.runs))


def gini(x: Array) -> float:
    """Gini coefficient of a non-negative vector."""
    x = np.sort(np.asarray(x, np.float64))
    if x.sum() <= 0:
        return 0.0
    n = x.size
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def rollout(policy: Policy, cfg: FeedConfig, n_users: int, seed: int) -> RunResult:
    """Runs ``policy`` for one episode per user on a simulator built from ``seed``."""
    pcfg = cfg.replace(**policy.env_overrides) if policy.env_overrides else cfg
    sim = FeedSimulator(pcfg, n_users, seed=seed)
    obs = sim.reset()
    policy.bind(sim)
    b = n_users
    em = EpisodeMetrics(b, pcfg.horizon_days)
    creator_imp = np.zeros(sim.corpus.catalog.n_creators)
    step_ms: list[float] = []
    knob_sum = np.zeros(N_KNOBS)
    n_act = 0
    steps = 0
    while not em.done and steps < pcfg.max_steps:
        active = em.active.copy()
        action = np.asarray(policy.act(obs), np.float32)
        t0 = sim.latency["total"]
        res = sim.step(action)
        step_ms.append((sim.latency["total"] - t0) * 1000.0 / b)
        em.update(res.info, res.terminated, res.truncated)
        shown = res.info["slate"].item[active]
        np.add.at(creator_imp, sim.corpus.catalog.creator[shown[shown >= 0]], 1.0)
        knob_sum += action[active].sum(axis=0)
        n_act += int(active.sum())
        obs = res.obs
        steps += 1
    per_user = em.per_user()
    ms = np.asarray(step_ms)
    population = {"creators/exposure_gini": gini(creator_imp),
                  "perf/request_ms_p50": float(np.percentile(ms, 50)) if ms.size else 0.0,
                  "perf/request_ms_p99": float(np.percentile(ms, 99)) if ms.size else 0.0}
    return RunResult(policy.name, seed, per_user, population, em.day_active.mean(axis=0), knob_sum / max(n_act, 1))


def evaluate(policies: Sequence[Policy], cfg: FeedConfig, n_users: int, seeds: Sequence[int],
             progress: bool = True) -> Comparison:
    """Runs every policy on every seed (common random numbers) and returns all runs."""
    comp = Comparison()
    total = len(policies) * len(seeds)
    with tqdm(total=total, desc="evaluate", disable=not progress) as bar:
        for seed in seeds:
            for pol in policies:
                bar.set_postfix_str(f"{pol.name} seed={seed}")
                comp.runs.append(rollout(pol, cfg, n_users, seed))
                bar.update(1)
    return comp


def bootstrap_ci(x: Array, seed: int = 0, reps: int = 2000) -> tuple[float, float, float]:
    """Mean of ``x`` and its 95 % percentile-bootstrap interval."""
    x = np.asarray(x, np.float64)
    m = float(x.mean())
    if x.size < 2 or np.all(x == x[0]):
        return m, m, m
    r = stats.bootstrap((x,), np.mean, n_resamples=reps, confidence_level=0.95, method="percentile",
                        vectorized=True, rng=np.random.default_rng(seed))
    return m, float(r.confidence_interval.low), float(r.confidence_interval.high)


def summarize(comp: Comparison, metrics: Sequence[str] | None = None, reps: int = 2000) -> list[dict[str, Any]]:
    """One row per (metric, policy): mean with 95 % CI and the paired difference from the baseline."""
    metrics = list(metrics) if metrics is not None else list(METRICS)
    rows: list[dict[str, Any]] = []
    base = comp.baseline if comp.baseline in comp.policies else comp.policies[0]
    for metric in metrics:
        xb = comp.per_user(base, metric)
        for pol in comp.policies:
            x = comp.per_user(pol, metric)
            m, lo, hi = bootstrap_ci(x, reps=reps)
            row = {"metric": metric, "policy": pol, "mean": m, "lo": lo, "hi": hi}
            if pol != base:
                d, dlo, dhi = bootstrap_ci(x - xb, reps=reps)
                row.update(diff=d, diff_lo=dlo, diff_hi=dhi, significant=bool(dlo > 0 or dhi < 0))
            rows.append(row)
    for metric in POPULATION_METRICS:
        for pol in comp.policies:
            vals = np.asarray([r.population[metric] for r in comp.runs if r.policy == pol])
            rows.append({"metric": metric, "policy": pol, "mean": float(vals.mean()), "lo": float(vals.min()),
                         "hi": float(vals.max())})
    return rows
