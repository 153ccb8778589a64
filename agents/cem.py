"""A tuned static baseline: the best constant knob vector found by the cross-entropy method on a
given simulation budget (the baseline KuaiSim reports against). RL has to beat this, not only the
seed's defaults.

Each iteration evaluates ``n_candidates`` constant actions at once, one batched simulator per training world
(``users_per_candidate`` users each, ``steps_per_iter`` requests, finished users replaced), scores
each by its mean reward per request, and refits a diagonal Gaussian to the elite. With ``worlds`` > 1
the users are spread over that many worlds (:class:`envs.world_mix.WorldMix`, each rebuilt every
``world_steps`` steps) and every candidate has users in each of them, so the vector is chosen for
worlds in general rather than for one world's corpus.

With ``constraints`` (the verdicts' :class:`agents.verdict.Tolerance`), the search is held to the same
guardrails as the verdicts: every iteration also serves the zero action (the weighted-sum baseline)
to its own users in the same worlds, and a candidate whose new-creator impression share falls below
the baseline's by more than ``reach_tol``, or whose regret rate rises above it by more than
``regret_tol``, ranks after every candidate that keeps both (infeasible ones by how far they miss).
The reward alone does not see creators' reach, so without this a search may buy retention with it.
A candidate keeps a guardrail when the one-sided upper bound (``guard_z`` standard errors, over the
iteration's users) of its shortfall is inside the tolerance, not only its point estimate: a search
that sees ~30 users per candidate would otherwise keep vectors that the evaluation then finds beyond
it (docs/point7.md: one guarded vector raised regret by 0.3 pp against a 0.2 pp tolerance).

With ``paired`` (the default), the candidates are compared on the same users: user slot i of every
candidate starts the same sequence of users (``FeedSimulator.key_users``: clones with the same hidden
state and random numbers), and at the start of every iteration all clones of a slot become copies of
the one that served the last iteration's mean (``FeedSimulator.copy_users``), so the candidates branch
from the state the mean's policy led to and a difference in fitness is the candidates' doing rather than the
luck of who each one served or where the last iteration left them. Unpaired, each candidate serves
its own users and the between-user spread enters every comparison (six unpaired searches on
``default`` landed 1.2 to 8.2 pp apart). The history reports ``fitness_diff_se``, the standard error
of a candidate's fitness difference from the current mean's, averaged over candidates: the noise each
iteration's ranking works against (on ``default``, ~2.5x smaller paired than unpaired). The price:
each iteration's world sees ``users_per_candidate`` distinct users' tastes, in ``n_candidates``
variants, rather than as many distinct users as rows.

With ``segments`` (an :class:`agents.segments.Segmenter`), the search is **segment-CEM**: every candidate is
one knob vector per observed segment (``(S, A)``), each row is served its candidate's vector for the
segment its current observation falls in, and each segment's Gaussian is refitted to the elite by that
segment's fitness: the reward its users collected while they were in it (per user slot and request, as
the constant search's). The segments' vectors are drawn independently, so one simulation runs S searches
at once on the same users; with one segment it is the constant search, draw for draw.

On an ``executor`` (``offline_data.executor``: in this process, or Ray), each iteration is one job per
training world: the world's simulator and its share of the rows (``users_per_candidate / worlds`` user slots
of every candidate) run the iteration's ``steps_per_iter`` requests and return each row's fitness sums and
guardrail counts; the driver joins them in row order and draws the next candidates. The worlds share no
state (a :class:`envs.world_mix.WorldMix` steps its worlds one after another on their own rows), so the
split changes nothing: the driver keeps each world between iterations (in this process as it is, for Ray
pickled) and the result is the same bytes with ``executor=None``, the in-process executor and Ray with any
number of workers (``tests/test_cem_executor.py``). One world is one job: parallelism is at most ``worlds``,
and a Ray job also pays for pickling its world twice per iteration. A Ray worker killed mid-iteration has
its job run again from the same pickled world (Ray's retries, ``offline_data.executor``), so the result is
unchanged.

What the split changes from the single batched simulator of earlier versions: a world is reset only when
one of its own rows ended, where the batched simulator also reset the other worlds with an empty mask.
With ``paired`` users (the default) an empty reset draws nothing, so a paired search, and any search over
one world, gives the earlier bytes; an *unpaired* search over several worlds draws its users from each
world's stream in another order (a new, equally valid draw).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from agents.segments import Segmenter
from agents.verdict import Tolerance
from envs.config import FeedConfig
from envs.learned import provide_models, served_models
from envs.world_mix import WorldLife, world_sizes
from offline_data.executor import Executor, LocalExecutor
from rankers.config import N_KNOBS
from rankers.types import Array

_GUARDRAIL_COUNTS: tuple[str, ...] = ("engagement/videos", "creators/new_creator_impressions", "engagement/regrets")
"""Per-step counts (``info``) summed per candidate for the guardrails."""


def rate_gaps(num: Array, den: Array, reference: int) -> tuple[Array, Array]:
    """Per candidate, the rate ``sum(num) / sum(den)`` and the standard error of its difference from the
    ``reference`` candidate's, from per-user-slot counts ``num``, ``den`` (U, C) (the delta method over the
    U slots: slot i of every candidate is one unit, so paired users' correlation is accounted for)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    n = num.shape[0]
    tot = np.maximum(den.sum(axis=0), 1.0)
    rate = num.sum(axis=0) / tot
    if n < 2:
        return rate, np.zeros_like(rate)
    infl = n * (num - rate * den) / tot  # (U, C) each slot's influence on its candidate's rate
    se = (infl - infl[:, [reference]]).std(axis=0, ddof=1) / np.sqrt(n)
    return rate, se


def rank_candidates(fitness: Array, share: Array, regret: Array, constraints: Tolerance | None = None,
                    reference: int = 1, share_se: Array | float = 0.0, regret_se: Array | float = 0.0,
                    z: float = 0.0) -> tuple[Array, Array]:
    """Candidates best first, and how far each misses the guardrails (0 = keeps both).

    Without ``constraints``: by fitness alone. With them: the candidates whose new-creator share's fall
    below ``share[reference]`` and whose regret rate's rise above ``regret[reference]`` are within
    ``reach_tol`` and ``regret_tol`` even at ``z`` standard errors (``share_se``, ``regret_se``: of each
    candidate's difference from the reference) come first, by fitness; then the others, by how far they
    miss (the sum of both shortfalls), then fitness."""
    fitness = np.asarray(fitness, np.float64)
    if constraints is None:
        return np.argsort(-fitness, kind="stable"), np.zeros(fitness.size)  # ties: the lower index first
    miss = (np.maximum(share[reference] - share + z * np.asarray(share_se) - constraints.reach_tol, 0.0)
            + np.maximum(regret - regret[reference] + z * np.asarray(regret_se) - constraints.regret_tol, 0.0))
    return np.lexsort((-fitness, miss)), miss


@dataclass
class CEMResult:
    best_action: Array  # (A,) float32, the final mean
    steps_used: int
    history: list[dict[str, float]] = field(default_factory=list)
    means: list[Array] = field(default_factory=list)
    """The mean after each iteration (clipped, float32): ``means[-1]`` is ``best_action``."""
    iter_steps: int = 0
    """User-requests one iteration spends (candidates x users per candidate x steps per iteration)."""

    def mean_after(self, steps: int) -> Array:
        """The search's mean once ``steps`` user-requests were spent: that of its first ``steps // iter_steps``
        iterations (the zero action, where it started, before the first), exactly what a search with that
        budget returns, since the iterations do not depend on the budget. The main job's agents start from
        it, so that their anchor and their own training together spend CEM-tuned's budget."""
        return mean_after(self.means, self.iter_steps, steps)


def mean_after(means: list, iter_steps: int, steps: int) -> Array:
    """:meth:`CEMResult.mean_after` of a search's per-iteration ``means`` (e.g. read back from ``cem.json``)."""
    if steps < 0 or iter_steps < 1:
        raise ValueError(f"mean_after needs steps >= 0 and iter_steps >= 1; got {steps}, {iter_steps}")
    k = steps // iter_steps
    if k > len(means):
        raise ValueError(f"{steps} user-requests buy {k} CEM iterations, but the search ran {len(means)} "
                         f"({len(means) * iter_steps} requests)")
    return np.zeros(N_KNOBS, np.float32) if k == 0 else np.asarray(means[k - 1], np.float32)


class _World(WorldLife):
    """World ``world`` of a search's ``worlds`` (:class:`envs.world_mix.WorldLife`: what
    :class:`envs.world_mix.WorldMix` does for that world's rows, for them alone), with its rows' current
    observations: what one CEM job steps and the driver keeps between iterations. Row r serves candidate
    ``r % n_candidates`` and is user slot ``r // n_candidates`` of the world."""

    def __init__(self, cfg: FeedConfig, n_users: int, first_row: int, seed: int, world: int, worlds: int,
                 world_steps: int, n_candidates: int, paired: bool) -> None:
        super().__init__(cfg, n_users, seed, world, worlds, world_steps)
        if paired:  # the mix's user slot of each row (a keyed user is drawn from its identity)
            self.sim.key_users((first_row + np.arange(n_users)) // n_candidates)
        self.obs = self.sim.reset()


@dataclass(frozen=True)
class _Iteration:
    """What every world's job of one iteration shares (sent once to a cluster)."""

    cfg: FeedConfig
    models: dict[str, Any] | None
    """The trained models the world serves (a fresh worker is given them before it builds or rebuilds one)."""
    cand: Array
    """(C, S, A) float32 the candidates."""
    steps: int
    branch: bool
    """Every slot's clones start as copies of the row that served candidate 0 (paired, after the first)."""
    segments: Segmenter | None
    ship: bool
    """The world travels pickled (to and from another process) rather than as the object."""


@dataclass(frozen=True)
class _WorldJob:
    """One world's share of one iteration: its state (None: build it, as the search's first iteration does)."""

    world: int
    n_users: int
    first_row: int
    """The world's first row in the search's batch."""
    seed: int
    worlds: int
    world_steps: int
    paired: bool
    state: _World | bytes | None
    it: int

    @property
    def label(self) -> str:
        return f"CEM iteration {self.it} world {self.world}"


def _run_world(common: _Iteration, job: _WorldJob) -> tuple[_World | bytes, Array, dict[str, Array]]:
    """One world's rows through one iteration: the world after it, and per row its reward sums by segment
    (S, n) and the guardrails' counts (n,) each. What an executor runs; depends only on its inputs."""
    if common.models:
        provide_models(common.cfg, common.models)  # a worker is a fresh process: the driver's models are not there
    n_cand = common.cand.shape[0]
    if job.state is None:
        w = _World(common.cfg, job.n_users, job.first_row, job.seed, job.world, job.worlds, job.world_steps, n_cand,
                   job.paired)
    else:
        w = pickle.loads(job.state) if isinstance(job.state, bytes) else job.state
    sim, n = w.sim, w.sim.n_users
    rows = np.arange(n)
    table = common.cand[rows % n_cand]  # (n, S, A): row r serves candidate r % C
    obs = w.obs
    if common.branch:  # every slot's clones branch from the row that served the mean (candidate 0)
        src = rows // n_cand * n_cand
        sim.copy_users(src)
        obs = obs[src]
    total = np.zeros((common.cand.shape[1], n))
    counts = {k: np.zeros(n) for k in _GUARDRAIL_COUNTS}
    for _ in range(common.steps):
        seg = np.zeros(n, np.int64) if common.segments is None else common.segments.assign(obs, sim.layout)
        res = w.step(table[rows, seg])
        total[seg, rows] += res.reward
        for k in counts:
            counts[k] += res.info[k]
        obs = res.obs
        done = res.terminated | res.truncated
        if done.any():
            obs = np.where(done[:, None], w.reset(done), obs)
    w.obs = obs
    if not common.ship:
        return w, total, counts
    import cloudpickle  # the learned pipeline's index holds a lambda, which pickle refuses

    return cloudpickle.dumps(w, protocol=pickle.HIGHEST_PROTOCOL), total, counts


USERS_PER_CANDIDATE = 32
"""Users each CEM candidate is scored on by default (split evenly over the training worlds)."""


def cem_tune(cfg: FeedConfig, budget_steps: int, seed: int = 0, n_candidates: int = 16,
             users_per_candidate: int = USERS_PER_CANDIDATE, steps_per_iter: int = 100, elite_frac: float = 0.25,
             init_std: float = 0.5, min_std: float = 0.05, progress: bool = False, worlds: int = 1,
             world_steps: int = 0, constraints: Tolerance | None = None, guard_z: float = 1.645,
             paired: bool = True, segments: Segmenter | None = None, init_mean: Array | None = None,
             executor: Executor | None = None) -> CEMResult:
    """Cross-entropy search over constant actions within ``budget_steps`` user-requests (see the module
    docstring for ``constraints``, ``guard_z``, ``paired``, ``segments`` and ``executor``). With ``segments``
    the result's ``best_action`` and ``means`` are (S, A) tables, one row per segment. ``init_mean`` (A,) or
    (S, A) starts the search there instead of at the zero action (e.g. segment-CEM refining a constant search's
    mean). ``executor``: where each iteration's worlds run (None: in this process, as the in-process executor);
    the result does not depend on it."""
    if (n_candidates < 2 + (constraints is not None) or users_per_candidate < 1 or steps_per_iter < 1
            or not 0 < elite_frac <= 1):
        raise ValueError("cem_tune needs n_candidates >= 2 (3 with constraints), users_per_candidate >= 1, "
                         "steps_per_iter >= 1, "
                         f"0 < elite_frac <= 1; got {n_candidates}, {users_per_candidate}, {steps_per_iter}, "
                         f"{elite_frac}")
    if not np.isfinite(guard_z) or guard_z < 0:
        raise ValueError(f"guard_z={guard_z} must be a finite number >= 0 (standard errors of the guardrails' margin)")
    rng = np.random.default_rng(seed)
    n_seg = 1 if segments is None else segments.n_segments
    mean = np.zeros((n_seg, N_KNOBS))
    if init_mean is not None:
        init = np.asarray(init_mean, np.float64)
        if init.shape not in ((N_KNOBS,), (n_seg, N_KNOBS)) or not np.all(np.isfinite(init)):
            raise ValueError(f"init_mean must be finite with shape ({N_KNOBS},) or ({n_seg}, {N_KNOBS}); "
                             f"got {init.shape}")
        mean[:] = np.clip(init, -1, 1)
    std = np.full((n_seg, N_KNOBS), init_std)
    b = n_candidates * users_per_candidate
    per_iter = b * steps_per_iter
    n_iter = max(budget_steps // per_iter, 1)
    n_elite = max(round(elite_frac * n_candidates), 1)
    if not isinstance(worlds, (int, np.integer)) or worlds < 1:
        raise ValueError(f"worlds={worlds!r} is invalid: must be an int >= 1")
    if not isinstance(world_steps, (int, np.integer)) or world_steps < 0:
        raise ValueError(f"world_steps={world_steps!r} is invalid: must be an int >= 0 (0 = never rebuilt)")
    if users_per_candidate % worlds:
        raise ValueError(f"users_per_candidate={users_per_candidate} must be a multiple of worlds={worlds} "
                         "(every candidate gets the same number of users in each world)")
    ex = executor if executor is not None else LocalExecutor()
    ship = not isinstance(ex, LocalExecutor)
    models = served_models(cfg)  # None when the world serves no trained model; raises here when one is missing
    # the worlds of make_simulator(cfg, b, seed, worlds, world_steps): contiguous rows, whole user slots each
    sizes = world_sizes(b, worlds)
    first = np.r_[0, np.cumsum(sizes)].tolist()
    states: list[_World | bytes | None] = [None] * worlds
    used = 0
    hist: list[dict[str, float]] = []
    means: list[Array] = []
    for it in tqdm(range(n_iter), desc="CEM", disable=not progress):
        cand = np.clip(mean + std * rng.standard_normal((n_candidates, n_seg, N_KNOBS)), -1, 1)
        cand[0] = np.clip(mean, -1, 1)  # keep the current mean in the race
        if constraints is not None:
            cand[1] = 0.0  # the weighted-sum baseline: the reference of the guardrails
        common = _Iteration(cfg, models, cand.astype(np.float32), steps_per_iter, paired and it > 0, segments, ship)
        jobs = [_WorldJob(k, sizes[k], first[k], seed, worlds, world_steps, paired, states[k], it)
                for k in range(worlds)]
        out = ex.map(_run_world, jobs, common=common)
        states = [o[0] for o in out]
        total = np.concatenate([o[1] for o in out], axis=1)  # (S, B) in row order
        counts = {k: np.concatenate([o[2][k] for o in out]) for k in _GUARDRAIL_COUNTS}
        used += per_iter
        per_slot = total.reshape(n_seg, users_per_candidate, n_candidates) / steps_per_iter
        fitness_seg = per_slot.mean(axis=1)  # (S, C)
        fitness = fitness_seg.sum(axis=0)
        per_slot = per_slot.sum(axis=0)
        gaps = per_slot[:, 1:] - per_slot[:, :1]  # one slot: no spread to measure
        diff_se = float(gaps.std(axis=0, ddof=1).mean() / np.sqrt(users_per_candidate)) if gaps.shape[0] > 1 else np.nan
        slots = {k: v.reshape(users_per_candidate, n_candidates) for k, v in counts.items()}
        videos = slots["engagement/videos"]
        share, share_se = rate_gaps(slots["creators/new_creator_impressions"], videos, reference=1)
        regret, regret_se = rate_gaps(slots["engagement/regrets"], videos, reference=1)
        for g in range(n_seg):
            order, miss = rank_candidates(fitness_seg[g], share, regret, constraints, 1, share_se, regret_se, guard_z)
            elite = cand[order[:n_elite], g]
            mean[g] = elite.mean(axis=0)
            std[g] = np.maximum(elite.std(axis=0), min_std)
        means.append(np.clip(mean if segments is not None else mean[0], -1, 1).astype(np.float32))
        hist.append({"iter": it, "best_fitness": float(fitness.max()), "mean_fitness": float(fitness.mean()),
                     "fitness_of_mean": float(fitness[0]), "new_creator_share_of_mean": float(share[0]),
                     "regret_rate_of_mean": float(regret[0]),
                     "fitness_diff_se": diff_se})
        if constraints is not None:  # share of the candidates that kept both guardrails
            hist[-1]["feasible"] = float((miss == 0).mean())
    return CEMResult(means[-1], used, hist, means, per_iter)
