"""An A/B-testing lab: overlapping experiments run as a platform runs them, and read out against the truth.

A platform randomises users into the arms of an :class:`Experiment` (a traffic split over :class:`Arm`
s, each a change of the knob vector, active from ``start_day`` for ``days``), runs several experiments at
once on the same users (each experiment assigns users by its own hash of the user, independently of the
others: overlapping layers, Tang et al. 2010), and reads each out after 1, 7 and 30 days: the difference
of the treatment's mean from the control's with Welch's t-test, CUPED-adjusted by each user's pre-period
watch time (Deng et al. 2013), a sample-ratio check (chi-square of the arms' user counts against the
split) and Benjamini-Hochberg correction over every test of a readout (``scipy.stats``). Readouts use
the users who were in the app when the experiment started (exposed users).

What no platform can do, the simulator can: serve *every* user under each arm with the same noise (keyed
users, ``FeedSimulator.key_users``). :func:`true_effects` runs the whole population under one arm (the
others at control) against the whole population at control, so each readout sits beside the effect the
arm would have at launch, at every readout day: the gap between what a day-1 experiment concludes and the
30-day truth, interference (treated and control users share the world's counters during the experiment,
not at launch), novelty (an effect that fades) and the interaction between two overlapping experiments
(everyone in both treatments, against the sum of each alone).

Metrics per user, counted from the experiment's start to the readout day: ``watch_minutes`` (total watch
time; 0 after the user churned) and ``retained`` (1 while the user has not churned).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from envs.config import FeedConfig
from envs.simulator import FeedSimulator
from rankers.config import KNOB_NAMES, N_KNOBS
from rankers.hashing import hash_uniform
from rankers.types import Array

METRICS: tuple[str, ...] = ("watch_minutes", "retained")
"""Per-user outcomes a readout compares (see the module docstring)."""


class ExperimentError(ValueError):
    """An experiment or arm that cannot be run as specified."""


class EmptyArmError(ExperimentError):
    """An arm that gets no traffic, or no exposed users to read out."""


@dataclass(frozen=True)
class Arm:
    """One arm: a ``share`` of the experiment's users, served the base knob vector changed by ``knobs``
    (knob name -> value added to the action, then clipped to [-1, 1]). The control arm changes nothing."""

    name: str
    share: float
    knobs: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ExperimentError("an arm needs a name")
        if not np.isfinite(self.share) or self.share < 0:
            raise ExperimentError(f"arm {self.name!r}: share={self.share} must be a finite number >= 0")
        if self.share == 0:
            raise EmptyArmError(f"arm {self.name!r} gets no traffic (share 0): drop it or give it a share")
        for k, v in self.knobs.items():
            if k not in KNOB_NAMES:
                raise ExperimentError(f"arm {self.name!r}: unknown knob {k!r}; knobs are {list(KNOB_NAMES)}")
            if not np.isfinite(v):
                raise ExperimentError(f"arm {self.name!r}: knob {k!r} = {v} is not finite")

    def delta(self) -> Array:
        d = np.zeros(N_KNOBS, np.float32)
        for k, v in self.knobs.items():
            d[KNOB_NAMES.index(k)] = v
        return d


@dataclass(frozen=True)
class Experiment:
    """Arms (the first is the control) splitting all users by ``share``; active for users' days in
    ``[start_day, start_day + days)``."""

    name: str
    arms: tuple[Arm, ...]
    start_day: float = 0.0
    days: float = float("inf")

    def __post_init__(self) -> None:
        if not self.name:
            raise ExperimentError("an experiment needs a name")
        if len(self.arms) < 2:
            raise ExperimentError(f"experiment {self.name!r} needs a control and at least one treatment arm")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ExperimentError(f"experiment {self.name!r} has arms with the same name: {names}")
        total = sum(a.share for a in self.arms)
        if abs(total - 1.0) > 1e-6:
            raise ExperimentError(f"experiment {self.name!r}: arm shares sum to {total:g}, not 1")
        if not np.isfinite(self.start_day) or self.start_day < 0 or not self.days > 0:
            raise ExperimentError(f"experiment {self.name!r}: start_day={self.start_day} must be finite and >= 0, "
                                  f"days={self.days} > 0")

    @property
    def salt(self) -> int:
        return zlib.crc32(self.name.encode()) & 0x7FFFFFFF

    def assign(self, users: Array) -> Array:
        """(U,) arm index of each user identity: the user's hash under this experiment against the split."""
        u = hash_uniform(np.asarray(users, np.int64), self.salt)
        edges = np.cumsum([a.share for a in self.arms])[:-1]
        return np.searchsorted(edges, u, side="right").astype(np.int64)

    def active(self, day: Array) -> Array:
        return (day >= self.start_day) & (day < self.start_day + self.days)


def check_experiments(experiments: Sequence[Experiment]) -> None:
    if not experiments:
        raise ExperimentError("the lab needs at least one experiment")
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ExperimentError(f"experiments need distinct names (their names salt the assignment): {names}")


@dataclass
class DailyOutcomes:
    """One life per user: watch minutes per user and day of their life, and the day each churned."""

    minutes: Array  # (U, D) float64
    churn_day: Array  # (U,) float64, inf where the user was still in the app at the horizon

    def metric(self, name: str, start: float, until: float) -> Array:
        """(U,) the metric counted over the users' days ``[start, until)`` (see :data:`METRICS`)."""
        if name == "watch_minutes":
            lo, hi = int(np.floor(start)), int(np.ceil(until))
            return self.minutes[:, lo:hi].sum(axis=1)
        if name == "retained":
            return (self.churn_day >= until).astype(np.float64)
        raise ExperimentError(f"unknown metric {name!r}: choose from {METRICS}")

    def exposed(self, start: float) -> Array:
        """(U,) users still in the app when an experiment starting at ``start`` began."""
        return self.churn_day >= start


def run_lab(cfg: FeedConfig, experiments: Sequence[Experiment], n_users: int, seed: int, base: Array | None = None,
            forced: Mapping[str, int] | None = None, progress: bool = False, desc: str = "lab") -> DailyOutcomes:
    """One life for each of ``n_users`` keyed users (identity = row) of world ``seed``. A user is served
    ``base`` (A,) (default: the zero action, weighted-sum) plus, for each experiment active on the user's
    day, the change of their arm: their assigned arm, or ``forced[experiment]`` for everyone (the truth runs).
    Users whose life ended leave the batch (``FeedSimulator.retire``)."""
    check_experiments(experiments)
    forced = dict(forced or {})
    for name, k in forced.items():
        match = [e for e in experiments if e.name == name]
        if not match or not 0 <= k < len(match[0].arms):
            raise ExperimentError(f"forced arm {name!r}={k} names no arm of the lab's experiments")
    if n_users < 2:
        raise ExperimentError(f"the lab needs >= 2 users, got {n_users}")
    base = np.zeros(N_KNOBS, np.float32) if base is None else np.asarray(base, np.float32)
    users = np.arange(n_users)
    deltas = []  # per experiment: (U, A) each user's change while the experiment is active
    for e in experiments:
        arm = np.full(n_users, forced[e.name]) if e.name in forced else e.assign(users)
        table = np.stack([a.delta() for a in e.arms])
        deltas.append(table[arm])
    n_days = int(np.ceil(cfg.horizon_days)) + 1
    minutes = np.zeros((n_users, n_days))
    churn_day = np.full(n_users, np.inf)
    sim = FeedSimulator(cfg, n_users, seed=seed)
    sim.key_users(users)
    sim.reset()
    rows = users.copy()  # the user identity of each live row
    bar = tqdm(total=n_users, desc=desc, disable=not progress, leave=False)
    while True:
        day = np.asarray(sim.users.day, np.float64)
        action = np.broadcast_to(base, (rows.size, N_KNOBS)).copy()
        for e, d in zip(experiments, deltas, strict=True):
            on = e.active(day)
            action[on] += d[rows[on]]
        res = sim.step(np.clip(action, -1.0, 1.0))
        idx = np.minimum(day.astype(np.int64), n_days - 1)
        np.add.at(minutes, (rows, idx), np.asarray(res.info["engagement/watch_s"], np.float64) / 60.0)
        churn_day[rows[res.terminated]] = day[res.terminated]
        fin = res.terminated | res.truncated
        if fin.all():
            bar.update(int(fin.sum()))
            break
        if fin.any():
            sim.retire(fin)
            rows = rows[~fin]
            bar.update(int(fin.sum()))
    bar.close()
    return DailyOutcomes(minutes, churn_day)


def _welch(y: Array, arm: Array, treat: int) -> tuple[float, float, float, float]:
    """Treatment-minus-control mean, its 95 % interval and p (Welch's t-test)."""
    t, c = y[arm == treat], y[arm == 0]
    if t.size < 2 or c.size < 2:
        raise EmptyArmError(f"a readout needs >= 2 exposed users per arm; got {t.size} treated, {c.size} control")
    res = stats.ttest_ind(t, c, equal_var=False)
    ci = res.confidence_interval(0.95)
    p = float(res.pvalue) if np.isfinite(res.pvalue) else 1.0
    return float(t.mean() - c.mean()), float(ci.low), float(ci.high), p


def cuped(y: Array, x: Array) -> Array:
    """``y`` adjusted by the pre-period covariate ``x`` (Deng et al. 2013): ``y - theta (x - mean x)``,
    ``theta = cov(y, x) / var(x)`` pooled over arms (the estimate stays unbiased; its variance falls by the
    squared correlation)."""
    vx = x.var()
    if vx <= 0:
        return y
    theta = np.cov(y, x, ddof=0)[0, 1] / vx
    return y - theta * (x - x.mean())


def readout(out: DailyOutcomes, experiments: Sequence[Experiment], day: float, pre_days: float = 0.0,
            alpha: float = 0.05) -> list[dict[str, Any]]:
    """What the platform concludes ``day`` days after each experiment started: one row per (experiment,
    treatment arm, metric) with the estimate, its interval, p, the Benjamini-Hochberg adjusted p over all the
    readout's rows, the sample-ratio check's p, and the decision (``better`` / ``worse`` / ``flat`` at
    ``alpha`` after the correction). With ``pre_days`` > 0 the users' watch minutes over the ``pre_days``
    before the start (where the start leaves room) adjust both metrics (CUPED)."""
    users = np.arange(out.churn_day.size)
    rows: list[dict[str, Any]] = []
    for e in experiments:
        arm = e.assign(users)
        counts = np.bincount(arm, minlength=len(e.arms))
        srm = stats.chisquare(counts, np.array([a.share for a in e.arms]) * counts.sum())
        exposed = out.exposed(e.start_day)
        pre_lo = max(0.0, e.start_day - pre_days)
        x = out.metric("watch_minutes", pre_lo, e.start_day)[exposed] if pre_days > 0 and e.start_day > 0 else None
        until = e.start_day + min(day, e.days)
        for metric in METRICS:
            y = out.metric(metric, e.start_day, until)[exposed]
            if x is not None:
                y = cuped(y, x)
            for t in range(1, len(e.arms)):
                d, lo, hi, p = _welch(y, arm[exposed], t)
                rows.append({"experiment": e.name, "arm": e.arms[t].name, "metric": metric, "day": day,
                             "diff": d, "lo": lo, "hi": hi, "p": p, "srm_p": float(srm.pvalue),
                             "cuped": x is not None,
                             "n": int(exposed.sum())})
    adj = stats.false_discovery_control([r["p"] for r in rows], method="bh")
    for r, q in zip(rows, adj, strict=True):
        r["p_adj"] = float(q)
        r["decision"] = "flat" if q >= alpha else ("better" if r["diff"] > 0 else "worse")
    return rows


def paired_effect(treated: DailyOutcomes, control: DailyOutcomes, metric: str, start: float, until: float,
                  exposed: Array) -> tuple[float, float, float]:
    """Mean per-user difference (same keyed users, same noise) over ``exposed`` users, and its 95 % interval."""
    diff = treated.metric(metric, start, until)[exposed] - control.metric(metric, start, until)[exposed]
    if np.all(diff == diff[0]):
        return float(diff[0]), float(diff[0]), float(diff[0])
    ci = stats.ttest_1samp(diff, 0.0).confidence_interval(0.95)
    return float(diff.mean()), float(ci.low), float(ci.high)


def true_effects(cfg: FeedConfig, experiments: Sequence[Experiment], n_users: int, seed: int, days: Sequence[float],
                 base: Array | None = None, interaction: bool = True,
                 progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, DailyOutcomes]]:
    """The effect each treatment arm would have at launch (every user in it, the other experiments at control)
    against every user at control, on the same keyed users and noise, at each readout day; with
    ``interaction`` and two or more experiments, also the first two experiments' interaction (both first
    treatments for everyone, minus each alone, plus control). Returns the rows and the runs by name."""
    control_forced = {e.name: 0 for e in experiments}
    runs = {"control": run_lab(cfg, experiments, n_users, seed, base, control_forced, progress, "truth: control")}
    rows: list[dict[str, Any]] = []

    def add(name: str, e: Experiment, arm: str, treated: DailyOutcomes, ref: DailyOutcomes, sign: float = 1.0) -> None:
        exposed = ref.exposed(e.start_day)
        for d in days:
            until = e.start_day + min(d, e.days)
            for metric in METRICS:
                m, lo, hi = paired_effect(treated, ref, metric, e.start_day, until, exposed)
                rows.append({"experiment": name, "arm": arm, "metric": metric, "day": d,
                             "diff": sign * m, "lo": sign * lo if sign > 0 else sign * hi,
                             "hi": sign * hi if sign > 0 else sign * lo})

    for e in experiments:
        for t in range(1, len(e.arms)):
            forced = {**control_forced, e.name: t}
            key = f"{e.name}={e.arms[t].name}"
            runs[key] = run_lab(cfg, experiments, n_users, seed, base, forced, progress, f"truth: {key}")
            add(e.name, e, e.arms[t].name, runs[key], runs["control"])
    if interaction and len(experiments) >= 2:
        e1, e2 = experiments[0], experiments[1]
        both = run_lab(cfg, experiments, n_users, seed, base, {**control_forced, e1.name: 1, e2.name: 1},
                       progress, "truth: both")
        runs["both"] = both
        a, b = runs[f"{e1.name}={e1.arms[1].name}"], runs[f"{e2.name}={e2.arms[1].name}"]
        # interaction = both - a - b + control, per user: a DailyOutcomes of the per-user combination
        start = max(e1.start_day, e2.start_day)
        combo = DailyOutcomes(both.minutes - a.minutes - b.minutes + runs["control"].minutes,
                              np.full(n_users, np.inf))
        zero = DailyOutcomes(np.zeros_like(both.minutes), np.full(n_users, np.inf))
        exposed = runs["control"].exposed(start)
        for d in days:
            m, lo, hi = paired_effect(combo, zero, "watch_minutes", start, start + d, exposed)
            ret = [(r.churn_day >= start + d).astype(np.float64)[exposed] for r in (both, a, b, runs["control"])]
            di = ret[0] - ret[1] - ret[2] + ret[3]
            ci = stats.ttest_1samp(di, 0.0).confidence_interval(0.95) if np.ptp(di) > 0 else None
            label = f"{e1.name} x {e2.name}"
            rows.append({"experiment": label, "arm": "interaction", "metric": "watch_minutes", "day": d,
                         "diff": m, "lo": lo, "hi": hi})
            rows.append({"experiment": label, "arm": "interaction", "metric": "retained", "day": d,
                         "diff": float(di.mean()), "lo": float(ci.low) if ci else float(di.mean()),
                         "hi": float(ci.high) if ci else float(di.mean())})
    return rows, runs
