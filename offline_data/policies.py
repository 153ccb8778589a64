"""Behaviour policies that log propensities: each returns its actions *and* the log-probability
of the logged action under the policy that chose it.

- :class:`GaussianKnobs`: the weighted-sum baseline (zero action), or any static knob vector, with
  randomized knobs; each knob is drawn from a normal N(mean, sigma^2) **truncated to [-1, 1]**
  (inverse-CDF sampling, so a fixed number of uniform draws per step). The logged log-probability
  is the exact log-density of the truncated normal at the stored action, so importance weights
  need no correction for clipping.
- :class:`EpsilonMenu`: the discrete knob menu; entry 0 (the seed baseline) with probability
  ``1 - epsilon``, otherwise a preset drawn uniformly from **all** P presets (so preset 0 has total
  probability ``1 - epsilon + epsilon / P``, any other entry ``epsilon / P``). Exact log-probabilities.
- :class:`CallablePolicy`: logs any policy ``obs (B, D) -> action``. Its log-probability comes from
  the callable's return value ``(action, log_prob)``, or from a ``log_prob(obs, action)`` method of
  the callable; if it provides neither, the logged log-probability is ``NaN`` (unknown propensity:
  the data are fine for CQL and behaviour cloning, not for importance-weighted estimators).

Every policy draws its randomness from the ``rng`` passed to :meth:`sample` (collection gives it a
child stream of its seed); none uses the global ``np.random``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy.special import ndtr, ndtri

from rankers.config import N_KNOBS
from rankers.types import Array

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


def menu_indices(action: Any, who: str) -> Array:
    """``action`` as int64 menu indices, or ``ValueError`` naming ``who`` and the first value that is not an
    integer (2.7, NaN, a bool or a string: an int64 cast would truncate 2.7 to 2). The range is the caller's
    to check (the env's menu)."""
    a = np.asarray(action)
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    if a.dtype.kind != "f":
        raise ValueError(f"{who} returned discrete actions of dtype {a.dtype}: expected integer menu indices")
    bad = ~np.isfinite(a) | (a != np.round(a))
    if np.any(bad):
        i = np.argwhere(bad)[0]
        raise ValueError(f"{who} returned discrete action {a[tuple(i)].item()!r} (slot {tuple(i)}): expected an "
                         "integer menu index")
    return a.astype(np.int64)


@runtime_checkable
class BehaviourPolicy(Protocol):
    """What :func:`offline_data.collect.collect` rolls out."""

    discrete: bool
    """True: actions are (B,) int64 menu indices; False: (B, A) float32 knob vectors in [-1, 1]."""

    def sample(self, obs: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        """obs (B, D) float32 -> (action, log_prob (B,) float64; NaN where unknown)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description recorded in the dataset's ``meta.json``."""
        ...


class GaussianKnobs:
    """Randomized knobs around a centre: each knob is drawn from N(mean, sigma^2) truncated to [-1, 1].

    With ``mean = 0`` (the default) this is the weighted-sum baseline with randomized knobs; with the
    CEM-tuned vector as ``mean`` it is the tuned static system with exploration noise (the log a deployed,
    tuned system would write).

    Args:
        sigma: scalar or (A,) standard deviation of the untruncated normal, each > 0.
        mean: scalar or (A,) centre of the untruncated normal, each in [-1, 1].
    """

    discrete = False

    def __init__(self, sigma: float | Array = 0.3, mean: float | Array = 0.0) -> None:
        s = np.broadcast_to(np.asarray(sigma, np.float64), (N_KNOBS,)).copy()
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValueError(f"GaussianKnobs sigma must be finite and > 0, got {sigma!r}")
        m = np.broadcast_to(np.asarray(mean, np.float64), (N_KNOBS,)).copy()
        if not np.all(np.isfinite(m)) or np.any(np.abs(m) > 1.0):
            raise ValueError(f"GaussianKnobs mean must be finite and in [-1, 1], got {mean!r}")
        self.sigma = s  # (A,) float64
        self.mean = m  # (A,) float64
        self._lo = ndtr((-1.0 - m) / s)  # (A,) standard-normal CDF at the lower truncation point
        self._hi = ndtr((1.0 - m) / s)
        self._log_z = np.log(self._hi - self._lo)  # log of the truncated normaliser, per knob

    def sample(self, obs: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        b = obs.shape[0]
        u = rng.random((b, N_KNOBS))  # (B, A) float64 in [0, 1)
        z = ndtri(self._lo + u * (self._hi - self._lo))  # inverse CDF of the truncated standard normal
        action = np.clip(self.mean + z * self.sigma, -1.0, 1.0).astype(np.float32)
        return action, self.log_prob(obs, action)

    def log_prob(self, obs: Array, action: Array) -> Array:
        """(B,) float64 exact log-density of the truncated normal at ``action`` (B, A); -inf outside [-1, 1]."""
        a = np.asarray(action, np.float64)
        z = (a - self.mean) / self.sigma
        lp = (-0.5 * z * z - np.log(self.sigma) - _LOG_SQRT_2PI - self._log_z).sum(axis=-1)
        inside = np.all(np.abs(a) <= 1.0, axis=-1)
        return np.where(inside, lp, -np.inf)

    def describe(self) -> dict[str, Any]:
        return {"kind": "gaussian_knobs", "discrete": False, "sigma": self.sigma.tolist(), "mean": self.mean.tolist(),
                "distribution": "per-knob N(mean, sigma^2) truncated to [-1, 1]; log_prob = exact truncated density"}


class EpsilonMenu:
    """Discrete knob menu: entry 0 with prob ``1 - epsilon``, else uniform over all ``menu_size``."""

    discrete = True

    def __init__(self, epsilon: float = 0.3, menu_size: int | None = None) -> None:
        if menu_size is None:
            from envs.feed_env import MENU_NAMES

            menu_size = len(MENU_NAMES)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"EpsilonMenu epsilon must be in [0, 1], got {epsilon!r}")
        if menu_size < 1:
            raise ValueError(f"EpsilonMenu menu_size must be >= 1, got {menu_size!r}")
        self.epsilon = float(epsilon)
        self.menu_size = int(menu_size)

    def probs(self) -> Array:
        """(P,) float64 action probabilities (state-independent); sums to 1."""
        p = np.full(self.menu_size, self.epsilon / self.menu_size)
        p[0] += 1.0 - self.epsilon
        return p

    def sample(self, obs: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        b = obs.shape[0]
        explore = rng.random(b) < self.epsilon  # fixed draws per step whatever happens
        uniform = rng.integers(0, self.menu_size, b)
        action = np.where(explore, uniform, 0).astype(np.int64)
        return action, self.log_prob(obs, action)

    def log_prob(self, obs: Array, action: Array) -> Array:
        """(B,) float64 log-probabilities of menu indices ``action`` (B,)."""
        with np.errstate(divide="ignore"):
            return np.log(self.probs())[np.asarray(action, np.int64)]

    def describe(self) -> dict[str, Any]:
        return {"kind": "epsilon_menu", "discrete": True, "epsilon": self.epsilon, "menu_size": self.menu_size,
                "probs": self.probs().tolist()}


class CallablePolicy:
    """Logs any policy given as a callable ``obs (B, D) -> action``.

    The log-probability of each logged action is taken, in this order, from: the callable's return
    value when it returns a tuple ``(action, log_prob)``; a ``log_prob(obs, action)`` method on the
    callable (or on the object whose ``act`` method was given); otherwise it is ``NaN``: the
    propensity is unknown and must not be used for importance weighting.

    Args:
        fn: the policy; a callable or an object with ``act(obs)`` (e.g. ``agents.policies.Policy``).
        discrete: True if actions are (B,) menu indices.
        name: recorded in ``meta.json``.
        seeded: if True, ``fn`` is called as ``fn(obs, rng)`` with the collection's policy stream.
    """

    def __init__(self, fn: Callable[..., Any] | Any, discrete: bool = False, name: str | None = None,
                 seeded: bool = False) -> None:
        owner = fn
        if not callable(fn) and hasattr(fn, "act"):
            fn = fn.act
        if not callable(fn):
            raise TypeError(f"CallablePolicy needs a callable or an object with act(obs), got {type(fn).__name__}")
        self.fn = fn
        self._owner = owner
        self.discrete = bool(discrete)
        self.seeded = bool(seeded)
        self.name = name or getattr(owner, "name", None) or getattr(fn, "__name__", type(owner).__name__)

    def sample(self, obs: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        out = self.fn(obs, rng) if self.seeded else self.fn(obs)
        b = obs.shape[0]
        if isinstance(out, tuple):
            action, logp = out
            logp = np.asarray(logp, np.float64).reshape(b)
        else:
            action = out
            lp_fn = getattr(self._owner, "log_prob", None) or getattr(self.fn, "log_prob", None)
            logp = np.asarray(lp_fn(obs, action), np.float64).reshape(b) if lp_fn else np.full(b, np.nan)
        action = np.asarray(action)
        if self.discrete:
            if action.shape != (b,):
                raise ValueError(f"policy {self.name!r} returned discrete actions of shape {action.shape}, "
                                 f"expected ({b},)")
            action = menu_indices(action, f"policy {self.name!r}")
        else:
            if action.shape != (b, N_KNOBS):
                raise ValueError(f"policy {self.name!r} returned actions of shape {action.shape}, "
                                 f"expected ({b}, {N_KNOBS})")
            action = np.clip(action.astype(np.float32), -1.0, 1.0)
        return action, logp

    def describe(self) -> dict[str, Any]:
        return {"kind": "callable", "discrete": self.discrete, "name": str(self.name),
                "log_prob": "from the policy (NaN where it gives none)"}


def make_behaviour(kind: str, *, sigma: float = 0.3, epsilon: float = 0.3) -> BehaviourPolicy:
    """``gaussian`` -> :class:`GaussianKnobs`, ``epsilon_menu`` -> :class:`EpsilonMenu`,
    ``weighted_sum`` -> the deterministic zero action (log-probability 0 for a point mass)."""
    if kind == "gaussian":
        return GaussianKnobs(sigma)
    if kind == "epsilon_menu":
        return EpsilonMenu(epsilon)
    if kind == "weighted_sum":
        def zero(obs: Array) -> tuple[Array, Array]:
            return np.zeros((obs.shape[0], N_KNOBS), np.float32), np.zeros(obs.shape[0])

        return CallablePolicy(zero, name="weighted_sum")
    raise ValueError(f"unknown behaviour policy {kind!r}: choose gaussian, epsilon_menu, weighted_sum")

