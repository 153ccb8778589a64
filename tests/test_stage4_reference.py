"""Stage 4's compiled greedy pass equals the plain per-user reference (``rankers.rebalance_reference``)
exactly: placements, scores, slot flags and relaxation counts, on random pools that reach the edges
(padding, consumed pools, reserved new-creator and explore slots up to every position, ties, rules that
must be relaxed, the rules switched off), and step by step on a simulator with ads and promoted slots."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rankers.pipeline
from envs.simulator import FeedSimulator
from rankers.config import HEADS, PipelineConfig
from rankers.knobs import Knobs
from rankers.ranking import descending_order
from rankers.rebalance import greedy_inputs, greedy_pass, rebalance
from rankers.rebalance_reference import greedy_pass_reference
from rankers.types import Pool
from rankers.user_model import UserView
from tests.helpers import knob_actions

K = len(HEADS)
FIELDS = ("item", "pool_index", "score", "explore", "reserved_new", "rule_relaxed")


@st.composite
def stage4_cases(draw: st.DrawFn) -> tuple[Pool, Knobs, UserView, PipelineConfig, np.ndarray, int]:
    """A random stage-4 input: pool, knobs, the user view (session topics), config, Thompson noise and the
    number of positions planned."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b, p = draw(st.integers(1, 6)), draw(st.integers(1, 40))
    feed_size = draw(st.integers(1, p))
    n_fill = draw(st.integers(1, feed_size))
    cfg = PipelineConfig(
        n_interest=1, n_following=0, n_trending=0, n_new_creator=0, n_serendipity=0, n_prerank=p, n_rank=p,
        feed_size=feed_size, slate_size=1, ad_positions=(), promoted_position=0, pool_quota_new_creator=0,
        pool_quota_serendipity=0, diversity_rules=draw(st.booleans()), adaptation=draw(st.booleans()),
        min_topics=draw(st.integers(0, 6)), min_new_creator=draw(st.integers(0, 4)),
        max_per_creator=draw(st.integers(1, 4)), max_consecutive_format=draw(st.integers(1, 3)),
        diversity_penalty=draw(st.sampled_from([0.0, 0.05, 0.5])),
        uncertainty_threshold=draw(st.sampled_from([0.0, 0.02, 0.5, 2.0])))
    n_topics = draw(st.integers(1, 8))
    n_creators = draw(st.integers(1, max(1, p)))
    item = np.tile(np.arange(p, dtype=np.int32), (b, 1))
    item[rng.random((b, p)) < draw(st.sampled_from([0.0, 0.15, 0.6, 0.95, 1.0]))] = -1  # consumed / padding
    heads = rng.random((b, p, K), dtype=np.float32)
    if draw(st.booleans()):
        heads = np.round(heads, 1)  # ties in every key
    pool = Pool(item=item, heads=heads, uncertainty=rng.random((b, p), dtype=np.float32),
                topic=rng.integers(0, n_topics, (b, p)).astype(np.int32),
                creator=rng.integers(0, n_creators, (b, p)).astype(np.int32),
                format=rng.integers(0, draw(st.integers(1, 3)), (b, p)).astype(np.int8),
                new_creator=rng.random((b, p)) < draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
                quality_est=np.round(rng.random((b, p), dtype=np.float32), 1),
                source=np.zeros((b, p), np.int8))
    share = st.sampled_from([0.0, 0.15, 0.2, 0.5, 1.0])
    knobs = Knobs(head_mult=rng.uniform(0.5, 2.0, (b, K)).astype(np.float32),
                  explore_share=np.full(b, draw(share), np.float32),
                  new_creator_share=np.full(b, draw(share), np.float32),
                  diversity_strength=rng.uniform(0.0, 2.0, b).astype(np.float32),
                  adaptation_strength=rng.uniform(0.0, 2.0, b).astype(np.float32),
                  break_after_min=np.full(b, 60.0, np.float32))
    view = UserView(b, 4, n_topics)
    view.session_engaged[:] = rng.integers(0, 3, (b, n_topics))
    view.session_skipped[:] = rng.integers(0, 3, (b, n_topics))
    return pool, knobs, view, cfg, rng.standard_normal((b, p)).astype(np.float32), n_fill


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=stage4_cases())
def test_compiled_pass_equals_reference(case) -> None:
    pool, knobs, view, cfg, noise, n_fill = case
    fast = rebalance(pool, knobs, view, cfg, noise, n_fill)
    ref = rebalance(pool, knobs, view, cfg, noise, n_fill, greedy=greedy_pass_reference)
    for f in FIELDS:
        a, r = getattr(fast, f), getattr(ref, f)
        assert a.dtype == r.dtype, f
        np.testing.assert_array_equal(a, r, err_msg=f)


def test_edges_are_reached() -> None:
    """The random cases above reach the fallbacks: relaxed rules, forced count rules, empty positions."""
    rng = np.random.default_rng(0)
    b, p = 64, 12
    cfg = PipelineConfig(n_interest=1, n_following=0, n_trending=0, n_new_creator=0, n_serendipity=0, n_prerank=p,
                         n_rank=p, feed_size=10, slate_size=1, ad_positions=(), promoted_position=0,
                         pool_quota_new_creator=0, pool_quota_serendipity=0, min_topics=4, min_new_creator=2)
    item = np.tile(np.arange(p, dtype=np.int32), (b, 1))
    item[rng.random((b, p)) < 0.3] = -1
    pool = Pool(item=item, heads=rng.random((b, p, K), dtype=np.float32),
                uncertainty=rng.random((b, p), dtype=np.float32),
                topic=rng.integers(0, 5, (b, p)).astype(np.int32), creator=rng.integers(0, 4, (b, p)).astype(np.int32),
                format=rng.integers(0, 2, (b, p)).astype(np.int8), new_creator=rng.random((b, p)) < 0.2,
                quality_est=rng.random((b, p), dtype=np.float32), source=np.zeros((b, p), np.int8))
    knobs = Knobs(head_mult=np.ones((b, K), np.float32), explore_share=np.full(b, 0.3, np.float32),
                  new_creator_share=np.full(b, 0.3, np.float32), diversity_strength=np.ones(b, np.float32),
                  adaptation_strength=np.ones(b, np.float32), break_after_min=np.full(b, 60.0, np.float32))
    view = UserView(b, 4, 5)
    noise = rng.standard_normal((b, p)).astype(np.float32)
    feed = rebalance(pool, knobs, view, cfg, noise)
    ref = rebalance(pool, knobs, view, cfg, noise, greedy=greedy_pass_reference)
    assert (feed.rule_relaxed > 0).any() and (feed.pool_index < 0).any()
    assert feed.reserved_new.any() and feed.explore.any()
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(feed, f), getattr(ref, f), err_msg=f)
    inputs = greedy_inputs(pool, knobs, cfg, np.zeros((b, p), np.float32), noise)
    for got, want in zip(greedy_pass(inputs, cfg, 7), greedy_pass_reference(inputs, cfg, 7)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("changes", [{}, {"diversity_rules": False}])
def test_simulation_identical_with_reference(tiny, monkeypatch, changes) -> None:
    """Every slate, response and observation is the same when the simulator's stage 4 runs the reference
    (ads and promoted content inserted in the served slates, random knobs, episode restarts)."""
    cfg = tiny.replace(pipeline=changes) if changes else tiny
    actions = knob_actions(40, 12, seed=4)

    def run() -> list[tuple[np.ndarray, ...]]:
        sim = FeedSimulator(cfg, 12, seed=5)
        out = [(sim.reset(),)]
        for a in actions:
            r = sim.step(a)
            out.append((r.obs, r.reward, r.info["slate"].item, r.info["slate"].ad, r.info["responses"]["watch_s"]))
            done = r.terminated | r.truncated
            if done.any():
                out.append((sim.reset(done),))
        return out

    fast = run()
    monkeypatch.setattr(rankers.pipeline, "rebalance", functools.partial(rebalance, greedy=greedy_pass_reference))
    ref = run()
    assert any((s[3] >= 0).any() for s in fast if len(s) > 1)  # ads were served
    assert len(fast) == len(ref)
    for a, r in zip(fast, ref):
        for x, y in zip(a, r):
            np.testing.assert_array_equal(x, y)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 8), c=st.integers(1, 300),
       rounding=st.sampled_from([None, 0, 1]))
def test_descending_order_is_the_stable_argsort(seed: int, b: int, c: int, rounding: int | None) -> None:
    """The feed without rebalancing (and stages 2-3's cut) orders by ``descending_order``: the permutation of
    ``np.argsort(-values, kind="stable")``, ties in column order, through infinities, signed zeros, subnormals."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((b, c)).astype(np.float32)
    if rounding is not None:
        v = np.round(v, rounding)  # many ties
    for value, share in ((-np.inf, 0.1), (np.inf, 0.03), (0.0, 0.05), (-0.0, 0.05), (1e-40, 0.02), (-1e-40, 0.02),
                         (-1e30, 0.05)):
        v[rng.random((b, c)) < share] = np.float32(value)
    np.testing.assert_array_equal(descending_order(v), np.argsort(-v, axis=1, kind="stable"))
    np.testing.assert_array_equal(descending_order(v[:, ::2]), np.argsort(-v[:, ::2], axis=1, kind="stable"))
