"""The planner's recorded commitments and the policy distilled from them (agents/distill.py)."""

from __future__ import annotations

import numpy as np
import pytest

from agents.distill import ArmAdvantages, DistilledPlanner, fit_advantages
from agents.headroom import load_rollout, planner_arms, save_rollout
from agents.planner import Decisions, branched_rollout
from envs.config import make_config
from rankers.config import N_KNOBS


@pytest.fixture(scope="module")
def recorded():
    cfg = make_config("tiny", horizon_days=2.0)
    arms = planner_arms(np.zeros(N_KNOBS, np.float32), deviations={"break_now": {"break_prompt": 1.0}})
    return cfg, arms, branched_rollout(arms, cfg, 12, seed=3, period=5, record=True)


def test_record_keeps_one_row_per_commitment(recorded):
    cfg, arms, res = recorded
    dec = res.decisions
    assert dec is not None and dec.obs.shape[0] == dec.scores.shape[0] > 12
    assert dec.scores.shape[1] == len(arms)
    assert np.all((dec.scores >= 0) & (dec.scores <= 1))
    # the planner committed to each period's argmax: the recorded scores reproduce its arm shares
    share = np.bincount(dec.scores.argmax(axis=1), minlength=len(arms)) / dec.scores.shape[0]
    np.testing.assert_allclose(share, res.arm_share)
    # recording changes nothing of the rollout itself
    plain = branched_rollout(arms, cfg, 12, seed=3, period=5)
    assert plain.decisions is None
    np.testing.assert_array_equal(plain.retained, res.retained)
    assert plain.requests == res.requests


def test_decisions_survive_the_rollout_store(recorded, tmp_path):
    _, _, res = recorded
    path = tmp_path / "r.npz"
    save_rollout(path, res, {"k": 1})
    back = load_rollout(path, {"k": 1})
    assert back is not None and back.decisions is not None
    np.testing.assert_array_equal(back.decisions.obs, res.decisions.obs)
    np.testing.assert_array_equal(back.decisions.scores, res.decisions.scores)


def test_fit_recovers_a_planted_advantage():
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((4000, 3)).astype(np.float32)
    # arm 1 is better exactly where the first field is positive; arm 2 never is
    adv1 = np.where(obs[:, 0] > 0, 0.2, -0.2) + 0.05 * rng.standard_normal(4000)
    scores = np.stack([np.full(4000, 0.5), 0.5 + adv1, np.full(4000, 0.3)], axis=1).astype(np.float32)
    model = fit_advantages([Decisions(obs[:2000], scores[:2000]), Decisions(obs[2000:], scores[2000:])])
    assert model.held_out_r2 > 0.5
    arms = np.stack([np.zeros(N_KNOBS), np.full(N_KNOBS, 0.5), np.full(N_KNOBS, -0.5)]).astype(np.float32)
    pol = DistilledPlanner(arms, model)
    test = rng.standard_normal((1000, 3)).astype(np.float32)
    picked = pol.act(test)
    want = np.where(test[:, :1] > 0, arms[1], arms[0])
    assert (picked == want).all(axis=1).mean() > 0.9
    assert pol.choices(test)[2] == 0.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least one planner rollout"):
        fit_advantages([])
    with pytest.raises(ValueError, match="at least 10"):
        fit_advantages([Decisions(np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32))])
    rng = np.random.default_rng(0)
    big, one = Decisions(rng.random((40, 2), np.float32), rng.random((40, 2), np.float32)), \
        Decisions(rng.random((3, 2), np.float32), rng.random((3, 2), np.float32))
    with pytest.raises(ValueError, match="10 held out"):  # the held-out (last) rollout is too short to choose by
        fit_advantages([big, one])
    model = ArmAdvantages(np.zeros(2), np.ones(2), np.zeros((5, 1)), 1.0, 0.0)
    with pytest.raises(ValueError, match="arm vectors"):
        DistilledPlanner(np.zeros((3, N_KNOBS), np.float32), model)
