"""Stage 1: multi-source candidate sourcing, union, dedup and safety filter (seeds/001, Stage 1).

Five sources: interest (nearest neighbours of the user estimate among item embeddings, or of the
two-tower user vector among the item tower's vectors; exact or faiss IVF),
following (recent videos of followed creators), trending (global and per-topic engagement
velocity), new-creator exploration (pseudo-random sample of new creators' videos, content only)
and diversity/serendipity (high-quality videos from topics the user has not engaged with).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rankers.config import PipelineConfig
from rankers.hashing import hash_u32
from rankers.item_index import EmbeddingIndex, ItemIndex
from rankers.types import Array, Catalog
from rankers.user_model import UserView

SOURCES: tuple[str, ...] = ("interest", "following", "trending", "new_creator", "serendipity")
SRC_INTEREST, SRC_FOLLOWING, SRC_TRENDING, SRC_NEW_CREATOR, SRC_SERENDIPITY = range(5)


def make_index(cfg: PipelineConfig, catalog: Catalog, tower: Any = None, exact: bool = False) -> ItemIndex:
    """The interest source's index under ``cfg.retrieval`` (``two_tower`` needs the trained ``tower``, a
    :class:`rankers.models.TwoTower`); ``exact`` forces exact search (``flat``)."""
    kind = "flat" if exact else cfg.index
    if cfg.retrieval == "two_tower":
        if tower is None:
            raise ValueError("PipelineConfig.retrieval='two_tower' needs a trained TwoTower model "
                             "(offline_data.provision.ensure_rankers resolves the checkpoints of a FeedConfig)")
        from rankers.serving import TwoTowerIndex  # torch only when asked for

        return TwoTowerIndex(tower, catalog, kind, cfg.ivf_nlist, cfg.ivf_nprobe, cfg.retrieval_refresh_days)
    return EmbeddingIndex(catalog, kind, cfg.ivf_nlist, cfg.ivf_nprobe)


class SourceTables:
    """Per-world-tick lists the non-personal sources draw from; rebuilt when the catalog changes.

    The lists that depend only on per-item content fields (safety filter, per-topic quality top
    lists, promoted items) are updated incrementally when items were only appended (an exact
    merge of the old top lists with the new items); any other change of those fields (a recycled
    slot) rebuilds them. The velocity- and creator-age-dependent lists are rebuilt every tick.
    """

    def __init__(self) -> None:
        self.version: tuple[float, int] | None = None
        self.trending: Array = np.zeros(0, np.int32)  # (n,) global, best first
        self.topic_trending: Array = np.zeros((0, 0), np.int32)  # (T, m)
        self.topic_quality: Array = np.zeros((0, 0), np.int32)  # (T, m) best quality estimate per topic
        self.new_creator_items: Array = np.zeros(0, np.int32)  # (n,)
        self.promoted: Array = np.zeros(0, np.int32)  # (n,) promoted items, served only in their slot
        self.flagged: Array = np.zeros(0, np.int32)  # (n,) items the integrity detector keeps out (bot_filter)
        self.local_trending: Array = np.zeros((0, 0, 0), np.int32)  # (R, L, m) per region and language, -1 pads
        self._ids: Array = np.zeros(0, np.int32)  # (n,) items passing the safety filter, not promoted
        self._ids_creator: Array = np.zeros(0, np.int32)  # (n,) their creators
        self._n_static = 0  # items covered by the static lists
        self._snap: dict[str, Array] = {}  # copies of the static fields the lists were built from

    def _static_fields(self, cat: Catalog) -> dict[str, Array]:
        return {"quality_est": cat.quality_est, "risk_est": cat.risk_est, "promoted": cat.promoted,
                "topic": cat.topic, "creator": cat.creator}

    def _update_static(self, cat: Catalog, cfg: PipelineConfig, per_topic: int) -> None:
        n, n0 = cat.n_items, self._n_static
        fields = self._static_fields(cat)
        same = bool(self._snap) and n >= n0 and all(
            np.array_equal(self._snap[k][:n0], v[:n0]) for k, v in fields.items())
        if same and n == n0:
            return
        lo = n0 if same else 0
        if not same:
            self._snap = {k: np.empty_like(v) for k, v in fields.items()}
        for k, v in fields.items():
            self._snap[k][lo:n] = v[lo:n]
        ok = (cat.risk_est[lo:n] <= cfg.safety_threshold) & ~cat.promoted[lo:n]
        new_ids = (np.flatnonzero(ok) + lo).astype(np.int32)
        safe = cat.risk_est[lo:n] <= cfg.safety_threshold
        promo = (np.flatnonzero(cat.promoted[lo:n] & safe) + lo).astype(np.int32)
        if same:
            self._ids = np.concatenate([self._ids, new_ids])
            self.promoted = np.concatenate([self.promoted, promo])
            old = self.topic_quality[self.topic_quality >= 0]
            cand = np.sort(np.concatenate([old, new_ids]))  # increasing ids keep the tie order
            self.topic_quality = _per_topic_top(cand, cat.topic, cat.quality_est, cat.n_topics, per_topic)
        else:
            ids = new_ids
            self._ids, self.promoted = ids, promo
            # Only the best ~2 x per_topic x T items by quality can be in a topic's top list: check,
            # then sort those (falls back to all items if some topic has too few of them).
            cand = ids[_at_least_top(cat.quality_est[ids], 2 * per_topic * cat.n_topics)]
            n_top = np.bincount(cat.topic[cand], minlength=cat.n_topics)
            n_all = np.bincount(cat.topic[ids], minlength=cat.n_topics)
            if np.any(n_top < np.minimum(per_topic, n_all)):
                cand = ids
            self.topic_quality = _per_topic_top(cand, cat.topic, cat.quality_est, cat.n_topics, per_topic)
        self._ids_creator = cat.creator[self._ids]
        self._n_static = n

    def update(self, cat: Catalog, cfg: PipelineConfig) -> None:
        version = (cat.world_day, cat.n_items)
        if version == self.version:
            return
        self.version = version
        per_topic = max(cfg.n_trending // 2, cfg.n_serendipity, 1)
        self._update_static(cat, cfg, per_topic)
        ids = self._ids
        m = max(cfg.n_trending, 1)
        velocity = cat.velocity
        if cfg.bot_filter:
            sus = suspicious(cat, ids, cfg.bot_ratio)
            self.flagged = ids[sus]
            velocity = velocity.copy()
            velocity[self.flagged] = -np.inf  # never trending
            ids = ids[~sus]
        top = ids[_top_stable(velocity[ids], m * 4)]
        self.trending = top[:m]
        self.topic_trending = _per_topic_top(top if top.size else ids, cat.topic, velocity, cat.n_topics, per_topic)
        newc = cat.new_creator_mask()[self._ids_creator]
        self.new_creator_items = self._ids[newc]
        if cat.velocity_region is not None and cat.language is not None and cfg.local_trending:
            r_n, l_n = cat.velocity_region.shape[0], int(cat.language[ids].max(initial=0)) + 1
            lists = np.full((r_n, l_n, m), -1, np.int32)
            for lang in range(l_n):
                mine = ids[cat.language[ids] == lang]
                for r in range(r_n):
                    top_r = mine[_top_stable(cat.velocity_region[r, mine], m)] if mine.size else mine
                    lists[r, lang, : top_r.size] = top_r
            self.local_trending = lists


def regional_priors(cat: Catalog, n_languages: int, fallback: Array) -> Array:
    """(R, L, D) the first interest estimate of a new user of each region and language: the mean content embedding
    of what the region engages with in that language (``Catalog.velocity_region``), normalised; ``fallback``
    (D,) where the region has no velocity in the language yet (and the whole table when the catalog has no
    regions: R = 1)."""
    n_regions = 1 if cat.velocity_region is None else cat.velocity_region.shape[0]
    out = np.broadcast_to(fallback, (n_regions, n_languages, fallback.size)).astype(np.float32)
    if cat.velocity_region is None or cat.language is None:
        return out
    n = cat.n_items
    for lang in range(n_languages):
        v = (cat.velocity_region[:, :n] * (cat.language[:n] == lang)) @ cat.emb[:n]  # (R, D)
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        out[:, lang] = np.where(norm > 0, v / np.maximum(norm, 1e-8), out[:, lang])
    return out


def regional_prior(cat: Catalog, region: Array, language: Array, fallback: Array, n_languages: int,
                   table: Array | None = None) -> Array:
    """(B, D) :func:`regional_priors` of each user's ``region`` and ``language`` (B,); ``table`` reuses one
    already computed for this catalog state. An unknown region or language raises ``ValueError``."""
    n_regions = 1 if cat.velocity_region is None else cat.velocity_region.shape[0]
    if region.size and (region.min() < 0 or region.max() >= n_regions):
        raise ValueError(f"unknown region {int(region.max()) if region.max() >= n_regions else int(region.min())}: "
                         f"this world has regions 0..{n_regions - 1}")
    if language.size and (language.min() < 0 or language.max() >= n_languages):
        bad = int(language.max()) if language.max() >= n_languages else int(language.min())
        raise ValueError(f"unknown language {bad}: this world has languages 0..{n_languages - 1}")
    if table is None:
        table = regional_priors(cat, n_languages, fallback)
    return table[region, language]


def suspicious(cat: Catalog, ids: Array, ratio: float) -> Array:
    """(len(ids),) bool: items whose logged likes and shares run ahead of their completions by more than
    ``ratio`` (``PipelineConfig.bot_filter``): the signature of engagement bought from bots, which like and
    share without watching. Only observable counters are read."""
    return (cat.likes[ids] + cat.shares[ids]) / (cat.completes[ids] + 10.0) > ratio


def _kth_largest(value: Array, m: int) -> Array:
    """The ``m``-th largest entry of ``value`` (1 <= m <= size), exactly.

    A threshold from a strided sample first narrows the entries to partition; when fewer than
    ``m`` entries exceed it and at least ``m`` reach it, it is the answer itself (ties)."""
    n = value.size
    stride = 8
    if n >= 64 * stride and m * stride * 4 <= n:
        samp = value[::stride]
        r = min(int(np.ceil(1.5 * m / stride)) + 8, samp.size)
        thr0 = np.partition(samp, samp.size - r)[samp.size - r]
        if np.count_nonzero(value >= thr0) >= m:
            gt = value[value > thr0]
            if gt.size < m:
                return thr0
            return np.partition(gt, gt.size - m)[gt.size - m]
    return np.partition(value, n - m)[n - m]


def _at_least_top(value: Array, m: int) -> Array:
    """Indices (increasing) of every entry at least as large as the ``m``-th largest of ``value``."""
    if m >= value.size:
        return np.arange(value.size)
    return np.flatnonzero(value >= _kth_largest(value, m))


def _top_stable(value: Array, m: int) -> Array:
    """``np.argsort(-value, kind="stable")[:m]`` without sorting everything (same order of ties:
    entries equal to the m-th largest come by increasing index)."""
    if m >= value.size:
        return np.argsort(-value, kind="stable")
    thr = _kth_largest(value, m)
    gt = np.flatnonzero(value > thr)
    eq = np.flatnonzero(value == thr)[: m - gt.size]
    return np.concatenate([gt[np.argsort(-value[gt], kind="stable")], eq])


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
                      index: ItemIndex, tables: SourceTables) -> tuple[Array, Array]:
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
        parts.append(index.search(index.query(users, view), cfg.n_interest))
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
        if tables.local_trending.size and cfg.local_trending:  # the user's region and language
            lt = tables.local_trending
            lang = np.minimum(view.language[users], lt.shape[1] - 1)
            glob = _pad(lt[view.region[users], lang, :n_glob], n_glob)
        else:
            glob = np.broadcast_to(_pad(tables.trending[None, :n_glob], n_glob), (b, n_glob))
        top3 = np.argsort(-view.topic_engaged[users], axis=1)[:, :3]
        per = cfg.n_trending // 2 // 3 + 1
        tt = _pad(tables.topic_trending, per)
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
        tq = _pad(tables.topic_quality, per)
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
    """Union + dedup (first source wins) + safety filter + recently-seen filter; -1 pads.

    One sort per row of ``item * 8 + tag`` over the candidates (tag = source + 1) and the user's
    recently seen items (tag 0): an item is kept where it starts its run of equal items with a
    candidate tag, so duplicates lose to the lowest source and seen items drop out. The output
    keeps the candidates sorted by item id (invalid entries first, as -1).
    """
    b, c = items.shape
    seen = view.seen[users]  # (B', H)
    n_cap = cat.emb.shape[0] + 1
    kt: type[np.signedinteger[Any]] = np.int32 if n_cap * 8 < 2**31 - 1 else np.int64  # int32 keys sort faster
    big = kt(n_cap * 8)
    ck = np.where(items >= 0, items.astype(kt) * 8 + (source.astype(kt) + 1), kt(-1))
    sk = np.where(seen >= 0, seen.astype(kt) * 8, big)
    key = np.concatenate([sk, ck], axis=1)
    key.sort(axis=1)
    tag = key & 7
    start = np.ones(key.shape, bool)
    start[:, 1:] = (key[:, 1:] >> 3) != (key[:, :-1] >> 3)
    keep = (key >= 0) & (tag != 0)  # candidate entries (valid ones)
    valid = start & keep
    cand = (key < 0) | keep  # every candidate entry: exactly c per row
    key = key[cand].reshape(b, c)
    valid = valid[cand].reshape(b, c)
    s_items = (key >> 3).astype(np.int32)
    safe = np.maximum(s_items, 0)
    valid &= (cat.risk_est.take(safe) <= cfg.safety_threshold) & ~cat.promoted.take(safe)
    out = np.where(valid, s_items, -1).astype(np.int32)
    return out, np.where(valid, (key & 7) - 1, -1).astype(np.int8)
