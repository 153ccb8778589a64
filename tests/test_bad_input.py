"""Bad input fails loudly, with a message that names the problem."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from envs.config import make_config
from envs.feed_env import FeedEnv, FeedVectorEnv
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS, PipelineConfig
from tests.helpers import CONTINUOUS_ID, DISCRETE_ID


@pytest.fixture(scope="module")
def env() -> gym.Env:
    e = gym.make(CONTINUOUS_ID, preset="tiny")
    e.reset(seed=0)
    return e


def test_nan_action(env) -> None:
    a = np.zeros(N_KNOBS, np.float32)
    a[3] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf.*weight\.p_comment"):
        env.step(a)


def test_inf_action(env) -> None:
    a = np.zeros(N_KNOBS, np.float32)
    a[-1] = np.inf
    with pytest.raises(ValueError, match=r"NaN or inf.*break_prompt"):
        env.step(a)


@pytest.mark.parametrize("shape", [(N_KNOBS - 1,), (N_KNOBS + 1,), (2, N_KNOBS), ()])
def test_wrong_shape_action(env, shape) -> None:
    with pytest.raises(ValueError, match=r"action has shape"):
        env.step(np.zeros(shape, np.float32))


def test_non_numeric_action(env) -> None:
    with pytest.raises(ValueError, match=r"action must be numeric"):
        env.step(np.array(["a"] * N_KNOBS))


def test_vector_env_wrong_batch() -> None:
    venv = FeedVectorEnv(num_envs=3, preset="tiny")
    venv.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected \(3, 13\)"):
        venv.step(np.zeros((2, N_KNOBS), np.float32))


@pytest.mark.parametrize("action", [99, -1, 8])
def test_discrete_out_of_range(action) -> None:
    denv = gym.make(DISCRETE_ID, preset="tiny")
    denv.reset(seed=0)
    with pytest.raises(ValueError, match=r"discrete action out of range: presets are 0\.\.7"):
        denv.step(action)


def test_discrete_non_integer() -> None:
    denv = FeedEnv(preset="tiny", discrete=True)
    denv.reset(seed=0)
    with pytest.raises(ValueError, match=r"integer preset indices"):
        denv.step(1.5)


def test_step_before_reset() -> None:
    with pytest.raises(RuntimeError, match=r"reset\(\) before step\(\)"):
        FeedEnv(preset="tiny").step(np.zeros(N_KNOBS, np.float32))


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: make_config("tiny", horizon_days=-1), r"FeedConfig\.horizon_days=-1 is invalid: must be > 0"),
        (lambda: make_config("tiny", churn_days=float("nan")), r"churn_days=nan is invalid: must be a finite"),
        (lambda: make_config("tiny", max_steps=0), r"max_steps=0 is invalid: must be >= 1"),
        (lambda: make_config("tiny", reward={"mode": "clicks"}),
         r"RewardConfig\.mode='clicks' is invalid: must be one of"),
        (lambda: make_config("tiny", corpus={"n_videos": 5}), r"CorpusConfig\.n_videos=5 is invalid"),
        (lambda: PipelineConfig(explore_share=2), r"PipelineConfig\.explore_share=2 is invalid: must be <= 1"),
        (lambda: PipelineConfig(new_creator_share=-0.1), r"new_creator_share=-0\.1 is invalid: must be >= 0"),
        (lambda: PipelineConfig(n_rank=10, feed_size=50), r"n_rank=10 is invalid: must be >= feed_size"),
        (lambda: PipelineConfig(ranking_weights=(1.0,)), r"ranking_weights.*one per head"),
        (lambda: make_config("huge"), r"unknown preset 'huge'"),
    ],
)
def test_bad_config(make, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()


def test_bad_config_through_gym_make() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'nope'"):
        gym.make(CONTINUOUS_ID, preset="nope")
    with pytest.raises(ValueError, match=r"horizon_days=-1"):
        gym.make(CONTINUOUS_ID, preset="tiny", horizon_days=-1)


def test_bad_n_users(tiny) -> None:
    with pytest.raises(ValueError, match=r"n_users=0 is invalid"):
        FeedSimulator(tiny, 0)


def test_config_must_be_feed_config() -> None:
    with pytest.raises(TypeError, match=r"config must be a FeedConfig"):
        FeedEnv(config={"preset": "tiny"})
