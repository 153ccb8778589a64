"""Statistics of an evaluation: per-user metrics grouped by policy and seed, and their intervals.

Per-user episode metrics are compared with 95 % bootstrap intervals (``scipy.stats.bootstrap``), and each
policy's *paired* per-user difference from the weighted-sum baseline gets its own interval, plus, where it fits,
the interquartile mean (IQM) of that difference with a 95 % stratified bootstrap interval (rliable's estimator:
users resampled within each seed), and a world-level interval (seeds resampled, then users within each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from agents.rollouts import METRICS, POPULATION_METRICS, RunResult
from rankers.types import Array

#: Per-user metrics that take only the values 0 and 1. The paired difference of such a metric is
#: -1, 0 or +1 per user and mostly 0, so its interquartile mean is 0 whatever the policies do: no
#: IQM is reported for them (``iqm`` is None), only the mean difference.
BINARY_METRICS: frozenset[str] = frozenset({"retention/retained_30d", "retention/day1_return",
                                            "retention/day7_return"})

@dataclass
class Comparison:
    """All runs, grouped by policy; ``summary`` holds intervals."""

    runs: list[RunResult] = field(default_factory=list)
    baseline: str = "weighted_sum"

    def per_user(self, policy: str, metric: str) -> Array:
        """(n_seeds * B,) float64: the policy's per-user values, seeds in increasing order."""
        return np.concatenate(self.per_seed(policy, metric))

    def runs_of(self, policy: str) -> list[RunResult]:
        """The policy's runs, seeds in increasing order."""
        return sorted((r for r in self.runs if r.policy == policy), key=lambda r: r.seed)

    def per_seed(self, policy: str, metric: str) -> list[Array]:
        """One (B,) array per seed, seeds in increasing order (the strata of the IQM bootstrap)."""
        return [np.asarray(r.per_user[metric], np.float64) for r in self.runs_of(policy)]

    def population_per_seed(self, policy: str, metric: str) -> Array:
        """(n_seeds,) float64: the policy's value of a population metric per seed, seeds in increasing order."""
        return np.asarray([r.population[metric] for r in self.runs_of(policy)], np.float64)

    def paired_per_seed(self, policy: str, metric: str, baseline: str | None = None) -> list[Array]:
        """One (B,) array per seed: the policy's per-user paired differences from ``baseline`` (default:
        the comparison's baseline)."""
        base = self.per_seed(baseline or self.baseline, metric)
        return [a - b for a, b in zip(self.per_seed(policy, metric), base)]

    @property
    def policies(self) -> list[str]:
        return list(dict.fromkeys(r.policy for r in self.runs))


def bootstrap_ci(x: Array, seed: int = 0, reps: int = 2000) -> tuple[float, float, float]:
    """Mean of ``x`` and its 95 % percentile-bootstrap interval."""
    x = np.asarray(x, np.float64)
    m = float(x.mean())
    if x.size < 2 or np.all(x == x[0]):
        return m, m, m
    r = stats.bootstrap((x,), np.mean, n_resamples=reps, confidence_level=0.95, method="percentile",
                        vectorized=True, rng=np.random.default_rng(seed))
    return m, float(r.confidence_interval.low), float(r.confidence_interval.high)


def iqm(x: Array) -> float:
    """Interquartile mean: the mean of the middle 50 % of all values (rliable's ``aggregate_iqm``,
    scipy's ``trim_mean`` cutting 25 % at each end, ``int(0.25 n)`` values each side)."""
    from rliable.metrics import aggregate_iqm

    return float(aggregate_iqm(np.asarray(x, np.float64)))


def _pooled(strata: Sequence[Array], who: str) -> tuple[list[Array], Array]:
    """The non-empty strata as flat float64 arrays, and all their values pooled."""
    parts = [p for p in (np.asarray(s, np.float64).ravel() for s in strata) if p.size]
    if not parts:
        raise ValueError(f"{who} needs at least one non-empty stratum")
    return parts, np.concatenate(parts)


def stratified_iqm_ci(strata: Sequence[Array], seed: int = 0, reps: int = 2000,
                      max_chunk: int = 4_000_000) -> tuple[float, float, float]:
    """IQM of all values of ``strata`` and its 95 % stratified percentile-bootstrap interval.

    The estimator of rliable's ``get_interval_estimates(..., method="percentile")`` with its
    ``StratifiedBootstrap`` on a (runs x tasks) matrix: each replicate resamples, with replacement,
    the values *within* each stratum (here: the users of one evaluation seed) and takes the IQM of
    the pooled resample. Vectorised in numpy (rliable's loop over replicates takes ~0.5 s per
    interval; a test checks the two agree). Strata may differ in size.

    Args:
        strata: one 1-D float array per stratum (e.g. per-user paired differences of one seed).
        seed: seed of the resampling generator.
        reps: bootstrap replicates.
        max_chunk: most resampled values held in memory at once.

    Returns:
        (iqm, lo, hi); a constant sample gives (v, v, v).
    """
    parts, full = _pooled(strata, "stratified_iqm_ci")
    point = iqm(full)
    if full.size < 2 or np.all(full == full[0]):
        return point, point, point
    rng = np.random.default_rng(seed)
    boot = np.empty(reps)
    step = max(1, max_chunk // full.size)
    for start in range(0, reps, step):
        r = min(step, reps - start)
        sample = np.concatenate([s[rng.integers(0, s.size, (r, s.size))] for s in parts], axis=1)
        boot[start:start + r] = stats.trim_mean(sample, 0.25, axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return point, float(lo), float(hi)


def hierarchical_ci(strata: Sequence[Array], seed: int = 0, reps: int = 2000) -> tuple[float, float, float]:
    """Mean of all values of ``strata`` and its 95 % two-level percentile-bootstrap interval.

    Each replicate draws as many strata as there are, with replacement (the worlds: evaluation seeds),
    then resamples the values *within* each drawn stratum (the users of that world), and takes the
    mean of the pooled resample. Users of one world share its trajectory (its creators, its counters,
    what trends), which a policy changes, so they are not independent draws: this interval carries
    the world-to-world spread that resampling users alone misses. With few strata it is coarse (two
    seeds give three distinct stratum draws); a wide interval then says "run more seeds".

    Returns:
        (mean, lo, hi); a single stratum gives the within-stratum bootstrap.
    """
    parts, full = _pooled(strata, "hierarchical_ci")
    point = float(full.mean())
    if full.size < 2 or np.all(full == full[0]):
        return point, point, point
    rng = np.random.default_rng(seed)
    k = len(parts)
    pick = rng.integers(0, k, (reps, k))  # which stratum fills each slot of each replicate
    sums = np.zeros(reps)
    counts = np.zeros(reps)
    for j, s in enumerate(parts):
        hit = pick == j  # (reps, k) slots filled by stratum j
        n_hit = int(hit.sum())
        if not n_hit:
            continue
        boot_sums = np.empty(n_hit)
        step = max(1, 4_000_000 // s.size)
        for a in range(0, n_hit, step):
            r = min(step, n_hit - a)
            boot_sums[a:a + r] = s[rng.integers(0, s.size, (r, s.size))].sum(axis=1)
        rows = np.nonzero(hit)[0]
        np.add.at(sums, rows, boot_sums)
        np.add.at(counts, rows, s.size)
    lo, hi = np.percentile(sums / counts, [2.5, 97.5])
    return point, float(lo), float(hi)


def summarize(comp: Comparison, metrics: Sequence[str] | None = None, reps: int = 2000) -> list[dict[str, Any]]:
    """One row per (metric, policy): mean with 95 % CI and the paired difference from the baseline.

    Row keys: ``metric``, ``policy``, ``mean``, ``lo``, ``hi`` (95 % percentile bootstrap over
    users); for every policy but the baseline also ``diff``, ``diff_lo``, ``diff_hi``,
    ``significant`` (the mean per-user paired difference from the baseline, same users and noise,
    and whether its 95 % CI excludes 0) and ``iqm``, ``iqm_lo``, ``iqm_hi``, ``iqm_significant``:
    the interquartile mean of the same paired differences with its 95 % stratified bootstrap CI
    (users resampled within each seed; :func:`stratified_iqm_ci`), robust to a few users with
    extreme differences. For the 0/1 metrics in :data:`BINARY_METRICS` the paired difference is
    -1/0/+1 and mostly 0, so its IQM says nothing: those four keys are ``None`` there.
    Paired rows also carry ``world_lo``, ``world_hi``, ``world_significant``: the 95 % interval of
    the same mean difference with worlds (seeds) resampled before users (:func:`hierarchical_ci`),
    which the verdicts use (:mod:`agents.verdict`).
    Population metrics (one value per world: :data:`POPULATION_METRICS`) are not bootstrapped: their rows
    carry ``spread = "seeds"``, ``lo``/``hi`` = min/max over the seeds and, for every policy but the baseline,
    ``diff`` = the mean over seeds of the policy's value minus the baseline's in the same world,
    ``diff_lo``/``diff_hi`` = the smallest and largest of those per-world differences and ``n_seeds``; no
    significance (``significant`` is None): with a handful of worlds, "lower in every world" is what they say.
    """
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
                strata = comp.paired_per_seed(pol, metric, base)
                _, wlo, whi = hierarchical_ci(strata, reps=reps)
                row.update(world_lo=wlo, world_hi=whi, world_significant=bool(wlo > 0 or whi < 0))
                if metric in BINARY_METRICS:
                    row.update(iqm=None, iqm_lo=None, iqm_hi=None, iqm_significant=None)
                else:
                    q, qlo, qhi = stratified_iqm_ci(strata, reps=reps)
                    row.update(iqm=q, iqm_lo=qlo, iqm_hi=qhi, iqm_significant=bool(qlo > 0 or qhi < 0))
            rows.append(row)
    for metric in POPULATION_METRICS:
        if not all(metric in r.population for r in comp.runs):  # saved by a version that did not measure it
            continue
        base_vals = comp.population_per_seed(base, metric)
        for pol in comp.policies:
            vals = comp.population_per_seed(pol, metric)
            row = {"metric": metric, "policy": pol, "mean": float(vals.mean()), "lo": float(vals.min()),
                   "hi": float(vals.max()), "spread": "seeds", "n_seeds": int(vals.size)}
            if pol != base and vals.size == base_vals.size:
                d = vals - base_vals
                row.update(diff=float(d.mean()), diff_lo=float(d.min()), diff_hi=float(d.max()), significant=None)
            rows.append(row)
    return rows

