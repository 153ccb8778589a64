"""Stage 1: multi-source candidate sourcing, union, dedup and safety filter (seeds/001, Stage 1).

Five sources: interest (nearest neighbours of the user estimate among item embeddings, faiss),
following (recent videos of followed creators), trending (global and per-topic engagement
velocity), new-creator exploration (pseudo-random sample of new creators' videos, content only)
and diversity/serendipity (high-quality videos from topics the user has not engaged with).
"""

from __future__ import annotations

import faiss
import numpy as np

from rankers.config import PipelineConfig
from rankers.hashing import hash_u32
from rankers.types import Array, Catalog
from rankers.user_model import UserView

SOURCES: tuple[str, ...] = ("interest", "following", "trending", "new_creator", "serendipity")
SRC_INTEREST, SRC_FOLLOWING, SRC_TRENDING, SRC_NEW_CREATOR, SRC_SERENDIPITY = range(5)


class EmbeddingIndex:
    """Inner-product index over item embeddings (faiss ``IndexFlatIP`` or ``IndexIVFFlat``).

    Grows as items are uploaded (``sync``); ids are item ids.
    """

    def __init__(self, catalog: Catalog, kind: str = "flat", nlist: int = 256, nprobe: int = 8) -> None:
        d = catalog.emb.shape[1]
        self.kind = kind
        if kind == "ivf":
            quant = faiss.IndexFlatIP(d)
            self.index: faiss.Index = faiss.IndexIVFFlat(quant, d, min(nlist, catalog.n_items), faiss.METRIC_INNER_PRODUCT)
            self._quant = quant
            train = np.ascontiguousarray(catalog.emb[: catalog.n_items])
            self.index.train(train)
            self.index.nprobe = nprobe
        else:
            self.index = faiss.IndexFlatIP(d)
        self.n_indexed = 0
        self.sync(catalog)

    def sync(self, catalog: Catalog) -> None:
        """Adds items uploaded since the last call."""
        if catalog.n_items > self.n_indexed:
            self.index.add(np.ascontiguousarray(catalog.emb[self.n_indexed : catalog.n_items]))
            self.n_indexed = catalog.n_items

    def search(self, query: Array, k: int) -> Array:
        """(B, D) float32 queries -> (B, k) int32 item ids, best first, -1 where fewer exist."""
        if query.shape[0] == 0:
            return np.zeros((0, k), np.int32)
        _, ids = self.index.search(np.ascontiguousarray(query, dtype=np.float32), k)
        return ids.astype(np.int32)


class SourceTables:
    """Per-world-tick lists the non-personal sources draw from; rebuilt when the catalog changes."""

    def __init__(self) -> None:
        self.version: tuple[float, int] | None = None
        self.trending: Array = np.zeros(0, np.int32)  # (n,) global, best first
        self.topic_trending: Array = np.zeros((0, 0), np.int32)  # (T, m)
        self.topic_quality: Array = np.zeros((0, 0), np.int32)  # (T, m) best quality estimate per topic
        self.new_creator_items: Array = np.zeros(0, np.int32)  # (n,)
        self.promoted: Array = np.zeros(0, np.int32)  # (n,) promoted items, served only in their slot

    def update(self, cat: Catalog, cfg: PipelineConfig) -> None:
        version = (cat.world_day, cat.n_items)
        if version == self.version:
            return
        self.version = version
        n = cat.n_items
        ok = (cat.risk_est[:n] <= cfg.safety_threshold) & ~cat.promoted[:n]
        ids = np.flatnonzero(ok).astype(np.int32)
        vel = cat.velocity[ids]
        m = max(cfg.n_trending, 1)
        top = ids[np.argsort(-vel, kind="stable")[: m * 4]]
        self.trending = top[:m]
        per_topic = max(cfg.n_trending // 2, cfg.n_serendipity, 1)
        self.topic_trending = _per_topic_top(top if top.size else ids, cat.topic, cat.velocity, cat.n_topics, per_topic)
        self.topic_quality = _per_topic_top(ids, cat.topic, cat.quality_est, cat.n_topics, per_topic)
        newc = cat.new_creator_mask()[cat.creator[ids]]
        self.new_creator_items = ids[newc]
        self.promoted = np.flatnonzero(cat.promoted[:n] & (cat.risk_est[:n] <= cfg.safety_threshold)).astype(np.int32)


def _per_topic_top(ids: Array, topic: Array, value: Array, n_topics: int, m: int) -> Array:
    """(T, m) int32: the ``m`` ids with the largest ``value`` in each topic, -1 padded."""
    order = np.lexsort((-value[ids], topic[ids]))
    s_ids = ids[order]
    s_top = topic[s_ids]
    starts = np.searchsorted(s_top, np.arange(n_topics))
    ends = np.searchsorted(s_top, np.arange(n_topics), side="right")
    j = np.arange(m)[None, :]
    pos = starts[:, None] + j
    out = np.where(pos < ends[:, None], s_ids[np.minimum(pos, max(s_ids.size - 1, 0))] if s_ids.size else -1, -1)
    return out.astype(np.int32)


def source_candidates(users: Array, view: UserView, cat: Catalog, cfg: PipelineConfig,
                      index: EmbeddingIndex, tables: SourceTables) -> tuple[Array, Array]:
    """Stage 1 for the users ``users`` (B',) int -> (items (B', C) int32, source (B', C) int8).

    Items are unique per row, pass the safety filter, exclude promoted items and items the user
    was shown recently; -1 pads.
    """
    b = users.size
    tables.update(cat, cfg)
    key = view.user_key[users]
    ref = view.refreshes[users]
    parts: list[Array] = []
    srcs: list[int] = []
    # Interest: nearest neighbours of the system's user estimate.
    if cfg.n_interest:
        parts.append(index.search(view.emb[users], cfg.n_interest))
        srcs.append(SRC_INTEREST)
    # Following: recent uploads of followed creators.
    if cfg.n_following:
        fol = view.follows[users]  # (B', F)
        rec = np.where(fol[:, :, None] >= 0, cat.creator_recent[np.maximum(fol, 0)], -1).reshape(b, -1)
        take = np.argsort(rec < 0, axis=1, kind="stable")[:, : cfg.n_following]
        got = np.take_along_axis(rec, take, axis=1)
        parts.append(_pad(got, cfg.n_following))
        srcs.append(SRC_FOLLOWING)
    # Trending: half global, half in the user's three most engaged topics.
    if cfg.n_trending:
        n_glob = cfg.n_trending - cfg.n_trending // 2
        glob = np.broadcast_to(_pad(tables.trending[None, :n_glob], n_glob), (b, n_glob))
        top3 = np.argsort(-view.topic_engaged[users], axis=1)[:, :3]
        per = cfg.n_trending // 2 // 3 + 1
        tt = tables.topic_trending[:, :per] if tables.topic_trending.shape[1] >= per else _pad(tables.topic_trending, per)
        loc = tt[top3].reshape(b, -1)[:, : cfg.n_trending // 2]
        parts.append(np.concatenate([glob, loc], axis=1))
        srcs.append(SRC_TRENDING)
    # New-creator exploration: pseudo-random sample keyed by (user, refresh).
    if cfg.n_new_creator:
        pool = tables.new_creator_items
        if pool.size:
            h = hash_u32(key[:, None], ref[:, None], np.arange(cfg.n_new_creator)[None, :], 77)
            parts.append(pool[(h % np.uint32(pool.size)).astype(np.int64)])
        else:
            parts.append(np.full((b, cfg.n_new_creator), -1, np.int32))
        srcs.append(SRC_NEW_CREATOR)
    # Serendipity: best-quality videos of the five topics the user engaged with least.
    if cfg.n_serendipity:
        tie = hash_u32(key[:, None], ref[:, None], np.arange(cat.n_topics)[None, :], 91).astype(np.float32) * 1e-12
        low = np.argsort(view.topic_engaged[users] + tie, axis=1)[:, :5]
        per = cfg.n_serendipity // 5 + 1
        tq = tables.topic_quality[:, :per] if tables.topic_quality.shape[1] >= per else _pad(tables.topic_quality, per)
        parts.append(tq[low].reshape(b, -1)[:, : cfg.n_serendipity])
        srcs.append(SRC_SERENDIPITY)
    items = np.concatenate(parts, axis=1).astype(np.int32)
    source = np.concatenate([np.full(p.shape[1], s, np.int8) for p, s in zip(parts, srcs, strict=True)])
    source = np.broadcast_to(source, items.shape)
    return _union_filter(items, source, users, view, cat, cfg)


def _pad(a: Array, width: int) -> Array:
    if a.shape[-1] >= width:
        return a[..., :width]
    pad = np.full((*a.shape[:-1], width - a.shape[-1]), -1, np.int32)
    return np.concatenate([a, pad], axis=-1)


def _union_filter(items: Array, source: Array, users: Array, view: UserView, cat: Catalog,
                  cfg: PipelineConfig) -> tuple[Array, Array]:
    """Union + dedup (first source wins) + safety filter + recently-seen filter; -1 pads."""
    b, c = items.shape
    order = np.argsort(items, axis=1, kind="stable")
    s_items = np.take_along_axis(items, order, axis=1)
    s_src = np.take_along_axis(source, order, axis=1)
    dup = np.zeros_like(s_items, dtype=bool)
    dup[:, 1:] = s_items[:, 1:] == s_items[:, :-1]
    valid = (s_items >= 0) & ~dup
    safe = np.maximum(s_items, 0)
    valid &= (cat.risk_est[safe] <= cfg.safety_threshold) & ~cat.promoted[safe]
    # Recently shown: membership of (row, item) keys among the seen ring buffer.
    seen = view.seen[users]
    n_cap = np.int64(cat.emb.shape[0] + 1)
    rows = np.arange(b, dtype=np.int64)[:, None]
    cand_keys = rows * n_cap + s_items
    seen_keys = (rows * n_cap + seen)[seen >= 0]
    valid &= ~np.isin(cand_keys, seen_keys)
    out = np.where(valid, s_items, -1).astype(np.int32)
    return out, np.where(valid, s_src, -1).astype(np.int8)
