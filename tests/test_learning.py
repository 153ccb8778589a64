"""Learning on probe environments with a known best action (SB3 identity-env style), kept small."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from agents.cql import CQLParams, train_cql
from agents.ppo import PPOParams, make_ppo
from envs.config import make_config

pytestmark = pytest.mark.slow


class KnobProbe(gym.Env):
    """Observation is a random sign s; reward is 1 - mean((a - s * target)^2): the best action is known."""

    def __init__(self, dim: int = 3) -> None:
        self.observation_space = spaces.Box(-1, 1, (1,), np.float32)
        self.action_space = spaces.Box(-1, 1, (dim,), np.float32)
        self.target = np.linspace(-0.6, 0.6, dim).astype(np.float32)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.s = np.float32(self.np_random.choice([-1.0, 1.0]))
        return np.array([self.s], np.float32), {}

    def step(self, action):
        r = 1.0 - float(np.mean((np.asarray(action) - self.s * self.target) ** 2))
        self.t += 1
        self.s = np.float32(self.np_random.choice([-1.0, 1.0]))
        return np.array([self.s], np.float32), r, False, self.t >= 8, {}


def test_ppo_finds_the_best_knobs_on_a_probe():
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(KnobProbe, n_envs=8, seed=0)
    params = replace(PPOParams(), n_steps=64, batch_size=128, gamma=0.0, learning_rate=1e-3)
    model = make_ppo(venv, params, seed=0).learn(12_000)
    env = KnobProbe()
    for s in (-1.0, 1.0):
        a, _ = model.predict(np.array([s], np.float32), deterministic=True)
        assert np.abs(a - s * env.target).max() < 0.25, (s, a)


def test_discrete_cql_finds_the_best_preset_from_uniform_logs(tmp_path: Path):
    import d3rlpy

    rng = np.random.default_rng(0)
    n, p = 3000, 5
    obs = rng.choice([-1.0, 1.0], size=(n, 1)).astype(np.float32)
    act = rng.integers(0, p, n)
    best = np.where(obs[:, 0] > 0, 3, 1)
    rew = (act == best).astype(np.float32)
    term = np.zeros(n, np.float32)
    term[7::8] = 1.0
    ds = d3rlpy.dataset.MDPDataset(obs, act, rew, term, action_space=d3rlpy.ActionSpace.DISCRETE, action_size=p)
    algo = train_cql(ds, make_config("tiny"), 600, tmp_path, discrete=True, steps_per_epoch=300,
                     params=replace(CQLParams(), batch_size=64, gamma=0.0, target_update_interval=50))
    pred = algo.predict(np.array([[-1.0], [1.0]], np.float32))
    assert pred.tolist() == [1, 3]


def test_cql_checkpoint_of_another_dataset_is_not_resumed(tmp_path: Path):
    import d3rlpy

    from agents.checkpoints import CheckpointMismatchError

    rng = np.random.default_rng(1)
    obs = rng.standard_normal((64, 2)).astype(np.float32)
    ds = d3rlpy.dataset.MDPDataset(obs, rng.integers(0, 3, 64), np.zeros(64, np.float32),
                                   (np.arange(64) % 8 == 7).astype(np.float32),
                                   action_space=d3rlpy.ActionSpace.DISCRETE, action_size=3)
    kw = {"discrete": True, "steps_per_epoch": 5, "params": replace(CQLParams(), batch_size=16)}
    train_cql(ds, make_config("tiny"), 5, tmp_path, dataset_id={"seed": 1}, **kw)
    train_cql(ds, make_config("tiny"), 10, tmp_path, dataset_id={"seed": 1}, **kw)  # same log: resumes
    with pytest.raises(CheckpointMismatchError, match="dataset"):
        train_cql(ds, make_config("tiny"), 15, tmp_path, dataset_id={"seed": 2}, **kw)


def test_cql_critic_landscape_reads_a_known_action_effect_and_reward_scale_is_applied(tmp_path: Path):
    # one-step probe: the reward rises toward target (knob 0 up, knob 1 down, knob 2 flat) from logs uniform
    # in the box, so the critic around a = 0 must say "up" for knob 0 and "down" for knob 1
    import d3rlpy

    from agents.cql import critic_landscape

    rng = np.random.default_rng(0)
    n = 4000
    obs = rng.standard_normal((n, 2)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    target = np.array([0.8, -0.8, 0.0], np.float32)
    rew = (-((act - target) ** 2)[:, :2].sum(axis=1)).astype(np.float32)
    term = np.ones(n, np.float32)  # one-step episodes: Q(s, a) = r(a)
    ds = d3rlpy.dataset.MDPDataset(obs, act, rew, term)
    params = replace(CQLParams(), batch_size=128, gamma=0.0, conservative_weight=0.1, reward_scale=10.0)
    algo = train_cql(ds, make_config("tiny"), 1500, tmp_path / "a", steps_per_epoch=1500, params=params)
    land = critic_landscape(algo, obs[:500], np.zeros(3, np.float32), step=0.4)
    assert land["up"][0] > 0 > land["down"][0], land
    assert land["down"][1] > 0 > land["up"][1], land
    # the true gain of +0.4 on knob 0 is (0.8^2 - 0.4^2) = 0.48, x10 reward scale: the critic is in scaled units
    assert 1.5 < land["up"][0] < 9.0, land
    assert abs(land["up"][2] - land["down"][2]) < abs(land["up"][0] - land["down"][0]) / 3, land
    with pytest.raises(ValueError, match=r"reward_scale=0\.0 is invalid"):
        train_cql(ds, make_config("tiny"), 10, tmp_path / "b", params=replace(params, reward_scale=0.0))
