"""Gymnasium and stable-baselines3 faces of :class:`envs.simulator.FeedSimulator`.

- :class:`FeedEnv`: one user (``gymnasium.Env``), for the checkers, d3rlpy and simple loops.
- :class:`FeedVectorEnv`: B users stepped at once (``gymnasium.vector.VectorEnv``, next-step
  autoreset as Gymnasium 1.0's ``CartPoleVectorEnv``).
- :class:`SB3FeedVecEnv`: stable-baselines3 ``VecEnv`` (same-step autoreset,
  ``terminal_observation``, ``TimeLimit.truncated``).
``discrete=True`` (or the ``Discrete`` classes) swaps the knob box for a ``Discrete(P)`` menu of
named knob settings (``rankers.knobs.KNOB_MENU``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.vector.utils import batch_space

from envs.config import FeedConfig, make_config
from envs.sessions import SessionSteps, check_decision, env_simulator, metric_keys
from envs.simulator import FeedSimulator
from envs.world_mix import WorldMix
from rankers.config import KNOB_NAMES, N_KNOBS
from rankers.knobs import KNOB_MENU, validate_action
from rankers.types import Array

MENU_NAMES: tuple[str, ...] = tuple(KNOB_MENU)
MENU_MATRIX: Array = np.stack([KNOB_MENU[n] for n in MENU_NAMES]).astype(np.float32)
RENDER_MODES: tuple[str, ...] = ()
"""The render modes the envs support: none (a feed has no picture; read ``info`` and ``layout`` instead)."""


class ResetNeededError(ResetNeeded, RuntimeError):
    """``step`` before the first ``reset``: gymnasium's ``ResetNeeded`` (and a ``RuntimeError``)."""


class UnsupportedRenderModeError(TypeError, ValueError):
    """A ``render_mode`` the envs do not support. A ``TypeError`` too, so that callers that try a render mode
    and fall back to none on ``TypeError`` (stable-baselines3's ``make_vec_env`` asks for ``"rgb_array"``) work."""


def autoreset_next_step() -> Any:
    """The value of ``metadata["autoreset_mode"]`` for next-step autoreset in the installed gymnasium:
    ``gymnasium.vector.AutoresetMode.NEXT_STEP`` where it exists (1.1 on; 1.4's vector wrappers refuse the
    string), else the string ``"NextStep"`` (1.0, the pinned version)."""
    mode = getattr(gym.vector, "AutoresetMode", None)
    return "NextStep" if mode is None else mode.NEXT_STEP


def check_render_mode(render_mode: Any) -> None:
    """``None`` passes; any other value raises :class:`UnsupportedRenderModeError` naming the supported modes."""
    if render_mode is not None and render_mode not in RENDER_MODES:
        raise UnsupportedRenderModeError(
            f"render_mode={render_mode!r} is not supported: the feedgym envs render nothing (supported modes: "
            f"{list(RENDER_MODES)}); pass render_mode=None and read the per-step metrics in info")


def check_started(started: bool, who: str) -> None:
    """:class:`ResetNeededError` unless the env was reset."""
    if not started:
        raise ResetNeededError(f"Cannot call {who}.step() before calling reset(): its users are not initialised")


def resolve_config(config: FeedConfig | None, preset: str, overrides: dict[str, Any]) -> FeedConfig:
    if config is not None:
        if not isinstance(config, FeedConfig):
            raise TypeError(f"config must be a FeedConfig, got {type(config).__name__}")
        return config.replace(**overrides) if overrides else config
    return make_config(preset, **overrides)


def env_spaces(cfg: FeedConfig, dim: int, discrete: bool) -> tuple[spaces.Box, spaces.Space]:
    """One user's observation space (``dim`` float32 values) and action space (the knob box, or the menu)."""
    obs = spaces.Box(-10.0, 10.0, (dim,), np.float32)
    act: spaces.Space = (spaces.Discrete(len(MENU_NAMES)) if discrete
                         else spaces.Box(-1.0, 1.0, (N_KNOBS,), np.float32))
    return obs, act


def check_num_envs(num_envs: Any) -> int:
    """``num_envs`` as an int, or ``ValueError``: an integer >= 1 (2.7 or "4" used to pass through ``int()``)."""
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs={num_envs!r} is invalid: must be an integer >= 1 (users stepped together)")
    return int(num_envs)


def _as_array(action: Any, discrete: bool, n: int) -> Array:
    """``np.asarray(action)``, or a ``ValueError`` naming the expected shape for a ragged nested sequence."""
    try:
        return np.asarray(action)
    except ValueError as e:  # numpy: "setting an array element with a sequence ... inhomogeneous shape"
        want = (f"({n},) integer menu indices" if discrete
                else f"({N_KNOBS},) knob values" if n == 1 else f"({n}, {N_KNOBS}) = (users, knobs)")
        raise ValueError(f"action is a ragged sequence (rows of different lengths), expected an array of shape "
                         f"{want}") from e


def to_knob_action(action: Any, discrete: bool, n: int) -> Array:
    """Discrete menu indices (B,) -> (B, A) knob vectors; a continuous action passes through (as an array)."""
    a = _as_array(action, discrete, n)
    if not discrete:
        return a
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"discrete action must be {n} integer menu indices, got {action!r} (dtype {a.dtype})")
    if a.shape == () and n == 1:
        a = a.reshape(1)
    if a.shape != (n,) or (not np.issubdtype(a.dtype, np.integer) and not np.all(np.mod(a, 1) == 0)):
        raise ValueError(f"discrete action must be {n} integer menu indices, got shape {a.shape} dtype {a.dtype}")
    if np.any((a < 0) | (a >= len(MENU_NAMES))):
        raise ValueError(f"discrete action out of range: presets are 0..{len(MENU_NAMES) - 1} {MENU_NAMES}")
    return MENU_MATRIX[a.astype(np.int64)]


class FeedEnv(gym.Env):
    """One user's life on a short-video feed, one feed request per step.

    ## Description

    A simulated platform (corpus, creators, a 4-stage recommender) serves one user, who watches a slate of
    ``pipeline.slate_size`` videos per request, sessions within days, and returns or churns between them.
    The agent does not pick videos: it sets how the recommender's last stage (rebalancing, exploration,
    new-creator slots, take-a-break prompts) and its score combination behave for this request. The hidden
    user (true interests, mood, boredom, satisfaction) is never observed.

    ## Action Space

    ``Box(-1, 1, (A,), float32)``, one entry per knob (``knob_names()``, ``rankers.knobs``): eight head-weight
    multipliers (``weight.<head>``: the seed weight times ``head_weight_range ** a``), ``explore_share`` and
    ``new_creator_share`` (seed share plus a bounded shift), ``diversity_strength`` and ``adaptation_strength``
    (``1 + a``), ``break_prompt`` (prompt threshold ``60 min * break_range ** -a``). The zero action is the
    seed's weighted-sum baseline exactly. With ``discrete=True`` (``DiscreteFeedEnv``):
    ``Discrete(P)``, a menu of named knob settings (``MENU_NAMES``; index 0 is the baseline).

    ## Observation Space

    ``Box(-10, 10, (D,), float32)``: what a production system can observe, never the hidden truth. Read it by
    name through ``env.layout`` (``obs[env.layout["session.minutes"]]``; ``env.layout.slices`` lists the
    fields, ``env.layout.names`` every scalar) rather than by offset, since fields get added: ``user.*`` (the
    system's user embedding and recent engagement rates, tenure, time since the last visit, cold start,
    follows, ...), ``session.*`` (videos and minutes so far, sessions today, topics engaged and skipped,
    break due), ``episode.day`` and ``pool.summary`` (spread, uncertainty, topic entropy, new-creator share
    and size of the candidate pool).

    ## Rewards

    Set by ``config.reward.mode``: ``retention`` (default: 1 when a session ends and the user comes back
    within the horizon, else 0), ``churn`` (-1 when the user churns), ``churn_expected`` (minus the churn
    probability at each session end), ``engagement`` (watch minutes) or ``composite`` (a weighted sum).
    Per-step metrics (``envs.simulator.STEP_METRICS``: engagement, slate, creators, retention) are in ``info``.

    ## Starting State

    ``reset`` draws a new user of the world (a share ``users.cold_start_share`` of them just signed up) at day
    0 of their first session. ``reset(seed=s)`` rebuilds the world and the user stream from ``s``; a reset
    without a seed starts the next user in the same world.

    ## Episode End

    ``terminated``: the user churned (no return within ``churn_days`` days). ``truncated``: the
    ``horizon_days`` horizon (30 days on ``default``) or the ``max_steps`` cap was reached. Never both.

    ## Arguments

    ```python
    gym.make("feedgym/ForYouFeed-v0", preset="small", reward={"mode": "churn"})
    ```

    Args:
        preset: a world preset, ``envs.config.PRESETS`` (``tiny``, ``small``, ``default``, ``large``, ...).
        config: a full :class:`FeedConfig` (overrides ``preset``).
        discrete: the ``Discrete(P)`` knob menu instead of the knob box.
        render_mode: ``None`` only (nothing is rendered); another mode raises
            :class:`UnsupportedRenderModeError`.
        decision: ``"request"`` (default: one step is one feed request) or ``"session"`` (one step is the user's
            whole session under knobs chosen when it starts, :mod:`envs.sessions`: the reward is the session's,
            ``info`` sums its requests' metrics and counts them in ``session/requests``).
        **overrides: config fields to replace (nested sections accept dicts).
    """

    # not a ClassVar (ruff's RUF012): gymnasium's Env declares metadata an instance attribute, which mypy holds to
    metadata: dict[str, Any] = {"render_modes": list(RENDER_MODES)}  # noqa: RUF012

    def __init__(self, preset: str = "default", config: FeedConfig | None = None, discrete: bool = False,
                 render_mode: str | None = None, decision: str = "request", **overrides: Any) -> None:
        check_render_mode(render_mode)
        self.render_mode = render_mode
        self.cfg = resolve_config(config, preset, overrides)
        self.discrete = discrete
        self.decision = check_decision(decision)
        self.sim: FeedSimulator | WorldMix | SessionSteps | None = None
        self._seed: int | None = None
        from envs.observation import ObservationLayout

        self.layout = ObservationLayout(self.cfg)
        self.observation_space, self.action_space = env_spaces(self.cfg, self.layout.dim, discrete)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Array, dict]:
        super().reset(seed=seed)
        if seed is not None or self.sim is None:
            s = seed if seed is not None else int(self.np_random.integers(2**31))
            self.sim = env_simulator(self.cfg, 1, s, 1, 0, self.decision)
        obs = self.sim.reset()
        return obs[0], {}

    def step(self, action: Any) -> tuple[Array, float, bool, bool, dict[str, Any]]:
        check_started(self.sim is not None, type(self).__name__)
        assert self.sim is not None
        a = to_knob_action(action, self.discrete, 1)
        if not self.discrete and np.shape(a) != (N_KNOBS,):  # one user: (A,) only, not (1, A) or (A, 1)
            raise ValueError(f"action has shape {np.shape(a)}, expected ({N_KNOBS},) = the knobs {KNOB_NAMES}")
        res = self.sim.step(np.asarray(a).reshape(1, -1))
        info = {k: float(res.info[k][0]) for k in metric_keys(self.decision)}
        return res.obs[0], float(res.reward[0]), bool(res.terminated[0]), bool(res.truncated[0]), info


class DiscreteFeedEnv(FeedEnv):
    """:class:`FeedEnv` with the ``Discrete(P)`` knob menu (``feedgym/ForYouFeedDiscrete-v0``).

    ## Description

    As :class:`FeedEnv`; only the action differs.

    ## Action Space

    ``Discrete(P)``: index ``i`` serves the knob setting ``MENU_NAMES[i]`` (``rankers.knobs.KNOB_MENU``:
    seed_baseline, explore_more, exploit_only, creator_boost, diverse, satisfaction, watch_time, wellbeing);
    0 is the weighted-sum baseline.

    ## Observation Space, Rewards, Episode End

    As :class:`FeedEnv`.

    ## Arguments

    ``preset``, ``config``, ``render_mode`` and ``**overrides`` as :class:`FeedEnv`.
    """

    def __init__(self, preset: str = "default", config: FeedConfig | None = None, render_mode: str | None = None,
                 **overrides: Any) -> None:
        super().__init__(preset=preset, config=config, discrete=True, render_mode=render_mode, **overrides)


class FeedVectorEnv(gym.vector.VectorEnv):
    """B users on one batched simulator (``gymnasium.vector.VectorEnv``), with next-step autoreset.

    ## Description

    :class:`FeedEnv`'s world with ``num_envs`` users stepped together by array operations (the fast path;
    ``gym.make_vec(id, num_envs, vectorization_mode="vector_entry_point")`` builds it). The users share one
    world (corpus, creators, trends, the recommender's counters), as a platform's users do. Next-step
    autoreset (``metadata["autoreset_mode"]``, as Gymnasium's ``CartPoleVectorEnv``): the step after a user's
    episode ends returns the new user's first observation with reward 0, ``terminated`` and ``truncated``
    False, and the ``info`` metrics masked out (``info["_<metric>"]`` is False there).

    ## Action Space

    ``Box(-1, 1, (B, A), float32)`` (or ``MultiDiscrete`` of ``B`` menu indices with ``discrete=True``), one
    row per user, as :class:`FeedEnv`'s action. A ragged or wrongly shaped action raises ``ValueError``
    naming the expected shape.

    ## Observation Space

    ``Box(-10, 10, (B, D), float32)``, one :class:`FeedEnv` observation per user; ``env.layout`` names the
    columns.

    ## Rewards

    ``(B,)`` float32, as :class:`FeedEnv` (``config.reward.mode``); ``info`` holds each per-step metric as a
    ``(B,)`` float32 array.

    ## Starting State

    ``reset(seed=s)`` rebuilds the world(s) and the users' stream from one integer ``s``: the batch is one
    seeded unit, so the same ``s`` gives the same users in the same rows, bit for bit. A list of per-env seeds
    cannot be honoured (the users share one world and one stream) and raises ``ValueError``, except a list of
    ``num_envs`` Nones (no reseeding) or, with ``num_envs=1``, a list of one integer.

    ## Episode End

    As :class:`FeedEnv`, per user; with ``worlds``/``world_steps`` a world's end also truncates its users'
    episodes. ``step`` before the first ``reset`` raises :class:`ResetNeededError`.

    ## Arguments

    Args:
        num_envs: B, users stepped together (an integer >= 1).
        preset, config, discrete, render_mode, decision, **overrides: as :class:`FeedEnv`.
        worlds: K, spread the users over that many worlds (:class:`envs.world_mix.WorldMix`).
        world_steps: a world is rebuilt from a fresh seed every that many steps (0 = never).
    """

    # an instance attribute of gymnasium's VectorEnv, as for FeedEnv
    metadata: dict[str, Any] = {  # noqa: RUF012
        "render_modes": list(RENDER_MODES), "autoreset_mode": autoreset_next_step()}

    def __init__(self, num_envs: int = 64, preset: str = "default", config: FeedConfig | None = None,
                 discrete: bool = False, worlds: int = 1, world_steps: int = 0, render_mode: str | None = None,
                 decision: str = "request", **overrides: Any) -> None:
        check_render_mode(render_mode)
        self.render_mode = render_mode
        self.cfg = resolve_config(config, preset, overrides)
        self.num_envs = check_num_envs(num_envs)
        self.discrete = discrete
        self.decision = check_decision(decision)
        self._metrics = metric_keys(self.decision)
        self.sim = env_simulator(self.cfg, self.num_envs, None, worlds, world_steps, self.decision)
        self.single_observation_space, self.single_action_space = env_spaces(self.cfg, self.sim.layout.dim, discrete)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._autoreset = np.zeros(self.num_envs, bool)
        self._started = False
        self.layout = self.sim.layout

    def batch_seed(self, seed: Any) -> int | None:
        """The one seed of the batch that ``reset(seed=...)`` accepts (see the class docstring), or
        ``ValueError`` for a list of seeds that cannot be honoured."""
        if isinstance(seed, np.integer):
            return int(seed)
        if not isinstance(seed, (list, tuple, np.ndarray)):
            return seed
        seeds = [int(x) if isinstance(x, np.integer) else x for x in seed]
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset(seed={seeds!r}) has {len(seeds)} seeds for num_envs={self.num_envs}; "
                             "pass one integer seed for the whole batch")
        if all(s is None for s in seeds):
            return None
        if self.num_envs == 1:
            return self.batch_seed(seeds[0])
        raise ValueError(f"reset(seed={seeds!r}): per-env seeds cannot be honoured: the {self.num_envs} users share "
                         f"one world and one random stream, seeded as a unit; pass one integer, e.g. "
                         f"reset(seed={seeds[0]!r}) (the same seed gives the same users in the same rows)")

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Array, dict]:
        seed = self.batch_seed(seed)
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
            self.sim.seed(seed)
        obs = self.sim.reset()
        self._autoreset[:] = False
        self._started = True
        return obs, {}

    def step(self, actions: Any) -> tuple[Array, Array, Array, Array, dict[str, Any]]:
        check_started(self._started, type(self).__name__)
        a = to_knob_action(actions, self.discrete, self.num_envs)
        m = self._autoreset
        if m.all():
            # Every user is starting over: reset only (no step), exactly as a single FeedEnv would.
            if not self.discrete:
                validate_action(a, self.num_envs)  # bad actions fail on every step
            obs = self.sim.reset(m)
            self._autoreset = np.zeros(self.num_envs, bool)
            info: dict[str, Any] = {k: np.zeros(self.num_envs, np.float32) for k in self._metrics}
            info.update({f"_{k}": np.zeros(self.num_envs, bool) for k in self._metrics})
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
        info = {}
        for k in self._metrics:
            info[k] = np.where(m, 0.0, res.info[k]).astype(np.float32)
            info[f"_{k}"] = ~m
        return obs, rew.astype(np.float32), term, trunc, info


class DiscreteFeedVectorEnv(FeedVectorEnv):
    """:class:`FeedVectorEnv` with the ``Discrete(P)`` knob menu (the vector face of
    ``feedgym/ForYouFeedDiscrete-v0``).

    ## Description, Observation Space, Rewards, Starting State, Episode End

    As :class:`FeedVectorEnv`.

    ## Action Space

    ``MultiDiscrete([P] * B)``: one menu index per user, as :class:`DiscreteFeedEnv`.

    ## Arguments

    ``num_envs``, ``preset``, ``config``, ``worlds``, ``world_steps``, ``render_mode`` and ``**overrides`` as
    :class:`FeedVectorEnv`.
    """

    def __init__(self, num_envs: int = 64, preset: str = "default", config: FeedConfig | None = None,
                 render_mode: str | None = None, **overrides: Any) -> None:
        super().__init__(num_envs=num_envs, preset=preset, config=config, discrete=True, render_mode=render_mode,
                         **overrides)


def knob_names() -> tuple[str, ...]:
    return KNOB_NAMES
