"""One policy interface for every agent and baseline: observations in, actions out.

A policy maps a batch of observations (B, D) to knob actions (B, A) in [-1, 1]. Some baselines
need a different pipeline (pure engagement) or the hidden world (the true-scores policy); they declare it with
``env_overrides`` and ``bind(sim)``, so evaluation treats them all alike.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from rankers.config import KNOB_NAMES, N_KNOBS
from rankers.types import Array

if TYPE_CHECKING:
    from envs.simulator import FeedSimulator


@runtime_checkable
class Policy(Protocol):
    """What evaluation and data collection call."""

    name: str
    env_overrides: dict[str, Any]
    """Config overrides this policy runs under (empty for knob-only policies)."""

    def bind(self, sim: FeedSimulator) -> None:
        """Called once per rollout with the simulator (only the true-scores policy looks at it)."""

    def act(self, obs: Array) -> Array:
        """(B, D) float32 observations -> (B, A) float32 actions in [-1, 1]."""
        ...


def module_digest(*modules: Any) -> str:
    """sha256 (16 hex) of torch modules' parameters and buffers (names, dtypes, shapes and bytes): what a
    trained policy's :meth:`fingerprint` records of its networks."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in sorted(m.state_dict().items()):
            a = t.detach().cpu().contiguous().numpy()
            h.update(f"{i}.{name}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def policy_fingerprint(policy: Any) -> dict[str, Any] | None:
    """What a policy's actions depend on, as JSON-able values (its class, name, env overrides and parameters:
    its ``fingerprint()``), or None if it has no ``fingerprint`` method (its rollouts are never reused)."""
    fp = getattr(policy, "fingerprint", None)
    return fp() if callable(fp) else None


class BasePolicy:
    """The baselines' common part: keeps the simulator it is bound to, fingerprints its class, name and env
    overrides; subclasses implement :meth:`act`."""

    name = "base"
    env_overrides: dict[str, Any] = {}  # noqa: RUF012 - read-only class default

    def bind(self, sim: FeedSimulator) -> None:
        self.sim = sim

    def fingerprint(self) -> dict[str, Any]:
        """Class, name and env overrides (subclasses add their parameters): see :func:`policy_fingerprint`."""
        return {"class": type(self).__qualname__, "name": self.name, "env_overrides": self.env_overrides}

    def act(self, obs: Array) -> Array:
        raise NotImplementedError


class WeightedSum(BasePolicy):
    """The seed's weighted-sum ranking with the seed's rebalancing: the zero action."""

    name = "weighted_sum"

    def act(self, obs: Array) -> Array:
        return np.zeros((obs.shape[0], N_KNOBS), np.float32)


class ConstantKnobs(BasePolicy):
    """A fixed knob vector for every user and request (e.g. a CEM-tuned static baseline)."""

    def __init__(self, action: Array, name: str = "constant") -> None:
        a = np.asarray(action, np.float32)
        if a.shape != (N_KNOBS,) or not np.all(np.isfinite(a)):
            raise ValueError(f"ConstantKnobs needs a finite ({N_KNOBS},) action, got shape {a.shape}")
        if np.any(np.abs(a) > 1.0 + 1e-6):  # e.g. a hand-edited cem.json: clipping would hide it
            i = int(np.argmax(np.abs(a)))
            raise ValueError(f"ConstantKnobs {name!r}: knob {KNOB_NAMES[i]!r} = {a[i]:g} is outside the action "
                             "range [-1, 1]")
        self.action = np.clip(a, -1, 1)
        self.name = name

    def act(self, obs: Array) -> Array:
        return np.broadcast_to(self.action, (obs.shape[0], N_KNOBS)).copy()

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "action": self.action.tolist()}


class Placebo(WeightedSum):
    """The weighted-sum baseline with the completion head's weight multiplied by 3^0.001 (+0.11 %): a policy
    no one would call different. Its paired difference from weighted-sum measures the noise floor of a
    comparison: a world whose trajectory reacts to the slightest change in what is served (which
    creators grow, what trends) moves every user's outcome, common random numbers or not."""

    name = "placebo"
    nudge = 1e-3

    def act(self, obs: Array) -> Array:
        a = super().act(obs)
        a[:, KNOB_NAMES.index("weight.p_complete")] = self.nudge
        return a

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "nudge": self.nudge}


class PureEngagement(WeightedSum):
    """Score = E[watch_time] x p_complete, no rebalancing (seed: "Pure engagement")."""

    name = "engagement"
    env_overrides = {"pipeline": {"score_mode": "engagement", "rebalancing": False}}  # noqa: RUF012


class RandomKnobs(BasePolicy):
    """Uniformly random knobs per request (seeded)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def bind(self, sim: FeedSimulator) -> None:
        """Restarts the stream from (own seed, the simulator's seed): a rollout's actions do not depend
        on which rollouts ran before it (or in which process)."""
        super().bind(sim)
        built = getattr(sim, "built_seed", None)
        self.rng = np.random.default_rng([self.seed, 0 if built is None else int(built)])

    def act(self, obs: Array) -> Array:
        return self.rng.uniform(-1, 1, (obs.shape[0], N_KNOBS)).astype(np.float32)

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "seed": self.seed}


class TrueScores(BasePolicy):
    """Sees the hidden world: a perfect ranker (true head values) and knobs set by hand from each user's
    true state: regret-susceptible users get a heavier regret penalty, bored users more diversity
    and exploration, dissatisfied users in long sessions an early break prompt. Not an upper bound (it
    fell below CEM-tuned on ``small``, 0.730 vs 0.756 under env v2): that is the clairvoyant planner of
    ``agents.planner``. Called ``oracle`` before env v3."""

    name = "true_scores"
    # stage 3 is the world's truth whichever ranker the world's pipeline has (a noiseless noisy-oracle scorer)
    env_overrides = {"pipeline": {"scorer": "noisy_oracle", "scorer_noise": 0.0, "scorer_cold_noise": 0.0}}  # noqa: RUF012

    def act(self, obs: Array) -> Array:
        u = self.sim.users
        b = obs.shape[0]
        a = np.zeros((b, N_KNOBS), np.float32)
        k = {n: i for i, n in enumerate(KNOB_NAMES)}
        a[:, k["weight.p_regret"]] = np.clip((u.suscept - 0.2) * 5.0, -0.5, 1.0)
        bored = u.boredom.max(axis=1)
        a[:, k["diversity_strength"]] = np.clip((bored - 0.5) * 2.0, -1.0, 1.0)
        a[:, k["explore_share"]] = np.where(u.cold, 0.5, 0.0)
        low = u.long_sat < u.cfg.users.satisfaction_ref
        a[:, k["break_prompt"]] = np.where(low & (u.s_minutes > 30.0), 1.0, 0.0)
        return a


class MenuKnobs:
    """Wraps a policy that answers menu indices (discrete PPO / DiscreteCQL on the knob menu) into a
    knob policy: each index mapped to its preset's knob vector (envs.feed_env.MENU_MATRIX)."""

    env_overrides: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, inner: Any, name: str) -> None:
        self.inner, self.name = inner, name

    def bind(self, sim: FeedSimulator) -> None:
        self.inner.bind(sim)

    def fingerprint(self) -> dict[str, Any] | None:
        inner = policy_fingerprint(self.inner)
        return None if inner is None else {"class": "MenuKnobs", "name": self.name, "inner": inner}

    def act(self, obs: Array) -> Array:
        from envs.feed_env import MENU_MATRIX

        return MENU_MATRIX[np.asarray(self.inner.act(obs), np.int64).reshape(-1)]


class FrameStack:
    """Each user's last ``frames`` observations side by side, oldest first, as SB3's ``VecFrameStack`` builds them
    in training (zeros before the user's first observation): the memory of a policy trained with
    ``PPOParams.frame_stack``. Kept per built row of the bound simulator (``uid``), started afresh where a new
    user makes their first request (``steps == 0``)."""

    def __init__(self, frames: int) -> None:
        if frames < 2:
            raise ValueError(f"FrameStack needs frames >= 2, got {frames}")
        self.frames = frames
        self.sim: Any = None
        self.stacks = np.zeros((0, 0), np.float32)

    def bind(self, sim: FeedSimulator) -> None:
        self.sim = sim
        self.stacks = np.zeros((sim.n_users0, self.frames * sim.layout.dim), np.float32)

    def push(self, obs: Array) -> Array:
        """(B, frames * D): ``obs`` (B, D) of the batch's rows now, pushed onto their users' stacks."""
        if self.sim is None:
            raise RuntimeError("FrameStack.push before bind(sim): it keeps one stack per user of the simulator")
        rows, d = self.sim.uid, obs.shape[1]
        s = self.stacks[rows]
        s[self.sim.steps == 0] = 0.0
        s = np.concatenate([s[:, d:], obs.astype(np.float32)], axis=1)
        self.stacks[rows] = s
        return s


class SessionHeld:
    """Serves ``inner`` the way an agent trained with ``decision="session"`` (:mod:`envs.sessions`) acts: it is
    asked for a user's knobs when their session starts (the simulator's ``new_session``), and those knobs are held
    for every request of the session. ``inner`` must act on any subset of the batch's observations (a trained
    agent does; a policy that reads the bound simulator's rows does not)."""

    def __init__(self, inner: Any, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or inner.name
        self.env_overrides = getattr(inner, "env_overrides", {})
        self.sim: Any = None
        self.held = np.zeros((0, N_KNOBS), np.float32)

    def bind(self, sim: FeedSimulator) -> None:
        if not hasattr(sim, "new_session") or not hasattr(sim, "uid"):
            raise TypeError(f"SessionHeld({self.name}) needs a FeedSimulator (new_session, uid); got "
                            f"{type(sim).__name__}")
        self.inner.bind(sim)
        self.sim = sim
        self.held = np.zeros((sim.n_users0, N_KNOBS), np.float32)

    def fingerprint(self) -> dict[str, Any] | None:
        inner = policy_fingerprint(self.inner)
        return None if inner is None else {"class": "SessionHeld", "name": self.name, "inner": inner}

    def act(self, obs: Array) -> Array:
        if self.sim is None:
            raise RuntimeError(f"SessionHeld({self.name}).act before bind(sim): it reads when sessions start")
        rows, start = self.sim.uid, self.sim.new_session
        if start.any():
            self.held[rows[start]] = np.asarray(self.inner.act(obs[start]), np.float32)
        return self.held[rows].copy()


BASELINES: dict[str, type[BasePolicy]] = {
    "weighted_sum": WeightedSum,
    "engagement": PureEngagement,
    "random": RandomKnobs,
    "true_scores": TrueScores,
    "placebo": Placebo,
}


def make_baseline(name: str, seed: int = 0) -> BasePolicy:
    """A baseline by name: ``weighted_sum``, ``engagement``, ``random``, ``true_scores``, ``placebo``."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}: choose one of {sorted(BASELINES)}")
    cls = BASELINES[name]
    return cls(seed) if cls is RandomKnobs else cls()

