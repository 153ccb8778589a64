"""The clairvoyant planner's choices distilled into a policy that sees only the observation.

The planner (:mod:`agents.planner`) bounds what deciding by the user's state can gain, but it decides with the
hidden state and one period of the future. How much of its gain a policy can take *from the observation
alone* is a second, non-RL measurement: record the planner's commitments on training worlds
(``branched_rollout(record=True)``: the observation at each period's start and every arm's survival score at
its end), fit each arm's advantage over the base arm (arm 0, CEM-tuned) as a function of the observation, and
serve the arm with the largest predicted advantage (:class:`DistilledPlanner`). This is a one-period
contextual bandit fitted by least squares, not reinforcement learning: it ignores what a choice does beyond
its period, so it measures the observable part of the planner's *myopic* gain.

The fit is ridge regression on the standardised observation and its squares (deterministic: numpy's
solver in float64). The penalty is chosen on held-out data: the last world's commitments when there are
several worlds (the last fifth of the commitments with one), then the model is refitted on all of them.
Advantages are noisy (one draw of each branch's future), so an arm is served only where its predicted
advantage is above 0; elsewhere the base arm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.planner import Decisions, KeyedResult, branched_rollout
from agents.policies import BasePolicy, ConstantKnobs
from envs.config import FeedConfig
from rankers.config import N_KNOBS
from rankers.types import Array

PENALTIES: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
"""Ridge penalties tried (per row: the penalty is scaled by the number of fitted rows)."""


@dataclass(frozen=True)
class ArmAdvantages:
    """A linear model of each arm's advantage over arm 0 on the features of :meth:`features`."""

    mean: Array  # (D,) observation mean
    scale: Array  # (D,) observation standard deviation (1 where constant)
    coef: Array  # (2D + 1, K - 1) weights of [1, z, z^2] for arms 1..K-1
    penalty: float  # the ridge penalty chosen on held-out users
    held_out_r2: float  # the held-out share of advantage variance explained, pooled over arms

    def features(self, obs: Array) -> Array:
        z = (np.asarray(obs, np.float64) - self.mean) / self.scale
        return np.concatenate([np.ones((z.shape[0], 1)), z, z * z], axis=1)

    def predict(self, obs: Array) -> Array:
        """(B, K) predicted advantage of each arm over arm 0 (column 0 is 0)."""
        adv = self.features(obs) @ self.coef
        return np.concatenate([np.zeros((adv.shape[0], 1)), adv], axis=1)

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "penalty": self.penalty, "held_out_r2": self.held_out_r2}


def _ridge(x: Array, y: Array, penalty: float) -> Array:
    reg = penalty * x.shape[0] * np.eye(x.shape[1])
    reg[0, 0] = 0.0  # the intercept is not shrunk
    return np.linalg.solve(x.T @ x + reg, x.T @ y)


def fit_advantages(decisions: Sequence[Decisions], penalties: Sequence[float] = PENALTIES) -> ArmAdvantages:
    """Fits :class:`ArmAdvantages` on the planner's recorded commitments (one :class:`Decisions` per world)."""
    if not decisions:
        raise ValueError("fit_advantages needs the recorded decisions of at least one planner rollout")
    k = {d.scores.shape[1] for d in decisions}
    if len(k) != 1 or k.pop() < 2:
        raise ValueError("every recorded rollout must have the same number (>= 2) of arms")
    obs = np.concatenate([d.obs for d in decisions]).astype(np.float64)
    scores = np.concatenate([d.scores for d in decisions]).astype(np.float64)
    if obs.shape[0] < 10:
        raise ValueError(f"fit_advantages needs at least 10 recorded commitments, got {obs.shape[0]}")
    adv = scores[:, 1:] - scores[:, :1]
    mean = obs.mean(axis=0)
    sd = obs.std(axis=0)
    scale = np.where(sd > 1e-8, sd, 1.0)
    probe = ArmAdvantages(mean, scale, np.zeros((2 * obs.shape[1] + 1, adv.shape[1])), 0.0, 0.0)
    x = probe.features(obs)
    cut = x.shape[0] - decisions[-1].obs.shape[0] if len(decisions) > 1 else int(0.8 * x.shape[0])
    if min(cut, x.shape[0] - cut) < 10:
        raise ValueError(f"fit_advantages needs at least 10 commitments to fit and 10 held out (the last rollout's), "
                         f"got {cut} and {x.shape[0] - cut}")
    best: tuple[float, float] | None = None
    for p in penalties:
        w = _ridge(x[:cut], adv[:cut], p)
        resid = adv[cut:] - x[cut:] @ w
        r2 = 1.0 - float((resid ** 2).sum() / max(((adv[cut:] - adv[:cut].mean(axis=0)) ** 2).sum(), 1e-12))
        if best is None or r2 > best[1]:
            best = (p, r2)
    assert best is not None
    return ArmAdvantages(mean, scale, _ridge(x, adv, best[0]), best[0], best[1])


class DistilledPlanner(BasePolicy):
    """Serves, for each observation, the arm with the largest predicted advantage over arm 0 (arm 0 where none
    is predicted above 0): the planner's choices as far as the observation predicts them."""

    def __init__(self, arms: Array, model: ArmAdvantages, name: str = "distilled_planner") -> None:
        a = np.asarray(arms, np.float32)
        if a.ndim != 2 or a.shape[1] != N_KNOBS or a.shape[0] != model.coef.shape[1] + 1:
            raise ValueError(f"DistilledPlanner needs ({model.coef.shape[1] + 1}, {N_KNOBS}) arm vectors, "
                             f"got {a.shape}")
        self.arms = np.clip(a, -1.0, 1.0)
        self.model = model
        self.name = name

    def act(self, obs: Array) -> Array:
        return self.arms[self.model.predict(obs).argmax(axis=1)]

    def choices(self, obs: Array) -> Array:
        """(K,) share of the rows of ``obs`` served by each arm."""
        pick = self.model.predict(obs).argmax(axis=1)
        return np.bincount(pick, minlength=self.arms.shape[0]) / max(pick.size, 1)

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "arms": self.arms.tolist(), "model": self.model.to_json()}


def distill_planner(arms: Sequence[ConstantKnobs], cfg: FeedConfig, n_users: int, seeds: Sequence[int],
                    period: int, progress: bool = False,
                    recorded: Callable[[int], KeyedResult | None] | None = None,
                    keep: Callable[[int, KeyedResult], None] | None = None) -> DistilledPlanner:
    """Records the planner over ``arms`` on the training worlds ``seeds`` (``n_users`` each, commitments every
    ``period`` requests), fits :class:`ArmAdvantages` and returns the :class:`DistilledPlanner`.
    ``recorded(seed)`` may return a stored recording (a rollout store), ``keep(seed, result)`` stores a new one."""
    if len(arms) < 2:
        raise ValueError(f"distill_planner needs at least 2 arms to choose between, got {len(arms)}")
    runs = []
    for s in seeds:
        res = recorded(s) if recorded is not None else None
        if res is None or res.decisions is None:
            res = branched_rollout(arms, cfg, n_users, s, period, name=f"distill: planner world {s}",
                                   progress=progress, record=True)
            if keep is not None:
                keep(s, res)
        assert res.decisions is not None
        runs.append(res.decisions)
    model = fit_advantages(runs)
    return DistilledPlanner(np.stack([a.action for a in arms]), model)
