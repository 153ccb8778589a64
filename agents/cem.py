"""A tuned static baseline: the best constant knob vector found by the cross-entropy method on a
given simulation budget (the baseline KuaiSim reports against). RL has to beat this, not only the
seed's defaults.

Each iteration evaluates ``n_candidates`` constant actions at once in one batched simulator
(``users_per_candidate`` users each, ``steps_per_iter`` requests, finished users replaced), scores
each by its mean reward per request, and refits a diagonal Gaussian to the elite. With ``worlds`` > 1
the users are spread over that many worlds (:class:`envs.worlds.WorldMix`, each rebuilt every
``world_steps`` steps) and every candidate has users in each of them, so the vector is chosen for
worlds in general rather than for one world's corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from envs.config import FeedConfig
from envs.worlds import make_simulator
from rankers.config import N_KNOBS
from rankers.types import Array


@dataclass
class CEMResult:
    best_action: Array  # (A,) float32, the final mean
    steps_used: int
    history: list[dict[str, float]] = field(default_factory=list)


def cem_tune(cfg: FeedConfig, budget_steps: int, seed: int = 0, n_candidates: int = 16,
             users_per_candidate: int = 32, steps_per_iter: int = 100, elite_frac: float = 0.25,
             init_std: float = 0.5, min_std: float = 0.05, progress: bool = False, worlds: int = 1,
             world_steps: int = 0) -> CEMResult:
    """Cross-entropy search over constant actions within ``budget_steps`` user-requests."""
    if n_candidates < 2 or users_per_candidate < 1 or steps_per_iter < 1 or not 0 < elite_frac <= 1:
        raise ValueError("cem_tune needs n_candidates >= 2, users_per_candidate >= 1, steps_per_iter >= 1, "
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
        action = np.tile(cand, (users_per_candidate, 1)).astype(np.float32)  # row r serves candidate r % C
        total = np.zeros(b)
        for _ in range(steps_per_iter):
            res = sim.step(action)
            total += res.reward
            done = res.terminated | res.truncated
            if done.any():
                sim.reset(done)
        used += per_iter
        fitness = total.reshape(users_per_candidate, n_candidates).mean(axis=0) / steps_per_iter
        elite = cand[np.argsort(-fitness)[:n_elite]]
        mean = elite.mean(axis=0)
        std = np.maximum(elite.std(axis=0), min_std)
        hist.append({"iter": it, "best_fitness": float(fitness.max()), "mean_fitness": float(fitness.mean()),
                     "fitness_of_mean": float(fitness[0])})
    return CEMResult(np.clip(mean, -1, 1).astype(np.float32), used, hist)
