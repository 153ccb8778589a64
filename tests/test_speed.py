"""Issue 30's compiled and cached paths compute what the plain numpy code computed, bit for bit: each test holds
a fast path against the formula it replaced (the determinism tests hold whole runs)."""

from __future__ import annotations

import numpy as np
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
