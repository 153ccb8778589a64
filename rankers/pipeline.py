"""The 4-stage pipeline as one object: sourcing -> pre-ranking -> ranking -> rebalancing.

As production prefetching does, the ranked pool of stages 1-3 is kept per user and reused across
requests; it is refreshed when it runs low (fewer than ``feed_size`` items) or when a new session
starts. Stage 4 runs at every request, so the action always takes effect, and served items leave
the pool, so nothing is shown twice.

Stages 1-3 are the noisy-oracle setting by default; ``PipelineConfig(retrieval="two_tower",
preranker="learned", scorer="learned")`` is the learned pipeline (trained models passed as
``models``, see :mod:`rankers.serving`).

``candidate_mode="recsim"`` replaces stages 1-2 and 4 by RecSim's setting (see
:class:`rankers.config.PipelineConfig`): the pool is re-drawn at every request and the slate is the
top of the scorer's ranking.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import numba
import numpy as np

from rankers.config import PipelineConfig
from rankers.explain import AD, ADAPTATION, DIVERSITY, EXPLORATION, NEW_CREATOR_SLOT, PROMOTED, RANKED
from rankers.hashing import hash_absorb, hash_normal_of, hash_u32
from rankers.item_index import EmbeddingIndex, ItemIndex
from rankers.knobs import Knobs
from rankers.ranking import (
    Scorer,
    TruthFn,
    combined_score,
    make_preranker,
    make_scorer,
    top_k_with_quota,
)
from rankers.rebalance import rebalance
from rankers.sourcing import (
    SRC_NEW_CREATOR,
    SRC_SERENDIPITY,
    SourceTables,
    make_index,
    source_candidates,
)
from rankers.types import Array, Catalog, Feed, Pool, Slate, take_rows
from rankers.user_model import UserView

STAGES: tuple[str, ...] = ("sourcing", "prerank", "rank", "rebalance")
BATCH_JOBS = "index"
"""Timing key of the batch jobs: the daily recomputation of item vectors for the retrieval index and the
pre-ranker, and vectors of new uploads, and the rebuild of the per-tick candidate lists of stage 1 (trending,
per-topic quality, new creators' items) when the catalog has moved on. Production runs them outside the
request path (offline and near-line jobs); here they run, when due, before the stages of a refresh. The
candidate lists were timed under ``sourcing`` before (README, Speed)."""


class Pipeline:
    """Holds the per-user ranked pools of B users and runs the four stages."""

    #: Per-user arrays of the pipeline itself (the pool's are ``Pool``'s fields; :meth:`take`).
    PER_USER: tuple[str, ...] = ("stream_pos", "promo_ptr")

    def __init__(self, cfg: PipelineConfig, catalog: Catalog, view: UserView, truth: TruthFn,
                 scorer: Scorer | None = None, models: Mapping[str, Any] | None = None) -> None:
        """``models``: the trained models the config asks for (``cfg.learned_models``), by kind
        (``two_tower``, ``preranker``, ``ranker``); ``scorer`` overrides stage 3."""
        self.cfg = cfg
        self.recsim = cfg.candidate_mode == "recsim"
        self.catalog = catalog
        self.view = view
        models = models or {}
        self.scorer = scorer if scorer is not None else make_scorer(cfg, truth, model=models.get("ranker"))
        self.prerank = make_preranker(cfg, models.get("preranker"))
        if self.recsim:  # no sourcing in the RecSim setting: the index is never searched
            self.index: ItemIndex = EmbeddingIndex(catalog, "flat")
        else:
            self.index = make_index(cfg, catalog, models.get("two_tower"))
        self._stage4_cfg = dataclasses.replace(cfg, rebalancing=False, adaptation=False) if self.recsim else cfg
        self.tables = SourceTables()
        b, k = view.n_users, len(cfg.ranking_weights)
        p = cfg.recsim_candidates if self.recsim else cfg.n_rank
        self.pool = Pool(
            item=np.full((b, p), -1, np.int32), heads=np.zeros((b, p, k), np.float32),
            uncertainty=np.zeros((b, p), np.float32), topic=np.zeros((b, p), np.int32),
            creator=np.zeros((b, p), np.int32), format=np.zeros((b, p), np.int8),
            new_creator=np.zeros((b, p), bool), quality_est=np.zeros((b, p), np.float32),
            source=np.full((b, p), -1, np.int8),
        )
        self.stream_pos = np.zeros(b, np.int64)  # slots shown in this session (ads included)
        self.promo_ptr = np.zeros(b, np.int64)
        self.timings: dict[str, float] = dict.fromkeys((*STAGES, BATCH_JOBS), 0.0)
        # model batch jobs: the index's and a learned pre-ranker's item vectors follow the catalog
        self._batch_jobs = [obj.sync for obj in (self.index, self.prerank) if hasattr(obj, "sync")]
        self.n_refreshed = 0
        # slots of the session's stream (1-based positions in every feed_size slots) that hold an ad / promoted item
        ads = cfg.ads and not self.recsim
        self._ad_slot = np.zeros(max(cfg.feed_size, *cfg.ad_positions, 0) + 1, bool)
        if ads:
            self._ad_slot[list(cfg.ad_positions)] = True
        self._promo_slot = ads and cfg.promoted_position > 0
        self._score: tuple[Knobs, Array] | None = None
        """(knobs, the pool's combined score under them) of the last :meth:`rebalance`, which :meth:`pool_summary`
        reuses under the same knobs until the pool's heads change (:meth:`refresh`, :meth:`take`)."""

    # ------------------------------------------------------------------ lifecycle
    def reset(self, mask: Array) -> None:
        """Clears the pools of users in ``mask`` (new users)."""
        self.pool.item[mask] = -1
        self.stream_pos[mask] = 0
        self.promo_ptr[mask] = 0

    def take(self, rows: Array) -> None:
        """Keeps only the users ``rows`` (pools and session streams; the view is the caller's)."""
        self.pool.take(rows)
        take_rows(self, self.PER_USER, rows)
        self.rows_changed()

    def rows_changed(self) -> None:
        """The batch's rows were replaced from outside (``take``, a masked step of the simulator): drops what
        was computed for the old rows."""
        self._score = None

    def start_session(self, mask: Array) -> None:
        """A new session: the pool is stale (session context shifted) and the ad stream restarts."""
        self.pool.item[mask] = -1
        self.stream_pos[mask] = 0

    def needs_refresh(self) -> Array:
        """(B,) bool: pools with fewer than ``feed_size`` items left (every user in recsim mode)."""
        if self.recsim:
            return np.ones(self.view.n_users, bool)
        return self.pool.remaining() < self.cfg.feed_size

    # ------------------------------------------------------------------ stages 1-3
    def refresh(self, mask: Array, knobs: Knobs) -> None:
        """Runs stages 1-3 for users in ``mask`` (B,) and stores their ranked pools."""
        self._score = None
        users = np.flatnonzero(mask)
        if users.size == 0:
            return
        if self.recsim:
            self._refresh_recsim(users, knobs)
            return
        cfg, cat, view = self.cfg, self.catalog, self.view
        t0 = time.perf_counter()
        for job in self._batch_jobs:
            job(cat)
        self.tables.update(cat, cfg)  # per-tick lists; source_candidates' own call then finds them current
        t_jobs = time.perf_counter()
        self.timings[BATCH_JOBS] += t_jobs - t0
        t0 = t_jobs
        items, source = source_candidates(users, view, cat, cfg, self.index, self.tables)
        items = self._without_muted(users, items)
        t1 = time.perf_counter()
        # Stage 2: lightweight pre-ranking with per-source quotas. The new-creator quota exists to
        # honour stage 4's reserved slots, so it scales with the new-creator-share knob.
        pre = self.prerank(users, items, view, cat)
        nc_quota = np.rint(cfg.pool_quota_new_creator * knobs.new_creator_share[users]
                           / max(cfg.new_creator_share, 1e-6)).astype(np.int64)
        quotas: list[tuple[Array, int | Array]] = [(source == SRC_NEW_CREATOR, nc_quota * 2),
                                                   (source == SRC_SERENDIPITY, cfg.pool_quota_serendipity * 2)]
        keep = top_k_with_quota(pre, cfg.n_prerank, quotas)
        items = np.take_along_axis(items, keep, axis=1)
        source = np.take_along_axis(source, keep, axis=1)
        t2 = time.perf_counter()
        # Stage 3: multi-task heads, weighted sum with the current knob weights, cut to n_rank.
        heads, unc = self.scorer.score(users, items, view, cat)
        w = knobs.weights(cfg)[users]
        score = np.where(items >= 0, combined_score(heads, w, cfg), -np.inf)
        newc = cat.item_is_new_creator(items)
        quotas = [(newc, nc_quota), (source == SRC_SERENDIPITY, cfg.pool_quota_serendipity)]
        keep = top_k_with_quota(score, cfg.n_rank, quotas)
        it = np.take_along_axis(items, keep, axis=1)
        valid = it >= 0
        safe = np.maximum(it, 0)
        pool = self.pool
        pool.item[users] = it
        pool.heads[users] = np.take_along_axis(heads, keep[:, :, None], axis=1)
        pool.uncertainty[users] = np.take_along_axis(unc, keep, axis=1)
        pool.topic[users] = cat.topic.take(safe)
        pool.creator[users] = cat.creator.take(safe)
        pool.format[users] = cat.format.take(safe)
        pool.new_creator[users] = np.take_along_axis(newc, keep, axis=1) & valid
        pool.quality_est[users] = cat.quality_est.take(safe)
        pool.source[users] = np.where(valid, np.take_along_axis(source, keep, axis=1), -1)
        view.refreshes[users] += 1
        self.n_refreshed += users.size
        t3 = time.perf_counter()
        self.timings["sourcing"] += t1 - t0
        self.timings["prerank"] += t2 - t1
        self.timings["rank"] += t3 - t2

    def _refresh_recsim(self, users: Array, knobs: Knobs) -> None:
        """RecSim setting: ``recsim_candidates`` uniform draws from the corpus, keyed by (user,
        request), duplicates dropped, scored by the stage-3 scorer; the pool is these candidates."""
        cfg, cat, view, pool = self.cfg, self.catalog, self.view, self.pool
        t0 = time.perf_counter()
        r = cfg.recsim_candidates
        h = hash_u32(view.user_key[users][:, None], view.refreshes[users][:, None], np.arange(r)[None, :], 131)
        items = np.sort((h % np.uint32(cat.n_items)).astype(np.int32), axis=1)
        dup = np.zeros(items.shape, bool)
        dup[:, 1:] = items[:, 1:] == items[:, :-1]
        items[dup] = -1
        items = self._without_muted(users, items)
        t1 = time.perf_counter()
        heads, unc = self.scorer.score(users, items, view, cat)
        safe = np.maximum(items, 0)
        valid = items >= 0
        pool.item[users] = items
        pool.heads[users] = heads
        pool.uncertainty[users] = unc
        pool.topic[users] = cat.topic.take(safe)
        pool.creator[users] = cat.creator.take(safe)
        pool.format[users] = cat.format.take(safe)
        pool.new_creator[users] = cat.item_is_new_creator(items) & valid
        pool.quality_est[users] = cat.quality_est.take(safe)
        pool.source[users] = -1
        view.refreshes[users] += 1
        self.n_refreshed += users.size
        self.timings["sourcing"] += t1 - t0
        self.timings["rank"] += time.perf_counter() - t1

    def _without_muted(self, users: Array, items: Array) -> Array:
        """``items`` (len(users), N) with the ones the users muted (topic or creator) set to -1."""
        view = self.view
        if not (view.muted_topic.any() or view.n_muted_creators.any()):
            return items
        safe = np.maximum(items, 0)
        gone = view.muted(users, self.catalog.topic.take(safe), self.catalog.creator.take(safe)) & (items >= 0)
        return np.where(gone, -1, items).astype(items.dtype)

    # ------------------------------------------------------------------ stage 4 and serving
    def rebalance(self, knobs: Knobs, ts_noise: Array, whole: bool = False) -> Feed:
        """Stage 4 for every user: the feed under the knobs. The feed is re-planned at every request and a
        request serves at most ``slate_size`` organic items from its head, so the pass stops there (the
        same items as the whole feed's head: ``rankers.rebalance.rebalance``); ``whole`` plans all
        ``feed_size`` positions (the rules' tests judge whole feeds)."""
        t0 = time.perf_counter()
        if self.view.muted_topic.any() or self.view.n_muted_creators.any():  # controls used since the pool was
            self.pool.item[:] = self._without_muted(np.arange(self.pool.item.shape[0]), self.pool.item)  # ranked
        n = None if whole else self.cfg.slate_size  # <= feed_size (PipelineConfig checks)
        score = combined_score(self.pool.heads, knobs.weights(self.cfg), self.cfg)
        self._score = (knobs, score)
        feed = rebalance(self.pool, knobs, self.view, self._stage4_cfg, ts_noise, n, score=score)
        self.timings["rebalance"] += time.perf_counter() - t0
        return feed

    def make_slate(self, feed: Feed, knobs: Knobs) -> Slate:
        """The next ``slate_size`` slots: organic feed items with ads and promoted content at the
        seed's positions (1-based positions in every ``feed_size`` slots of the session)."""
        cfg, cat, view = self.cfg, self.catalog, self.view
        b, s = feed.item.shape[0], cfg.slate_size
        pos = self.stream_pos[:, None] + np.arange(s)[None, :]
        pos50 = pos % cfg.feed_size + 1
        is_ad = self._ad_slot[pos50]  # = np.isin(pos50, cfg.ad_positions) when ads are served
        promo_ids = self.tables.promoted
        promo_item = np.full((b, s), -1, np.int64)
        if self._promo_slot and promo_ids.size > 0:
            is_promo = pos50 == cfg.promoted_position
            if is_promo.any():
                k = (hash_u32(view.user_key)[:, None].astype(np.int64) + self.promo_ptr[:, None]) % promo_ids.size
                promo_item = np.where(is_promo, promo_ids[k], -1)
                is_promo &= self._without_muted(np.arange(b), promo_item) >= 0  # a muted one gives its slot back
        else:
            is_promo = np.zeros((b, s), bool)
        adapt = self._stage4_cfg.adaptation
        eng_t = self.view.session_topics()[0] if adapt else np.zeros((b, 1), bool)
        item = np.empty((b, s), np.int32)
        feed_pos = np.empty((b, s), np.int32)
        explore = np.empty((b, s), bool)
        reserved = np.empty((b, s), bool)
        source = np.empty((b, s), np.int8)
        reason = np.empty((b, s), np.int8)
        top_head = np.empty((b, s), np.int8)
        n_promo = np.empty(b, np.int64)
        _slate_kernel(is_ad, is_promo, promo_item, feed.item, feed.pool_index, feed.explore, feed.reserved_new,
                      feed.diverted, self.pool.source, self.pool.heads, knobs.weights(self.cfg), self.pool.topic,
                      eng_t, knobs.adaptation_strength, adapt, item, feed_pos, explore, reserved, source, reason,
                      top_head, n_promo)
        self.promo_ptr += n_promo
        ad = np.full((b, s), -1, np.int32)
        if is_ad.any():
            r, c = np.nonzero(is_ad)  # only the ad slots: (n,)
            rel = view.emb[r] @ cat.ad_emb.T  # (n, n_ads)
            n_ads = cat.ad_emb.shape[0]
            noise = np.empty((r.size, n_ads), np.float32)  # hash_normal(user key, position, ad), compiled
            _ad_noise(view.user_key[r], pos[r, c], noise)
            ad[r, c] = (rel + 0.5 * noise).argmax(axis=1)
        brk = view.session_minutes >= knobs.break_after_min
        return Slate(item=item, ad=ad, promoted=is_promo, feed_pos=feed_pos, explore=explore,
                     reserved_new=reserved, break_prompt=brk, source=source, reason=reason, top_head=top_head)

    def consume(self, feed: Feed, slate: Slate, n_slots_shown: Array) -> None:
        """Removes served organic items from the pools and advances the session stream."""
        rows = np.arange(feed.item.shape[0])[:, None]
        organic = slate.feed_pos >= 0
        pidx = np.where(organic, feed.pool_index[rows, np.maximum(slate.feed_pos, 0)], -1)
        r, c = np.nonzero(pidx >= 0)
        self.pool.item[r, pidx[r, c]] = -1
        self.stream_pos += n_slots_shown

    def pool_summary(self, knobs: Knobs) -> dict[str, Array]:
        """(B,) summaries of the current pool a production system can observe."""
        pool, cfg = self.pool, self.cfg
        valid = pool.item >= 0
        n = np.maximum(valid.sum(axis=1), 1)
        cached = self._score
        full = cached[1] if cached is not None and cached[0] is knobs else combined_score(
            pool.heads, knobs.weights(cfg), cfg)
        score = np.where(valid, full, 0.0)
        mean = score.sum(axis=1) / n
        spread = np.sqrt(np.maximum((np.where(valid, score - mean[:, None], 0.0) ** 2).sum(axis=1) / n, 0.0))
        unc = (pool.uncertainty * valid).sum(axis=1) / n
        t = self.catalog.n_topics
        b = pool.item.shape[0]
        flat = (np.arange(b)[:, None] * t + pool.topic)[valid]
        counts = np.bincount(flat, minlength=b * t).reshape(b, t).astype(np.float32)
        pr = counts / n[:, None]
        ent = -(pr * np.log(np.where(pr > 0, pr, 1.0))).sum(axis=1) / np.log(t)
        return {"score_spread": spread.astype(np.float32), "uncertainty": unc.astype(np.float32),
                "topic_entropy": ent.astype(np.float32),
                "new_creator_share": ((pool.new_creator & valid).sum(axis=1) / n).astype(np.float32),
                "remaining": (valid.sum(axis=1) / cfg.n_rank).astype(np.float32)}


@numba.njit(cache=True, nogil=True)
def _slate_kernel(is_ad: Array, is_promo: Array, promo_item: Array, feed_item: Array, feed_pool_index: Array,
                  feed_explore: Array, feed_reserved: Array, feed_diverted: Array, pool_source: Array,
                  pool_heads: Array, weights: Array, pool_topic: Array, engaged_topic: Array,
                  adaptation_strength: Array, adaptation: bool,
                  item: Array, feed_pos: Array, explore: Array, reserved: Array, source: Array, reason: Array,
                  top_head: Array, n_promo: Array) -> None:
    """:meth:`Pipeline.make_slate`'s slots (B, S) in one compiled pass: the organic slots (neither ad nor promoted)
    take the feed's items in order (``feed_pos``), a promoted slot its ``promo_item``; per slot the feed's explore
    and reserved flags, and for an organic item its stage-1 ``source``, the ``top_head`` (first maximum of the
    weighted heads, a NaN counting as the maximum, as ``np.argmax``) and the ``reason`` (``rankers.explain``: the
    last that applies of ranked, adaptation, diversity, exploration, new-creator slot, promoted, ad). ``n_promo``
    (B,) counts the promoted slots."""
    b, s = is_ad.shape
    k_heads = pool_heads.shape[2]
    for u in range(b):
        n_org = 0
        n_promo[u] = 0
        for j in range(s):
            ad, promo = is_ad[u, j], is_promo[u, j]
            organic = not (ad or promo)
            fp = n_org if organic else -1
            n_org += organic
            feed_pos[u, j] = fp
            it = feed_item[u, fp] if organic else -1
            if promo:
                it = promo_item[u, j]
                n_promo[u] += 1
            item[u, j] = it
            ex = organic and feed_explore[u, fp]
            rs = organic and feed_reserved[u, fp]
            explore[u, j] = ex
            reserved[u, j] = rs
            pidx = feed_pool_index[u, fp] if organic and it >= 0 else -1
            ok = pidx >= 0
            source[u, j] = pool_source[u, pidx] if ok else -1
            code = RANKED
            if ok:
                best_k = 0
                best = pool_heads[u, pidx, 0] * weights[u, 0]
                if not np.isnan(best):
                    for k in range(1, k_heads):
                        v = pool_heads[u, pidx, k] * weights[u, k]
                        if np.isnan(v):
                            best_k = k
                            break
                        if v > best:
                            best, best_k = v, k
                top_head[u, j] = best_k
                if adaptation and engaged_topic[u, pool_topic[u, pidx]] and adaptation_strength[u] > 0:
                    code = ADAPTATION
                if feed_diverted[u, fp]:
                    code = DIVERSITY
            else:
                top_head[u, j] = -1
            if ex:
                code = EXPLORATION
            if rs:
                code = NEW_CREATOR_SLOT
            if promo:
                code = PROMOTED
            if ad:
                code = AD
            reason[u, j] = code


@numba.njit(cache=True, nogil=True)
def _ad_noise(user_key: Array, pos: Array, out: Array) -> None:
    """``out`` (n, A) = ``rankers.hashing.hash_normal(user_key[:, None], pos[:, None], arange(A)[None, :])``,
    compiled (integer hashing, the same float32 operations; ``tests/test_speed.py``)."""
    for r in range(out.shape[0]):
        h = hash_absorb(hash_absorb(0x27D4EB2F, np.int64(user_key[r]), 0), np.int64(pos[r]), 1)
        for j in range(out.shape[1]):
            out[r, j] = hash_normal_of(hash_absorb(h, j, 2))
