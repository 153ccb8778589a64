"""A tuned static baseline: the best constant knob vector found by the cross-entropy method on a
given simulation budget (the baseline KuaiSim reports against). RL has to beat this, not only the
seed's defaults.

Each iteration evaluates ``n_candidates`` constant actions at once in one batched simulator
(``users_per_candidate`` users each, ``steps_per_iter`` requests, finished users replaced), scores
each by its mean reward per request, and refits a diagonal Gaussian to the elite. With ``worlds`` > 1
the users are spread over that many worlds (:class:`envs.worlds.WorldMix`, each rebuilt every
``world_steps`` steps) and every candidate has users in each of them, so the vector is chosen for
worlds in general rather than for one world's corpus.

With ``constraints`` (the verdicts' :class:`agents.verdict.Tolerance`), the search is held to the same
guardrails as the verdicts: every iteration also serves the zero action (the weighted-sum baseline)
to its own users in the same worlds, and a candidate whose new-creator impression share falls below
the baseline's by more than ``reach_tol``, or whose regret rate rises above it by more than
``regret_tol``, ranks after every candidate that keeps both (infeasible ones by how far they miss).
The reward alone does not see creators' reach, so without this a search may buy retention with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from agents.verdict import Tolerance
from envs.config import FeedConfig
from envs.worlds import make_simulator
from rankers.config import N_KNOBS
from rankers.types import Array

_GUARDRAIL_COUNTS: tuple[str, ...] = ("engagement/videos", "creators/new_creator_impressions", "engagement/regrets")
"""Per-step counts (``info``) summed per candidate for the guardrails."""


def rank_candidates(fitness: Array, share: Array, regret: Array,
                    constraints: Tolerance | None = None, reference: int = 1) -> tuple[Array, Array]:
    """Candidates best first, and how far each misses the guardrails (0 = keeps both).

    Without ``constraints``: by fitness alone. With them: the candidates whose new-creator share is at
    least ``share[reference] - reach_tol`` and whose regret rate is at most ``regret[reference] +
    regret_tol`` come first, by fitness; then the others, by how far they miss (the sum of both
    shortfalls), then fitness."""
    fitness = np.asarray(fitness, np.float64)
    if constraints is None:
        return np.argsort(-fitness), np.zeros(fitness.size)
    miss = (np.maximum(share[reference] - constraints.reach_tol - share, 0.0)
            + np.maximum(regret - regret[reference] - constraints.regret_tol, 0.0))
    return np.lexsort((-fitness, miss)), miss


@dataclass
class CEMResult:
    best_action: Array  # (A,) float32, the final mean
    steps_used: int
    history: list[dict[str, float]] = field(default_factory=list)


def cem_tune(cfg: FeedConfig, budget_steps: int, seed: int = 0, n_candidates: int = 16,
             users_per_candidate: int = 32, steps_per_iter: int = 100, elite_frac: float = 0.25,
             init_std: float = 0.5, min_std: float = 0.05, progress: bool = False, worlds: int = 1,
             world_steps: int = 0, constraints: Tolerance | None = None) -> CEMResult:
    """Cross-entropy search over constant actions within ``budget_steps`` user-requests (see the module
    docstring for ``constraints``)."""
    if (n_candidates < 2 + (constraints is not None) or users_per_candidate < 1 or steps_per_iter < 1
            or not 0 < elite_frac <= 1):
        raise ValueError("cem_tune needs n_candidates >= 2 (3 with constraints), users_per_candidate >= 1, "
                         "steps_per_iter >= 1, "
                         f"0 < elite_frac <= 1; got {n_candidates}, {users_per_candidate}, {steps_per_iter}, "
                         f"{elite_frac}")
    rng = np.random.default_rng(seed)
    mean = np.zeros(N_KNOBS)
    std = np.full(N_KNOBS, init_std)
    b = n_candidates * users_per_candidate
    per_iter = b * steps_per_iter
    n_iter = max(budget_steps // per_iter, 1)
    n_elite = max(round(elite_frac * n_candidates), 1)
    if users_per_candidate % worlds:
        raise ValueError(f"users_per_candidate={users_per_candidate} must be a multiple of worlds={worlds} "
                         "(every candidate gets the same number of users in each world)")
    sim = make_simulator(cfg, b, seed, worlds, world_steps)
    sim.reset()
    used = 0
    hist: list[dict[str, float]] = []
    for it in tqdm(range(n_iter), desc="CEM", disable=not progress):
        cand = np.clip(mean + std * rng.standard_normal((n_candidates, N_KNOBS)), -1, 1)
        cand[0] = np.clip(mean, -1, 1)  # keep the current mean in the race
        if constraints is not None:
            cand[1] = 0.0  # the weighted-sum baseline: the reference of the guardrails
        action = np.tile(cand, (users_per_candidate, 1)).astype(np.float32)  # row r serves candidate r % C
        total = np.zeros(b)
        counts = {k: np.zeros(b) for k in _GUARDRAIL_COUNTS}
        for _ in range(steps_per_iter):
            res = sim.step(action)
            total += res.reward
            for k in counts:
                counts[k] += res.info[k]
            done = res.terminated | res.truncated
            if done.any():
                sim.reset(done)
        used += per_iter
        fitness = total.reshape(users_per_candidate, n_candidates).mean(axis=0) / steps_per_iter
        per_cand = {k: v.reshape(users_per_candidate, n_candidates).sum(axis=0) for k, v in counts.items()}
        videos = np.maximum(per_cand["engagement/videos"], 1.0)
        share = per_cand["creators/new_creator_impressions"] / videos
        regret = per_cand["engagement/regrets"] / videos
        order, miss = rank_candidates(fitness, share, regret, constraints)
        elite = cand[order[:n_elite]]
        mean = elite.mean(axis=0)
        std = np.maximum(elite.std(axis=0), min_std)
        hist.append({"iter": it, "best_fitness": float(fitness.max()), "mean_fitness": float(fitness.mean()),
                     "fitness_of_mean": float(fitness[0]), "new_creator_share_of_mean": float(share[0]),
                     "regret_rate_of_mean": float(regret[0])})
        if constraints is not None:  # share of the candidates that kept both guardrails
            hist[-1]["feasible"] = float((miss == 0).mean())
    return CEMResult(np.clip(mean, -1, 1).astype(np.float32), used, hist)
