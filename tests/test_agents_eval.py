"""Agents and evaluation: common random numbers, intervals, checkpoints, determinism."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.cem import cem_tune
from agents.checkpoints import CheckpointMismatchError
from agents.evaluation import PendingRollouts, evaluate, run_jobs
from agents.policies import ConstantKnobs, PureEngagement, TrueScores, WeightedSum, make_baseline
from agents.ppo import CHECKPOINT, META, PPOParams, load_ppo, train_ppo
from agents.report import table_rows
from agents.rollout_store import RolloutStore
from agents.rollouts import METRICS, STATE_GROUPS, RolloutJob, RunResult, decode_state, gini, rollout
from agents.stats import BINARY_METRICS, Comparison, bootstrap_ci, iqm, stratified_iqm_ci, summarize
from envs.config import ENV_VERSION, make_config
from envs.simulator import FeedSimulator
from offline_data.executor import LocalExecutor
from rankers.config import KNOB_NAMES, N_KNOBS
from tests.helpers import CaptureSink


@pytest.fixture(scope="module")
def cfg():
    return make_config("tiny", horizon_days=3.0, churn_days=2.0)


def test_rollout_is_reproducible_and_policies_share_users(cfg):
    a = rollout(WeightedSum(), cfg, 6, seed=3)
    b = rollout(WeightedSum(), cfg, 6, seed=3)
    for k in a.per_user:
        np.testing.assert_array_equal(a.per_user[k], b.per_user[k], err_msg=k)
    c = rollout(WeightedSum(), cfg, 6, seed=4)
    assert any(not np.array_equal(a.per_user[k], c.per_user[k]) for k in a.per_user)

    class Counting(WeightedSum):
        calls = 0

        def act(self, obs):
            self.calls += 1  # one call per batched request
            return super().act(obs)

    counted = Counting()
    d = rollout(counted, cfg, 6, seed=3)
    assert d.population["perf/rollout_requests"] == counted.calls == a.population["perf/rollout_requests"] > 0


def test_engagement_baseline_changes_the_pipeline(cfg):
    ws = rollout(WeightedSum(), cfg, 6, seed=1)
    pe = rollout(PureEngagement(), cfg, 6, seed=1)
    assert not np.array_equal(ws.per_user["slate/topic_entropy"], pe.per_user["slate/topic_entropy"])


def test_placebo_is_weighted_sum_nudged_in_one_head_weight(cfg):
    obs = np.zeros((5, 3), np.float32)
    pl, ws = make_baseline("placebo"), WeightedSum()
    diff = pl.act(obs) - ws.act(obs)
    assert diff.shape == (5, N_KNOBS) and np.count_nonzero(diff) == 5
    assert np.all(diff[:, KNOB_NAMES.index("weight.p_complete")] == pytest.approx(1e-3))
    # the nudge reaches the ranking: somewhere in a rollout a slate differs
    a, b = rollout(pl, cfg, 6, seed=2), rollout(ws, cfg, 6, seed=2)
    assert any(not np.array_equal(a.per_user[k], b.per_user[k]) for k in a.per_user)


def test_summary_has_paired_differences(cfg):
    comp = evaluate([WeightedSum(), ConstantKnobs(np.zeros(N_KNOBS), "zero_copy"), TrueScores()], cfg, 6, [0],
                    progress=False)
    rows = summarize(comp, ["retention/sessions_per_day", "engagement/regret_rate"], reps=200)
    twin = next(r for r in rows if r["policy"] == "zero_copy" and r["metric"] == "retention/sessions_per_day")
    # the zero action is the weighted-sum baseline: same users, same noise -> identical outcomes
    assert twin["diff"] == 0.0 and not twin["significant"]
    base = next(r for r in rows if r["policy"] == "weighted_sum" and r["metric"] == "engagement/regret_rate")
    assert base["lo"] <= base["mean"] <= base["hi"]
    req = {r["policy"]: r["mean"] for r in rows if r["metric"] == "perf/rollout_requests"}
    assert set(req) == {"weighted_sum", "zero_copy", "true_scores"} and req["zero_copy"] == req["weighted_sum"] > 0


def test_bootstrap_interval_covers_the_mean_and_shrinks():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 400)
    m, lo, hi = bootstrap_ci(x, reps=500)
    assert lo < 1.0 < hi and lo < m < hi
    _m2, lo2, hi2 = bootstrap_ci(np.tile(x, 4), reps=500)
    assert hi2 - lo2 < hi - lo


def test_gini_known_values():
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.r_[np.zeros(9), 1.0]) == pytest.approx(0.9)


def test_policy_input_errors():
    with pytest.raises(ValueError, match="shape"):
        ConstantKnobs(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        ConstantKnobs(np.full(N_KNOBS, np.nan))
    with pytest.raises(ValueError, match=r"knob 'explore_share' = 5 is outside the action range \[-1, 1\]"):
        ConstantKnobs(np.eye(N_KNOBS)[KNOB_NAMES.index("explore_share")] * 5.0)
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("nope")


def test_ppo_checkpoint_resumes_and_refuses_other_versions(cfg, tmp_path: Path):
    out = tmp_path / "ppo"
    m1 = train_ppo(cfg, 512, out, num_envs=8, seed=0)
    assert m1.num_timesteps >= 512 and (out / CHECKPOINT).exists()
    m2 = train_ppo(cfg, 1024, out, num_envs=8, seed=0)
    assert m2.num_timesteps >= 1024
    assert json.loads((out / META).read_text())["num_timesteps"] == m2.num_timesteps
    meta = json.loads((out / META).read_text())
    meta["env_version"] = "v999"
    (out / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="env version 'v999'"):
        load_ppo(out, cfg)
    meta["env_version"] = ENV_VERSION
    (out / META).write_text(json.dumps(meta))
    # the message names the differing fields (cfg has a 3-day horizon, the tiny preset 7)
    with pytest.raises(CheckpointMismatchError, match=r"horizon_days: stored=3\.0 here=7\.0"):
        load_ppo(out, make_config("tiny"))
    with pytest.raises(CheckpointMismatchError):
        train_ppo(make_config("tiny"), 512, out, num_envs=8, seed=0)
    # the main job's mode: the mismatched checkpoint is set aside (kept), training starts afresh
    m3 = train_ppo(make_config("tiny"), 512, out, num_envs=8, seed=0, restart_mismatched=True)
    assert 512 <= m3.num_timesteps < 1024
    assert (tmp_path / "ppo.stale-0" / CHECKPOINT).exists()
    assert json.loads((out / META).read_text())["config"]["horizon_days"] == 7.0


def test_ppo_losses_reach_the_sink_and_no_temp_dir_is_left(cfg, tmp_path: Path, monkeypatch):
    """SB3's default logger makes an empty ``SB3-<date>`` directory in the temp dir on every ``learn``
    (fresh or resumed); train_ppo's silent logger makes none and still hands SB3's values to the sink."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    sink = CaptureSink()
    train_ppo(cfg, 512, tmp_path / "ppo", num_envs=8, seed=0, sink=sink, params=PPOParams(n_steps=16, batch_size=64))
    train_ppo(cfg, 768, tmp_path / "ppo", num_envs=8, seed=0, sink=sink, params=PPOParams(n_steps=16, batch_size=64))
    assert [p.name for p in systmp.iterdir() if p.name.startswith("SB3-")] == []  # (torch may cache here)
    keys = set().union(*(m for m, _ in sink.logged))
    assert {"losses/value_loss", "losses/policy_gradient_loss", "train/returned_per_step"} <= keys
    assert max(step for _, step in sink.logged) >= 768


def test_ppo_training_is_deterministic(cfg, tmp_path: Path):
    a = train_ppo(cfg, 512, tmp_path / "a", num_envs=8, seed=5, resume=False)
    b = train_ppo(cfg, 512, tmp_path / "b", num_envs=8, seed=5, resume=False)
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(pa, pb)


def test_cem_is_deterministic_and_within_budget(cfg):
    r1 = cem_tune(cfg, 2000, seed=1, n_candidates=4, users_per_candidate=4, steps_per_iter=20)
    r2 = cem_tune(cfg, 2000, seed=1, n_candidates=4, users_per_candidate=4, steps_per_iter=20)
    np.testing.assert_array_equal(r1.best_action, r2.best_action)
    assert r1.steps_used <= 2000 and len(r1.history) == 6
    assert np.all(np.abs(r1.best_action) <= 1)


def test_cem_mean_after_a_budget_is_the_search_with_that_budget(cfg):
    """The main job's agents start from CEM's mean part way (``mean_after``): it must be what a search with
    that budget returns, so that the agents' anchor is a CEM result of a stated budget."""
    kw = dict(n_candidates=8, users_per_candidate=2, steps_per_iter=20)  # 320 requests an iteration
    big, small = cem_tune(cfg, 2000, seed=1, **kw), cem_tune(cfg, 1000, seed=1, **kw)
    assert big.iter_steps == 320 and len(big.means) == 6 and len(small.means) == 3
    np.testing.assert_array_equal(big.mean_after(1000), small.best_action)
    np.testing.assert_array_equal(big.mean_after(1919), big.means[4])  # 5 whole iterations
    np.testing.assert_array_equal(big.means[-1], big.best_action)
    assert not np.array_equal(big.mean_after(1000), big.best_action)  # the search moved on
    np.testing.assert_array_equal(big.mean_after(319), np.zeros(13))  # before its first iteration: the zero action
    with pytest.raises(ValueError, match="buy 7 CEM iterations, but the search ran 6"):
        big.mean_after(2240)


def test_cem_guardrails_rank_keepers_first_by_hand():
    from agents.cem import rank_candidates
    from agents.verdict import Tolerance

    fitness = np.array([5.0, 1.0, 9.0, 7.0, 6.0])
    share = np.array([0.30, 0.30, 0.10, 0.295, 0.292])  # candidate 1 is the reference (weighted-sum)
    regret = np.array([0.040, 0.040, 0.040, 0.050, 0.041])
    order, miss = rank_candidates(fitness, share, regret)
    assert list(order) == [2, 3, 4, 0, 1] and not miss.any()
    order, miss = rank_candidates(fitness, share, regret, Tolerance(regret_tol=0.002, reach_tol=0.01))
    # 2 loses 20 pp of new-creator share (misses by 0.19), 3 raises regret by 1 pp (misses by 0.008);
    # 4 is inside both tolerances
    assert list(order) == [4, 0, 1, 3, 2]
    np.testing.assert_allclose(miss, [0.0, 0.0, 0.19, 0.008, 0.0], atol=1e-12)
    # with a margin: 4's 0.8 pp fall plus 1.645 x 0.2 pp of standard error is beyond the 1 pp tolerance
    share_se = np.array([0.0, 0.0, 0.01, 0.0, 0.002])
    order, miss = rank_candidates(fitness, share, regret, Tolerance(regret_tol=0.002, reach_tol=0.01), 1,
                                  share_se, 0.0, z=1.645)
    assert list(order) == [0, 1, 4, 3, 2]
    np.testing.assert_allclose(miss, [0.0, 0.0, 0.19 + 0.01645, 0.008, 0.00129], atol=1e-12)


def test_rate_gaps_standard_error_by_hand():
    from agents.cem import rate_gaps

    num = np.array([[1.0, 2.0, 1.0], [3.0, 2.0, 3.0]])  # 2 user slots x 3 candidates
    den = np.full((2, 3), 10.0)
    rate, se = rate_gaps(num, den, reference=0)
    np.testing.assert_allclose(rate, [0.2, 0.2, 0.2])
    # slot influences (U (num - rate den) / sum(den)): candidate 0 (-0.1, +0.1), 1 (0, 0), 2 = candidate 0's;
    # differences from 0: 1 -> (+0.1, -0.1): sd 0.1414 / sqrt(2) = 0.1; 2 -> (0, 0): the same users, no error
    np.testing.assert_allclose(se, [0.0, 0.1, 0.0], atol=1e-12)
    # unequal exposure: candidate 1 has rates 2/20 and 4/10 in its two slots; the pooled rate is 6/30
    num, den = np.array([[1.0, 2.0], [1.0, 4.0]]), np.array([[10.0, 20.0], [10.0, 10.0]])
    rate, se = rate_gaps(num, den, reference=0)
    np.testing.assert_allclose(rate, [0.1, 0.2])
    # influences: candidate 1 2 (2 - 0.2 x 20) / 30 = -4/30, 2 (4 - 0.2 x 10) / 30 = +4/30; candidate 0: 0, 0
    np.testing.assert_allclose(se, [0.0, np.std([-4 / 30, 4 / 30], ddof=1) / np.sqrt(2)], atol=1e-12)


def test_cem_with_guardrails_serves_the_reference_and_reports_them(cfg):
    from agents.verdict import Tolerance

    kw = dict(n_candidates=4, users_per_candidate=4, steps_per_iter=20)
    r1 = cem_tune(cfg, 2000, seed=1, constraints=Tolerance(), **kw)
    r2 = cem_tune(cfg, 2000, seed=1, constraints=Tolerance(), **kw)
    np.testing.assert_array_equal(r1.best_action, r2.best_action)
    h = r1.history[-1]
    assert 0.0 <= h["feasible"] <= 1.0 and 0.0 <= h["new_creator_share_of_mean"] <= 1.0
    free = cem_tune(cfg, 2000, seed=1, constraints=Tolerance(regret_tol=np.inf, reach_tol=np.inf), **kw)
    assert all(x["feasible"] == 1.0 for x in free.history)  # nothing can miss an infinite tolerance
    tight = cem_tune(cfg, 2000, seed=1, constraints=Tolerance(regret_tol=np.inf, reach_tol=-1.0), **kw)
    assert all(x["feasible"] == 0.0 for x in tight.history)  # nobody gains 100 pp of share
    with pytest.raises(ValueError, match="3 with constraints"):
        cem_tune(cfg, 2000, seed=1, constraints=Tolerance(), n_candidates=2, users_per_candidate=4)


def _run(policy: str, seed: int, values: dict[str, list[float]]) -> RunResult:
    per_user = {k: np.asarray(v, np.float64) for k, v in values.items()}
    return RunResult(policy, seed, per_user, {"creators/exposure_gini": 0.0, "perf/request_ms_p50": 0.0,
                                              "perf/request_ms_p99": 0.0}, np.ones(2), np.zeros(N_KNOBS))


def test_iqm_of_paired_differences_hand_computed():
    # 8 paired differences over two seeds: sorted -100, 1, 2, 3, 4, 5, 6, 100; the IQM drops the
    # 2 lowest and 2 highest (25 % each side) -> mean(2, 3, 4, 5) = 3.5, while the mean is 21/8
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)
    m = "engagement/watch_minutes"
    b = "retention/retained_30d"
    comp = Comparison(runs=[
        _run("weighted_sum", 0, {m: [10, 10, 10, 10], b: [1, 0, 1, 0]}),
        _run("weighted_sum", 1, {m: [20, 20, 20, 20], b: [1, 1, 0, 0]}),
        _run("agent", 0, {m: [-90, 11, 12, 13], b: [1, 1, 1, 0]}),
        _run("agent", 1, {m: [24, 25, 26, 120], b: [1, 1, 1, 1]}),
    ])
    rows = summarize(comp, [m, b], reps=500)
    r = next(x for x in rows if x["policy"] == "agent" and x["metric"] == m)
    assert r["iqm"] == pytest.approx(3.5)
    assert r["diff"] == pytest.approx(21 / 8)
    assert r["iqm_lo"] <= r["iqm"] <= r["iqm_hi"] and r["iqm_lo"] < r["iqm_hi"]
    assert isinstance(r["iqm_significant"], bool)
    binary = next(x for x in rows if x["policy"] == "agent" and x["metric"] == b)
    assert binary["iqm"] is None and binary["iqm_lo"] is None and binary["diff"] == pytest.approx(3 / 8)
    base = next(x for x in rows if x["policy"] == "weighted_sum" and x["metric"] == m)
    assert "iqm" not in base and "diff" not in base
    # runs saved before perf/rollout_requests existed are summarised without it
    assert not any(x["metric"] == "perf/rollout_requests" for x in rows)
    assert any(x["metric"] == "perf/request_ms_p50" for x in rows)



def test_population_metrics_are_paired_per_world_not_bootstrapped():
    # exposure_gini is one value per world: its row says so and compares worlds pairwise, never a users' CI
    m = "engagement/watch_minutes"
    runs = []
    for pol, ginis in (("weighted_sum", [0.5, 0.6, 0.7]), ("agent", [0.45, 0.58, 0.71])):
        for seed, g in enumerate(ginis):
            r = _run(pol, seed, {m: [1.0, 2.0]})
            r.population["creators/exposure_gini"] = g
            runs.append(r)
    rows = summarize(Comparison(runs=runs), [m], reps=100)
    agent = next(x for x in rows if x["metric"] == "creators/exposure_gini" and x["policy"] == "agent")
    base = next(x for x in rows if x["metric"] == "creators/exposure_gini" and x["policy"] == "weighted_sum")
    assert agent["spread"] == "seeds" and agent["n_seeds"] == 3
    assert (agent["lo"], agent["hi"]) == (0.45, 0.71)
    assert agent["diff"] == pytest.approx((-0.05 - 0.02 + 0.01) / 3)
    assert (agent["diff_lo"], agent["diff_hi"]) == (pytest.approx(-0.05), pytest.approx(0.01))
    assert agent["significant"] is None and "diff" not in base
    _, body = table_rows(rows, metrics=["creators/exposure_gini"])
    cell = body[0][2]
    assert "[" not in cell and "(worlds 0.45..0.71)" in cell and "per world -0.05..+0.01" in cell, cell


def test_binary_metrics_are_known_metrics():
    assert set(METRICS) >= BINARY_METRICS


def test_stratified_iqm_interval_matches_rliable():
    from numpy.random import RandomState
    from rliable import library, metrics

    x = np.random.default_rng(0).standard_exponential((300, 2))
    q, lo, hi = stratified_iqm_ci([x[:, 0], x[:, 1]], seed=0, reps=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arch's RandomState deprecation inside rliable
        point, ci = library.get_interval_estimates({"a": x}, lambda s: np.array([metrics.aggregate_iqm(s)]),
                                                   reps=2000, random_state=RandomState(1))
    assert q == pytest.approx(float(point["a"][0]))
    # same estimator, different resampling streams: the bounds agree to Monte-Carlo error
    assert lo == pytest.approx(float(ci["a"][0, 0]), abs=0.02)
    assert hi == pytest.approx(float(ci["a"][1, 0]), abs=0.02)
    assert stratified_iqm_ci([np.full(5, 2.0), np.full(3, 2.0)]) == (2.0, 2.0, 2.0)
    # strata of unequal size are resampled within themselves: a stratum of 1 value never varies
    q2, lo2, hi2 = stratified_iqm_ci([np.array([5.0]), np.array([5.0, 5.0, 5.0, 0.0])], reps=300)
    assert q2 == 5.0 and 0.0 <= lo2 <= hi2 <= 5.0


def test_decode_state_matches_the_simulator_view(cfg):
    sim = FeedSimulator(cfg, 16, seed=2)
    obs = sim.reset()
    for _ in range(40):
        v = decode_state(obs, sim.layout)
        np.testing.assert_allclose(v["session_minutes"], sim.view.session_minutes, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(v["days_since_signup"], sim.view.days_since_signup, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(v["episode_day"], sim.users.day, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(v["cold_start"] > 0.5, sim.view.cold_start)
        obs = sim.step(np.zeros((16, N_KNOBS), np.float32)).obs
    # the round trip was checked on non-trivial values
    assert sim.view.session_minutes.max() > 1.0 and sim.users.day.max() > 0.0


def test_knob_usage_by_state_shapes_and_constant_policy(cfg):
    a = np.linspace(-0.9, 0.9, N_KNOBS).astype(np.float32)
    r = rollout(ConstantKnobs(a, "const"), cfg, 8, seed=0)
    assert set(r.knob_by_state) == set(STATE_GROUPS) == set(r.state_counts)
    totals = set()
    for g, labels in STATE_GROUPS.items():
        m, n = r.knob_by_state[g], r.state_counts[g]
        assert m.shape == (len(labels), N_KNOBS) and n.shape == (len(labels),)
        totals.add(int(n.sum()))
        filled = n > 0
        np.testing.assert_allclose(m[filled], np.broadcast_to(a, m[filled].shape), atol=1e-6, err_msg=g)
        assert np.all(np.isnan(m[~filled])), g
    # every group partitions the same active user-requests
    assert len(totals) == 1 and totals.pop() > 0
    # the buckets really split the requests: several session-time and episode-day buckets are used
    assert (r.state_counts["session"] > 0).sum() >= 2 and (r.state_counts["day"] > 0).sum() >= 2
    np.testing.assert_allclose(r.knob_means, a, atol=1e-6)


def test_background_rollouts_give_the_serial_runs(cfg):
    """Rollouts handed to the executor first (as the main job does before it trains) and rollouts run after
    them give the serial loop's runs, each set in job order; a rollout's error reaches the caller."""

    pols = [WeightedSum(), make_baseline("random", seed=7), TrueScores()]
    serial = {(r.policy, r.seed): r for r in evaluate(pols, cfg, 6, (0, 1), progress=False).runs}
    ex = LocalExecutor()
    bg = PendingRollouts([RolloutJob(p, cfg, 6, s) for s in (0, 1) for p in pols[1:]], ex)
    fg = [RolloutJob(pols[0], cfg, 6, s) for s in (0, 1)]
    out = run_jobs(fg, ex, progress=False, background=[bg])
    assert [(r.policy, r.seed) for r in out] == [("weighted_sum", 0), ("weighted_sum", 1), ("random", 0),
                                                 ("true_scores", 0), ("random", 1), ("true_scores", 1)]
    for r in out:
        for k, v in r.per_user.items():
            np.testing.assert_array_equal(v, serial[(r.policy, r.seed)].per_user[k], err_msg=f"{r.policy} {k}")

    class Broken(WeightedSum):
        name = "broken"

        def act(self, obs):
            raise RuntimeError("broken policy")

    bad = PendingRollouts([RolloutJob(Broken(), cfg, 6, 0)], ex)
    with pytest.raises(RuntimeError, match="broken policy"):
        run_jobs([], progress=False, background=[bad])
    with pytest.raises(ValueError, match="finished='keep'"):
        PendingRollouts([RolloutJob(WeightedSum(), cfg, 6, 0, finished="keep")], ex)


def test_resuming_with_other_hyperparameters_is_refused(cfg, tmp_path: Path):
    from agents.ppo import PPOParams

    train_ppo(cfg, 256, tmp_path / "ppo", num_envs=4, seed=0, params=PPOParams(n_steps=64, batch_size=64))
    with pytest.raises(CheckpointMismatchError, match=r"gamma: stored=0\.995 here=0\.9"):
        train_ppo(cfg, 512, tmp_path / "ppo", num_envs=4, seed=0, params=PPOParams(n_steps=64, batch_size=64,
                                                                                      gamma=0.9))


def test_ppo_residual_on_an_anchor_serves_the_anchor_plus_its_action(cfg, tmp_path: Path):
    from agents.loading import load_agent
    from agents.ppo import SB3Policy

    anchor = np.linspace(-0.9, 0.9, N_KNOBS).astype(np.float32)
    model = train_ppo(cfg, 256, tmp_path / "ppo", num_envs=4, seed=0, anchor=anchor)
    obs = FeedSimulator(cfg, 4, seed=1).reset()
    raw, _ = model.predict(obs, deterministic=True)
    served = load_agent(tmp_path / "ppo").act(obs)  # the anchor comes back from the checkpoint
    np.testing.assert_array_equal(served, np.clip(anchor + raw, -1, 1))
    np.testing.assert_array_equal(SB3Policy(model, anchor=anchor).act(obs), served)
    assert not np.allclose(served, np.clip(raw, -1, 1))
    with pytest.raises(CheckpointMismatchError, match="anchor: stored="):
        train_ppo(cfg, 512, tmp_path / "ppo", num_envs=4, seed=0, anchor=-anchor)
    with pytest.raises(ValueError, match="anchor must be"):
        train_ppo(cfg, 256, tmp_path / "bad", num_envs=4, seed=0, anchor=np.full(N_KNOBS, 1.5))


def test_verdicts_need_retention_above_zero_within_regret_and_reach_tolerances():
    from agents.verdict import Tolerance, verdict_lines, verdicts

    def rows(agent, ret, reg_hi, reach_lo, world=None):
        w = world or ret  # the world-level interval (seeds resampled first) decides
        return [{"metric": "retention/retained_30d", "policy": agent, "diff": sum(ret) / 2, "diff_lo": ret[0],
                 "diff_hi": ret[1], "world_lo": w[0], "world_hi": w[1]},
                {"metric": "engagement/regret_rate", "policy": agent, "diff": 0.0, "diff_lo": -1.0, "diff_hi": reg_hi,
                 "world_lo": -1.0, "world_hi": reg_hi},
                {"metric": "creators/new_creator_share", "policy": agent, "diff": 0.0, "diff_lo": reach_lo,
                 "diff_hi": 1.0, "world_lo": reach_lo, "world_hi": 1.0}]

    r = (rows("good", (0.01, 0.05), 0.001, -0.005) + rows("noisy", (-0.01, 0.05), 0.0, 0.0)
         + rows("worse", (-0.05, -0.01), 0.0, 0.0) + rows("regretful", (0.01, 0.05), 0.003, 0.0)
         + rows("starver", (0.01, 0.05), 0.0, -0.02) + rows("one_world", (0.01, 0.05), 0.0, 0.0, (-0.02, 0.08)))
    vs = {v["agent"]: v for v in verdicts(r, ["good", "noisy", "worse", "regretful", "starver", "one_world"],
                                          "weighted_sum", Tolerance(0.002, 0.01))}
    assert [a for a, v in vs.items() if v["beats"]] == ["good"]
    assert vs["one_world"]["retention_users_lo"] > 0 and not vs["one_world"]["retention_better"]
    assert not vs["regretful"]["regret_ok"] and not vs["starver"]["reach_ok"]
    lines = verdict_lines(list(vs.values()))
    assert "includes 0" in lines[1] and "lower (interval below 0)" in lines[2] and "BEATS" in lines[0]
    with pytest.raises(KeyError, match="no paired rows for agent 'ghost'"):
        verdicts(r, ["ghost"], "weighted_sum")


def test_hierarchical_interval_carries_the_spread_between_worlds():
    from agents.stats import hierarchical_ci, stratified_iqm_ci

    a, b = np.full(100, 0.1), np.full(100, -0.1)  # two worlds that disagree; no spread within either
    m, lo, hi = hierarchical_ci([a, b], reps=2000)
    assert m == pytest.approx(0.0)
    assert lo == pytest.approx(-0.1) and hi == pytest.approx(0.1)  # draws {a, a}, {b, b}, {a, b}
    _, ulo, uhi = stratified_iqm_ci([a, b], reps=200)  # resampling users alone sees no uncertainty
    assert ulo == uhi == pytest.approx(0.0)
    x = np.random.default_rng(0).normal(0.02, 0.1, 400)
    m1, lo1, hi1 = hierarchical_ci([x], reps=2000)  # one world: the users' bootstrap
    assert m1 == pytest.approx(x.mean()) and lo1 < m1 < hi1 and hi1 - lo1 == pytest.approx(2 * 1.96 * 0.005, rel=0.2)
    with pytest.raises(ValueError, match="at least one non-empty stratum"):
        hierarchical_ci([np.zeros(0)])


def _assert_same_run(a: RunResult, b: RunResult, timings: bool = True) -> None:
    """Equal runs (``timings=False``: but the wall-time ``perf/request_ms_*``, which no two rollouts share)."""

    def pop(r: RunResult) -> dict[str, float]:
        return {k: v for k, v in r.population.items() if timings or not k.startswith("perf/request_ms")}

    assert (a.policy, a.seed, pop(a)) == (b.policy, b.seed, pop(b))
    for got, want in ((a.per_user, b.per_user), (a.knob_by_state, b.knob_by_state), (a.state_counts, b.state_counts)):
        assert got.keys() == want.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
            assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(a.retention_by_day, b.retention_by_day)
    np.testing.assert_array_equal(a.knob_means, b.knob_means)


def test_rollout_store_reuses_a_finished_rollout_and_sets_a_damaged_one_aside(cfg, tmp_path: Path, monkeypatch,
                                                                             capsys):
    """A stored rollout is read back exactly (not run again); another seed, policy or world is another entry;
    a damaged file is moved aside and the rollout run again; a policy with no fingerprint is never stored."""
    import agents.rollouts as ro

    store = RolloutStore(tmp_path)

    def run(job: RolloutJob) -> RunResult:
        return run_jobs([job], progress=False)[0]

    job = RolloutJob(ConstantKnobs(np.full(N_KNOBS, 0.25), "c"), cfg, 4, 0, store=tmp_path)
    assert not store.holds(job)
    first = run(job)
    assert store.holds(job) and len(list(tmp_path.glob("c-tiny-seed0-*.npz"))) == 1
    _assert_same_run(first, rollout(job.policy, cfg, 4, 0), timings=False)  # storing changed nothing

    def no_rollout(*a, **k):
        raise AssertionError("the stored rollout was run again")

    with monkeypatch.context() as m:
        m.setattr(ro, "rollout", no_rollout)
        _assert_same_run(run(job), first)
        pending = PendingRollouts([job, job], LocalExecutor())
        assert pending.n_stored == 2 and not pending._batch.jobs  # nothing is sent to the executor
        for other in (RolloutJob(job.policy, cfg, 4, 1, store=tmp_path),
                      RolloutJob(ConstantKnobs(np.full(N_KNOBS, 0.5), "c"), cfg, 4, 0, store=tmp_path),
                      RolloutJob(job.policy, cfg.replace(horizon_days=2.0), 4, 0, store=tmp_path),
                      RolloutJob(job.policy, cfg, 5, 0, store=tmp_path)):
            assert not store.holds(other)
            with pytest.raises(AssertionError, match="run again"):
                run(other)
    path = store.path(job)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    _assert_same_run(run(job), first, timings=False)
    assert "cannot be read" in capsys.readouterr().out
    assert list(tmp_path.glob("*.stale-0")) and store.holds(job)

    class Anonymous(WeightedSum):
        fingerprint = None  # no way to tell two of them apart: never stored

    anon = RolloutJob(Anonymous(), cfg, 4, 0, store=tmp_path / "anon")
    run(anon)
    assert not RolloutStore(tmp_path / "anon").holds(anon) and not (tmp_path / "anon").exists()


def test_policy_fingerprints_follow_the_parameters(cfg, tmp_path: Path):
    """A trained policy's fingerprint changes when its network does, and is equal for a copy loaded back."""
    from agents.policies import policy_fingerprint
    from agents.ppo import SB3Policy

    model = train_ppo(cfg, 256, tmp_path / "ppo", seed=0, num_envs=4, progress=False)
    a = policy_fingerprint(SB3Policy(model, "ppo"))
    b = policy_fingerprint(SB3Policy(load_ppo(tmp_path / "ppo", cfg), "ppo"))
    assert a == b and a["params"]
    with torch.no_grad():
        next(model.policy.parameters()).add_(1e-3)
    assert policy_fingerprint(SB3Policy(model, "ppo"))["params"] != a["params"]
    assert policy_fingerprint(SB3Policy(model, "ppo", anchor=np.zeros(N_KNOBS)))["anchor"] == [0.0] * N_KNOBS
    assert policy_fingerprint(make_baseline("random", seed=3)) != policy_fingerprint(make_baseline("random", seed=4))
