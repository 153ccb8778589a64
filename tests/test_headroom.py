"""The v3 state-dependence mechanisms and the headroom instruments (segment-CEM, the clairvoyant planner)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.cem import cem_tune
from agents.headroom import headroom_rows, load_rollout, planner_arms, rollout_path, save_rollout, trait_terciles
from agents.planner import blind_key, blind_planner_rollout, branched_rollout
from agents.policies import ConstantKnobs
from agents.segments import Segmenter, SegmentKnobs
from envs.config import make_config
from envs.observation import ObservationLayout
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS


@pytest.fixture(scope="module")
def tiny():
    return make_config("tiny")


def test_habit_raises_return_and_lowers_churn_and_dulls_satisfaction(tiny) -> None:
    sim = FeedSimulator(tiny, 4, seed=0)
    sim.reset()
    u = sim.users
    u.cold[:] = False
    u.rate_mult[:] = 1.0
    low, high = np.zeros(4, np.float32), np.ones(4, np.float32)
    ref = np.full(4, tiny.users.satisfaction_ref, np.float32)
    r0, h0 = u.clocks(ref, low)
    r1, h1 = u.clocks(ref, high)
    assert np.all(r1 > r0) and np.all(h1 < h0)
    # satisfaction moves a habitual user's hazard less (outcome insensitivity)
    _, h0_sad = u.clocks(ref - 0.2, low)
    _, h1_sad = u.clocks(ref - 0.2, high)
    assert np.all(h0_sad / h0 > h1_sad / h1 * 1.5)


def test_habit_builds_with_minutes_and_lapses_with_gaps(tiny) -> None:
    sim = FeedSimulator(tiny, 2, seed=0)
    sim.reset()
    u = sim.users
    u.habit[:] = 0.5
    u.s_minutes[:] = np.array([0.0, 40.0], np.float32)
    _, habit = u.fold(u.feeling())
    assert habit[0] == pytest.approx(0.5) and habit[1] == pytest.approx(0.5 + tiny.users.habit_gain * 0.5)
    u.boredom[:] = 1.0
    u.start_session(np.ones(2, bool), np.zeros(2, np.float32), np.array([0.5, 10.0], np.float32))
    assert u.habit[0] == pytest.approx(0.5)  # a same-day return keeps the habit; a 10-day lapse erodes it
    assert u.habit[1] == pytest.approx(0.5 * np.exp(-9.0 / tiny.users.habit_decay_days), rel=1e-5)
    assert u.boredom[0].max() > u.boredom[1].max()  # satiation recovers with the gap


def test_focused_users_dislike_diverse_sessions(tiny) -> None:
    sim = FeedSimulator(tiny, 2000, seed=3)
    sim.reset()
    u = sim.users
    k = (u.topic_wts > 0).sum(axis=1)
    assert set(np.unique(k)) == {1, 2, 3}
    assert u.appetite[k == 1].mean() < 0 < u.appetite[k == 3].mean() - 0.5
    # the observation's history entropy tells them apart (established users only: new ones have no history)
    ent = sim.view.topic_entropy()
    est = ~u.cold
    assert ent[est & (k == 1)].max() < ent[est & (k == 3)].mean()
    assert np.all(ent[u.cold] == 0)


def test_segmenter_assigns_by_native_thresholds(tiny) -> None:
    lay = ObservationLayout(tiny)
    seg = Segmenter((("tenure_days", 7.0), ("session_minutes", 30.0)))
    obs = np.zeros((4, lay.dim), np.float32)
    obs[:, lay["user.days_since_signup"]] = (np.log1p(np.array([[1.0], [10.0], [1.0], [10.0]])) / 7.0)
    obs[:, lay["session.minutes"]] = np.array([[5.0], [5.0], [45.0], [45.0]]) / 60.0
    assert seg.assign(obs, lay).tolist() == [0, 1, 2, 3]
    assert seg.labels()[3] == "tenure_days>=7,session_minutes>=30"
    with pytest.raises(ValueError, match="unknown segment field"):
        Segmenter((("shoe_size", 1.0),))
    with pytest.raises(ValueError, match=r"\(4, 13\) table"):
        SegmentKnobs(np.zeros((3, N_KNOBS)), seg)
    pol = SegmentKnobs(np.arange(4)[:, None] * np.ones((4, N_KNOBS)) / 4, seg)
    with pytest.raises(RuntimeError, match="before bind"):
        pol.act(obs)


def test_segment_cem_returns_a_table_and_is_deterministic(tiny) -> None:
    seg = Segmenter((("tenure_days", 7.0),))
    kw = dict(budget_steps=2 * 8 * 4 * 10, n_candidates=8, users_per_candidate=4, steps_per_iter=10, seed=5)
    a = cem_tune(tiny, segments=seg, **kw)
    b = cem_tune(tiny, segments=seg, **kw)
    assert a.best_action.shape == (2, N_KNOBS) and len(a.means) == 2
    np.testing.assert_array_equal(a.best_action, b.best_action)
    const = cem_tune(tiny, **kw)
    assert const.best_action.shape == (N_KNOBS,)
    # segment-CEM branching from the constant search's mean: every segment starts there
    start = cem_tune(tiny, **{**kw, "budget_steps": 8 * 4 * 10, "init_std": 1e-9, "min_std": 1e-9},
                     segments=seg, init_mean=const.best_action)
    np.testing.assert_allclose(start.best_action, np.tile(const.best_action, (2, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="init_mean"):
        cem_tune(tiny, segments=seg, init_mean=np.zeros(3), **kw)


def test_keyed_rollout_pairs_users_and_identical_arms_change_nothing(tiny) -> None:
    a = np.zeros(N_KNOBS, np.float32)
    one = branched_rollout([ConstantKnobs(a, "w")], tiny, 8, seed=2)
    again = branched_rollout([ConstantKnobs(a, "w")], tiny, 8, seed=2)
    np.testing.assert_array_equal(one.retained, again.retained)
    np.testing.assert_array_equal(one.counts["engagement/videos"], again.counts["engagement/videos"])
    np.testing.assert_array_equal(one.start_obs, again.start_obs)
    # the planner's first look at a user is the same user the one-arm rollout served
    two = branched_rollout([ConstantKnobs(a, "w"), ConstantKnobs(np.full(N_KNOBS, 0.5, np.float32), "x")],
                           tiny, 8, seed=2, period=5)
    np.testing.assert_array_equal(two.start_obs, one.start_obs)
    assert two.arm_share.sum() == pytest.approx(1.0) and two.requests > one.requests
    with pytest.raises(ValueError, match="env_overrides"):
        bad = ConstantKnobs(a, "e")
        bad.env_overrides = {"pipeline": {"rebalancing": False}}
        branched_rollout([bad], tiny, 2, seed=0)


def test_headroom_rows_pair_by_world_and_refuse_mismatches(tiny) -> None:
    base = np.zeros(N_KNOBS, np.float32)
    arms = planner_arms(base)
    assert [p.name for p in arms][:2] == ["cem_tuned", "diverse"] and len(arms) == 6
    res = {"cem_tuned": [branched_rollout([arms[0]], tiny, 6, s) for s in (0, 1)],
           "diverse": [branched_rollout([arms[1]], tiny, 6, s) for s in (0, 1)]}
    rows = headroom_rows(res, reps=200)
    d = next(r for r in rows if r["policy"] == "diverse")
    diff = np.concatenate([x.retained.astype(float) - y.retained for x, y in zip(res["diverse"], res["cem_tuned"])])
    assert d["diff"] == pytest.approx(diff.mean()) and d["lo"] <= d["diff"] <= d["hi"]
    res["diverse"] = res["diverse"][:1]
    with pytest.raises(ValueError, match="same worlds"):
        headroom_rows(res, reps=200)


def test_rollout_store_round_trips_and_refuses_other_keys(tiny, tmp_path) -> None:
    res = branched_rollout([ConstantKnobs(np.zeros(N_KNOBS, np.float32), "w")], tiny, 4, seed=1)
    key = {"seed": 1, "users": 4}
    path = rollout_path(tmp_path, "w-w1", key)
    assert load_rollout(path, key) is None
    save_rollout(path, res, key)
    back = load_rollout(path, key)
    assert back is not None and back.name == res.name and back.requests == res.requests
    np.testing.assert_array_equal(back.retained, res.retained)
    np.testing.assert_array_equal(back.counts["engagement/regrets"], res.counts["engagement/regrets"])
    assert rollout_path(tmp_path, "w-w1", {"seed": 2, "users": 4}) != path
    with pytest.raises(ValueError, match="another key"):
        load_rollout(path, {"seed": 2, "users": 4})
    path.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="unreadable"):
        load_rollout(path, key)


def test_headroom_script_end_to_end_and_resumes_from_its_store(tmp_path) -> None:
    from scripts.headroom import Args, main

    args = Args(preset="tiny", users=4, seeds=(0, 1), cem_budget=16 * 32 * 100, train_worlds=1, period=5,
                out=tmp_path, progress=False)
    rep = main(args)
    assert {r["policy"] for r in rep["rows"]} == {"weighted_sum", "cem_tuned", "segment_cem", "planner"}
    stored = sorted((tmp_path / "rollouts").glob("*.npz"))
    assert len(stored) == 4 * 2 and (tmp_path / "cem.json").exists()
    again = main(args)  # every vector and rollout read back: the same table
    assert again["rows"] == rep["rows"]
    assert sorted((tmp_path / "rollouts").glob("*.npz")) == stored
    with pytest.raises(ValueError, match="segment-from"):
        main(Args(preset="tiny", segment_from=1.0, out=tmp_path))


def test_headroom_script_distills_the_planner_from_reused_vectors(tmp_path) -> None:
    from scripts.headroom import Args, main

    first = Args(preset="tiny", users=4, seeds=(0,), cem_budget=16 * 32 * 50, train_worlds=1, period=5,
                 policies=(), out=tmp_path / "a", progress=False)
    main(first)
    args = Args(preset="tiny", users=4, seeds=(0,), period=5, policies=("distilled",), distill_worlds=2,
                tuned=tmp_path / "a" / "cem.json", out=tmp_path / "b", progress=False)
    rep = main(args)
    assert [r["policy"] for r in rep["rows"] if r["group"] == "all"] == ["cem_tuned", "distilled"]
    assert rep["cem_tuned"] == json.loads((tmp_path / "a" / "cem.json").read_text())["cem_tuned"]
    assert not (tmp_path / "b" / "cem.json").exists()  # nothing was tuned
    assert len(list((tmp_path / "b" / "rollouts").glob("planner-record-w100*.npz"))) == 2
    with pytest.raises(ValueError, match="--policies"):
        main(Args(preset="tiny", policies=("oracle",), out=tmp_path / "c"))
    with pytest.raises(ValueError, match="distill-worlds"):
        main(Args(preset="tiny", policies=("distilled",), distill_worlds=1, out=tmp_path / "c"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not a cem\.json"):
        main(Args(preset="tiny", tuned=tmp_path / "bad.json", out=tmp_path / "c", progress=False))


def test_constant_arms_serve_each_planner_arm_to_everyone(tmp_path) -> None:
    from scripts.headroom import Args, main

    first = Args(preset="tiny", users=4, seeds=(0,), cem_budget=16 * 32 * 50, train_worlds=1, period=5,
                 policies=(), out=tmp_path / "a", progress=False)
    main(first)
    tuned = json.loads((tmp_path / "a" / "cem.json").read_text())
    rep = main(Args(preset="tiny", users=4, seeds=(0,), period=5, policies=("constant_arms",),
                    tuned=tmp_path / "a" / "cem.json", out=tmp_path / "b", progress=False))
    arms = planner_arms(np.asarray(tuned["cem_tuned"], np.float32), np.asarray(tuned["segment_cem"], np.float32))
    rows = {r["policy"]: r for r in rep["rows"] if r["group"] == "all"}
    assert set(rows) == {"cem_tuned"} | {f"const_{a.name}" for a in arms[1:]}
    for a in arms[1:3]:  # each row is the one-arm rollout of that vector
        alone = branched_rollout([a], make_config("tiny"), 4, 0)
        assert rows[f"const_{a.name}"]["retention"] == pytest.approx(alone.retained.mean())
    assert {r["trait"] for r in rep["terciles"]} >= {"social_value", "compliance", "placebo_0"}


def test_trait_terciles_find_a_trait_that_decides_the_best_arm() -> None:
    rng = np.random.default_rng(7)  # not the placebos' stream (seed 0)
    n = 3000
    trait = rng.random(n)
    low = trait < np.quantile(trait, 1 / 3)  # the lowest tercile
    ref = (rng.random(n) < 0.5).astype(float)
    # arm "a" is better by 0.3 for the low tercile and worse by 0.3 elsewhere; arm "b" equals the reference
    a = np.where(low, np.maximum(ref, rng.random(n) < 0.3), np.minimum(ref, rng.random(n) > 0.3)).astype(float)
    rows = {r["trait"]: r for r in trait_terciles({"ref": ref, "a": a, "b": ref.copy()}, {"t": trait}, "ref")}
    assert rows["t"]["best"][0][0] == "a" and rows["t"]["best"][2][0] in ("ref", "b")
    assert rows["t"]["gain"] == pytest.approx(np.mean(np.where(low, a - ref, 0.0)), abs=1e-9)
    assert all(rows[f"placebo_{i}"]["gain"] < rows["t"]["gain"] / 2 for i in range(3))
    with pytest.raises(ValueError, match="shape"):
        trait_terciles({"ref": ref}, {"t": trait[:10]}, "ref")
    # a flag with a point mass still splits in two: the flagged users and the others
    flag = (rng.random(n) < 0.3).astype(float)
    row = trait_terciles({"ref": ref, "a": a}, {"flag": flag}, "ref", placebos=0)[0]
    assert len(row["best"]) == 2


def test_the_blind_planner_with_identical_arms_is_the_one_arm_rollout(tiny) -> None:
    """Without foresight, the committed life is lived with the user's own random numbers in a world the look-ahead
    leaves alone: with two identical arms the user's life is bit for bit the one-arm rollout's."""
    a = np.full(N_KNOBS, 0.2, np.float32)
    one = branched_rollout([ConstantKnobs(a, "a")], tiny, 12, seed=0, period=10)
    blind = blind_planner_rollout([ConstantKnobs(a, "a"), ConstantKnobs(a, "b")], tiny, 12, seed=0, period=10,
                                  samples=2)
    np.testing.assert_array_equal(one.retained, blind.retained)
    for c in one.counts:
        np.testing.assert_array_equal(one.counts[c], blind.counts[c], err_msg=c)
    np.testing.assert_array_equal(one.start_obs, blind.start_obs)
    with pytest.raises(ValueError, match=">= 2 arms"):
        blind_planner_rollout([ConstantKnobs(a, "a")], tiny, 4, seed=0)


def test_blind_keys_differ_from_the_real_ones_and_from_each_other() -> None:
    key = np.arange(1000, dtype=np.uint32)
    k0, k1, s1 = blind_key(key, 0, 0), blind_key(key, 1, 0), blind_key(key, 0, 1)
    assert not (k0 == key).any() and not (k0 == k1).any() and not (k0 == s1).any()


def test_a_frozen_world_is_left_as_it_is(tiny) -> None:
    sim = FeedSimulator(tiny, 6, seed=1)
    sim.reset()
    cat = sim.corpus.catalog
    before = {k: np.array(v, copy=True) for k, v in vars(cat).items() if isinstance(v, np.ndarray)}
    day = sim.world_day
    with sim.frozen_world():
        for _ in range(5):
            sim.step(np.zeros((6, N_KNOBS), np.float32))
    assert sim.world_day == day and not sim.frozen
    for k, v in vars(cat).items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, before[k], err_msg=k)
    sim.step(np.zeros((6, N_KNOBS), np.float32))
    assert sim.world_day > day
    assert any(not np.array_equal(v, before[k]) for k, v in vars(cat).items()
               if isinstance(v, np.ndarray) and k in before and v.shape == before[k].shape)


def test_the_main_job_names_the_measured_headroom(tmp_path) -> None:
    from agents.headroom import headroom_line, read_headroom
    from envs.config import ENV_VERSION

    rows = [{"group": "all", "policy": "planner", "diff": 0.06, "lo": 0.04, "hi": 0.08},
            {"group": "all", "policy": "distilled", "diff": 0.002, "lo": -0.02, "hi": 0.03},
            {"group": "new", "policy": "planner", "diff": 0.5, "lo": 0.4, "hi": 0.6}]
    path = tmp_path / "headroom.json"
    path.write_text(json.dumps({"rows": rows, "env_version": ENV_VERSION, "args": {"preset": "small"}}))
    measured = read_headroom(path, "small")
    assert list(measured) == ["planner", "distilled"] and measured["planner"]["diff"] == 0.06
    heads = [{"agent": "ppo", "vs_other": {"diff": 0.03}}, {"agent": "cem_tuned", "vs_other": None}]
    line = headroom_line(measured, heads)
    assert "clairvoyant planner +6.0 pp [+4.0, +8.0]" in line and "ppo +50 %" in line and "cem_tuned +" not in line
    with pytest.raises(ValueError, match="measured on preset 'small', this job runs 'tiny'"):
        read_headroom(path, "tiny")
    path.write_text(json.dumps({"rows": rows, "env_version": "v0", "args": {"preset": "small"}}))
    with pytest.raises(ValueError, match="env 'v0'"):
        read_headroom(path, "small")
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"not a headroom\.json"):
        read_headroom(path, "small")
