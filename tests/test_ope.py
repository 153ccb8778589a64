"""Off-policy estimators against cases with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from agents.ope import (
    Trajectories,
    doubly_robust,
    gaussian_logp,
    greedy_logp,
    pad_episodes,
    per_decision_is,
    weighted_is,
)


def _two_armed_chain(n: int, h: int, mu_p: float, rng: np.random.Generator):
    """Each step: arm 1 pays 1, arm 0 pays 0; behaviour picks arm 1 w.p. mu_p."""
    a = (rng.random((n, h)) < mu_p).astype(np.int64)
    r = a.astype(np.float64)
    blp = np.where(a == 1, np.log(mu_p), np.log(1 - mu_p))
    return a, r, blp


@pytest.mark.parametrize("pi_p", [0.2, 0.9])
def test_is_wis_dr_recover_known_value(pi_p):
    rng = np.random.default_rng(0)
    n, h, gamma, mu_p = 20_000, 3, 0.9, 0.5
    a, r, blp = _two_armed_chain(n, h, mu_p, rng)
    tlp = np.where(a == 1, np.log(pi_p), np.log(1 - pi_p))
    tr = Trajectories(r, np.ones((n, h), bool), blp, tlp)
    truth = pi_p * sum(gamma**t for t in range(h))
    assert per_decision_is(tr, gamma) == pytest.approx(truth, rel=0.05)
    assert weighted_is(tr, gamma) == pytest.approx(truth, rel=0.05)
    # exact Q: q(s, a) = r(a) + gamma * V_pi(remaining); with the exact model DR has zero variance
    rem = np.array([sum(gamma**k for k in range(1, h - t)) for t in range(h)])
    q = a + rem * pi_p
    v = pi_p * (1 + rem)
    dr = doubly_robust(tr, q, np.broadcast_to(v, (n, h)), gamma)
    assert dr == pytest.approx(truth, rel=1e-9)
    # a wrong model is corrected by the weights (DR stays consistent)
    dr_bad = doubly_robust(tr, np.zeros((n, h)), np.zeros((n, h)), gamma)
    assert dr_bad == pytest.approx(truth, rel=0.05)


def test_on_policy_weights_are_one():
    rng = np.random.default_rng(1)
    _a, r, blp = _two_armed_chain(500, 4, 0.3, rng)
    tr = Trajectories(r, np.ones_like(r, bool), blp, blp.copy())
    mc = (r * 0.95 ** np.arange(4)).sum(1).mean()
    assert per_decision_is(tr, 0.95) == pytest.approx(mc)
    assert weighted_is(tr, 0.95) == pytest.approx(mc)


def test_padding_and_log_densities():
    ep = np.array([7, 7, 7, 3, 3])
    st = np.array([0, 1, 2, 0, 1])
    out = pad_episodes(ep, st, {"r": np.arange(5.0)}, horizon=2)
    assert out["mask"].tolist() == [[True, True], [True, True]]
    assert out["r"].tolist() == [[3.0, 4.0], [0.0, 1.0]]
    from scipy import stats

    x = np.array([[0.1, -0.2]])
    assert gaussian_logp(x, np.zeros((1, 2)), 0.3)[0] == pytest.approx(stats.norm(0, 0.3).logpdf(x).sum())
    p = np.exp(greedy_logp(np.arange(4), np.zeros(4, np.int64), 4, 0.2))
    assert p.sum() == pytest.approx(1.0) and p[0] == pytest.approx(0.85)


# ---------------------------------------------------------------------------------------------- on logged data
@pytest.fixture(scope="module")
def logged(tiny):
    from offline_data import GaussianKnobs, collect

    return collect(GaussianKnobs(0.3), tiny, n_users=8, n_steps=12, seed=3, autoreset=False)


def test_trajectories_from_logged_data_behaviour_as_target(logged):
    from agents.ope import SampledPolicy, build_trajectories, effective_sample_size, logged_returns
    from offline_data import GaussianKnobs

    h, gamma = 10, 0.9
    tr = build_trajectories(logged, SampledPolicy(GaussianKnobs(0.3)), horizon=h)
    data = logged.transitions
    n_ep = np.unique(data.episode_id).size
    assert tr.rewards.shape == tr.mask.shape == tr.behaviour_logp.shape == tr.target_logp.shape == (n_ep, h)
    assert tr.rows is not None and tr.rows.shape == (n_ep, h)
    assert tr.mask.sum() == int((data.step < h).sum())
    assert np.array_equal(tr.rows >= 0, tr.mask)
    assert np.array_equal(data.rewards[tr.rows[tr.mask]], tr.rewards[tr.mask].astype(np.float32))
    # the behaviour policy as target: weights exactly 1, IS = WIS = the on-data Monte Carlo return
    assert np.array_equal(tr.target_logp, tr.behaviour_logp)
    mc = logged_returns(logged, h, gamma).mean()
    assert per_decision_is(tr, gamma) == pytest.approx(mc, rel=1e-12)
    assert weighted_is(tr, gamma) == pytest.approx(mc, rel=1e-12)
    assert effective_sample_size(tr) == pytest.approx(1.0)


def test_smoothed_weighted_sum_matches_the_gaussian_behaviour(logged):
    from agents.ope import build_trajectories, truncnorm_logp
    from agents.policies import make_baseline

    # N(0, 0.3^2) truncated to [-1, 1] around the zero action is exactly the logging distribution
    tr = build_trajectories(logged, make_baseline("weighted_sum"), horizon=10, sigma=0.3)
    np.testing.assert_allclose(tr.target_logp[tr.mask], tr.behaviour_logp[tr.mask], rtol=1e-9, atol=1e-9)
    # and the smoothed density integrates to one on [-1, 1] even with its mean at the edge
    x = np.linspace(-1, 1, 20001)[:, None]
    dens = np.exp(truncnorm_logp(x, np.full_like(x, 0.9), 0.3))
    assert np.trapezoid(dens, x[:, 0]) == pytest.approx(1.0, abs=1e-4)


class _ObsPolicy:
    """A deterministic policy of the observation only (to check the replay's alignment)."""

    name = "obs_tanh"
    env_overrides: dict = {}  # noqa: RUF012

    def bind(self, sim):
        pass

    def act(self, obs):
        return np.tanh(obs[:, :13] - 0.5).astype(np.float32)


@pytest.mark.parametrize("autoreset", [False, True])
def test_replay_reproduces_the_logged_states(tiny, autoreset):
    from agents.ope import replay_target_actions, target_actions
    from agents.policies import make_baseline
    from offline_data import GaussianKnobs, collect

    ds = collect(GaussianKnobs(0.3), tiny, n_users=6, n_steps=15, seed=1, autoreset=autoreset)
    pol = _ObsPolicy()
    direct = target_actions(ds, pol)
    replayed, oracle = replay_target_actions(ds, [pol, make_baseline("true_scores")], tiny)
    np.testing.assert_allclose(replayed.actions, direct.actions, atol=1e-6)
    cont = ~(ds.transitions.terminals | ds.transitions.timeouts)
    np.testing.assert_allclose(replayed.next_actions[cont], direct.next_actions[cont], atol=1e-6)
    assert oracle.actions.shape == (len(ds.transitions), 13) and np.all(np.abs(oracle.actions) <= 1)
    with pytest.raises(ValueError, match="simulator"):
        target_actions(ds, make_baseline("true_scores"))
    if autoreset:
        many = collect(GaussianKnobs(0.3), tiny, n_users=6, n_steps=3, seed=1, worlds=2)
        with pytest.raises(ValueError, match="logged on 2 worlds"):
            replay_target_actions(many, [pol], tiny)


@pytest.mark.parametrize("rate", [False, True])
def test_fqe_recovers_a_known_finite_horizon_value(rate):
    from agents.ope import FQEParams, fit_fqe

    rng = np.random.default_rng(0)
    e, h, d, a, r, gamma = 64, 8, 5, 3, 0.5, 0.9
    obs = rng.standard_normal((e, h + 1, d)).astype(np.float32)
    step = np.broadcast_to(np.arange(h), (e, h))
    q = fit_fqe(obs[:, :-1].reshape(-1, d), rng.uniform(-1, 1, (e * h, a)), np.full(e * h, r),
                obs[:, 1:].reshape(-1, d), rng.uniform(-1, 1, (e * h, a)), (h - step).reshape(-1),
                (step == h - 1).reshape(-1), gamma=gamma, horizon=h, params=FQEParams(rate=rate))
    truth = r * (1 - gamma**h) / (1 - gamma)
    v0 = q(obs[:, 0], rng.uniform(-1, 1, (e, a)), np.full(e, h))
    assert v0.mean() == pytest.approx(truth, rel=0.03)
    # one step left (the states logged at the last step): just the reward, up to the fit's error in Q units
    assert q(obs[:, h - 1], rng.uniform(-1, 1, (e, a)), np.full(e, 1)).mean() == pytest.approx(r, abs=0.1 * truth)
    assert np.all(q(obs[:, 0], np.zeros((e, a)), np.zeros(e)) == 0)


def test_estimates_for_the_behaviour_itself_agree(logged):
    from agents.ope import FQEParams, SampledPolicy, estimate, logged_returns
    from offline_data import GaussianKnobs

    est = estimate(logged, SampledPolicy(GaussianKnobs(0.3)), horizon=10, gamma=0.9,
                   fqe=FQEParams(n_iters=20, steps_per_iter=10), n_samples=4)
    mc = logged_returns(logged, 10, 0.9).mean()
    assert est["IS"] == pytest.approx(mc) and est["WIS"] == pytest.approx(mc) and est["ESS"] == pytest.approx(1.0)
    assert np.isfinite(est["DR"]) and np.isfinite(est["FQE"])


def test_evaluate_script_writes_its_json(tmp_path):
    import json

    from tests.test_scripts import load_script

    ev = load_script("evaluate")
    rows = ev.main(ev.Args(preset="tiny", users=6, horizon=6, fqe_iters=12, fqe_steps=10, dr_samples=2,
                           bootstrap_reps=50, out=tmp_path))
    assert [r["policy"] for r in rows] == ["behaviour", "weighted_sum", "random", "true_scores", "constant"]
    report = json.loads((tmp_path / "ope.json").read_text())
    assert report["rows"] == json.loads(json.dumps(rows))
    for r in rows:
        for k in ("truth", "IS", "WIS", "DR", "FQE"):
            assert np.isfinite(r[k]), (r["policy"], k)
            if k != "truth":
                assert r[f"err_{k}"] == pytest.approx(r[k] - r["truth"])
    assert (tmp_path / "ope_vs_truth.png").stat().st_size > 0


def test_wis_with_unequal_episode_lengths_is_unbiased_on_policy():
    # regression: WIS used to normalise each step over the episodes still running, which overstates the
    # value when episodes end early (ended episodes hold reward 0 with their final weight)
    r = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    mask = np.array([[True, True, True], [True, False, False]])
    lp = np.log(np.full((2, 3), 0.5))
    tr = Trajectories(r, mask, lp, lp.copy())
    mc = (np.where(mask, r, 0) * 0.9 ** np.arange(3)).sum(1).mean()
    assert weighted_is(tr, 0.9) == pytest.approx(mc)
    assert per_decision_is(tr, 0.9) == pytest.approx(mc)
