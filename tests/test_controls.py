""""Why you're seeing this" and user controls: every slot's reason, mutes honoured from the next request on."""

from __future__ import annotations

import numpy as np
import pytest

from envs.config import make_config
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS
from rankers.explain import AD, EXPLORATION, NEW_CREATOR_SLOT, PROMOTED, REASONS, SOURCES, explain
from rankers.user_model import ControlError


def _run(cfg, b: int, steps: int, seed: int = 0):
    sim = FeedSimulator(cfg, b, seed=seed)
    sim.reset()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        before = (sim.view.muted_topic.copy(), sim.view.muted_creator.copy())
        res = sim.step(rng.uniform(-1, 1, (b, N_KNOBS)).astype(np.float32))
        yield sim, before, res
        done = res.terminated | res.truncated
        if done.any():
            sim.reset(done)


def test_muted_topics_and_creators_are_never_served_again() -> None:
    cfg = make_config("tiny", users={"controls_share": 1.0, "mute_topic_prob": 0.3, "mute_creator_prob": 0.6})
    b = 32
    served_muted = 0
    for sim, (mt, mc), res in _run(cfg, b, 250):
        item = res.info["slate"].item
        ok = item >= 0
        cat = sim.corpus.catalog
        top = cat.topic[np.maximum(item, 0)]
        cre = cat.creator[np.maximum(item, 0)]
        hit = mt[np.arange(b)[:, None], top] | (cre[:, :, None] == mc[:, None, :]).any(axis=2)
        served_muted += int((ok & hit).sum())
    assert served_muted == 0
    assert sim.view.muted_topic.sum() > 5 and (sim.view.muted_creator >= 0).sum() > 5  # the controls were used


def test_controls_off_mute_nothing_and_explicit_mutes_are_checked() -> None:
    cfg = make_config("tiny")
    sim, _, _ = next(_run(cfg, 4, 1))
    assert not sim.view.muted_topic.any() and (sim.view.muted_creator < 0).all()
    with pytest.raises(ControlError, match="no topic 99"):
        sim.view.mute([0], topic=[99])
    with pytest.raises(ControlError, match="no creator"):
        sim.view.mute([0], creator=[10**7])
    with pytest.raises(ControlError, match="rows"):
        sim.view.mute([7], topic=[0])
    sim.view.mute([1], topic=[3])
    res = sim.step(np.zeros((4, N_KNOBS), np.float32))
    item = res.info["slate"].item[1]
    assert not (sim.corpus.catalog.topic[item[item >= 0]] == 3).any()


def test_every_slot_carries_its_reason_and_a_sentence() -> None:
    cfg = make_config("tiny")
    seen = np.zeros(len(REASONS), bool)
    for sim, _, res in _run(cfg, 16, 30, seed=3):
        s = res.info["slate"]
        assert s.reason.shape == s.item.shape and s.source.shape == s.item.shape
        np.testing.assert_array_equal(s.reason == AD, s.ad >= 0)
        np.testing.assert_array_equal(s.reason == PROMOTED, s.promoted)
        assert np.all((s.reason == EXPLORATION) == (s.explore & ~s.reserved_new & (s.ad < 0) & ~s.promoted))
        assert np.all((s.reason == NEW_CREATOR_SLOT) == (s.reserved_new & (s.ad < 0) & ~s.promoted))
        organic = s.feed_pos >= 0
        assert np.all((s.source >= 0) <= organic) and s.source.max() < len(SOURCES)
        assert np.all((s.top_head >= 0) == (organic & (s.item >= 0)))
        seen[np.unique(s.reason)] = True
        cat = sim.corpus.catalog
        text = explain(s, 0, cat.topic[np.maximum(s.item[0], 0)])
        assert len(text) == s.item.shape[1] and all(isinstance(t, str) and t for t in text)
    assert seen[[0, 1, 2, 3, 5]].all()  # ranked, exploration, new-creator slot, diversity and ads all occur
