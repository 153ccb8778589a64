"""5. Invariants of the 4-stage pipeline on every final feed and slate, over many steps and users:
unique valid items, nothing shown twice in a session, the four diversity rules, reserved
new-creator slots, the zero action = the seed's weighted-sum ranking, and the diversity knob."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.config import FeedConfig
from envs.simulator import FeedSimulator
from rankers.config import HEADS, N_KNOBS, RANKING_WEIGHTS, PipelineConfig
from rankers.hashing import hash_normal
from rankers.knobs import Knobs, knobs_from_action
from rankers.ranking import model_error, weighted_sum
from rankers.rebalance import check_feed_rules, rebalance
from rankers.types import Pool
from rankers.user_model import UserView
from tests.helpers import knob_actions

SEED_WEIGHTS = np.array([RANKING_WEIGHTS[h] for h in HEADS], np.float32)


def run_with_spy(cfg: FeedConfig, n_users: int, n_steps: int, actions: np.ndarray | None = None,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Steps a simulator (resetting finished users) and records, every step, the pool stage 4 saw,
    the feed it built, the slate and what was shown."""
    sim = FeedSimulator(cfg, n_users, seed=seed)
    sim.reset()
    records: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    orig_rebalance = sim.pipeline.rebalance
    orig_respond = sim.users.respond

    def rebalance_spy(knobs, ts_noise):
        pool = sim.pipeline.pool
        cur["pool"] = {k: getattr(pool, k).copy() for k in ("item", "heads", "topic", "creator", "format",
                                                             "new_creator")}
        cur["knobs"] = knobs
        cur["feed"] = orig_rebalance(knobs, ts_noise, whole=True)  # the rules are judged on whole feeds
        return cur["feed"]

    def respond_spy(item, ad, corpus, break_prompt, *rest):
        out = orig_respond(item, ad, corpus, break_prompt, *rest)
        cur["slate_item"], cur["slate_ad"], cur["shown"] = item.copy(), ad.copy(), out["shown"].copy()
        return out

    sim.pipeline.rebalance = rebalance_spy
    sim.users.respond = respond_spy
    if actions is None:
        actions = knob_actions(n_steps, n_users)
    for a in actions[:n_steps]:
        res = sim.step(a)
        done = res.terminated | res.truncated
        records.append({**cur, "n_items": sim.corpus.catalog.n_items, "catalog": sim.corpus.catalog,
                        "session_end": res.info["retention/session_end"] > 0, "done": done})
        cur = {}
        if done.any():
            sim.reset(done)
    return records


@pytest.fixture(scope="module")
def records(tiny) -> list[dict[str, Any]]:
    return run_with_spy(tiny, n_users=12, n_steps=60)


def feed_attrs(rec: dict[str, Any]) -> tuple[np.ndarray, ...]:
    feed, pool = rec["feed"], rec["pool"]
    rows = np.arange(feed.item.shape[0])[:, None]
    pidx = np.maximum(feed.pool_index, 0)
    placed = feed.pool_index >= 0

    def at(a: np.ndarray) -> np.ndarray:
        return np.where(placed, a[rows, pidx], -1)

    return at(pool["topic"]), at(pool["creator"]), at(pool["format"]), placed & pool["new_creator"][rows, pidx]


def test_feed_items_unique_and_valid(records, tiny) -> None:
    for t, rec in enumerate(records):
        feed, pool = rec["feed"], rec["pool"]
        cat = rec["catalog"]
        rows = np.arange(feed.item.shape[0])[:, None]
        assert feed.item.shape[1] == tiny.pipeline.feed_size
        np.testing.assert_array_equal(feed.item >= 0, feed.pool_index >= 0)
        # the feed's items are the pool's items at the recorded indices
        np.testing.assert_array_equal(np.where(feed.pool_index >= 0, pool["item"][rows, np.maximum(feed.pool_index, 0)],
                                               -1), feed.item)
        for b, row in enumerate(feed.item):
            v = row[row >= 0]
            assert len(np.unique(v)) == len(v), f"step {t} user {b}: duplicate feed items"
            assert np.all(v < rec["n_items"])
            assert not cat.promoted[v].any(), "organic feed holds no promoted items"
            assert np.all(cat.risk_est[v] <= tiny.pipeline.safety_threshold), "unsafe item passed the filter"
            # filled from the front: padding only at the end
            assert np.all(row[: len(v)] >= 0)


def test_slate_items_unique_and_valid(records, tiny) -> None:
    s = tiny.pipeline.slate_size
    n_ads = tiny.corpus.n_ads
    for t, rec in enumerate(records):
        item, ad = rec["slate_item"], rec["slate_ad"]
        assert item.shape == ad.shape == (item.shape[0], s)
        assert np.all((item >= 0) ^ (ad >= 0) | ((item < 0) & (ad < 0))), "a slot is a video or an ad"
        assert np.all(ad < n_ads)
        for b in range(item.shape[0]):
            v = item[b][item[b] >= 0]
            assert len(np.unique(v)) == len(v), f"step {t} user {b}: duplicate slate items"
            assert np.all(v < rec["n_items"])


def test_nothing_shown_twice_in_a_session(records) -> None:
    n_users = records[0]["slate_item"].shape[0]
    seen: list[set[int]] = [set() for _ in range(n_users)]
    n_shown = 0
    for t, rec in enumerate(records):
        item, shown = rec["slate_item"], rec["shown"]
        for b in range(n_users):
            vids = item[b][shown[b] & (item[b] >= 0)].tolist()
            again = seen[b].intersection(vids)
            assert not again, f"step {t} user {b}: shown again within the session: {sorted(again)}"
            seen[b].update(vids)
            n_shown += len(vids)
            if rec["session_end"][b] or rec["done"][b]:
                seen[b] = set()
    assert n_shown > 1000


def assert_rules_hold(records: list, cfg) -> tuple[int, int]:
    """The four rules hold on every feed, unless stage 4 reports it had to relax one (the pool could
    not satisfy it); the coverage rules (min topics, min new-creator) always hold as far as the pool
    allows. Returns (feeds with a relaxation, feeds)."""
    n_relaxed = n_feeds = 0
    for t, rec in enumerate(records):
        feed, pool = rec["feed"], rec["pool"]
        topic, creator, fmt, new = feed_attrs(rec)
        ok = check_feed_rules(feed.item, topic, creator, fmt, new, cfg)
        relaxed = feed.rule_relaxed > 0
        for rule, holds in ok.items():
            bad = ~holds & ~relaxed
            assert not bad.any(), f"step {t}: rule {rule} broken without relaxation for users {np.flatnonzero(bad)}"
        valid = pool["item"] >= 0
        need_new = np.minimum(cfg.min_new_creator, (pool["new_creator"] & valid).sum(1))
        assert np.all(new.sum(1) >= need_new), f"step {t}: too few new-creator items"
        for b in range(feed.item.shape[0]):
            in_pool = np.unique(pool["topic"][b][valid[b]]).size
            in_feed = np.unique(topic[b][feed.item[b] >= 0]).size
            assert in_feed >= min(cfg.min_topics, in_pool), f"step {t} user {b}: {in_feed} topics, pool has {in_pool}"
        n_relaxed += relaxed.sum()
        n_feeds += relaxed.size
    return n_relaxed, n_feeds


def test_diversity_rules_hold(records, tiny) -> None:
    n_relaxed, n_feeds = assert_rules_hold(records, tiny.pipeline)
    # report-level sanity: relaxing is the exception (see the test report for the rate on tiny)
    assert n_relaxed < n_feeds


def _reserved_slot_could_be_new(rec: dict[str, Any], b: int, j: int, cfg: PipelineConfig) -> bool:
    """Whether, at feed position j of user b, some unplaced new-creator pool item satisfied the
    hard rules given the feed's prefix (the condition under which stage 4 must use it)."""
    feed, pool = rec["feed"], rec["pool"]
    prefix = feed.pool_index[b, :j]
    prefix = prefix[prefix >= 0]
    cand = np.flatnonzero(pool["new_creator"][b] & (pool["item"][b] >= 0))
    cand = np.setdiff1d(cand, prefix)
    if not cfg.diversity_rules:
        return cand.size > 0
    creators, topics, fmts = pool["creator"][b], pool["topic"][b], pool["format"][b]
    n_new = int(pool["new_creator"][b][prefix].sum())
    n_topics = len(np.unique(topics[prefix]))
    run, last = 0, -1
    for f in fmts[prefix]:
        run, last = (run + 1, f) if f == last else (1, f)
    new_need = max(cfg.min_new_creator - n_new, 0)
    topic_need = max(cfg.min_topics - n_topics, 0)
    force = (cfg.feed_size - j) <= new_need + topic_need
    for c in cand:
        if (creators[prefix] == creators[c]).sum() >= cfg.max_per_creator:
            continue
        if run >= cfg.max_consecutive_format and fmts[c] == last:
            continue
        if force and not (new_need > 0 or (topic_need > 0 and topics[c] not in topics[prefix])):
            continue
        return True
    return False


@pytest.mark.parametrize("rules", [True, False])
def test_reserved_new_creator_slots_honoured(tiny, rules: bool) -> None:
    cfg = tiny.replace(pipeline={"diversity_rules": rules})
    recs = run_with_spy(cfg, n_users=8, n_steps=25)
    n_reserved = n_new = 0
    for t, rec in enumerate(recs):
        feed = rec["feed"]
        knobs = rec["knobs"]
        _, _, _, new = feed_attrs(rec)
        # the number of reserved slots follows the knob: round(share * feed_size), spread evenly
        expect = np.floor(knobs.new_creator_share * cfg.pipeline.feed_size + 1e-4)
        got = (feed.reserved_new | (feed.pool_index < 0)).sum(1)
        assert np.all(np.abs(got - expect) <= 1 + (feed.pool_index < 0).sum(1))
        for b, j in zip(*np.nonzero(feed.reserved_new), strict=True):
            n_reserved += 1
            if new[b, j]:
                n_new += 1
            else:
                assert not _reserved_slot_could_be_new(rec, b, j, cfg.pipeline), (
                    f"step {t} user {b} slot {j}: reserved slot took an established creator's video "
                    "although an eligible new-creator video was in the pool")
    assert n_reserved > 50 and n_new > 0.5 * n_reserved


def test_zero_action_gives_seed_knobs(tiny) -> None:
    cfg = tiny.pipeline
    k = knobs_from_action(np.zeros((3, N_KNOBS), np.float32), cfg)
    np.testing.assert_array_equal(k.weights(cfg), np.broadcast_to(SEED_WEIGHTS, (3, len(HEADS))))
    np.testing.assert_array_equal(k.head_mult, 1.0)
    np.testing.assert_allclose(k.explore_share, 0.2)
    np.testing.assert_allclose(k.new_creator_share, 0.15)
    np.testing.assert_array_equal(k.diversity_strength, 1.0)
    np.testing.assert_array_equal(k.adaptation_strength, 1.0)
    assert cfg.adapt_engaged == 1.3 and cfg.adapt_skipped == 0.5
    assert np.all(cfg.adapt_engaged ** k.adaptation_strength == np.float32(1.3))
    assert np.all(cfg.adapt_skipped ** k.adaptation_strength == np.float32(0.5))
    np.testing.assert_array_equal(k.break_after_min, 60.0)


@pytest.mark.parametrize("rebalancing", [True, False])
def test_zero_action_is_weighted_sum_ranking(tiny, rebalancing: bool) -> None:
    """No exploration, no reserved slots, no rules or penalty, no adaptation: the zero action's
    feed is the pool sorted by the seed's weighted sum, every step."""
    cfg = tiny.replace(pipeline={"rebalancing": rebalancing, "explore_share": 0.0, "new_creator_share": 0.0,
                                 "diversity_rules": False, "diversity_penalty": 0.0, "adapt_engaged": 1.0,
                                 "adapt_skipped": 1.0})
    recs = run_with_spy(cfg, n_users=6, n_steps=30, actions=np.zeros((30, 6, N_KNOBS), np.float32))
    f = cfg.pipeline.feed_size
    for t, rec in enumerate(recs):
        pool, feed = rec["pool"], rec["feed"]
        score = weighted_sum(pool["heads"], SEED_WEIGHTS)
        for b in range(score.shape[0]):
            valid = np.flatnonzero(pool["item"][b] >= 0)
            order = valid[np.argsort(-score[b, valid], kind="stable")][:f]
            got = feed.pool_index[b][feed.pool_index[b] >= 0]
            np.testing.assert_array_equal(got, order, err_msg=f"step {t} user {b}")
            assert not feed.explore[b].any() and not feed.reserved_new[b].any()


# ---------------------------------------------------------------------------- the diversity knob
K = len(HEADS)


def _feed_topics(scores: list[float], topics: list[int], creators: list[int], fmts: list[int], new: list[bool],
                 strength: float, feed_size: int, rules: bool, new_share: float) -> int:
    p = len(scores)
    cfg = PipelineConfig(n_interest=1, n_following=0, n_trending=0, n_new_creator=0, n_serendipity=0, n_prerank=p,
                         n_rank=p, feed_size=feed_size, slate_size=1, ad_positions=(), promoted_position=0,
                         pool_quota_new_creator=0, pool_quota_serendipity=0, diversity_rules=rules)
    heads = np.zeros((1, p, K), np.float32)
    heads[0, :, HEADS.index("p_complete")] = np.asarray(scores, np.float32) / RANKING_WEIGHTS["p_complete"]
    pool = Pool(item=np.arange(p, dtype=np.int32)[None], heads=heads, uncertainty=np.zeros((1, p), np.float32),
                topic=np.asarray(topics, np.int32)[None], creator=np.asarray(creators, np.int32)[None],
                format=np.asarray(fmts, np.int8)[None], new_creator=np.asarray(new, bool)[None],
                quality_est=np.linspace(0, 1, p, dtype=np.float32)[None], source=np.zeros((1, p), np.int8))
    knobs = Knobs(head_mult=np.ones((1, K), np.float32), explore_share=np.zeros(1, np.float32),
                  new_creator_share=np.full(1, new_share, np.float32),
                  diversity_strength=np.full(1, strength, np.float32), adaptation_strength=np.ones(1, np.float32),
                  break_after_min=np.full(1, 60.0, np.float32))
    view = UserView(1, 4, max(topics) + 1)
    feed = rebalance(pool, knobs, view, cfg, np.zeros((1, p), np.float32))
    placed = feed.pool_index[0][feed.pool_index[0] >= 0]
    return len(set(np.asarray(topics)[placed].tolist()))


pool_items = st.lists(
    st.tuples(st.floats(0.0, 0.3, allow_nan=False), st.integers(0, 5), st.integers(0, 6), st.integers(0, 3),
              st.booleans()),
    min_size=2, max_size=24)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=pool_items, a=st.floats(-1.0, 1.0), b=st.floats(-1.0, 1.0), feed_size=st.integers(1, 12))
def test_raising_diversity_knob_never_lowers_topic_coverage(items, a, b, feed_size) -> None:
    """The soft topic penalty alone (hard rules off, no reserved slots) is monotone in the knob.

    With the hard rules on it is not: the greedy pass with a creator cap, a format-run limit and
    end-of-feed forcing can lose a topic when a stronger penalty changes an early pick (a random
    search found 4 -> 3 topics at strength 1 -> 2, 8 slots, one reserved new-creator slot); the
    rules' own guarantee (at least min_topics where the pool allows) is checked by assert_rules_hold.
    """
    lo, hi = sorted((a, b))
    feed_size = min(feed_size, len(items))
    cols = [list(c) for c in zip(*items, strict=True)]
    cov = [_feed_topics(*cols, strength=1.0 + x, feed_size=feed_size, rules=False, new_share=0.0)
           for x in (lo, hi)]
    assert cov[1] >= cov[0], f"diversity knob {lo:.3f} -> {hi:.3f} lowered topic coverage {cov[0]} -> {cov[1]}"


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 20), c=st.integers(1, 200), k=st.integers(1, 8),
       big=st.booleans())
def test_compiled_model_error_is_the_hashed_normal(seed: int, b: int, c: int, k: int, big: bool) -> None:
    """The noisy-oracle scorer's persistent errors, compiled, are ``hash_normal(user, item, head)`` bit for bit
    (padding -1 hashes as item 0)."""
    rng = np.random.default_rng(seed)
    key = rng.integers(0, 2**32, b, dtype=np.uint64).astype(np.uint32)
    items = rng.integers(-1, 2**31 - 1 if big else 5000, (b, c)).astype(np.int32)
    want = hash_normal(key[:, None, None], np.maximum(items, 0)[:, :, None], np.arange(k)[None, None, :])
    got = model_error(key, items, k)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)
