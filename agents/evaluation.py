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
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS
from rankers.types import Array

#: Episode metrics per user: name -> (description, higher is better?).
METRICS: dict[str, tuple[str, bool | None]] = {
    "retention/retained_30d": ("share of users not churned by the horizon", True),
    "retention/day1_return": ("had a session on day 1 after the start", True),
    "retention/day7_return": ("had a session on day 7 after the start", True),
    "retention/mean_return_gap_days": ("mean days between sessions", False),
    "retention/sessions": ("sessions in the episode", True),
    "retention/active_days": ("days with at least one session", True),
    "engagement/session_videos": ("videos per session", None),
    "engagement/session_minutes": ("minutes per session", None),
    "engagement/watch_minutes": ("watch minutes over the episode", True),
    "engagement/first_day_watch_minutes": ("watch minutes on day 0", True),
    "engagement/like_rate": ("likes per video", True),
    "engagement/share_rate": ("shares per video", True),
    "engagement/comment_rate": ("comments per video", True),
    "engagement/follow_rate": ("follows per video", True),
    "engagement/skip_rate": ("skips (< 2 s) per video", False),
    "engagement/regret_rate": ("regretted videos per video", False),
    "engagement/harmful_rate": ("harmful (high-risk) exposures per video", False),
    "slate/topic_entropy": ("normalised topic entropy of slates", True),
    "slate/intra_list_distance": ("mean pairwise embedding distance in slates", True),
    "slate/ad_load": ("ads per slot shown", None),
    "creators/new_creator_share": ("share of impressions from new creators", True),
    "creators/new_creator_follow_conversion": ("follows per new-creator impression", True),
}
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


def rollout(policy: Policy, cfg: FeedConfig, n_users: int, seed: int, progress: bool = False) -> RunResult:
    """Runs ``policy`` for one episode per user on a simulator built from ``seed``."""
    pcfg = cfg.replace(**policy.env_overrides) if policy.env_overrides else cfg
    sim = FeedSimulator(pcfg, n_users, seed=seed)
    obs = sim.reset()
    policy.bind(sim)
    b = n_users
    h = int(np.ceil(cfg.horizon_days)) + 1
    active = np.ones(b, bool)
    tot: dict[str, Array] = {}
    sessions = np.zeros(b)
    gaps = np.zeros(b)
    n_gaps = np.zeros(b)
    days = np.zeros((b, h), bool)
    days[:, 0] = True
    first_day_watch = np.zeros(b)
    retained = np.zeros(b, bool)
    creator_imp = np.zeros(sim.corpus.catalog.n_creators)
    step_ms: list[float] = []
    knob_sum = np.zeros(N_KNOBS)
    n_act = 0
    steps = 0
    bar = tqdm(total=b, desc=f"{policy.name} seed={seed}", disable=not progress, leave=False)
    while active.any() and steps < cfg.max_steps:
        action = np.asarray(policy.act(obs), np.float32)
        t0 = sim.latency["total"]
        res = sim.step(action)
        step_ms.append((sim.latency["total"] - t0) * 1000.0 / b)
        info = res.info
        for k in ("engagement/videos", "engagement/watch_s", "engagement/likes", "engagement/shares",
                  "engagement/comments", "engagement/follows", "engagement/skips", "engagement/regrets",
                  "engagement/harmful", "slate/ads", "slate/topic_entropy", "slate/intra_list_distance",
                  "creators/new_creator_impressions", "creators/new_creator_follows", "retention/session_videos",
                  "retention/session_minutes"):
            tot[k] = tot.get(k, np.zeros(b)) + np.where(active, info[k], 0.0)
        tot["steps"] = tot.get("steps", np.zeros(b)) + active
        day = info["retention/day"]
        first_day_watch += np.where(active & (day < 1.0), info["engagement/watch_s"] / 60.0, 0.0)
        ended = active & (info["retention/session_end"] > 0)
        sessions += ended
        ret = active & (info["retention/returned"] > 0)
        gaps += np.where(ret, info["retention/gap_days"], 0.0)
        n_gaps += ret
        d = np.minimum(day.astype(np.int64), h - 1)
        days[np.flatnonzero(ret), d[ret]] = True
        slate = info["slate"]
        shown_items = slate.item[active]
        valid = shown_items >= 0
        np.add.at(creator_imp, sim.corpus.catalog.creator[shown_items[valid]], 1.0)
        knob_sum += action[active].sum(axis=0)
        n_act += int(active.sum())
        done = res.terminated | res.truncated
        retained |= active & res.truncated
        bar.update(int((active & done).sum()))
        active &= ~done
        obs = res.obs
        steps += 1
    bar.close()
    vids = np.maximum(tot["engagement/videos"], 1.0)
    sess = np.maximum(sessions, 1.0)
    per_user = {
        "retention/retained_30d": retained.astype(np.float64),
        "retention/day1_return": days[:, min(1, h - 1)].astype(np.float64),
        "retention/day7_return": days[:, min(7, h - 1)].astype(np.float64),
        "retention/mean_return_gap_days": np.where(n_gaps > 0, gaps / np.maximum(n_gaps, 1), cfg.churn_days),
        "retention/sessions": sessions,
        "retention/active_days": days.sum(axis=1).astype(np.float64),
        "engagement/session_videos": tot["retention/session_videos"] / sess,
        "engagement/session_minutes": tot["retention/session_minutes"] / sess,
        "engagement/watch_minutes": tot["engagement/watch_s"] / 60.0,
        "engagement/first_day_watch_minutes": first_day_watch,
        "engagement/like_rate": tot["engagement/likes"] / vids,
        "engagement/share_rate": tot["engagement/shares"] / vids,
        "engagement/comment_rate": tot["engagement/comments"] / vids,
        "engagement/follow_rate": tot["engagement/follows"] / vids,
        "engagement/skip_rate": tot["engagement/skips"] / vids,
        "engagement/regret_rate": tot["engagement/regrets"] / vids,
        "engagement/harmful_rate": tot["engagement/harmful"] / vids,
        "slate/topic_entropy": tot["slate/topic_entropy"] / np.maximum(tot["steps"], 1),
        "slate/intra_list_distance": tot["slate/intra_list_distance"] / np.maximum(tot["steps"], 1),
        "slate/ad_load": tot["slate/ads"] / np.maximum(tot["slate/ads"] + tot["engagement/videos"], 1),
        "creators/new_creator_share": tot["creators/new_creator_impressions"] / vids,
        "creators/new_creator_follow_conversion": tot["creators/new_creator_follows"]
        / np.maximum(tot["creators/new_creator_impressions"], 1.0),
    }
    ms = np.asarray(step_ms)
    population = {"creators/exposure_gini": gini(creator_imp),
                  "perf/request_ms_p50": float(np.percentile(ms, 50)) if ms.size else 0.0,
                  "perf/request_ms_p99": float(np.percentile(ms, 99)) if ms.size else 0.0}
    return RunResult(policy.name, seed, per_user, population, days.mean(axis=0), knob_sum / max(n_act, 1))


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
