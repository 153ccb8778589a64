"""The interest source's item index: inner-product search over item vectors, exact (a blocked numpy/torch
search) or with faiss ``IndexIVFFlat``. :class:`EmbeddingIndex` searches the catalog's content embeddings;
:class:`rankers.serving.TwoTowerIndex` the two-tower model's vectors with the same search (:func:`ip_search`)."""

from __future__ import annotations

from typing import Protocol

import faiss
import numba
import numpy as np
import torch

from rankers.types import Array, Catalog
from rankers.user_model import UserView


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
    """What the interest source needs of an index (:class:`EmbeddingIndex`, :class:`rankers.serving.TwoTowerIndex`)."""

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
