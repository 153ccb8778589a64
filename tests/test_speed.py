"""Issue 30's compiled and cached paths compute what the plain numpy code computed, bit for bit: each test holds
a fast path against the formula it replaced (the determinism tests hold whole runs)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.simulator import FeedSimulator
from rankers.hashing import hash_normal, hash_uniform
from tests.helpers import knob_actions


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
