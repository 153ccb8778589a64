"""The decision problem in time: per-day discounting (a semi-MDP) and the return-time reward."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.ppo import ElapsedTimeRolloutBuffer, PPOParams, make_ppo
from envs.config import make_config
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS


def test_buffer_discounts_by_elapsed_days() -> None:
    buf = ElapsedTimeRolloutBuffer(3, spaces.Box(-1, 1, (1,)), spaces.Box(-1, 1, (1,)), n_envs=1, gamma=1.0,
                                   gae_lambda=1.0, gamma_day=0.5)
    buf.rewards[:, 0] = [1.0, 2.0, 4.0]
    buf.days[:, 0] = [1.0, 2.0, 0.0]  # the first step took a day, the second two
    buf.compute_returns_and_advantage(torch.zeros(1), np.array([True]))
    # G2 = 4, G1 = 2 + 0.5^2 * 4 = 3, G0 = 1 + 0.5^1 * 3 = 2.5
    np.testing.assert_allclose(buf.returns[:, 0], [2.5, 3.0, 4.0])
    with pytest.raises(ValueError, match="gamma_per_day"):
        ElapsedTimeRolloutBuffer(3, spaces.Box(-1, 1, (1,)), spaces.Box(-1, 1, (1,)), gamma_day=1.5)


class _Probe(gym.Env):
    """Choose, then wait for the payoff: 'soon' pays 1 one day later, 'later' pays 1.5 ten days later (two steps:
    the choice takes the waiting time, the payoff ends the episode). Per day (0.9) 'soon' is worth 0.9 and
    'later' 0.52; with one discount per step (0.99) both are one step away, and 'later' wins."""

    observation_space = spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.choice = -1
        return np.zeros(2, np.float32), {}

    def step(self, action):
        if self.choice < 0:
            self.choice = int(action)
            days = 1.0 if self.choice == 0 else 10.0
            return np.array([1.0, self.choice], np.float32), 0.0, False, False, {"retention/elapsed_days": days}
        reward = 1.0 if self.choice == 0 else 1.5
        return np.zeros(2, np.float32), reward, True, False, {"retention/elapsed_days": 0.0}


def test_per_day_discount_changes_the_best_action_on_a_probe() -> None:
    picks = {}
    for per_day in (0.0, 0.9):
        env = DummyVecEnv([_Probe] * 8)
        model = make_ppo(env, PPOParams(n_steps=16, batch_size=64, learning_rate=3e-3, gamma=0.99, gae_lambda=1.0,
                                        gamma_per_day=per_day, ent_coef=0.0), seed=0)
        from agents.ppo import ElapsedTimeCallback

        model.learn(4000, callback=ElapsedTimeCallback())
        act, _ = model.predict(np.zeros((1, 2), np.float32), deterministic=True)
        picks[per_day] = int(act[0])
    assert picks == {0.0: 1, 0.9: 0}


def test_simulator_reports_elapsed_days_and_the_return_time_reward() -> None:
    sim = FeedSimulator(make_config("tiny", reward={"mode": "return_time"}), 16, seed=0)
    sim.reset()
    clock = np.zeros(16)
    for _ in range(200):
        res = sim.step(np.zeros((16, N_KNOBS), np.float32))
        e = res.info["retention/elapsed_days"]
        assert np.all(e >= 0)
        ret = res.info["retention/returned"] > 0
        np.testing.assert_allclose(res.reward[ret], -res.info["retention/gap_days"][ret], rtol=1e-6)
        assert np.all(res.reward[~ret & ~res.terminated] == 0)
        clock += e
        done = res.terminated | res.truncated
        assert np.all(clock[res.truncated & ~res.terminated] <= 7.0 + 1e-3)
        clock[done] = 0
        if done.any():
            sim.reset(done)
