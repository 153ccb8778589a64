"""2. Determinism: same seed -> identical rollouts, another seed differs; the single env, the
vector env with one user and the simulator itself agree step for step."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from envs.feed_env import FeedEnv, FeedVectorEnv
from envs.simulator import STEP_METRICS, FeedSimulator
from tests.helpers import CONTINUOUS_ID, DISCRETE_ID, knob_actions

N_STEPS = 50


def rollout(env_id: str, seed: int, n_steps: int = N_STEPS, **overrides) -> list[tuple]:
    env = gym.make(env_id, preset="tiny", **overrides)
    obs, _ = env.reset(seed=seed)
    if env_id == DISCRETE_ID:
        acts = np.random.default_rng(7).integers(0, env.action_space.n, n_steps)
    else:
        acts = knob_actions(n_steps, 1)[:, 0]
    out = [(obs.copy(), 0.0, False, False, {})]
    for a in acts:
        obs, rew, term, trunc, info = env.step(a)
        out.append((obs.copy(), rew, term, trunc, dict(info)))
        if term or trunc:
            obs, _ = env.reset()
            out.append((obs.copy(), 0.0, False, False, {}))
    return out


def assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b, strict=True)):
        np.testing.assert_array_equal(x[0], y[0], err_msg=f"obs differ at step {t}")
        assert x[1:4] == y[1:4], f"reward/terminated/truncated differ at step {t}"
        assert x[4] == y[4], f"info differs at step {t}"


@pytest.mark.parametrize("env_id", [CONTINUOUS_ID, DISCRETE_ID])
def test_same_seed_same_rollout(env_id: str) -> None:
    assert_same(rollout(env_id, seed=11), rollout(env_id, seed=11))


def test_other_seed_differs() -> None:
    a, b = rollout(CONTINUOUS_ID, seed=11, n_steps=5), rollout(CONTINUOUS_ID, seed=12, n_steps=5)
    assert not np.array_equal(a[0][0], b[0][0])
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a[1:], b[1:], strict=False))


def test_episode_boundary_is_deterministic() -> None:
    """Rollouts that cross episode ends (max_steps=15) stay identical."""
    a = rollout(CONTINUOUS_ID, seed=5, max_steps=15)
    assert sum(x[2] or x[3] for x in a) >= 3
    assert_same(a, rollout(CONTINUOUS_ID, seed=5, max_steps=15))


def test_reset_with_seed_restarts_the_world() -> None:
    env = FeedEnv(preset="tiny")
    o1, _ = env.reset(seed=4)
    env.step(np.zeros(env.action_space.shape, np.float32))
    o2, _ = env.reset(seed=4)
    np.testing.assert_array_equal(o1, o2)


@pytest.mark.parametrize("discrete", [False, True])
def test_single_env_matches_vector_env_and_simulator(tiny, discrete: bool) -> None:
    """One user: FeedEnv, FeedVectorEnv(num_envs=1) and FeedSimulator(n_users=1) agree, across
    episode ends too (max_steps=12; the vector env's next-step autoreset returns the reset)."""
    cfg = tiny.replace(max_steps=12)
    seed, n = 21, N_STEPS
    single = FeedEnv(config=cfg, discrete=discrete)
    vec = FeedVectorEnv(num_envs=1, config=cfg, discrete=discrete)
    sim = FeedSimulator(cfg, 1, seed=seed)
    if discrete:
        from envs.feed_env import MENU_MATRIX

        idx = np.random.default_rng(3).integers(0, len(MENU_MATRIX), n)
        single_acts, vec_acts, sim_acts = list(idx), [np.array([i]) for i in idx], [MENU_MATRIX[[i]] for i in idx]
    else:
        acts = knob_actions(n, 1)
        single_acts, vec_acts, sim_acts = list(acts[:, 0]), list(acts), list(acts)
    o_s, _ = single.reset(seed=seed)
    o_v, _ = vec.reset(seed=seed)
    o_m = sim.reset()
    np.testing.assert_array_equal(o_s, o_v[0])
    np.testing.assert_array_equal(o_s, o_m[0])
    single_done = sim_done = False
    n_ends = 0
    for t in range(n):
        # single env: reset after an end; vector env: the step after an end is the reset
        if single_done:
            o_s, _ = single.reset()
            r_s, te_s, tr_s, info_s = 0.0, False, False, {}
        else:
            o_s, r_s, te_s, tr_s, info_s = single.step(single_acts[t])
        o_v, r_v, te_v, tr_v, info_v = vec.step(vec_acts[t])
        if sim_done:
            o_m, r_m, te_m, tr_m = sim.reset(), np.zeros(1, np.float32), np.zeros(1, bool), np.zeros(1, bool)
            info_m = None
        else:
            res = sim.step(sim_acts[t])
            o_m, r_m, te_m, tr_m, info_m = res.obs, res.reward, res.terminated, res.truncated, res.info
        msg = f"step {t}"
        np.testing.assert_array_equal(o_s, o_v[0], err_msg=msg)
        np.testing.assert_array_equal(o_s, o_m[0], err_msg=msg)
        assert r_s == r_v[0] == r_m[0], msg
        assert te_s == te_v[0] == te_m[0] and tr_s == tr_v[0] == tr_m[0], msg
        if info_m is not None:
            for k in STEP_METRICS:
                assert info_s[k] == info_v[k][0] == info_m[k][0], (msg, k)
        single_done = sim_done = bool(te_s or tr_s)
        n_ends += single_done
    assert n_ends >= 3


def test_vector_env_matches_simulator_many_users(tiny) -> None:
    """B users: the vector env is the simulator plus next-step autoreset, nothing else."""
    cfg = tiny.replace(max_steps=8)
    b, seed = 4, 9
    vec = FeedVectorEnv(num_envs=b, config=cfg)
    sim = FeedSimulator(cfg, b, seed=seed)
    acts = knob_actions(30, b)
    o_v, _ = vec.reset(seed=seed)
    np.testing.assert_array_equal(o_v, sim.reset())
    pending = np.zeros(b, bool)
    for t, a in enumerate(acts):
        o_v, r_v, te_v, tr_v, _ = vec.step(a)
        if pending.all():
            o_m, r_m = sim.reset(pending), np.zeros(b, np.float32)
            te_m = tr_m = np.zeros(b, bool)
        else:
            res = sim.step(a)
            o_m, r_m, te_m, tr_m = res.obs, res.reward, res.terminated, res.truncated
            if pending.any():
                o_m = np.where(pending[:, None], sim.reset(pending), o_m)
                r_m = np.where(pending, 0.0, r_m)
                te_m, tr_m = te_m & ~pending, tr_m & ~pending
        np.testing.assert_array_equal(o_v, o_m, err_msg=f"step {t}")
        np.testing.assert_array_equal(r_v, r_m)
        np.testing.assert_array_equal(te_v, te_m)
        np.testing.assert_array_equal(tr_v, tr_m)
        pending = te_m | tr_m
