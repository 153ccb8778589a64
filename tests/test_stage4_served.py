"""Stage 4 plans only the positions a request serves: the same feed head, the same simulation.

The pipeline stops stage 4's greedy pass after ``slate_size`` positions (a request serves no more,
and the feed is re-planned at the next one). These tests hold that shortcut to the whole feed:
field by field on random pools, and step by step on a simulator.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.simulator import FeedSimulator
from rankers.config import HEADS, PipelineConfig
from rankers.knobs import Knobs
from rankers.rebalance import rebalance
from rankers.types import Pool
from rankers.user_model import UserView
from tests.helpers import knob_actions

K = len(HEADS)
FIELDS = ("item", "pool_index", "score", "explore", "reserved_new")


def _random_stage4(rng: np.random.Generator, b: int, p: int, feed_size: int, rules: bool,
                   min_topics: int) -> tuple[Pool, Knobs, UserView, PipelineConfig, np.ndarray]:
    cfg = PipelineConfig(n_interest=1, n_following=0, n_trending=0, n_new_creator=0, n_serendipity=0, n_prerank=p,
                         n_rank=p, feed_size=feed_size, slate_size=1, ad_positions=(), promoted_position=0,
                         pool_quota_new_creator=0, pool_quota_serendipity=0, diversity_rules=rules,
                         min_topics=min_topics)
    n_topics = int(rng.integers(2, 8))
    item = np.tile(np.arange(p, dtype=np.int32), (b, 1))
    item[rng.random((b, p)) < 0.15] = -1  # consumed pool slots
    pool = Pool(item=item, heads=rng.random((b, p, K), dtype=np.float32),
                uncertainty=rng.random((b, p), dtype=np.float32),
                topic=rng.integers(0, n_topics, (b, p)).astype(np.int32),
                creator=rng.integers(0, max(2, p // 3), (b, p)).astype(np.int32),
                format=rng.integers(0, 3, (b, p)).astype(np.int8), new_creator=rng.random((b, p)) < 0.3,
                quality_est=rng.random((b, p), dtype=np.float32), source=np.zeros((b, p), np.int8))
    knobs = Knobs(head_mult=rng.uniform(0.5, 2.0, (b, K)).astype(np.float32),
                  explore_share=rng.uniform(0.0, 0.5, b).astype(np.float32),
                  new_creator_share=rng.uniform(0.0, 0.5, b).astype(np.float32),
                  diversity_strength=rng.uniform(0.0, 2.0, b).astype(np.float32),
                  adaptation_strength=rng.uniform(0.0, 2.0, b).astype(np.float32),
                  break_after_min=np.full(b, 60.0, np.float32))
    view = UserView(b, 4, n_topics)
    return pool, knobs, view, cfg, rng.standard_normal((b, p)).astype(np.float32)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), p=st.integers(4, 40), feed_size=st.integers(1, 30), rules=st.booleans(),
       min_topics=st.integers(0, 6))
def test_stopped_pass_equals_the_whole_feeds_head(seed: int, p: int, feed_size: int, rules: bool,
                                                   min_topics: int) -> None:
    feed_size = min(feed_size, p)
    pool, knobs, view, cfg, noise = _random_stage4(np.random.default_rng(seed), 5, p, feed_size, rules, min_topics)
    whole = rebalance(pool, knobs, view, cfg, noise)
    assert whole.item.shape == (5, feed_size)
    for n in range(1, feed_size + 1):  # forced picks near the end included: they depend on feed_size, not n
        head = rebalance(pool, knobs, view, cfg, noise, n_positions=n)
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(head, f), getattr(whole, f)[:, :n], err_msg=f"{f}, n={n}")


@pytest.mark.parametrize("seed", range(5))
def test_stopped_top_of_ranking_equals_the_whole_feeds_head(seed: int) -> None:
    """Without rebalancing (the engagement baseline, the RecSim setting) the feed is the ranking's top: its
    head is the same whether the pass stops early or not (ties kept in pool order)."""
    pool, knobs, view, cfg, noise = _random_stage4(np.random.default_rng(seed), 4, 30, 20, True, 2)
    cfg = PipelineConfig(**{**cfg.__dict__, "rebalancing": False})
    pool.heads[:, ::3] = pool.heads[:, 1::3].mean()  # some ties
    whole = rebalance(pool, knobs, view, cfg, noise)
    for n in range(1, cfg.feed_size + 1):
        head = rebalance(pool, knobs, view, cfg, noise, n_positions=n)
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(head, f), getattr(whole, f)[:, :n], err_msg=f"{f}, n={n}")


def test_bad_position_counts_are_refused() -> None:
    pool, knobs, view, pcfg, noise = _random_stage4(np.random.default_rng(0), 2, 10, 6, True, 2)
    for n in (0, 7):
        with pytest.raises(ValueError, match="n_positions"):
            rebalance(pool, knobs, view, pcfg, noise, n_positions=n)


@pytest.mark.parametrize("preset_changes", [{}, {"pipeline": {"diversity_rules": False}}])
def test_simulation_identical_with_whole_feeds(tiny, preset_changes) -> None:
    """Every observation, reward and served slate is the same when stage 4 plans whole feeds."""
    cfg = tiny.replace(**preset_changes) if preset_changes else tiny
    sims = [FeedSimulator(cfg, 16, seed=3) for _ in range(2)]
    orig = sims[1].pipeline.rebalance
    sims[1].pipeline.rebalance = lambda knobs, ts_noise: orig(knobs, ts_noise, whole=True)
    obs = [s.reset() for s in sims]
    np.testing.assert_array_equal(obs[0], obs[1])
    for a in knob_actions(80, 16, seed=9):
        r0, r1 = (s.step(a) for s in sims)
        np.testing.assert_array_equal(r0.obs, r1.obs)
        np.testing.assert_array_equal(r0.reward, r1.reward)
        np.testing.assert_array_equal(r0.info["slate"].item, r1.info["slate"].item)
        np.testing.assert_array_equal(r0.info["responses"]["watch_s"], r1.info["responses"]["watch_s"])
        done = r0.terminated | r0.truncated
        np.testing.assert_array_equal(done, r1.terminated | r1.truncated)
        if done.any():
            o0, o1 = sims[0].reset(done), sims[1].reset(done)
            np.testing.assert_array_equal(o0, o1)
