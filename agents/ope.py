"""Off-policy evaluation of a policy from logged data, before it is run.

Estimators of the (truncated, discounted) value ``E[sum_{t<H} gamma^t r_t]`` of a target policy
from trajectories logged by a behaviour policy with recorded log-propensities:
per-decision importance sampling (IS), weighted per-decision IS (WIS), doubly robust (DR, Jiang & Li
2016) with a fitted Q-function, and fitted-Q evaluation (FQE, d3rlpy's implementation).

Continuous knob policies are deterministic, so their density is a delta; for IS they are smoothed
into ``N(pi(s), sigma^2)`` per knob (``gaussian_logp``) — state the sigma with the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rankers.types import Array


@dataclass(frozen=True)
class Trajectories:
    """Logged episodes padded to (E, H); ``mask`` marks real steps."""

    rewards: Array  # (E, H) float64
    mask: Array  # (E, H) bool
    behaviour_logp: Array  # (E, H) float64 log mu(a_t | s_t)
    target_logp: Array  # (E, H) float64 log pi(a_t | s_t)

    @property
    def n_episodes(self) -> int:
        return int(self.rewards.shape[0])


def pad_episodes(episode: Array, step: Array, values: dict[str, Array], horizon: int) -> dict[str, Array]:
    """Flat logged arrays (M,) with episode ids and step indices -> (E, H) arrays (+ ``mask``),
    keeping steps < ``horizon``."""
    ids, e_idx = np.unique(episode, return_inverse=True)
    keep = step < horizon
    out = {"mask": np.zeros((ids.size, horizon), bool)}
    out["mask"][e_idx[keep], step[keep]] = True
    for k, v in values.items():
        arr = np.zeros((ids.size, horizon), np.float64)
        arr[e_idx[keep], step[keep]] = v[keep]
        out[k] = arr
    return out


def _discounts(h: int, gamma: float) -> Array:
    return gamma ** np.arange(h, dtype=np.float64)


def _cum_weights(tr: Trajectories, clip: float | None) -> Array:
    logw = np.cumsum(np.where(tr.mask, tr.target_logp - tr.behaviour_logp, 0.0), axis=1)
    w = np.exp(np.minimum(logw, 700.0))
    if clip is not None:
        w = np.minimum(w, clip)
    return np.where(tr.mask, w, 0.0)


def per_decision_is(tr: Trajectories, gamma: float, clip: float | None = None) -> float:
    """PDIS: mean over episodes of ``sum_t gamma^t w_{0:t} r_t``."""
    w = _cum_weights(tr, clip)
    return float((w * tr.rewards * _discounts(tr.rewards.shape[1], gamma)).sum(axis=1).mean())


def weighted_is(tr: Trajectories, gamma: float, clip: float | None = None) -> float:
    """Weighted PDIS: the cumulative weights at each t are normalised over episodes."""
    w = _cum_weights(tr, clip)
    norm = w.sum(axis=0)
    wn = np.where(norm > 0, w / np.where(norm > 0, norm, 1.0), 0.0)
    return float((wn * tr.rewards * _discounts(tr.rewards.shape[1], gamma)).sum())


def doubly_robust(tr: Trajectories, q_logged: Array, v_target: Array, gamma: float, clip: float | None = None) -> float:
    """DR (Jiang & Li 2016): ``sum_t gamma^t [w_t (r_t - q(s_t,a_t)) + w_{t-1} v(s_t)]``.

    Args:
        q_logged: (E, H) fitted Q of the logged actions.
        v_target: (E, H) fitted value of the target policy, ``Q(s_t, pi(s_t))``.
    """
    w = _cum_weights(tr, clip)
    w_prev = np.concatenate([np.ones((w.shape[0], 1)), w[:, :-1]], axis=1) * tr.mask
    terms = w * (tr.rewards - q_logged) + w_prev * v_target
    return float((np.where(tr.mask, terms, 0.0) * _discounts(w.shape[1], gamma)).sum(axis=1).mean())


def gaussian_logp(action: Array, mean: Array, sigma: float) -> Array:
    """(M, A) actions under independent ``N(mean, sigma^2)`` per knob -> (M,) log-densities."""
    z = (action - mean) / sigma
    return (-0.5 * z * z - np.log(sigma) - 0.5 * np.log(2 * np.pi)).sum(axis=-1)


def greedy_logp(action: Array, greedy: Array, n_actions: int, epsilon: float) -> Array:
    """Log-probability of discrete ``action`` (M,) under epsilon-greedy around ``greedy`` (M,)."""
    p = np.where(action == greedy, 1 - epsilon + epsilon / n_actions, epsilon / n_actions)
    return np.log(p)
