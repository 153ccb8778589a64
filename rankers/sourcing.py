"""Stage 1: multi-source candidate sourcing, union, dedup and safety filter (seeds/001, Stage 1).

Five sources: interest (nearest neighbours of the user estimate among item embeddings, or of the
two-tower user vector among the item tower's vectors; exact or faiss IVF),
following (recent videos of followed creators), trending (global and per-topic engagement
velocity), new-creator exploration (pseudo-random sample of new creators' videos, content only)
and diversity/serendipity (high-quality videos from topics the user has not engaged with).
"""

from __future__ import annotations

from typing import Any, Protocol

import faiss
import numba
import numpy as np
import torch

from rankers.config import PipelineConfig
from rankers.hashing import hash_u32
from rankers.types import Array, Catalog
from rankers.user_model import UserView

SOURCES: tuple[str, ...] = ("interest", "following", "trending", "new_creator", "serendipity")
SRC_INTEREST, SRC_FOLLOWING, SRC_TRENDING, SRC_NEW_CREATOR, SRC_SERENDIPITY = range(5)


class EmbeddingIndex:
    """Inner-product index over item embeddings: exact (``flat``) or faiss ``IndexIVFFlat`` (``ivf``).

    ``flat`` is an exact blocked search in numpy: a per-query score threshold estimated on a strided
    sample of the items, one pass of BLAS products over item blocks that keeps the items scoring at
    least the threshold, and an exact top-``k`` among those (rows where the threshold kept fewer
    than ``k`` items are searched again in full). It reads the catalog's embeddings directly, so
    items uploaded since the last search (and recycled slots) are always current.
    ``ivf`` grows as items are uploaded (``sync``); ids are item ids.
    """

    BLOCK = 1 << 19
    """Scores per block of the exact search: a (B', BLOCK / B') float32 score block (2 MB) stays in cache."""
    SAMPLE_STRIDE = 16
    """Every SAMPLE_STRIDE-th item is scored first to estimate each query's top-k threshold."""

    def __init__(self, catalog: Catalog, kind: str = "flat", nlist: int = 256, nprobe: int = 8) -> None:
        self.kind = kind
        self.catalog = catalog
        self.n_indexed = 0
        if kind == "ivf":
            self.index, self._quant = new_ivf(catalog.emb[: catalog.n_items], nlist, nprobe)
            self.sync(catalog)

    def query(self, users: Array, view: UserView) -> Array:
        """(B', D) float32 query vectors of the users ``users``: the system's interest estimates."""
        return view.emb[users]

    def sync(self, catalog: Catalog) -> None:
        """Adds items uploaded since the last call (``ivf``; the exact search needs no sync)."""
        self.catalog = catalog
        if self.kind == "ivf" and catalog.n_items > self.n_indexed:
            self.index.add(np.ascontiguousarray(catalog.emb[self.n_indexed : catalog.n_items]))
            self.n_indexed = catalog.n_items

    def search(self, query: Array, k: int) -> Array:
        """(B, D) float32 queries -> (B, k) int32 item ids of the ``k`` best inner products, -1
        where fewer exist. ``ivf`` returns them best first; ``flat`` in no particular order (stage 1
        only uses the set)."""
        return ip_search(query, k, self.index if self.kind == "ivf" else None,
                         self.catalog.emb[: self.catalog.n_items])


class ItemIndex(Protocol):
    """What the interest source needs of an index (:class:`EmbeddingIndex`, :class:`rankers.learned.TwoTowerIndex`)."""

    def sync(self, catalog: Catalog) -> None:
        """Brings the index up to date with the catalog (called before every stage-1 run)."""
        ...

    def query(self, users: Array, view: UserView) -> Array:
        """(B',) users -> (B', D) float32 query vectors."""
        ...

    def search(self, query: Array, k: int) -> Array:
        """(B', D) queries -> (B', k) int32 item ids of the ``k`` best inner products, -1 pads."""
        ...


def new_ivf(train: Array, nlist: int, nprobe: int) -> tuple[faiss.IndexIVFFlat, faiss.Index]:
    """An empty faiss ``IndexIVFFlat`` (inner product) trained on ``train`` (n, D) with ``min(nlist, n)``
    lists, searching ``nprobe`` of them; returned with its coarse quantiser (keep both alive)."""
    d = train.shape[1]
    quant = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quant, d, min(nlist, train.shape[0]), faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    index.nprobe = nprobe
    return index, quant


def make_index(cfg: PipelineConfig, catalog: Catalog, tower: Any = None, exact: bool = False) -> ItemIndex:
    """The interest source's index under ``cfg.retrieval`` (``two_tower`` needs the trained ``tower``, a
    :class:`rankers.models.TwoTower`); ``exact`` forces exact search (``flat``)."""
    kind = "flat" if exact else cfg.index
    if cfg.retrieval == "two_tower":
        if tower is None:
            raise ValueError("PipelineConfig.retrieval='two_tower' needs a trained TwoTower model "
                             "(envs.learned.ensure_rankers resolves the checkpoints of a FeedConfig)")
        from rankers.learned import TwoTowerIndex  # torch only when asked for

        return TwoTowerIndex(tower, catalog, kind, cfg.ivf_nlist, cfg.ivf_nprobe, cfg.retrieval_refresh_days)
    return EmbeddingIndex(catalog, kind, cfg.ivf_nlist, cfg.ivf_nprobe)


def ip_search(query: Array, k: int, ivf: faiss.Index | None, items: Array) -> Array:
    """(B, D) queries -> (B, k) int32 ids of the ``k`` best inner products, -1 where fewer exist: with
    the faiss index ``ivf`` (best first), else exactly over the (n, D) item matrix ``items`` (a set in
    no particular order; see :class:`EmbeddingIndex`)."""
    if query.shape[0] == 0:
        return np.zeros((0, k), np.int32)
    q = np.ascontiguousarray(query, dtype=np.float32)
    if ivf is not None:
        _, ids = ivf.search(q, k)
        return ids.astype(np.int32)
    return _exact_top_k(q, items, k, EmbeddingIndex.BLOCK, EmbeddingIndex.SAMPLE_STRIDE)


def _exact_top_k(q: Array, emb: Array, k: int, block: int, stride: int) -> Array:
    """Ids (B, k) of the k largest ``q @ emb.T`` per row (a set, unordered), -1 padded; ``block`` scores
    (B x items) per blocked product. See :class:`EmbeddingIndex`."""
    b, n = q.shape[0], emb.shape[0]
    out = np.full((b, k), -1, np.int32)
    if n <= k or n < 4 * stride * 64 or b <= 2:  # small: one product and one partition are cheaper
        s = q @ emb.T
        if n <= k:
            out[:, :n] = np.arange(n, dtype=np.int32)
            return out
        return np.argpartition(-s, k - 1, axis=1)[:, :k].astype(np.int32)
    # 1. threshold: the r-th best score on a strided sample, r chosen so ~1.25 k + slack items pass.
    samp = q @ emb[::stride].T  # (B, n / stride)
    m = samp.shape[1]
    r = min(int(np.ceil(1.25 * k * m / n)) + 8, m)
    thr = np.partition(samp, m - r, axis=1)[:, m - r]  # (B,) the r-th largest
    # 2. one blocked pass keeping (item, score) at or above the threshold, per row in item order, in a
    # (B, width) table with room for one more block (grown when a row nears its end; -inf / -1 pads).
    block = max(block // b, 1)  # items per block
    buf = np.empty((b, block), np.float32)  # reused: a fresh block per product costs page faults
    width = int(np.ceil(1.5 * k)) + 64 + block
    tv = np.full((b, width), -np.inf, np.float32)
    ti = np.full((b, width), -1, np.int32)
    count = np.zeros(b, np.int64)
    thr = np.ascontiguousarray(thr, np.float32)
    q_t = torch.from_numpy(q)
    for c0 in range(0, n, block):
        w = min(block, n - c0)
        sc = buf[:, :w]
        torch.mm(q_t, torch.from_numpy(emb[c0 : c0 + w]).T, out=torch.from_numpy(sc))  # MKL: ~2x numpy's BLAS here
        if int(count.max()) + w > tv.shape[1]:
            grow = tv.shape[1]
            tv = np.concatenate([tv, np.full((b, grow), -np.inf, np.float32)], axis=1)
            ti = np.concatenate([ti, np.full((b, grow), -1, np.int32)], axis=1)
        _keep_at_least(sc, thr, c0, tv, ti, count)
    # 3. exact top-k among the kept entries of each row.
    w = max(int(count.max()), k)
    tv, ti = tv[:, :w], ti[:, :w]
    sel = np.argpartition(tv, w - k, axis=1)[:, w - k :]  # the k largest
    out = np.take_along_axis(ti, sel, axis=1)
    short = np.flatnonzero(count < k)  # threshold too high (rare): search those rows in full
    if short.size:
        s = q[short] @ emb.T
        out[short] = np.argpartition(-s, k - 1, axis=1)[:, :k]
    return out


@numba.njit(cache=True, nogil=True)
def _keep_at_least(score: Array, thr: Array, offset: int, values: Array, ids: Array, count: Array) -> None:
    """Appends each row's entries of ``score`` (B, w) at or above ``thr`` (B,), in column order, to that
    row of ``values`` / ``ids`` (ids = column + ``offset``) after its ``count`` kept entries (updated)."""
    for r in range(score.shape[0]):
        t = thr[r]
        n = count[r]
        row, row_values, row_ids = score[r], values[r], ids[r]  # row views: cheaper indexing
        for c in range(row.shape[0]):
            v = row[c]
            if v >= t:
                row_values[n] = v
                row_ids[n] = c + offset
                n += 1
        count[r] = n


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
        top = ids[_top_stable(cat.velocity[ids], m * 4)]
        self.trending = top[:m]
        self.topic_trending = _per_topic_top(top if top.size else ids, cat.topic, cat.velocity, cat.n_topics, per_topic)
        newc = cat.new_creator_mask()[self._ids_creator]
        self.new_creator_items = ids[newc]


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
