"""stable-baselines3 ``VecEnv`` adapter over the batched simulator (same-step autoreset)."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from envs.config import FeedConfig
from envs.feed_env import check_num_envs, check_render_mode, check_started, env_spaces, resolve_config, to_knob_action
from envs.sessions import check_decision, env_simulator, metric_keys
from rankers.types import Array


class SB3FeedVecEnv(VecEnv):
    """B users on one batched simulator as a stable-baselines3 ``VecEnv``, with same-step autoreset.

    ## Description

    :class:`envs.feed_env.FeedVectorEnv`'s world in SB3's contract (``docs/guide/vec_envs.md``): a finished
    user is replaced at once; their last observation is in ``infos[i]["terminal_observation"]`` and
    ``infos[i]["TimeLimit.truncated"]`` marks the horizon (or the end of their world's life), not churn.
    ``train_ppo`` trains on it.

    ## Action Space

    ``Box(-1, 1, (A,), float32)`` per user (``step`` takes ``(B, A)``), or ``Discrete(P)`` menu indices
    (``(B,)``) with ``discrete=True``; as :class:`envs.feed_env.FeedEnv`.

    ## Observation Space

    ``Box(-10, 10, (D,), float32)`` per user (``reset``/``step`` return ``(B, D)``); ``env.layout`` names the
    columns, as :class:`envs.feed_env.FeedEnv`.

    ## Rewards

    ``(B,)`` float32, as :class:`envs.feed_env.FeedEnv` (``config.reward.mode``); ``infos[i]`` holds user i's
    per-step metrics as floats.

    ## Episode End

    ``dones[i]`` when user i churned or was truncated (horizon, ``max_steps``, end of their world);
    ``TimeLimit.truncated`` tells the two apart. ``step`` before the first ``reset`` raises
    :class:`envs.feed_env.ResetNeededError`.

    ## Arguments

    Args:
        num_envs: B, users stepped together (an integer >= 1).
        preset, config, discrete, render_mode, decision, **overrides: as :class:`envs.feed_env.FeedEnv`.
        seed: seeds the world(s) and users at the next ``reset`` (also :meth:`seed`); None = fresh entropy.
        worlds, world_steps: spread the users over that many worlds, each rebuilt from a fresh seed every
            ``world_steps`` steps (:class:`envs.world_mix.WorldMix`); the default is one world, forever.
    """

    def __init__(self, num_envs: int = 64, preset: str = "default", config: FeedConfig | None = None,
                 discrete: bool = False, seed: int | None = None, worlds: int = 1, world_steps: int = 0,
                 render_mode: str | None = None, decision: str = "request", **overrides: Any) -> None:
        check_render_mode(render_mode)
        cfg = resolve_config(config, preset, overrides)
        num_envs = check_num_envs(num_envs)
        self.cfg = cfg
        self.discrete = discrete
        self.decision = check_decision(decision)
        self._metrics = metric_keys(self.decision)
        self.sim = env_simulator(cfg, num_envs, seed, worlds, world_steps, self.decision)
        obs_space, act_space = env_spaces(cfg, self.sim.layout.dim, discrete)
        self.render_mode = render_mode  # read by VecEnv.__init__ (get_attr)
        super().__init__(num_envs, obs_space, act_space)
        self._actions: Array | None = None
        self._started = False
        self._seed: int | None = seed
        self.layout = self.sim.layout

    def reset(self) -> Array:
        if self._seed is not None:
            self.sim.seed(self._seed)
            self._seed = None
        self._started = True
        return self.sim.reset()

    def step_async(self, actions: Array) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        check_started(self._started, type(self).__name__)
        a = to_knob_action(self._actions, self.discrete, self.num_envs)
        res = self.sim.step(a)
        done = res.terminated | res.truncated
        infos: list[dict[str, Any]] = [{k: float(res.info[k][i]) for k in self._metrics} for i in range(self.num_envs)]
        obs = res.obs
        if done.any():
            for i in np.flatnonzero(done):
                infos[i]["terminal_observation"] = obs[i].copy()
                infos[i]["TimeLimit.truncated"] = bool(res.truncated[i] and not res.terminated[i])
            obs = np.where(done[:, None], self.sim.reset(done), obs)
        return obs, res.reward.astype(np.float32), done, infos

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        self._seed = seed
        return [seed] * self.num_envs

    def close(self) -> None:
        pass

    def _n_indices(self, indices: VecEnvIndices) -> int:
        """How many envs ``indices`` names (SB3 types its index list as an Iterable; a sized one is needed)."""
        idx = self._get_indices(indices)
        if not isinstance(idx, Sized):
            raise TypeError(f"indices must be None, an int or a sized sequence of ints, got {type(idx).__name__}")
        return len(idx)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self, attr_name)] * self._n_indices(indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: VecEnvIndices = None, **kwargs: Any) -> list[Any]:
        return [getattr(self, method_name)(*args, **kwargs)] * self._n_indices(indices)

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False] * self._n_indices(indices)
