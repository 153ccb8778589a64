"""Regions and languages: users mostly watch their languages, trending per region and language, the prior."""

from __future__ import annotations

import numpy as np
import pytest

from envs.config import make_config
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS
from rankers.sourcing import regional_prior

CFG = make_config("tiny", corpus={"n_regions": 4, "n_languages": 3})


def _serve(cfg, b: int = 64, steps: int = 60) -> tuple[FeedSimulator, float]:
    sim = FeedSimulator(cfg, b, seed=0)
    sim.reset()
    spoken = total = 0
    for _ in range(steps):
        res = sim.step(np.zeros((sim.n_users, N_KNOBS), np.float32))
        item = res.info["slate"].item
        ok = (item >= 0) & res.info["responses"]["shown"]
        lang = sim.corpus.catalog.language[np.maximum(item, 0)]
        u = sim.users
        own = (lang == u.language[:, None]) | ((lang == 0) & u.bilingual[:, None])
        spoken += int((own & ok).sum())
        total += int(ok.sum())
        done = res.terminated | res.truncated
        if done.any():
            sim.reset(done)
    return sim, spoken / total


def test_users_mostly_watch_their_languages_and_trending_is_local() -> None:
    sim, share = _serve(CFG)
    cat, tables = sim.corpus.catalog, sim.pipeline.tables
    lang = cat.language[: cat.n_items]
    u = sim.users
    chance = np.mean([np.mean((lang == lo) | ((lang == 0) & bi)) for lo, bi in zip(u.language, u.bilingual)])
    assert share > 0.5 and share > chance + 0.15  # mostly their languages, well above a random video's chance
    assert tables.local_trending.shape[:2] == (4, 3)
    for lang in range(3):
        ids = tables.local_trending[:, lang][tables.local_trending[:, lang] >= 0]
        assert ids.size and np.all(cat.language[ids] == lang)
    assert np.array_equal(sim.view.region, sim.users.region)  # the system knows where the user is


def test_regional_prior_and_unknown_region_or_language() -> None:
    sim, _ = _serve(CFG, steps=20)
    cat = sim.corpus.catalog
    fallback = np.zeros(cat.emb.shape[1], np.float32)
    n_lang = CFG.corpus.n_languages
    pri = regional_prior(cat, np.array([0, 1, 0]), np.array([0, 1, 0]), fallback, n_lang)
    assert pri.shape == (3, cat.emb.shape[1]) and np.allclose(pri[0], pri[2])
    assert np.allclose(np.linalg.norm(pri, axis=1), 1.0, atol=1e-4) or np.any(pri == 0)
    with pytest.raises(ValueError, match="unknown region 7"):
        regional_prior(cat, np.array([7]), np.array([0]), fallback, n_lang)
    with pytest.raises(ValueError, match=f"unknown language {n_lang}"):
        regional_prior(cat, np.array([0]), np.array([n_lang]), fallback, n_lang)


def test_one_region_one_language_is_the_plain_world() -> None:
    sim = FeedSimulator(make_config("tiny"), 4, seed=0)
    sim.reset()
    assert not sim.corpus.localized and sim.corpus.catalog.language is None
    assert sim.pipeline.tables.local_trending.size == 0
