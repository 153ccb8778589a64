"""1. API: the gymnasium and stable-baselines3 checkers pass with zero warnings, and the vector
and SB3 VecEnv faces honour their contracts."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from envs.feed_env import FeedEnv, FeedVectorEnv, UnsupportedRenderModeError, autoreset_next_step
from envs.sb3 import SB3FeedVecEnv
from envs.simulator import STEP_METRICS
from tests.helpers import CONTINUOUS_ID, DISCRETE_ID, ENV_IDS, install_fake_world


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_gymnasium_check_env_no_warnings(env_id: str) -> None:
    env = gym.make(env_id, preset="tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped, skip_render_check=True)
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_check_env_no_warnings(env_id: str) -> None:
    env = gym.make(env_id, preset="tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env, warn=True)
    assert not caught, [str(w.message) for w in caught]


def test_spaces() -> None:
    env = gym.make(CONTINUOUS_ID, preset="tiny")
    assert isinstance(env.action_space, gym.spaces.Box)
    assert env.action_space.dtype == np.float32
    assert np.all(env.action_space.low == -1.0) and np.all(env.action_space.high == 1.0)
    assert env.observation_space.dtype == np.float32
    denv = gym.make(DISCRETE_ID, preset="tiny")
    assert isinstance(denv.action_space, gym.spaces.Discrete)
    assert denv.observation_space == env.observation_space


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_make_vec(env_id: str) -> None:
    venv = gym.make_vec(env_id, num_envs=4, vectorization_mode="vector_entry_point", preset="tiny")
    assert isinstance(venv.unwrapped, FeedVectorEnv)
    assert venv.metadata["autoreset_mode"] == autoreset_next_step()
    assert venv.num_envs == 4
    assert venv.observation_space.shape == (4, *venv.single_observation_space.shape)
    obs, info = venv.reset(seed=0)
    assert obs.shape == venv.observation_space.shape and obs.dtype == np.float32
    assert venv.observation_space.contains(obs)
    venv.action_space.seed(0)
    for _ in range(5):
        obs, rew, term, trunc, info = venv.step(venv.action_space.sample())
        assert venv.observation_space.contains(obs)
        assert rew.shape == (4,) and rew.dtype == np.float32
        assert term.shape == trunc.shape == (4,) and term.dtype == trunc.dtype == np.bool_
        for k in STEP_METRICS:
            assert info[k].shape == (4,)
            assert info[f"_{k}"].dtype == np.bool_
    venv.close()


def _fresh_user(obs_row: np.ndarray, layout) -> bool:
    """A new user's first observation: day 0 and an empty session."""
    return bool(obs_row[layout["episode.day"]][0] == 0.0 and obs_row[layout["session.videos"]][0] == 0.0)


def test_sb3_vecenv_contract_same_step_autoreset() -> None:
    n = 4
    env = SB3FeedVecEnv(num_envs=n, preset="tiny", seed=1, max_steps=6)
    obs = env.reset()
    assert obs.shape == (n, *env.observation_space.shape) and obs.dtype == np.float32
    rng = np.random.default_rng(0)
    for _t in range(1, 7):
        env.step_async(rng.uniform(-1, 1, (n, *env.action_space.shape)).astype(np.float32))
        obs, rew, done, infos = env.step_wait()
        assert obs.dtype == np.float32 and rew.dtype == np.float32 and done.dtype == np.bool_
        assert isinstance(infos, list) and len(infos) == n
        for i in range(n):
            assert set(STEP_METRICS) <= set(infos[i])
            if done[i]:
                term_obs = infos[i]["terminal_observation"]
                assert term_obs.shape == env.observation_space.shape
                assert env.observation_space.contains(term_obs)
                assert isinstance(infos[i]["TimeLimit.truncated"], bool)
                # same-step autoreset: the returned observation is already the new user's
                assert _fresh_user(obs[i], env.layout)
                assert not np.array_equal(term_obs, obs[i])
            else:
                assert "terminal_observation" not in infos[i]
                assert "TimeLimit.truncated" not in infos[i]
    # max_steps=6: whoever did not churn was truncated at step 6, with TimeLimit.truncated set
    assert done.all()
    assert any(info["TimeLimit.truncated"] for info in infos)
    for info in infos:
        assert info["TimeLimit.truncated"] == (info["retention/churned"] == 0.0)


def test_sb3_vecenv_churn_is_not_timelimit(monkeypatch) -> None:
    """A churned user is done with ``TimeLimit.truncated`` False (a true terminal for bootstrapping)."""

    env = SB3FeedVecEnv(num_envs=2, preset="tiny", seed=3)
    env.reset()
    install_fake_world(monkeypatch, env.sim, left=True, gap=np.array([5.0, 0.5]))
    _obs, _rew, done, infos = env.step(np.zeros((2, env.action_space.shape[0]), np.float32))
    assert done.tolist() == [True, False]
    assert infos[0]["TimeLimit.truncated"] is False
    assert "terminal_observation" in infos[0] and "terminal_observation" not in infos[1]


def test_sb3_vecenv_interface() -> None:
    from stable_baselines3.common.vec_env import VecEnv

    env = SB3FeedVecEnv(num_envs=3, preset="tiny", discrete=True, seed=0)
    assert isinstance(env, VecEnv)
    assert env.seed(5) == [5, 5, 5]
    o1 = env.reset()
    env.seed(5)
    o2 = env.reset()
    np.testing.assert_array_equal(o1, o2)
    obs, _rew, _done, _infos = env.step(np.array([0, 1, 2]))
    assert obs.shape == (3, *env.observation_space.shape)
    assert env.get_attr("discrete") == [True, True, True]
    assert env.env_is_wrapped(gym.Wrapper) == [False, False, False]
    env.close()


def test_shift_presets_change_only_the_users():
    from envs.config import SHIFTED_USERS, make_config

    for base in ("tiny", "small", "default"):
        a, b = make_config(base), make_config(f"{base}-shift")
        assert (a.corpus, a.pipeline, a.reward, a.horizon_days) == (b.corpus, b.pipeline, b.reward, b.horizon_days)
        assert b.preset == f"{base}-shift"
        for k, v in SHIFTED_USERS.items():
            assert getattr(b.users, k) == v != getattr(a.users, k), k


def test_autoreset_mode_is_gymnasiums_own_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """gymnasium >= 1.1 declares the mode with ``gymnasium.vector.AutoresetMode`` and 1.4's vector wrappers
    (``RecordEpisodeStatistics``, ``NormalizeObservation``) raise on the string; 1.0 (pinned) has no enum."""
    import enum

    mode = getattr(gym.vector, "AutoresetMode", None)
    assert FeedVectorEnv.metadata["autoreset_mode"] == ("NextStep" if mode is None else mode.NEXT_STEP)

    class FakeMode(enum.Enum):  # what gymnasium 1.1+ provides
        NEXT_STEP = "NextStep"
        SAME_STEP = "SameStep"
        DISABLED = "Disabled"

    monkeypatch.setattr(gym.vector, "AutoresetMode", FakeMode, raising=False)
    assert autoreset_next_step() is FakeMode.NEXT_STEP
    monkeypatch.delattr(gym.vector, "AutoresetMode")
    assert autoreset_next_step() == "NextStep"


def test_gymnasium_vector_wrappers() -> None:
    from gymnasium.wrappers.vector import NormalizeObservation, RecordEpisodeStatistics

    env = NormalizeObservation(RecordEpisodeStatistics(FeedVectorEnv(num_envs=3, preset="tiny", max_steps=3)))
    obs, _ = env.reset(seed=0)
    episodes = 0
    for _ in range(4):
        obs, _rew, _term, _trunc, info = env.step(np.zeros((3, env.single_action_space.shape[0]), np.float32))
        assert obs.shape == (3, env.single_observation_space.shape[0]) and np.isfinite(obs).all()
        episodes += int(info.get("_episode", np.zeros(3, bool)).sum())
    assert episodes == 3  # max_steps=3: every user's episode ended on the third step


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_render_mode(env_id: str) -> None:
    """``render_mode`` used to be sent into the config ("FeedConfig has no field 'render_mode'")."""
    env = gym.make(env_id, preset="tiny", render_mode=None)
    assert env.render_mode is None and env.unwrapped.render_mode is None
    env.reset(seed=0)
    venv = gym.make_vec(env_id, num_envs=2, vectorization_mode="vector_entry_point", preset="tiny", render_mode=None)
    assert venv.render_mode is None
    for mode in ("human", "rgb_array", "ansi"):
        with pytest.raises(UnsupportedRenderModeError, match=rf"render_mode='{mode}' is not supported"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gymnasium warns that the mode is not in metadata["render_modes"]
            gym.make(env_id, preset="tiny", render_mode=mode)
    for make in (lambda: FeedEnv(preset="tiny", render_mode="human"),
                 lambda: FeedVectorEnv(2, preset="tiny", render_mode="rgb_array"),
                 lambda: SB3FeedVecEnv(2, preset="tiny", render_mode="rgb_array")):
        with pytest.raises(ValueError, match=r"not supported: the feedgym envs render nothing"):
            make()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_make_vec_env(env_id: str) -> None:
    """SB3's ``make_vec_env`` asks for ``render_mode="rgb_array"`` and retries without it on ``TypeError``."""
    from stable_baselines3.common.env_util import make_vec_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        venv = make_vec_env(env_id, n_envs=2, seed=0, env_kwargs={"preset": "tiny"})
    obs = venv.reset()
    assert obs.shape == (2, *venv.observation_space.shape)
    venv.action_space.seed(0)
    obs, rew, _done, infos = venv.step(np.stack([venv.action_space.sample() for _ in range(2)]))
    assert obs.shape == (2, *venv.observation_space.shape) and rew.shape == (2,) and len(infos) == 2
    venv.close()
