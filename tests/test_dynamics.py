"""4. Hand-computed dynamics with a fake response model: the simulator's bookkeeping of sessions,
return gaps, churn, horizon and rewards, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from envs.config import make_config
from envs.feed_env import FeedEnv
from rankers.config import N_KNOBS
from tests.helpers import install_fake_world

ZERO = np.zeros(N_KNOBS, np.float32)


def make_env(monkeypatch: pytest.MonkeyPatch, **fake) -> tuple[FeedEnv, dict]:
    env = FeedEnv(preset="tiny")  # horizon 7 days, churn after 3 days without a return
    env.reset(seed=0)
    assert env.cfg.horizon_days == 7.0 and env.cfg.churn_days == 3.0
    calls = install_fake_world(monkeypatch, env.sim, **fake)
    return env, calls


def day_of(env: FeedEnv, obs: np.ndarray) -> float:
    return float(obs[env.layout["episode.day"]][0] * env.cfg.horizon_days)


def test_no_session_end_no_reward_day_unchanged(monkeypatch) -> None:
    env, calls = make_env(monkeypatch, left=False)
    for _ in range(3):
        obs, rew, term, trunc, info = env.step(ZERO)
        assert (rew, term, trunc) == (0.0, False, False)
        assert info["retention/session_end"] == 0.0 and info["retention/day"] == 0.0
    assert len(calls["respond"]) == 3 and calls["end_session"] == []
    # every shown video slot (not the ads at positions 5, 12, 20, 30) counts in the session
    n_videos = sum(int((item >= 0).sum()) for item in calls["respond"])
    assert n_videos == 26
    assert obs[env.layout["session.videos"]][0] == pytest.approx(n_videos / 100.0)


def test_return_advances_day_and_pays_one(monkeypatch) -> None:
    env, calls = make_env(monkeypatch, left=True, gap=0.5)
    obs, rew, term, trunc, info = env.step(ZERO)
    # the fake respond leaves the hidden session minutes at 0: the new day is exactly the gap
    assert (rew, term, trunc) == (1.0, False, False)
    assert info["retention/returned"] == 1.0 and info["retention/session_end"] == 1.0
    assert info["retention/gap_days"] == 0.5 and info["retention/day"] == 0.5
    assert env.sim.users.day[0] == 0.5
    assert day_of(env, obs) == pytest.approx(0.5, abs=1e-6)
    # the system sees the 12-hour gap and a fresh session
    assert obs[env.layout["user.hours_since_last_visit"]][0] == pytest.approx(np.log1p(12.0) / 7.0, rel=1e-6)
    assert obs[env.layout["session.videos"]][0] == 0.0
    obs, rew, *_ = env.step(ZERO)
    assert rew == 1.0 and env.sim.users.day[0] == 1.0
    assert len(calls["end_session"]) == 2


def test_session_minutes_move_the_end_of_session(monkeypatch) -> None:
    env, _ = make_env(monkeypatch, left=True, gap=1.0)
    env.sim.users.s_minutes[:] = 144.0  # 0.1 day in session before leaving
    _obs, rew, *_ , _info = env.step(ZERO)
    assert rew == 1.0
    assert env.sim.users.day[0] == pytest.approx(1.1)


def test_churn_is_terminated(monkeypatch) -> None:
    env, _ = make_env(monkeypatch, left=True, gap=3.5)  # > churn_days, and day 0 + 3 <= 7
    _obs, rew, term, trunc, info = env.step(ZERO)
    assert (rew, term, trunc) == (0.0, True, False)
    assert info["retention/churned"] == 1.0 and info["retention/returned"] == 0.0


def test_quitting_is_churn(monkeypatch) -> None:
    env, _ = make_env(monkeypatch, left=True, gap=np.inf)
    _, rew, term, trunc, info = env.step(ZERO)
    assert (rew, term, trunc) == (0.0, True, False)
    assert info["retention/gap_days"] == env.cfg.churn_days  # inf is reported as churn_days


def test_gap_past_horizon_is_truncated(monkeypatch) -> None:
    env, _ = make_env(monkeypatch, left=True, gap=2.5)  # not churn (< 3 days)
    env.sim.users.day[:] = 5.0
    _, rew, term, trunc, _ = env.step(ZERO)
    assert (rew, term, trunc) == (0.0, False, True)  # 5 + 2.5 >= 7


def test_churn_window_past_horizon_is_truncated(monkeypatch) -> None:
    """At day 5 a gap of 4 days cannot be told from churn within the 7-day horizon: truncated."""
    env, _ = make_env(monkeypatch, left=True, gap=4.0)
    env.sim.users.day[:] = 5.0
    _, rew, term, trunc, _ = env.step(ZERO)
    assert (rew, term, trunc) == (0.0, False, True)


def test_churn_boundary(monkeypatch) -> None:
    """At day 4, churn is decidable up to 4 + 3 = 7 <= horizon: terminated."""
    env, _ = make_env(monkeypatch, left=True, gap=3.01)
    env.sim.users.day[:] = 4.0
    _, _, term, trunc, _ = env.step(ZERO)
    assert (term, trunc) == (True, False)


def test_max_steps_truncates(monkeypatch) -> None:
    env = FeedEnv(preset="tiny", max_steps=3)
    env.reset(seed=0)
    install_fake_world(monkeypatch, env.sim, left=False)
    flags = [env.step(ZERO)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_engagement_reward_is_watch_minutes(monkeypatch) -> None:
    env = FeedEnv(preset="tiny", reward={"mode": "engagement"})
    env.reset(seed=0)
    install_fake_world(monkeypatch, env.sim, left=False, watch_s=30.0)
    _, rew, _, _, info = env.step(ZERO)
    slate = env.cfg.pipeline.slate_size
    assert rew == pytest.approx(slate * 30.0 / 60.0)  # every shown slot watched 30 s
    assert info["engagement/watch_s"] == pytest.approx(slate * 30.0)


def test_engagement_reward_on_session_end_has_no_return_bonus(monkeypatch) -> None:
    env = FeedEnv(preset="tiny", reward={"mode": "engagement"})
    env.reset(seed=0)
    install_fake_world(monkeypatch, env.sim, left=True, gap=0.5, watch_s=6.0)
    _, rew, *_ = env.step(ZERO)
    assert rew == pytest.approx(env.cfg.pipeline.slate_size * 6.0 / 60.0)


def test_composite_reward(monkeypatch) -> None:
    env = FeedEnv(preset="tiny", reward={"mode": "composite", "w_return": 2.0, "w_watch_min": 0.1})
    env.reset(seed=0)
    install_fake_world(monkeypatch, env.sim, left=True, gap=0.5, watch_s=60.0)
    _, rew, *_ = env.step(ZERO)
    assert rew == pytest.approx(2.0 * 1 + 0.1 * env.cfg.pipeline.slate_size)


def test_churn_reward_is_minus_one_at_churn_only(monkeypatch) -> None:
    env = FeedEnv(preset="tiny", reward={"mode": "churn"})
    env.reset(seed=0)
    install_fake_world(monkeypatch, env.sim, left=True, gap=0.5)
    _, rew, term, trunc, _ = env.step(ZERO)  # a return: no reward in this mode
    assert (rew, term, trunc) == (0.0, False, False)
    install_fake_world(monkeypatch, env.sim, left=True, gap=5.0)  # no return within churn_days = 3
    _, rew, term, trunc, info = env.step(ZERO)
    assert (rew, term, trunc) == (-1.0, True, False) and info["retention/churned"] == 1.0


def test_expected_churn_reward_has_the_churn_rewards_expectation_with_less_variance() -> None:
    """``churn_expected`` pays -P(churn at this session end | state) instead of -1 at the churn: summed over
    an episode it has the realised churn's expectation (a compensator) and a much smaller spread."""
    from envs.simulator import FeedSimulator

    cfg = make_config("tiny", reward={"mode": "churn_expected"})
    n = 400
    sim = FeedSimulator(cfg, n, seed=0)
    sim.reset()
    zero = np.zeros((n, N_KNOBS), np.float32)
    expected = np.zeros(n)
    churned = np.zeros(n)
    alive = np.ones(n, bool)
    while alive.any():
        res = sim.step(zero)
        assert (res.reward <= 0).all() and (res.reward[res.info["retention/session_end"] == 0] == 0).all()
        expected += np.where(alive, res.reward, 0.0)
        churned += alive & res.terminated
        alive &= ~(res.terminated | res.truncated)
    m_real, m_exp = churned.mean(), -expected.mean()
    se = np.sqrt(m_real * (1 - m_real) / n)
    assert 0.05 < m_real < 0.95 and abs(m_real - m_exp) < 3 * se, (m_real, m_exp, se)
    # the realised churn is the compensator plus a martingale, so the compensator spreads less; by how much depends
    # on how large the per-session churn probabilities are (env v4 on tiny: about 0.83 of the realised spread)
    assert expected.std() < 0.9 * churned.std()
