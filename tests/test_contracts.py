"""3. Contracts: terminated/truncated exclusive, next-step autoreset, observations inside the
space as float32, the named-slice layout covers the whole observation."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from envs.feed_env import FeedEnv, FeedVectorEnv
from envs.observation import ObservationLayout
from envs.simulator import STEP_METRICS, FeedSimulator
from tests.helpers import CONTINUOUS_ID, knob_actions


def test_terminated_truncated_exclusive_and_obs_in_space(tiny) -> None:
    """Many users over many steps (short horizon so that churn and horizon both occur)."""
    cfg = tiny.replace(horizon_days=2.0, churn_days=0.5, max_steps=40)
    b = 16
    sim = FeedSimulator(cfg, b, seed=0)
    space = gym.spaces.Box(-10.0, 10.0, (sim.layout.dim,), np.float32)
    obs = sim.reset()
    n_term = n_trunc = 0
    for a in knob_actions(80, b):
        res = sim.step(a)
        assert not np.any(res.terminated & res.truncated)
        assert res.obs.dtype == np.float32 and res.reward.dtype == np.float32
        assert np.all(np.isfinite(res.obs)) and np.all(np.isfinite(res.reward))
        for row in res.obs:
            assert space.contains(row)
        # a churned user reports it in info, consistently
        np.testing.assert_array_equal(res.info["retention/churned"] > 0, res.terminated)
        n_term += res.terminated.sum()
        n_trunc += res.truncated.sum()
        done = res.terminated | res.truncated
        if done.any():
            obs = sim.reset(done)
            assert obs.dtype == np.float32
    assert n_term > 0 and n_trunc > 0, (n_term, n_trunc)


def test_single_env_obs_in_space() -> None:
    env = gym.make(CONTINUOUS_ID, preset="tiny", max_steps=20)
    obs, _ = env.reset(seed=1)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    for a in knob_actions(45, 1)[:, 0]:
        obs, rew, term, trunc, info = env.step(a)
        assert obs.dtype == np.float32 and env.observation_space.contains(obs)
        assert type(rew) is float and type(term) is bool and type(trunc) is bool
        assert not (term and trunc)
        assert set(info) == set(STEP_METRICS)
        if term or trunc:
            obs, _ = env.reset()


def test_vector_env_next_step_autoreset(tiny) -> None:
    """The step after an episode ends returns the new user's first observation, reward 0, both
    flags False and no metrics; the other users are unaffected."""
    env = FeedVectorEnv(num_envs=4, config=tiny.replace(max_steps=5))
    layout = env.layout
    obs, _ = env.reset(seed=2)
    acts = knob_actions(12, 4)
    prev_done = np.zeros(4, bool)
    n_autoreset = 0
    for a in acts:
        obs, rew, term, trunc, info = env.step(a)
        assert not np.any(term & trunc)
        if prev_done.any():
            m = prev_done
            n_autoreset += 1
            assert np.all(rew[m] == 0.0) and not term[m].any() and not trunc[m].any()
            assert np.all(obs[m][:, layout["episode.day"]] == 0.0)
            assert np.all(obs[m][:, layout["session.videos"]] == 0.0)
            for k in STEP_METRICS:
                assert not info[f"_{k}"][m].any() and np.all(info[k][m] == 0.0)
                assert info[f"_{k}"][~m].all()
        prev_done = term | trunc
    assert n_autoreset >= 2


def test_vector_env_partial_autoreset(tiny, monkeypatch) -> None:
    """Only the finished user is reset on the next step; the others keep stepping."""
    from tests.helpers import install_fake_world

    env = FeedVectorEnv(num_envs=3, config=tiny)
    env.reset(seed=4)
    zero = np.zeros((3, env.single_action_space.shape[0]), np.float32)
    install_fake_world(monkeypatch, env.sim, left=True, gap=np.array([np.inf, 0.5, 0.5]))
    obs, rew, term, trunc, info = env.step(zero)
    assert term.tolist() == [True, False, False] and not trunc.any()
    assert rew.tolist() == [0.0, 1.0, 1.0]
    day_before = obs[:, env.layout["episode.day"]][:, 0]
    monkeypatch.undo()
    install_fake_world(monkeypatch, env.sim, left=False)
    obs, rew, term, trunc, info = env.step(zero)
    assert obs[0, env.layout["episode.day"]][0] == 0.0 and rew[0] == 0.0
    np.testing.assert_array_equal(obs[1:, env.layout["episode.day"]][:, 0], day_before[1:])
    assert info["_engagement/videos"].tolist() == [False, True, True]
    assert info["engagement/videos"][0] == 0.0 and np.all(info["engagement/videos"][1:] > 0)


def test_layout_covers_observation(tiny) -> None:
    layout = ObservationLayout(tiny)
    env = FeedEnv(preset="tiny")
    assert env.observation_space.shape == (layout.dim,)
    covered = np.zeros(layout.dim, int)
    for name, sl in layout.slices.items():
        assert sl.step is None and 0 <= sl.start < sl.stop <= layout.dim, name
        covered[sl] += 1
    assert np.all(covered == 1), "slices must tile the observation exactly once"
    assert len(layout.names) == layout.dim == len(set(layout.names))
    for i, name in enumerate(layout.names):
        assert layout[name] == slice(i, i + 1)
    assert layout["user.embedding"].stop - layout["user.embedding"].start == tiny.corpus.emb_dim
    assert layout["user.rate_like"] == slice(layout["user.recent_rates"].start, layout["user.recent_rates"].start + 1)
    try:
        layout["no.such.field"]
    except KeyError as e:
        assert "no.such.field" in str(e)
    else:
        raise AssertionError("unknown field must raise KeyError")
