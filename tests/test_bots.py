"""Bots and manipulated engagement: rings inflate counters and reach trending; the detector keeps them out."""

from __future__ import annotations

import numpy as np

from envs.config import make_config
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS


def _run(bots: float, detector: bool, steps: int = 120, b: int = 96) -> tuple[dict[str, float], list[dict]]:
    cfg = make_config("tiny", corpus={"bot_rings_per_day": bots}, pipeline={"bot_filter": detector})
    sim = FeedSimulator(cfg, b, seed=0)
    sim.key_users(np.arange(b))
    sim.reset()
    tot: dict[str, float] = {}
    snaps = []
    for i in range(steps):
        res = sim.step(np.zeros((b, N_KNOBS), np.float32))
        for k, v in res.info.items():
            if k.startswith("integrity/"):
                tot[k] = tot.get(k, 0.0) + float(v.sum())
        if i % 10 == 9:
            snaps.append(sim.integrity())
        done = res.terminated | res.truncated
        if done.any():
            sim.reset(done)
    return tot, snaps


def test_rings_reach_trending_and_the_detector_keeps_most_of_them_out() -> None:
    off, _ = _run(0.0, False)
    assert off["integrity/boosted_impressions"] == 0.0
    on, _ = _run(20.0, False)
    share_on = on["integrity/boosted_trending_impressions"] / on["integrity/trending_impressions"]
    assert share_on > 0.03  # bought engagement takes a measurable share of what trending serves
    det, snaps = _run(20.0, True)
    share_det = det["integrity/boosted_trending_impressions"] / det["integrity/trending_impressions"]
    assert share_det < 0.5 * share_on
    recall = np.mean([s["recall"] for s in snaps])
    fpr = np.mean([s["false_positive_rate"] for s in snaps])
    assert recall > 0.5 and fpr < 0.05


def test_no_bots_leave_the_world_and_detector_quiet() -> None:
    cfg = make_config("tiny", pipeline={"bot_filter": True})
    sim = FeedSimulator(cfg, 8, seed=1)
    sim.reset()
    assert sim.corpus.bot_rng is None  # no rings: the world's streams are the default world's
    sim.step(np.zeros((8, N_KNOBS), np.float32))
    rep = sim.integrity()
    assert rep["boosted_items"] == 0.0 and rep["false_positive_rate"] < 0.01
