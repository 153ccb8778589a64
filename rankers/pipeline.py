"""The 4-stage pipeline as one object: sourcing -> pre-ranking -> ranking -> rebalancing.

As production prefetching does, the ranked pool of stages 1-3 is kept per user and reused across
requests; it is refreshed when it runs low (fewer than ``feed_size`` items) or when a new session
starts. Stage 4 runs at every request, so the action always takes effect, and served items leave
the pool, so nothing is shown twice.
"""

from __future__ import annotations

import time

import numpy as np

from rankers.config import PipelineConfig
from rankers.hashing import hash_normal, hash_u32
from rankers.knobs import Knobs
from rankers.ranking import Scorer, TruthFn, combined_score, make_scorer, prerank_score, top_k_with_quota
from rankers.rebalance import rebalance
from rankers.sourcing import SRC_NEW_CREATOR, SRC_SERENDIPITY, EmbeddingIndex, SourceTables, source_candidates
from rankers.types import Array, Catalog, Feed, Pool, Slate
from rankers.user_model import UserView

STAGES: tuple[str, ...] = ("sourcing", "prerank", "rank", "rebalance")


class Pipeline:
    """Holds the per-user ranked pools of B users and runs the four stages."""

    def __init__(self, cfg: PipelineConfig, catalog: Catalog, view: UserView, truth: TruthFn,
                 scorer: Scorer | None = None) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.view = view
        self.scorer = scorer if scorer is not None else make_scorer(cfg, truth)
        self.index = EmbeddingIndex(catalog, cfg.index, cfg.ivf_nlist, cfg.ivf_nprobe)
        self.tables = SourceTables()
        b, p, k = view.n_users, cfg.n_rank, len(cfg.ranking_weights)
        self.pool = Pool(
            item=np.full((b, p), -1, np.int32), heads=np.zeros((b, p, k), np.float32),
            uncertainty=np.zeros((b, p), np.float32), topic=np.zeros((b, p), np.int32),
            creator=np.zeros((b, p), np.int32), format=np.zeros((b, p), np.int8),
            new_creator=np.zeros((b, p), bool), quality_est=np.zeros((b, p), np.float32),
            source=np.full((b, p), -1, np.int8),
        )
        self.stream_pos = np.zeros(b, np.int64)  # slots shown in this session (ads included)
        self.promo_ptr = np.zeros(b, np.int64)
        self.timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.n_refreshed = 0

    # ------------------------------------------------------------------ lifecycle
    def reset(self, mask: Array) -> None:
        """Clears the pools of users in ``mask`` (new users)."""
        self.pool.item[mask] = -1
        self.stream_pos[mask] = 0
        self.promo_ptr[mask] = 0

    def start_session(self, mask: Array) -> None:
        """A new session: the pool is stale (session context shifted) and the ad stream restarts."""
        self.pool.item[mask] = -1
        self.stream_pos[mask] = 0

    def needs_refresh(self) -> Array:
        """(B,) bool: pools with fewer than ``feed_size`` items left."""
        return self.pool.remaining() < self.cfg.feed_size

    # ------------------------------------------------------------------ stages 1-3
    def refresh(self, mask: Array, knobs: Knobs) -> None:
        """Runs stages 1-3 for users in ``mask`` (B,) and stores their ranked pools."""
        users = np.flatnonzero(mask)
        if users.size == 0:
            return
        cfg, cat, view = self.cfg, self.catalog, self.view
        t0 = time.perf_counter()
        self.index.sync(cat)
        items, source = source_candidates(users, view, cat, cfg, self.index, self.tables)
        t1 = time.perf_counter()
        # Stage 2: lightweight pre-ranking with per-source quotas.
        pre = prerank_score(users, items, view, cat)
        quotas = [(source == SRC_NEW_CREATOR, cfg.pool_quota_new_creator * 2),
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
        quotas = [(newc, cfg.pool_quota_new_creator), (source == SRC_SERENDIPITY, cfg.pool_quota_serendipity)]
        keep = top_k_with_quota(score, cfg.n_rank, quotas)
        it = np.take_along_axis(items, keep, axis=1)
        valid = it >= 0
        safe = np.maximum(it, 0)
        pool = self.pool
        pool.item[users] = it
        pool.heads[users] = np.take_along_axis(heads, keep[:, :, None], axis=1)
        pool.uncertainty[users] = np.take_along_axis(unc, keep, axis=1)
        pool.topic[users] = cat.topic[safe]
        pool.creator[users] = cat.creator[safe]
        pool.format[users] = cat.format[safe]
        pool.new_creator[users] = np.take_along_axis(newc, keep, axis=1) & valid
        pool.quality_est[users] = cat.quality_est[safe]
        pool.source[users] = np.where(valid, np.take_along_axis(source, keep, axis=1), -1)
        view.refreshes[users] += 1
        self.n_refreshed += users.size
        t3 = time.perf_counter()
        self.timings["sourcing"] += t1 - t0
        self.timings["prerank"] += t2 - t1
        self.timings["rank"] += t3 - t2

    # ------------------------------------------------------------------ stage 4 and serving
    def rebalance(self, knobs: Knobs, ts_noise: Array) -> Feed:
        """Stage 4 for every user: the ``feed_size`` feed under the knobs."""
        t0 = time.perf_counter()
        feed = rebalance(self.pool, knobs, self.view, self.cfg, ts_noise)
        self.timings["rebalance"] += time.perf_counter() - t0
        return feed

    def make_slate(self, feed: Feed, knobs: Knobs) -> Slate:
        """The next ``slate_size`` slots: organic feed items with ads and promoted content at the
        seed's positions (1-based positions in every ``feed_size`` slots of the session)."""
        cfg, cat, view = self.cfg, self.catalog, self.view
        b, s = feed.item.shape[0], cfg.slate_size
        pos = self.stream_pos[:, None] + np.arange(s)[None, :]
        pos50 = pos % cfg.feed_size + 1
        is_ad = np.isin(pos50, np.asarray(cfg.ad_positions)) if cfg.ads else np.zeros((b, s), bool)
        promo_ids = self.tables.promoted
        is_promo = (pos50 == cfg.promoted_position) & cfg.ads & (cfg.promoted_position > 0) & (promo_ids.size > 0)
        organic = ~(is_ad | is_promo)
        feed_pos = np.where(organic, np.cumsum(organic, axis=1) - 1, -1).astype(np.int32)
        rows = np.arange(b)[:, None]
        safe = np.maximum(feed_pos, 0)
        item = np.where(organic, feed.item[rows, safe], -1).astype(np.int32)
        if is_promo.any():
            k = (hash_u32(view.user_key)[:, None].astype(np.int64) + self.promo_ptr[:, None]) % promo_ids.size
            item = np.where(is_promo, promo_ids[k], item)
            self.promo_ptr += is_promo.sum(axis=1)
        ad = np.full((b, s), -1, np.int32)
        if is_ad.any():
            rel = view.emb @ cat.ad_emb.T  # (B, n_ads)
            n_ads = cat.ad_emb.shape[0]
            noise = hash_normal(view.user_key[:, None, None], pos[:, :, None], np.arange(n_ads)[None, None, :])
            best = (rel[:, None, :] + 0.5 * noise).argmax(axis=2).astype(np.int32)
            ad = np.where(is_ad, best, -1)
        explore = np.where(organic, feed.explore[rows, safe], False)
        reserved = np.where(organic, feed.reserved_new[rows, safe], False)
        brk = view.session_minutes >= knobs.break_after_min
        return Slate(item=item, ad=ad, promoted=is_promo, feed_pos=feed_pos, explore=explore,
                     reserved_new=reserved, break_prompt=brk)

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
        score = np.where(valid, combined_score(pool.heads, knobs.weights(cfg), cfg), 0.0)
        mean = score.sum(axis=1) / n
        spread = np.sqrt(np.maximum((np.where(valid, score - mean[:, None], 0.0) ** 2).sum(axis=1) / n, 0.0))
        unc = (pool.uncertainty * valid).sum(axis=1) / n
        t = self.catalog.n_topics
        counts = np.zeros((pool.item.shape[0], t), np.float32)
        np.add.at(counts, (np.broadcast_to(np.arange(pool.item.shape[0])[:, None], pool.topic.shape)[valid],
                           pool.topic[valid]), 1.0)
        pr = counts / n[:, None]
        ent = -(pr * np.log(np.where(pr > 0, pr, 1.0))).sum(axis=1) / np.log(t)
        return {"score_spread": spread.astype(np.float32), "uncertainty": unc.astype(np.float32),
                "topic_entropy": ent.astype(np.float32),
                "new_creator_share": ((pool.new_creator & valid).sum(axis=1) / n).astype(np.float32),
                "remaining": (valid.sum(axis=1) / cfg.n_rank).astype(np.float32)}
