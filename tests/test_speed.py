"""Issue 30's compiled and cached paths compute what the plain numpy code computed, bit for bit: each test holds
a fast path against the formula it replaced (the determinism tests hold whole runs)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.simulator import FeedSimulator
from rankers.hashing import hash_normal, hash_uniform
from rankers.rebalance import (
    EXPLOIT,
    EXPLORE,
    NEW_CREATOR,
    _feed,
    _feed_numpy,
    _slot_kinds,
    adapted_score,
    greedy_inputs,
    greedy_pass,
    slot_mask,
)
from tests.helpers import knob_actions
from tests.test_stage4_reference import stage4_cases


def noise_reference(sim: FeedSimulator, s: int, p: int) -> tuple[np.ndarray, ...]:
    """``FeedSimulator._noise`` as it was written with ``rankers.hashing`` (before the compiled pass)."""
    key, st_, salt = sim.users.key, sim.steps, sim.noise_salt
    pos = np.arange(s)
    r_resp = hash_uniform(salt, 1, key[:, None, None], st_[:, None, None], pos[None, :, None],
                          np.arange(9)[None, None, :])
    n_resp = hash_normal(salt, 2, key[:, None], st_[:, None], pos[None, :])
    r_sess = hash_uniform(salt, 3, key[:, None], sim.users.n_sessions[:, None], np.arange(4)[None, :])
    ts_noise = hash_normal(salt, 4, key[:, None], st_[:, None], np.arange(p)[None, :])
    return r_resp, n_resp, r_sess.astype(np.float64), ts_noise


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 9), s=st.integers(1, 12), p=st.integers(1, 60))
def test_compiled_request_noise_is_the_hashed_noise(tiny, seed: int, b: int, s: int, p: int) -> None:
    sim = FeedSimulator(tiny, b, seed=seed % 1000)
    sim.reset()
    rng = np.random.default_rng(seed)
    sim.users.key[:] = rng.integers(0, 2**32, b, dtype=np.uint64).astype(np.uint32)
    sim.steps[:] = rng.integers(0, 2**40, b)  # wraps to 32 bits in the hash, as astype(uint32) does
    sim.users.n_sessions[:] = rng.integers(0, 2**33, b)
    got, want = sim._noise(s, p), noise_reference(sim, s, p)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_step_noise_matches_reference_along_a_run(tiny) -> None:
    sim = FeedSimulator(tiny, 5, seed=2)
    sim.reset()
    cfg = tiny.pipeline
    for a in knob_actions(12, 5):
        for g, w in zip(sim._noise(cfg.slate_size, cfg.n_rank), noise_reference(sim, cfg.slate_size, cfg.n_rank),
                        strict=True):
            np.testing.assert_array_equal(g, w)
        sim.step(a)


def greedy_keys_reference(exploit: np.ndarray, pool, ts_noise: np.ndarray, threshold: float) -> np.ndarray:
    """Stage 4's placement keys as the numpy formulas wrote them (before the compiled pass)."""
    uncertain = pool.uncertainty > threshold
    thompson = exploit + np.where(uncertain, pool.uncertainty * ts_noise, 0.0).astype(np.float32)
    explore_key = np.where(uncertain, thompson, thompson - 1e3)
    return np.stack([exploit, explore_key.astype(np.float32), pool.quality_est.astype(np.float32)], axis=1)


def slot_kinds_reference(knobs, feed_size: int) -> np.ndarray:
    """Stage 4's slot plan as the numpy formulas wrote it (before the compiled pass)."""
    new_pos = slot_mask(knobs.new_creator_share, feed_size, 0.0)
    explore_pos = slot_mask(knobs.explore_share, feed_size, 0.5) & ~new_pos
    return np.where(new_pos, NEW_CREATOR, np.where(explore_pos, EXPLORE, EXPLOIT)).astype(np.int8)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), f=st.integers(1, 80))
def test_compiled_slot_plan_equals_numpy(seed: int, f: int) -> None:
    """Every share the knobs can give (a grid of [0, 1] and its float32 neighbours) plans the same slots."""
    from rankers.knobs import Knobs

    rng = np.random.default_rng(seed)
    grid = np.concatenate([np.linspace(0, 1, 101, dtype=np.float32), rng.random(200, dtype=np.float32)])
    grid = np.concatenate([grid, np.nextafter(grid, np.float32(2)), np.nextafter(grid, np.float32(-1))])
    grid = np.clip(grid, 0, 1).astype(np.float32)
    other = rng.permutation(grid)
    b = grid.size
    knobs = Knobs(head_mult=np.ones((b, 8), np.float32), explore_share=grid, new_creator_share=other,
                  diversity_strength=np.ones(b, np.float32), adaptation_strength=np.ones(b, np.float32),
                  break_after_min=np.full(b, 60.0, np.float32))
    got = np.empty((b, f), np.int8)
    _slot_kinds(knobs.new_creator_share, knobs.explore_share, got)
    np.testing.assert_array_equal(got, slot_kinds_reference(knobs, f))


@settings(max_examples=300, deadline=None)
@given(case=stage4_cases(), nan=st.booleans())
def test_compiled_feed_and_keys_equal_numpy(case, nan: bool) -> None:
    """The greedy keys and the feed's items, slot flags and ``diverted`` (:func:`rankers.rebalance._feed_kernel`)
    equal the numpy formulas they replaced, with ties, padding and NaN scores (which take the numpy path)."""
    pool, knobs, view, cfg, noise, n_fill = case
    exploit = adapted_score(pool, knobs, view, cfg)
    if nan:
        exploit[:, ::3] = np.nan
    inputs = greedy_inputs(pool, knobs, cfg, exploit, noise)
    want = greedy_keys_reference(exploit, pool, noise, cfg.uncertainty_threshold)
    assert inputs.keys.dtype == want.dtype
    np.testing.assert_array_equal(inputs.keys, want)
    np.testing.assert_array_equal(inputs.slot_kind, slot_kinds_reference(knobs, cfg.feed_size))
    pool_index, score, relaxed = greedy_pass(inputs, cfg, n_fill)
    got, ref = _feed(pool, inputs, pool_index, score, relaxed), _feed_numpy(pool, inputs, pool_index, score, relaxed)
    for f in ("item", "pool_index", "score", "explore", "reserved_new", "rule_relaxed", "diverted"):
        a, r = getattr(got, f), getattr(ref, f)
        assert a.dtype == r.dtype and a.shape == r.shape, f
        np.testing.assert_array_equal(a, r, err_msg=f)


@settings(max_examples=50, deadline=None)
@given(case=stage4_cases())
def test_greedy_keys_of_float64_noise_are_the_numpy_formulas(case) -> None:
    """Noise of another dtype than float32 (or broadcast) takes the numpy formulas, whose products it decides."""
    pool, knobs, view, cfg, noise, _ = case
    exploit = adapted_score(pool, knobs, view, cfg)
    for other in (noise.astype(np.float64) * np.float64(1.0 + 1e-9), noise[:1]):
        got = greedy_inputs(pool, knobs, cfg, exploit, other).keys
        np.testing.assert_array_equal(got, greedy_keys_reference(exploit, pool, other, cfg.uncertainty_threshold))


def slate_reference(pipe, feed, knobs):
    """``Pipeline.make_slate`` (and its ``_reasons``) as the numpy code wrote them before the compiled pass;
    returns the slate and the promoted slots' count per user (what it added to ``promo_ptr``)."""
    from rankers.explain import AD, ADAPTATION, DIVERSITY, EXPLORATION, NEW_CREATOR_SLOT, PROMOTED, RANKED
    from rankers.hashing import hash_u32
    from rankers.types import Slate

    cfg, cat, view = pipe.cfg, pipe.catalog, pipe.view
    b, s = feed.item.shape[0], cfg.slate_size
    pos = pipe.stream_pos[:, None] + np.arange(s)[None, :]
    pos50 = pos % cfg.feed_size + 1
    ads = cfg.ads and not pipe.recsim
    is_ad = np.isin(pos50, np.asarray(cfg.ad_positions)) if ads else np.zeros((b, s), bool)
    promo_ids = pipe.tables.promoted
    is_promo = (pos50 == cfg.promoted_position) & ads & (cfg.promoted_position > 0) & (promo_ids.size > 0)
    promo_item = np.full((b, s), -1, np.int64)
    if is_promo.any():
        k = (hash_u32(view.user_key)[:, None].astype(np.int64) + pipe.promo_ptr[:, None]) % promo_ids.size
        promo_item = np.where(is_promo, promo_ids[k], -1)
        is_promo &= pipe._without_muted(np.arange(b), promo_item) >= 0
    organic = ~(is_ad | is_promo)
    feed_pos = np.where(organic, np.cumsum(organic, axis=1) - 1, -1).astype(np.int32)
    rows = np.arange(b)[:, None]
    safe = np.maximum(feed_pos, 0)
    item = np.where(organic, feed.item[rows, safe], -1).astype(np.int32)
    n_promo = np.zeros(b, np.int64)
    if is_promo.any():
        item = np.where(is_promo, promo_item, item).astype(np.int32)
        n_promo = is_promo.sum(axis=1)
    ad = np.full((b, s), -1, np.int32)
    if is_ad.any():
        r, c = np.nonzero(is_ad)
        rel = view.emb[r] @ cat.ad_emb.T
        noise = hash_normal(view.user_key[r][:, None], pos[r, c][:, None], np.arange(cat.ad_emb.shape[0])[None, :])
        ad[r, c] = (rel + 0.5 * noise).argmax(axis=1)
    explore = np.where(organic, feed.explore[rows, safe], False)
    reserved = np.where(organic, feed.reserved_new[rows, safe], False)
    brk = view.session_minutes >= knobs.break_after_min
    org = organic & (item >= 0)
    pidx = np.where(org, feed.pool_index[rows, safe], -1)
    ok = pidx >= 0
    psafe = np.maximum(pidx, 0)
    pool = pipe.pool
    source = np.where(ok, pool.source[rows, psafe], -1).astype(np.int8)
    contrib = pool.heads[rows, psafe] * knobs.weights(cfg)[:, None, :]
    top_head = np.where(ok, contrib.argmax(axis=2), -1).astype(np.int8)
    diverted = np.where(ok, feed.diverted[rows, safe], False)
    adapted = np.zeros_like(ok)
    if pipe._stage4_cfg.adaptation:
        eng_t, _ = view.session_topics()
        adapted = ok & eng_t[rows, pool.topic[rows, psafe]] & (knobs.adaptation_strength[:, None] > 0)
    reason = np.full(ok.shape, RANKED, np.int8)
    for flag, code in ((adapted, ADAPTATION), (diverted, DIVERSITY), (explore, EXPLORATION),
                       (reserved, NEW_CREATOR_SLOT), (is_promo, PROMOTED), (is_ad, AD)):
        reason[flag] = code
    return Slate(item=item, ad=ad, promoted=is_promo, feed_pos=feed_pos, explore=explore, reserved_new=reserved,
                 break_prompt=brk, source=source, reason=reason, top_head=top_head), n_promo


@pytest.mark.parametrize("changes", [
    {},  # ads and promoted slots, adaptation
    {"users": {"controls_share": 0.9}, "pipeline": {"adaptation": False, "promoted_position": 5}},  # mutes; promo = ad
    {"pipeline": {"candidate_mode": "recsim", "recsim_candidates": 60, "feed_size": 10, "slate_size": 10, "ads": False,
                  "ad_positions": (), "promoted_position": 0}},
])
def test_compiled_slate_equals_numpy(tiny, monkeypatch, changes) -> None:
    """Every slate of a run (random knobs, restarts) is the one the numpy code built: items, ads, promoted slots,
    flags, sources, reasons and top heads."""
    cfg = tiny.replace(**changes)
    sim = FeedSimulator(cfg, 10, seed=3)
    sim.reset()
    pipe = sim.pipeline
    orig = pipe.make_slate
    counts = {"promo": 0, "ad": 0}
    reasons: set[int] = set()

    def checked(feed, knobs):
        ptr0 = pipe.promo_ptr.copy()
        want, n_promo = slate_reference(pipe, feed, knobs)
        got = orig(feed, knobs)
        for f in want.__dataclass_fields__:
            a, w = getattr(got, f), getattr(want, f)
            assert a.dtype == w.dtype and a.shape == w.shape, f
            np.testing.assert_array_equal(a, w, err_msg=f)
        np.testing.assert_array_equal(pipe.promo_ptr, ptr0 + n_promo)
        counts["promo"] += int(want.promoted.sum())
        counts["ad"] += int((want.ad >= 0).sum())
        reasons.update(np.unique(want.reason).tolist())
        return got

    monkeypatch.setattr(pipe, "make_slate", checked)
    for a in knob_actions(60, 10, seed=8):
        r = sim.step(a)
        done = r.terminated | r.truncated
        if done.any():
            sim.reset(done)
    if not changes:
        assert counts["promo"] and counts["ad"] and len(reasons) >= 5


def test_pool_summary_reuses_the_score_of_the_same_knobs_only(tiny) -> None:
    """The observation's pool summary reads stage 4's combined score under the same knobs, and computes its own
    for other knobs or once the pool was refreshed: the same values either way."""
    from rankers.knobs import knobs_from_action

    sim = FeedSimulator(tiny, 6, seed=4)
    sim.reset()
    pipe = sim.pipeline
    for a in knob_actions(15, 6, seed=5):
        sim.step(a)
        knobs = knobs_from_action(a, tiny.pipeline)
        other = knobs_from_action(a, tiny.pipeline)  # equal values, another object: no reuse
        pipe.rebalance(knobs, np.zeros((6, tiny.pipeline.n_rank), np.float32))
        assert pipe._score is not None and pipe._score[0] is knobs
        cached, fresh = pipe.pool_summary(knobs), pipe.pool_summary(other)
        pipe.refresh(np.ones(6, bool), knobs)
        assert pipe._score is None
        for k in fresh:
            np.testing.assert_array_equal(cached[k], fresh[k])

