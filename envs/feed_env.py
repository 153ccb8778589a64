"""Gymnasium and stable-baselines3 faces of :class:`envs.simulator.FeedSimulator`.

- :class:`FeedEnv`: one user (``gymnasium.Env``), for the checkers, d3rlpy and simple loops.
- :class:`FeedVectorEnv`: B users stepped at once (``gymnasium.vector.VectorEnv``, next-step
  autoreset as Gymnasium 1.0's ``CartPoleVectorEnv``).
- :class:`SB3FeedVecEnv`: stable-baselines3 ``VecEnv`` (same-step autoreset,
  ``terminal_observation``, ``TimeLimit.truncated``).
``discrete=True`` (or the ``Discrete`` classes) swaps the knob box for a ``Discrete(P)`` menu of
named presets (``rankers.knobs.KNOB_PRESETS``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from envs.config import FeedConfig, make_config
from envs.simulator import STEP_METRICS, FeedSimulator
from envs.worlds import make_simulator
from rankers.config import KNOB_NAMES, N_KNOBS
from rankers.knobs import KNOB_PRESETS, validate_action
from rankers.types import Array

PRESET_NAMES: tuple[str, ...] = tuple(KNOB_PRESETS)
PRESET_MATRIX: Array = np.stack([KNOB_PRESETS[n] for n in PRESET_NAMES]).astype(np.float32)


def resolve_config(config: FeedConfig | None, preset: str, overrides: dict[str, Any]) -> FeedConfig:
    if config is not None:
        if not isinstance(config, FeedConfig):
            raise TypeError(f"config must be a FeedConfig, got {type(config).__name__}")
        return config.replace(**overrides) if overrides else config
    return make_config(preset, **overrides)


def _spaces(cfg: FeedConfig, dim: int, discrete: bool) -> tuple[spaces.Box, spaces.Space]:
    obs = spaces.Box(-10.0, 10.0, (dim,), np.float32)
    act: spaces.Space = (spaces.Discrete(len(PRESET_NAMES)) if discrete
                         else spaces.Box(-1.0, 1.0, (N_KNOBS,), np.float32))
    return obs, act


def check_num_envs(num_envs: Any) -> int:
    """``num_envs`` as an int, or ``ValueError``: an integer >= 1 (2.7 or "4" used to pass through ``int()``)."""
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs={num_envs!r} is invalid: must be an integer >= 1 (users stepped together)")
    return int(num_envs)


def to_knob_action(action: Any, discrete: bool, n: int) -> Array:
    """Discrete preset indices (B,) -> (B, A) knob vectors; a continuous action passes through."""
    if not discrete:
        return np.asarray(action)
    a = np.asarray(action)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"discrete action must be {n} integer preset indices, got {action!r} (dtype {a.dtype})")
    if a.shape == () and n == 1:
        a = a.reshape(1)
    if a.shape != (n,) or (not np.issubdtype(a.dtype, np.integer) and not np.all(np.mod(a, 1) == 0)):
        raise ValueError(f"discrete action must be {n} integer preset indices, got shape {a.shape} dtype {a.dtype}")
    if np.any((a < 0) | (a >= len(PRESET_NAMES))):
        raise ValueError(f"discrete action out of range: presets are 0..{len(PRESET_NAMES) - 1} {PRESET_NAMES}")
    return PRESET_MATRIX[a.astype(np.int64)]


class FeedEnv(gym.Env):
    """One user's life on the feed. One step = one feed request for the next ``slate_size`` videos.

    Args:
        preset: ``tiny`` | ``small`` | ``default`` | ``large``.
        config: a full :class:`FeedConfig` (overrides ``preset``).
        discrete: use the ``Discrete(P)`` preset menu instead of the knob box.
        **overrides: config fields to replace (nested sections accept dicts).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, preset: str = "default", config: FeedConfig | None = None, discrete: bool = False,
                 **overrides: Any) -> None:
        self.cfg = resolve_config(config, preset, overrides)
        self.discrete = discrete
        self.sim: FeedSimulator | None = None
        self._seed: int | None = None
        from envs.observation import ObservationLayout

        self.layout = ObservationLayout(self.cfg)
        self.observation_space, self.action_space = _spaces(self.cfg, self.layout.dim, discrete)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Array, dict]:
        super().reset(seed=seed)
        if seed is not None or self.sim is None:
            s = seed if seed is not None else int(self.np_random.integers(2**31))
            self.sim = FeedSimulator(self.cfg, 1, seed=s)
        obs = self.sim.reset()
        return obs[0], {}

    def step(self, action: Any) -> tuple[Array, float, bool, bool, dict[str, Any]]:
        if self.sim is None:
            raise RuntimeError("call reset() before step()")
        a = to_knob_action(action, self.discrete, 1)
        if not self.discrete and np.shape(a) != (N_KNOBS,):  # one user: (A,) only, not (1, A) or (A, 1)
            raise ValueError(f"action has shape {np.shape(a)}, expected ({N_KNOBS},) = the knobs {KNOB_NAMES}")
        res = self.sim.step(np.asarray(a).reshape(1, -1))
        info = {k: float(res.info[k][0]) for k in STEP_METRICS}
        return res.obs[0], float(res.reward[0]), bool(res.terminated[0]), bool(res.truncated[0]), info


class DiscreteFeedEnv(FeedEnv):
    """:class:`FeedEnv` with the ``Discrete(P)`` preset menu."""

    def __init__(self, preset: str = "default", config: FeedConfig | None = None, **overrides: Any) -> None:
        super().__init__(preset=preset, config=config, discrete=True, **overrides)


class FeedVectorEnv(gym.vector.VectorEnv):
    """B users stepped at once (next-step autoreset: the step after an episode ends returns the
    new user's first observation with reward 0). ``worlds`` / ``world_steps`` spread the users over that
    many worlds, each rebuilt from a fresh seed every ``world_steps`` steps (:class:`envs.worlds.WorldMix`;
    a world's end truncates its users' episodes)."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": [], "autoreset_mode": "NextStep"}

    def __init__(self, num_envs: int = 64, preset: str = "default", config: FeedConfig | None = None,
                 discrete: bool = False, worlds: int = 1, world_steps: int = 0, **overrides: Any) -> None:
        self.cfg = resolve_config(config, preset, overrides)
        self.num_envs = check_num_envs(num_envs)
        self.discrete = discrete
        self.sim = make_simulator(self.cfg, self.num_envs, None, worlds, world_steps)
        self.single_observation_space, self.single_action_space = _spaces(self.cfg, self.sim.layout.dim, discrete)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._autoreset = np.zeros(self.num_envs, bool)
        self.layout = self.sim.layout

    def reset(self, *, seed: int | list[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Array, dict]:
        if isinstance(seed, list):
            seed = seed[0]
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
            self.sim.seed(seed)
        obs = self.sim.reset()
        self._autoreset[:] = False
        return obs, {}

    def step(self, actions: Any) -> tuple[Array, Array, Array, Array, dict[str, Any]]:
        a = to_knob_action(actions, self.discrete, self.num_envs)
        m = self._autoreset
        if m.all():
            # Every user is starting over: reset only (no step), exactly as a single FeedEnv would.
            if not self.discrete:
                validate_action(a, self.num_envs)  # bad actions fail on every step
            obs = self.sim.reset(m)
            self._autoreset = np.zeros(self.num_envs, bool)
            info = {k: np.zeros(self.num_envs, np.float32) for k in STEP_METRICS}
            info.update({f"_{k}": np.zeros(self.num_envs, bool) for k in STEP_METRICS})
            z = np.zeros(self.num_envs, bool)
            return obs, np.zeros(self.num_envs, np.float32), z, z.copy(), info
        res = self.sim.step(a)
        obs, rew, term, trunc = res.obs, res.reward, res.terminated, res.truncated
        if m.any():
            # The step just taken was wasted on finished users: report their new user's first
            # observation, reward 0, no metrics (``_key`` masks are False there).
            obs = np.where(m[:, None], self.sim.reset(m), obs)
            rew = np.where(m, 0.0, rew).astype(np.float32)
            term = term & ~m
            trunc = trunc & ~m
        self._autoreset = term | trunc
        info: dict[str, Any] = {}
        for k in STEP_METRICS:
            info[k] = np.where(m, 0.0, res.info[k]).astype(np.float32)
            info[f"_{k}"] = ~m
        return obs, rew.astype(np.float32), term, trunc, info


class DiscreteFeedVectorEnv(FeedVectorEnv):
    def __init__(self, num_envs: int = 64, preset: str = "default", config: FeedConfig | None = None,
                 **overrides: Any) -> None:
        super().__init__(num_envs=num_envs, preset=preset, config=config, discrete=True, **overrides)


def knob_names() -> tuple[str, ...]:
    return KNOB_NAMES
