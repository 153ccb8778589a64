"""Per-session decisions: the simulator's masked step, the session stepper (``decision="session"``) and the
policy wrapper that serves a session-level agent in request-level rollouts."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from agents.policies import ConstantKnobs, SessionHeld
from envs.config import FeedConfig
from envs.feed_env import FeedEnv, FeedVectorEnv
from envs.sb3 import SB3FeedVecEnv
from envs.sessions import SessionSteps
from envs.simulator import STEP_METRICS, FeedSimulator, StepResult
from rankers.config import N_KNOBS

B = 9


def _actions(b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (b, N_KNOBS)).astype(np.float32)


def _rows(sim: FeedSimulator) -> dict[str, np.ndarray]:
    return {f"{type(o).__name__}.{n}": np.array(getattr(o, n), copy=True)
            for o, names in sim._row_fields() for n in names}


def test_masked_step_serves_the_active_users_alone(tiny: FeedConfig) -> None:
    """The active users get what an unmasked step gives them, bit for bit (tiny's stages 1-3 treat each row alone);
    the others' every per-user array is untouched."""
    masked, full = FeedSimulator(tiny, B, seed=3), FeedSimulator(tiny, B, seed=3)
    masked.reset()
    full.reset()
    before = _rows(masked)
    act = np.zeros(B, bool)
    act[[1, 4, 5]] = True
    a = _actions(B)
    rm, rf = masked.step(a, act), full.step(a)
    np.testing.assert_array_equal(rm.obs[act], rf.obs[act])
    np.testing.assert_array_equal(rm.reward[act], rf.reward[act])
    for k in STEP_METRICS:
        np.testing.assert_array_equal(rm.info[k][act], rf.info[k][act], err_msg=k)
        assert not rm.info[k][~act].any(), k
    assert not rm.obs[~act].any() and not rm.reward[~act].any()
    after = _rows(masked)
    assert after.keys() == before.keys()
    for name, arr in after.items():
        assert arr.shape == before[name].shape, name
        np.testing.assert_array_equal(arr[~act], before[name][~act], err_msg=name)
    np.testing.assert_array_equal(masked.steps, act.astype(np.int64))


def test_waiting_does_not_change_a_users_life(tiny: FeedConfig) -> None:
    """Keyed random numbers: a user who waits a step and then goes on meets the same numbers at the same request,
    so a lone user's life is the same whether or not they wait."""
    waits, goes = FeedSimulator(tiny, 1, seed=7), FeedSimulator(tiny, 1, seed=7)
    waits.reset()
    goes.reset()
    a = _actions(1, seed=2)
    waits.step(a, np.zeros(1, bool))
    for _ in range(5):
        rw, rg = waits.step(a, np.ones(1, bool)), goes.step(a)
        np.testing.assert_array_equal(rw.obs, rg.obs)
        np.testing.assert_array_equal(rw.reward, rg.reward)


def test_masked_step_refuses_a_bad_mask(tiny: FeedConfig) -> None:
    sim = FeedSimulator(tiny, B, seed=0)
    sim.reset()
    with pytest.raises(ValueError, match="active must be a"):
        sim.step(_actions(B), np.ones(B - 1, bool))
    with pytest.raises(ValueError, match="active must be a"):
        sim.step(_actions(B), np.ones(B, np.int64))


def test_a_session_step_is_the_session_under_held_knobs(tiny: FeedConfig) -> None:
    """One user: a session step equals the requests of that session stepped one by one with the same knobs."""
    sess, req = FeedEnv(config=tiny, decision="session"), FeedEnv(config=tiny)
    o_s, _ = sess.reset(seed=5)
    o_r, _ = req.reset(seed=5)
    np.testing.assert_array_equal(o_s, o_r)
    a = np.full(N_KNOBS, 0.3, np.float32)
    for _ in range(6):
        o_s, r_s, term_s, trunc_s, info_s = sess.step(a)
        total, n, days = 0.0, 0, 0.0
        while True:
            o_r, r_r, term_r, trunc_r, info_r = req.step(a)
            total, n, days = total + r_r, n + 1, days + info_r["retention/elapsed_days"]
            if info_r["retention/session_end"] > 0 or term_r or trunc_r:
                break
        np.testing.assert_array_equal(o_s, o_r)
        assert (r_s, term_s, trunc_s, info_s["session/requests"]) == (pytest.approx(total), term_r, trunc_r, n)
        assert info_s["retention/elapsed_days"] == pytest.approx(days, rel=1e-5)
        if term_s or trunc_s:
            break


class _Counting:
    """A simulator probe: user u's session lasts ``u + 1`` requests and pays 1 a request; records who stepped."""

    layout = type("L", (), {"dim": 2})()

    def __init__(self, b: int) -> None:
        self.n_users = b
        self.left = np.arange(b) + 1
        self.stepped: list[np.ndarray] = []

    def step(self, action: np.ndarray, active: np.ndarray) -> StepResult:
        self.stepped.append(active.copy())
        self.left = self.left - active
        end = active & (self.left == 0)
        info: dict[str, Any] = {k: np.zeros(self.n_users, np.float32) for k in STEP_METRICS}
        info["retention/session_end"] = end.astype(np.float32)
        info["retention/elapsed_days"] = active * 0.01 + end * 1.0
        obs = np.stack([active.astype(np.float32), end.astype(np.float32)], axis=1)
        return StepResult(obs, active.astype(np.float32), np.zeros(self.n_users, bool), np.zeros(self.n_users, bool),
                          info)


def test_the_session_stepper_waits_for_every_session_on_a_probe() -> None:
    probe = _Counting(4)
    res = SessionSteps(probe).step(np.zeros((4, N_KNOBS), np.float32))  # type: ignore[arg-type]
    np.testing.assert_array_equal(res.reward, [1, 2, 3, 4])
    np.testing.assert_array_equal(res.info["session/requests"], [1, 2, 3, 4])
    np.testing.assert_allclose(res.info["retention/elapsed_days"], [1.01, 1.02, 1.03, 1.04], rtol=1e-6)
    np.testing.assert_array_equal(res.obs[:, 1], 1.0)  # each user's observation is that of their session's end
    assert [s.sum() for s in probe.stepped] == [4, 3, 2, 1]  # users whose session ended wait


def test_vector_envs_with_per_session_decisions(tiny: FeedConfig) -> None:
    env = FeedVectorEnv(num_envs=B, config=tiny, decision="session")
    env.reset(seed=1)
    for _ in range(4):
        obs, rew, term, trunc, info = env.step(_actions(B))
        assert obs.shape == (B, env.layout.dim) and np.isfinite(obs).all() and rew.shape == (B,)
        assert (info["session/requests"][info["_session/requests"]] >= 1).all()
        assert not (term & trunc).any()
    sb3 = SB3FeedVecEnv(B, config=tiny, seed=1, decision="session")
    sb3.reset()
    _, _, _, infos = sb3.step(np.zeros((B, N_KNOBS), np.float32))
    assert all(i["session/requests"] >= 1 for i in infos)
    with pytest.raises(ValueError, match="decision='day' is invalid"):
        FeedVectorEnv(num_envs=2, config=tiny, decision="day")


def test_session_held_asks_only_at_session_starts(tiny: FeedConfig) -> None:
    class Counter(ConstantKnobs):
        def __init__(self) -> None:
            super().__init__(np.zeros(N_KNOBS, np.float32), "counter")
            self.calls = 0

        def act(self, obs: np.ndarray) -> np.ndarray:
            self.calls += 1
            return np.full((len(obs), N_KNOBS), (self.calls % 5) / 5, np.float32)

    sim = FeedSimulator(tiny, B, seed=2)
    obs = sim.reset()
    pol = SessionHeld(Counter())
    pol.bind(sim)
    prev = None
    for _ in range(40):
        starts = sim.new_session.copy()
        a = pol.act(obs)
        if prev is not None:
            np.testing.assert_array_equal(a[~starts], prev[~starts])  # held within a session
        res = sim.step(a)
        ended = res.terminated | res.truncated
        obs = np.where(ended[:, None], sim.reset(ended), res.obs) if ended.any() else res.obs
        prev = a
    assert 1 < pol.inner.calls < 40
    with pytest.raises(RuntimeError, match="before bind"):
        SessionHeld(Counter()).act(obs)


def test_frame_stack_in_evaluation_is_the_training_stack(tiny: FeedConfig) -> None:
    """Memory: the stack a PPO agent is served in evaluation (agents.policies.FrameStack) is, row for row, the one
    SB3's VecFrameStack gave it in training, through users' ends and replacements."""
    from stable_baselines3.common.vec_env import VecFrameStack

    from agents.policies import FrameStack

    venv = SB3FeedVecEnv(B, config=tiny.replace(horizon_days=1), seed=1)
    env = VecFrameStack(venv, 3)
    stacked = env.reset()
    d = venv.layout.dim
    fs = FrameStack(3)
    fs.bind(venv.sim)
    ended = 0
    for t in range(60):
        np.testing.assert_array_equal(fs.push(stacked[:, -d:]), stacked, err_msg=f"step {t}")
        stacked, _, dones, _ = env.step(_actions(B, seed=t))
        ended += int(dones.sum())
    assert ended > 0  # the stacks were started afresh for new users
    with pytest.raises(ValueError, match="frame_stack"):
        from agents.ppo import PPOParams

        PPOParams(frame_stack=2, decision="session")


class _CueSim:
    """A probe world for per-session decisions: each session lasts 4 requests and pays 1 a request when the first
    knob's sign matches the session's cue, which the observation shows only at the session's first request. Best
    per-session policy: the cue's sign, held (4 a session); the best policy of each request's observation gets the
    first request right and guesses the rest (2.5)."""

    layout = type("L", (), {"dim": 2})()
    LENGTH = 4

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.n_users = 1

    def _start(self) -> np.ndarray:
        self.cue, self.left = float(self.rng.choice([-1.0, 1.0])), self.LENGTH
        return np.array([[self.cue, 1.0]], np.float32)

    def reset(self, mask: Any = None) -> np.ndarray:
        self.sessions = 0
        return self._start()

    def step(self, action: np.ndarray, active: Any = None) -> StepResult:
        info: dict[str, Any] = {k: np.zeros(1, np.float32) for k in STEP_METRICS}
        reward = np.array([float(np.sign(action[0, 0]) == self.cue)], np.float32)
        self.left -= 1
        obs = np.array([[0.0, 1.0]], np.float32)
        end = self.left == 0
        if end:
            info["retention/session_end"][:] = 1.0
            self.sessions += 1
            obs = self._start()
        return StepResult(obs, reward, np.zeros(1, bool), np.array([end and self.sessions >= 3]), info)


class _Gym(gym.Env):
    """One probe user as a gymnasium env, a session (or a request) a step."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (N_KNOBS,), np.float32)

    def __init__(self, sim: Any) -> None:
        self.sim = sim

    def reset(self, *, seed: Any = None, options: Any = None) -> tuple[np.ndarray, dict]:
        return self.sim.reset()[0], {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        res = self.sim.step(np.asarray(action, np.float32).reshape(1, -1))
        return res.obs[0], float(res.reward[0]), bool(res.terminated[0]), bool(res.truncated[0]), {}


def _learned_reward(make: Any, steps: int) -> float:
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.ppo import PPOParams, make_ppo

    venv = DummyVecEnv([lambda i=i: _Gym(make(i)) for i in range(4)])  # type: ignore[misc]
    model = make_ppo(venv, PPOParams(n_steps=32, batch_size=64, learning_rate=3e-3, gamma=0.9, log_std_init=-1.0),
                     seed=0)
    model.learn(steps)
    env, total = _Gym(make(99)), 0.0
    for _ in range(20):  # episodes of 3 sessions
        obs, _ = env.reset()
        for _ in range(60):
            a, _ = model.predict(obs, deterministic=True)
            obs, r, term, trunc, _ = env.step(a)
            total += r
            if term or trunc:
                break
    return total / 20


def test_per_session_decisions_learn_the_cue_that_requests_cannot_see() -> None:
    """PPO on the session stepper learns to hold the cue's sign for the whole session (3 sessions: 12 of 12 an
    episode); PPO on requests cannot do better than the first request of each and a guess (7.5 expected)."""
    per_session = _learned_reward(lambda i: SessionSteps(_CueSim(i)), 3000)
    per_request = _learned_reward(lambda i: _CueSim(i), 3000)
    assert per_session == 12.0
    assert per_request < 10.0


class _Recall(gym.Env):
    """A probe for memory: a cue, then a blank observation at which the agent must name the cue (1 if right)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def reset(self, *, seed: Any = None, options: Any = None) -> tuple[np.ndarray, dict]:
        self.cue, self.t = int(self.rng.integers(2)), 0
        return np.array([2.0 * self.cue - 1.0, 1.0], np.float32), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        if self.t == 1:
            return np.array([0.0, 1.0], np.float32), 0.0, False, False, {}
        return np.array([0.0, 1.0], np.float32), float(int(action) == self.cue), True, False, {}


def test_memory_recalls_a_cue_that_one_observation_cannot() -> None:
    """With a stack of two observations (PPOParams.frame_stack's wrapper) PPO names the cue every time; without
    memory it can only guess."""
    from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack

    from agents.ppo import PPOParams, make_ppo

    scores = {}
    for frames in (1, 2):
        venv: Any = DummyVecEnv([lambda i=i: _Recall(i) for i in range(8)])  # type: ignore[misc]
        if frames > 1:
            venv = VecFrameStack(venv, frames)
        model = make_ppo(venv, PPOParams(n_steps=32, batch_size=64, learning_rate=3e-3, gamma=0.9), seed=0)
        model.learn(4000)
        test: Any = DummyVecEnv([lambda i=i: _Recall(100 + i) for i in range(50)])  # type: ignore[misc]
        if frames > 1:
            test = VecFrameStack(test, frames)
        obs, hits = test.reset(), 0.0
        for _ in range(2):
            a, _ = model.predict(obs, deterministic=True)
            obs, r, _, _ = test.step(a)
            hits += float(r.sum())
        scores[frames] = hits / 50
    assert scores[2] > 0.95 and scores[1] < 0.8, scores
