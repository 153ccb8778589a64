"""Retiring users whose episodes ended (``FeedSimulator.retire``), as evaluation does: the batch shrinks,
the users left keep their state and their random numbers, and nothing per-user is forgotten."""

from __future__ import annotations

import numpy as np
import pytest

from agents.policies import make_baseline
from agents.rollouts import rollout
from envs.config import make_config
from envs.simulator import FeedSimulator
from envs.users import Users
from rankers.config import N_KNOBS
from rankers.user_model import UserView

B = 7  # a batch size no other dimension of the tiny world has


def _per_user_arrays(obj: object, b: int) -> set[str]:
    return {k for k, v in vars(obj).items() if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == b}


def test_every_per_user_array_is_declared() -> None:
    """A per-user array added to Users or UserView without joining PER_USER would keep retired rows."""
    sim = FeedSimulator(make_config("tiny"), B, seed=0)
    sim.reset()
    dims = {sim.cfg.corpus.emb_dim, sim.cfg.corpus.n_topics, sim.cfg.pipeline.n_rank, sim.cfg.pipeline.seen_memory}
    assert B not in dims
    assert _per_user_arrays(sim.users, B) == set(Users.PER_USER)
    assert _per_user_arrays(sim.view, B) == set(UserView.PER_USER)
    assert _per_user_arrays(sim.pipeline, B) == {"stream_pos", "promo_ptr"}
    assert _per_user_arrays(sim.pipeline.pool, B) == set(sim.pipeline.pool.__dataclass_fields__)


def test_retire_keeps_the_rest_and_their_random_numbers() -> None:
    cfg = make_config("tiny")
    full, part = FeedSimulator(cfg, B, seed=3), FeedSimulator(cfg, B, seed=3)
    full.reset()
    part.reset()
    zero = np.zeros((B, N_KNOBS), np.float32)
    for _ in range(3):
        full.step(zero)
        part.step(zero)
    gone = np.zeros(B, bool)
    gone[[1, 4]] = True
    keep = np.flatnonzero(~gone)
    before = {k: getattr(part.users, k)[keep].copy() for k in Users.PER_USER}
    pool_before = part.pipeline.pool.item[keep].copy()
    part.retire(gone)
    assert part.n_users == B - 2 and part.n_users0 == B
    np.testing.assert_array_equal(part.uid, keep)
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(part.users, k), v, err_msg=k)
    np.testing.assert_array_equal(part.pipeline.pool.item, pool_before)
    # a user's random numbers are keyed by the user: the survivors meet what they would have met
    pc = part.cfg.pipeline
    for a, b in zip(part._noise(pc.slate_size, pc.n_rank), full._noise(pc.slate_size, pc.n_rank), strict=True):
        np.testing.assert_array_equal(a, b[keep])
    res = part.step(zero[: B - 2])
    full.step(zero)
    assert res.obs.shape[0] == B - 2 and res.reward.shape == (B - 2,)
    assert res.info["slate"].item.shape[0] == B - 2
    part.retire(np.zeros(B - 2, bool))  # nothing to retire: no change
    assert part.n_users == B - 2


def test_retire_rejects_bad_masks_and_reset() -> None:
    sim = FeedSimulator(make_config("tiny"), B, seed=0)
    sim.reset()
    with pytest.raises(ValueError, match="retire mask has shape"):
        sim.retire(np.zeros(B + 1, bool))
    with pytest.raises(ValueError, match="no users"):
        sim.retire(np.ones(B, bool))
    sim.retire(np.eye(B, dtype=bool)[0])
    with pytest.raises(ValueError, match="reset after retire"):
        sim.reset()
    sim.reset(seed=1)  # a seeded reset rebuilds the full batch
    assert sim.n_users == B and np.array_equal(sim.uid, np.arange(B))
    # keyed users can be reset after a retire: row r starts the next user of its identity, as without the retire
    keyed = FeedSimulator(make_config("tiny"), B, seed=0)
    keyed.key_users(np.arange(B))
    keyed.reset()
    keyed.retire(np.eye(B, dtype=bool)[0])
    keyed.reset(np.eye(B - 1, dtype=bool)[1])  # identity 2's second user
    full = FeedSimulator(make_config("tiny"), B, seed=0)
    full.key_users(np.arange(B))
    full.reset()
    full.reset(np.eye(B, dtype=bool)[2])
    np.testing.assert_array_equal(keyed.users.long[1], full.users.long[2])


def test_rollout_retires_finished_users(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rollout shrinks the batch as episodes end, folds every user's episode, and is reproducible."""
    sizes: list[int] = []
    retire = FeedSimulator.retire

    def spy(self: FeedSimulator, mask: np.ndarray) -> None:
        retire(self, mask)
        sizes.append(self.n_users)

    monkeypatch.setattr(FeedSimulator, "retire", spy)
    cfg = make_config("tiny")
    run = rollout(make_baseline("weighted_sum"), cfg, 24, seed=5, finished="retire")
    assert sizes and sizes == sorted(sizes, reverse=True) and sizes[-1] < 24
    pu = run.per_user
    assert pu["retention/retained_30d"].shape == (24,)
    assert np.all(pu["engagement/session_videos"] > 0)
    again = rollout(make_baseline("weighted_sum"), cfg, 24, seed=5, finished="retire")
    for k in pu:
        np.testing.assert_array_equal(again.per_user[k], pu[k], err_msg=k)


def test_rollout_replaces_finished_users_by_new_unmeasured_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default: the batch keeps its size, finished users' rows get new users, the measured users'
    episodes are the first 24 and are folded to their ends; reproducible."""
    resets: list[int] = []
    reset = FeedSimulator.reset

    def spy(self: FeedSimulator, mask: np.ndarray | None = None, seed: int | None = None) -> np.ndarray:
        resets.append(self.n_users if mask is None else int(np.asarray(mask).sum()))
        return reset(self, mask, seed)

    monkeypatch.setattr(FeedSimulator, "reset", spy)
    cfg = make_config("tiny")
    run = rollout(make_baseline("weighted_sum"), cfg, 24, seed=5)
    assert resets[0] == 24 and len(resets) > 1 and all(0 < n < 24 for n in resets[1:])
    pu = run.per_user
    assert pu["retention/retained_30d"].shape == (24,)
    assert np.all(pu["engagement/session_videos"] > 0)
    again = rollout(make_baseline("weighted_sum"), cfg, 24, seed=5)
    for k in pu:
        np.testing.assert_array_equal(again.per_user[k], pu[k], err_msg=k)
    with pytest.raises(ValueError, match="finished='ghost' is invalid"):
        rollout(make_baseline("weighted_sum"), cfg, 4, seed=5, finished="ghost")
