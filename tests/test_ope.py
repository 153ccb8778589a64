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
