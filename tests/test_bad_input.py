"""Bad input fails loudly, with a message that names the problem."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from envs.config import FeedConfig, make_config
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


@pytest.mark.parametrize("shape", [(N_KNOBS - 1,), (N_KNOBS + 1,), (2, N_KNOBS), (), (1, N_KNOBS), (N_KNOBS, 1)])
def test_wrong_shape_action(env, shape) -> None:
    with pytest.raises(ValueError, match=r"action has shape"):
        env.step(np.zeros(shape, np.float32))


@pytest.mark.parametrize("action", [np.array(["a"] * N_KNOBS), np.zeros(N_KNOBS, complex), np.zeros(N_KNOBS, bool)])
def test_non_real_action(env, action) -> None:
    with pytest.raises(ValueError, match=r"action must be real numbers, got dtype"):
        env.step(action)


@pytest.mark.parametrize("action", [True, "1", None, 1 + 0j])
def test_discrete_action_of_another_type(action) -> None:
    denv = gym.make(DISCRETE_ID, preset="tiny")
    denv.reset(seed=0)
    with pytest.raises(ValueError, match=r"discrete action must be 1 integer menu indices, got"):
        denv.step(action)


@pytest.mark.parametrize("num_envs", [2.7, "4", None, 0, True])
def test_vector_env_num_envs_must_be_a_positive_integer(num_envs) -> None:
    from envs.sb3 import SB3FeedVecEnv

    with pytest.raises(ValueError, match=r"num_envs=.* is invalid: must be an integer >= 1"):
        gym.make_vec(CONTINUOUS_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", preset="tiny")
    with pytest.raises(ValueError, match=r"num_envs=.* is invalid"):
        SB3FeedVecEnv(num_envs, preset="tiny")


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
    with pytest.raises(ValueError, match=r"integer menu indices"):
        denv.step(1.5)


@pytest.mark.parametrize("face", ["single", "vector", "sb3"])
def test_step_before_reset(face: str) -> None:
    """The vector and SB3 faces used to step never-initialised users silently."""
    from envs.sb3 import SB3FeedVecEnv

    if face == "single":
        env, a = FeedEnv(preset="tiny"), np.zeros(N_KNOBS, np.float32)
    elif face == "vector":
        env, a = FeedVectorEnv(num_envs=2, preset="tiny"), np.zeros((2, N_KNOBS), np.float32)
    else:
        env, a = SB3FeedVecEnv(num_envs=2, preset="tiny", seed=0), np.zeros((2, N_KNOBS), np.float32)
    for kind in (gym.error.ResetNeeded, RuntimeError):  # gymnasium's convention, and what FeedEnv raised before
        with pytest.raises(kind, match=r"Cannot call \w+\.step\(\) before calling reset\(\)"):
            env.step(a)
    env.reset()
    out = env.step(a)
    assert np.all(np.isfinite(out[0]))


@pytest.mark.parametrize("face", ["single", "vector", "sb3", "vector_discrete"])
def test_ragged_action_names_the_expected_shape(face: str) -> None:
    """A ragged nested list used to fail with numpy's "inhomogeneous shape" message."""
    from envs.sb3 import SB3FeedVecEnv

    if face == "single":
        env, a, want = FeedEnv(preset="tiny"), [0.0] * (N_KNOBS - 1) + [[0.0, 0.0]], rf"\({N_KNOBS},\) knob values"
    elif face in ("sb3", "vector"):
        env = SB3FeedVecEnv(num_envs=2, preset="tiny", seed=0) if face == "sb3" else FeedVectorEnv(2, preset="tiny")
        a, want = [[0.0] * N_KNOBS, [0.0] * 3], rf"\(2, {N_KNOBS}\)"
    else:
        env, a, want = FeedVectorEnv(num_envs=2, preset="tiny", discrete=True), [[0], [1, 2]], r"\(2,\) integer menu"
    env.reset()
    with pytest.raises(ValueError, match=rf"action is a ragged sequence .*expected an array of shape {want}"):
        env.step(a)


def test_vector_reset_refuses_per_env_seeds_it_cannot_honour() -> None:
    """``reset(seed=[5, 6])`` used to use 5 silently: the users share one world seeded as a unit."""
    venv = FeedVectorEnv(num_envs=2, preset="tiny")
    with pytest.raises(ValueError, match=r"per-env seeds cannot be honoured.*reset\(seed=5\)"):
        venv.reset(seed=[5, 6])
    with pytest.raises(ValueError, match=r"per-env seeds cannot be honoured"):
        venv.reset(seed=[5, 5])  # seeding every env with 5 would make them identical: not what a batch does
    with pytest.raises(ValueError, match=r"has 3 seeds for num_envs=2"):
        venv.reset(seed=(5, 6, 7))
    with pytest.raises(ValueError, match=r"has 1 seeds for num_envs=2"):
        venv.reset(seed=[5])


def test_vector_reset_seed_lists_it_can_honour_are_deterministic() -> None:
    """A list of Nones reseeds nothing; with one user, ``[s]`` is the seed ``s`` (as the single env)."""
    a, b = FeedVectorEnv(num_envs=2, preset="tiny"), FeedVectorEnv(num_envs=2, preset="tiny")
    np.testing.assert_array_equal(a.reset(seed=3)[0], b.reset(seed=3)[0])
    z = np.zeros((2, N_KNOBS), np.float32)
    a.step(z), b.step(z)
    o_a, o_b = a.reset(seed=[None, None])[0], b.reset()[0]  # no reseed: the next users of the same stream
    np.testing.assert_array_equal(o_a, o_b)
    assert not np.array_equal(o_a, FeedVectorEnv(num_envs=2, preset="tiny").reset(seed=3)[0])
    one = FeedVectorEnv(num_envs=1, preset="tiny")
    single = FeedEnv(preset="tiny")
    o1, o2 = one.reset(seed=[5])[0], single.reset(seed=5)[0]
    np.testing.assert_array_equal(o1[0], o2)
    for _ in range(3):
        r1, r2 = one.step(np.zeros((1, N_KNOBS), np.float32)), single.step(np.zeros(N_KNOBS, np.float32))
        np.testing.assert_array_equal(r1[0][0], r2[0])
        assert float(r1[1][0]) == r2[1]


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
        # wrong types, numpy scalars and fields without range rules are checked too
        (lambda: make_config("tiny", corpus={"n_videos": "3000"}), r"n_videos='3000' is invalid: must be an integer"),
        (lambda: make_config("tiny", corpus={"n_videos": 2000.5}), r"n_videos=2000\.5 is invalid: must be an integer"),
        (lambda: make_config("tiny", corpus={"n_videos": True}), r"n_videos=True is invalid: must be an integer"),
        (lambda: make_config("tiny", horizon_days=np.float32("nan")), r"horizon_days=.*nan.* must be a finite"),
        (lambda: make_config("tiny", churn_days=np.float32(-3)), r"churn_days=.*-3.* must be > 0"),
        (lambda: make_config("tiny", users={"w_affinity": float("nan")}), r"UserConfig\.w_affinity=nan .*finite"),
        (lambda: make_config("tiny", reward={"mode": "composite", "w_return": float("inf")}), r"w_return=inf"),
        (lambda: make_config("tiny", pipeline={"ranking_weights": (float("nan"),) * 8}),
         r"ranking_weights\[0\]=nan .*finite"),
        (lambda: make_config("tiny", pipeline={"ranking_weights": "abcdefgh"}), r"weights='abcdefgh'.*sequence"),
        (lambda: make_config("tiny", pipeline={"ad_positions": (5.5,)}), r"ad_positions\[0\]=5\.5 .*integer"),
        (lambda: make_config("tiny", pipeline={"ad_positions": (5, 5)}), r"ad_positions=\(5, 5\).*without repeats"),
        (lambda: make_config("tiny", pipeline={"rebalancing": "no"}), r"rebalancing='no' .*True or False"),
        (lambda: make_config("tiny", corpus={"format_duration_s": (-1.0, 2.0, 3.0, 4.0)}), r"durations > 0"),
        (lambda: make_config("tiny").with_settings(["users.bias=1", "users.bias=2"]), r"repeats 'users\.bias'"),
        (lambda: make_config("tiny").with_settings(["users.bias"]), r"malformed: write PATH=VALUE"),
        (lambda: make_config("tiny", pipeline={"knobs": {"head_weight_range": 0.5}}),
         r"KnobConfig\.head_weight_range=0\.5 is invalid: must be > 1"),
        (lambda: make_config("tiny", users=5), r"FeedConfig\.users=5 is invalid: must be a UserConfig"),
        # fields that must agree with each other
        (lambda: make_config("tiny", users={"interest_topics": 50}), r"topics=50 .*<= corpus\.n_topics \(12\)"),
        (lambda: make_config("tiny", pipeline={"min_topics": 13}), r"min_topics=13 .*<= corpus\.n_topics"),
        (lambda: make_config("tiny", pipeline={"n_interest": 5000}), r"n_interest=5000 .*<= corpus\.n_videos"),
        # unknown names, at any depth, with the closest known ones
        (lambda: make_config("tiny", horizon_day=3.0), r"no field 'horizon_day'; did you mean horizon_days"),
        (lambda: make_config("tiny", users={"w_afinity": 1.0}), r"'users\.w_afinity'; did you mean w_affinity"),
        (lambda: make_config("tiny", pipeline={"knobs": {"nope": 1}}), r"no field 'pipeline\.knobs\.nope'"),
        (lambda: FeedConfig.from_json({**make_config("tiny").to_json(), "max_steps": "x"}), r"max_steps='x'"),
    ],
)
def test_bad_config(make, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()


def test_config_takes_numpy_scalars_lists_and_nested_dicts_as_python_values() -> None:
    cfg = make_config("tiny", corpus={"n_videos": np.int64(3000)}, horizon_days=np.float32(5.0), churn_days=2,
                      pipeline={"knobs": {"break_range": 3}, "ad_positions": [5, 12]})
    assert type(cfg.corpus.n_videos) is int and type(cfg.horizon_days) is float and type(cfg.churn_days) is float
    assert cfg.pipeline.knobs.break_range == 3.0 and cfg.pipeline.ad_positions == (5, 12)
    assert FeedConfig.from_json(cfg.to_json()) == cfg


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


@pytest.mark.parametrize("field", ["regret_tol", "reach_tol"])
@pytest.mark.parametrize("value", [float("nan"), "0.1", None])
def test_verdict_tolerances_must_be_numbers(field: str, value) -> None:
    """A NaN tolerance made every comparison False (no agent could beat) and CEM's guardrail ranking NaN."""
    from agents.verdict import Tolerance

    with pytest.raises(ValueError, match=rf"Tolerance\.{field}=.*--{field.replace('_', '-')}.*must be a number"):
        Tolerance(**{field: value})
    assert Tolerance(**{field: float("inf")}) and Tolerance(**{field: -0.01})  # no limit; an improvement required
