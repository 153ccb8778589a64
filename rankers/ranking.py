"""Stages 2 and 3: pre-ranking and the multi-task ranker with the seed's weighted sum.

The ranker is pluggable (:class:`Scorer`). The default is :class:`NoisyOracleScorer`, a *clearly
named* noisy view of the world's true head expectations: its error is persistent per (user, item,
head), larger for items with few impressions (the cold-start blind spot of a real model), and it
reports that uncertainty for Thompson sampling. ``PipelineConfig(scorer="learned",
preranker="learned")`` swaps in the trained models of :mod:`rankers.serving` for stages 3 and 2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numba
import numpy as np

from rankers.config import HEAD_INDEX, HEADS, PipelineConfig
from rankers.hashing import hash_absorb, hash_normal_of
from rankers.types import Array, Catalog
from rankers.user_model import UserView

#: ``truth(users (B',), items (B', C)) -> (B', C, K)`` expected head values, watch_time in seconds.
TruthFn = Callable[[Array, Array], Array]


class Scorer(Protocol):
    """Stage 3 model: predicted head values and the uncertainty of the weighted score."""

    def score(self, users: Array, items: Array, view: UserView, cat: Catalog) -> tuple[Array, Array]:
        """(B',) users, (B', C) int32 items (-1 pads) -> heads (B', C, K) float32 with
        watch_time in ``watch_time_scale_s`` units, uncertainty (B', C) float32."""
        ...


class NoisyOracleScorer:
    """A noisy view of the true head expectations (a stand-in for a trained multi-task ranker).

    Probability heads get logit noise ``sigma * eps(user, item, head)``; watch time a log-normal
    factor. ``sigma = noise + cold_noise / sqrt(1 + impressions / cold_impressions)``.
    """

    def __init__(self, truth: TruthFn, cfg: PipelineConfig) -> None:
        self.truth = truth
        self.cfg = cfg
        self._wt = HEAD_INDEX["watch_time"]

    def _cold(self, items: Array, cat: Catalog) -> Array:
        """(B', C) float32 cold-start part of the noise, ``cold_noise / sqrt(1 + imp / cold_impressions)``."""
        imp = cat.impressions.take(np.maximum(items, 0))
        return self.cfg.scorer_cold_noise / np.sqrt(1.0 + imp / self.cfg.cold_impressions)

    def sigma(self, items: Array, cat: Catalog) -> Array:
        return (self.cfg.scorer_noise + self._cold(items, cat)).astype(np.float32)

    def score(self, users: Array, items: Array, view: UserView, cat: Catalog) -> tuple[Array, Array]:
        true = self.truth(users, items)  # (B', C, K)
        cold = self._cold(items, cat)
        sig = (self.cfg.scorer_noise + cold).astype(np.float32)
        eps = model_error(view.user_key[users], items, len(HEADS))  # hash_normal(key, item, head), compiled
        wt = self._wt
        # logit(p) + sigma * eps, then the sigmoid, in place (same float32 operations as the formula)
        p = np.clip(true, 1e-4, 1 - 1e-4)
        logit = np.log(p)
        logit -= np.log1p(np.negative(p, out=p), out=p)
        eps_wt = eps[:, :, wt].copy()
        eps *= sig[:, :, None]
        logit += eps
        heads = np.negative(logit, out=logit)
        np.exp(heads, out=heads)
        heads += 1.0
        np.reciprocal(heads, out=heads)
        eps_wt *= 0.5 * sig
        heads[:, :, wt] = true[:, :, wt] * np.exp(eps_wt) / self.cfg.watch_time_scale_s
        unc = (0.1 * cold).astype(np.float32)
        return heads.astype(np.float32, copy=False), unc


def model_error(user_key: Array, items: Array, n_heads: int) -> Array:
    """(B', C, K) float32 persistent model errors ``hash_normal(user_key[:, None, None], max(items, 0)[:, :, None],
    arange(K)[None, None, :])`` (:func:`rankers.hashing.hash_normal`, the same bits; tested) for (B',) user keys
    and (B', C) items, computed in one compiled pass instead of a dozen passes over (B', C, K) arrays."""
    out = np.empty((*items.shape, n_heads), np.float32)
    _model_error(np.ascontiguousarray(user_key, np.uint32), np.ascontiguousarray(items, np.int64), out)
    return out


@numba.njit(cache=True, nogil=True)
def _model_error(user_key: Array, items: Array, out: Array) -> None:
    """Fills ``out`` (B', C, K) with :func:`rankers.hashing.hash_normal` of (user key, max(item, 0), head)."""
    for r in range(items.shape[0]):
        h_user = hash_absorb(0x27D4EB2F, np.int64(user_key[r]), 0)
        for c in range(items.shape[1]):
            h_item = hash_absorb(h_user, max(items[r, c], 0), 1)
            for k in range(out.shape[2]):
                out[r, c, k] = hash_normal_of(hash_absorb(h_item, k, 2))


def make_scorer(cfg: PipelineConfig, truth: TruthFn, model: Any = None, checkpoint: str | Path | None = None,
                expected_meta: dict[str, Any] | None = None) -> Scorer:
    """Builds the stage-3 scorer named by ``cfg.scorer``.

    ``learned`` uses ``model`` (a trained :class:`rankers.models.MultiTaskRanker`) or, when it is None,
    loads ``checkpoint`` (a ranker checkpoint of ``scripts/train_rankers.py``, checked against
    ``expected_meta``, see :func:`rankers.model_files.load_ranker`). The truth is not used by it.
    """
    if cfg.scorer == "noisy_oracle":
        return NoisyOracleScorer(truth, cfg)
    if cfg.scorer == "learned":
        from rankers.model_files import load_ranker  # torch only when asked for
        from rankers.serving import LearnedScorer

        if model is None:
            if checkpoint is None:
                raise ValueError("PipelineConfig.scorer='learned' needs a model or a checkpoint path "
                                 "(offline_data.provision.ensure_rankers resolves the checkpoints of a FeedConfig)")
            model, _ = load_ranker(checkpoint, {"kind": "ranker", **(expected_meta or {})})
        return LearnedScorer(model, cfg)
    raise ValueError(f"PipelineConfig.scorer={cfg.scorer!r} is not a known scorer")


def weighted_sum(heads: Array, weights: Array) -> Array:
    """The seed's combined score: (B, C, K) heads x (B, K) or (K,) weights -> (B, C) float32."""
    w = weights if weights.ndim == 2 else weights[None, :]
    return np.einsum("bck,bk->bc", heads, w.astype(np.float32)).astype(np.float32)


def combined_score(heads: Array, weights: Array, cfg: PipelineConfig) -> Array:
    """Stage 3's ranking score under ``cfg.score_mode``: the weighted sum, or pure engagement
    ``E[watch_time] x p_complete`` (the weights are then ignored)."""
    if cfg.score_mode == "engagement":
        return (heads[..., HEAD_INDEX["watch_time"]] * heads[..., HEAD_INDEX["p_complete"]]).astype(np.float32)
    return weighted_sum(heads, weights)


def prerank_score(users: Array, items: Array, view: UserView, cat: Catalog) -> Array:
    """Stage 2: a lightweight scorer on observable features -> (B', C) float32, -inf for padding.

    Affinity of the user estimate and the item embedding, plus logged completion and skip
    rates (smoothed toward priors) and the content-quality estimate.
    """
    safe = np.maximum(items, 0)
    # ``take`` gathers rows several times faster than fancy indexing (same values)
    aff = np.einsum("bcd,bd->bc", cat.emb.take(safe, axis=0), view.emb[users])
    imp = cat.impressions.take(safe)
    comp = (cat.completes.take(safe) + 1.0) / (imp + 4.0)
    skip = (cat.skips.take(safe) + 1.0) / (imp + 4.0)
    s = 2.0 * aff + 0.5 * comp - 0.5 * skip + 0.3 * cat.quality_est.take(safe)
    return np.where(items >= 0, s, -np.inf).astype(np.float32)


#: Stage 2: ``prerank(users (B',), items (B', C), view, catalog) -> (B', C)`` float32 scores, -inf for padding.
PreRankFn = Callable[[Array, Array, UserView, Catalog], Array]


def make_preranker(cfg: PipelineConfig, model: Any = None) -> PreRankFn:
    """Stage 2 under ``cfg.preranker``: :func:`prerank_score`, or the trained pre-ranker ``model`` (a
    :class:`rankers.models.PreRanker`) through :class:`rankers.serving.LearnedPreRanker`."""
    if cfg.preranker == "heuristic":
        return prerank_score
    if model is None:
        raise ValueError("PipelineConfig.preranker='learned' needs a trained PreRanker model "
                         "(offline_data.provision.ensure_rankers resolves the checkpoints of a FeedConfig)")
    from rankers.serving import LearnedPreRanker  # torch only when asked for

    return LearnedPreRanker(model, refresh_days=cfg.retrieval_refresh_days)


def top_k_with_quota(score: Array, k: int, quotas: list[tuple[Array, int | Array]]) -> Array:
    """Indices (B, k) of the top-``k`` entries of ``score`` (B, C) (-inf = invalid), best first,
    keeping at least ``q`` entries of each ``(mask (B, C), q)`` quota group where available
    (``q`` an int, or (B,) ints per row).

    Rows with fewer than ``k`` valid entries return their invalid entries last.
    """
    b, c = score.shape
    k = min(k, c)
    key = score.copy()
    rows = np.arange(b)[:, None]
    for mask, q_in in quotas:
        q_row = np.minimum(np.broadcast_to(np.asarray(q_in), (b,)), c)
        q = int(q_row.max()) if b else 0
        if q <= 0:
            continue
        g = np.where(mask & np.isfinite(score), score, -np.inf)
        top = np.argpartition(-g, q - 1, axis=1)[:, :q] if q < c else np.broadcast_to(np.arange(c), (b, c))
        ok = np.isfinite(np.take_along_axis(g, top, axis=1))
        if np.any(q_row < q):  # per-row quotas: keep only each row's best q_row of the group
            order = descending_order(np.take_along_axis(g, top, axis=1))
            top = np.take_along_axis(top, order, axis=1)
            ok = np.take_along_axis(ok, order, axis=1) & (np.arange(top.shape[1])[None, :] < q_row[:, None])
        bonus = np.where(ok, 1e6, 0.0).astype(np.float32)
        key[rows, top] += bonus  # indices are distinct within a row: same as np.add.at
    idx = np.argpartition(-key, k - 1, axis=1)[:, :k] if k < c else np.broadcast_to(np.arange(c), (b, c)).copy()
    order = descending_order(np.take_along_axis(score, idx, axis=1))
    return np.take_along_axis(idx, order, axis=1)


def descending_order(values: Array) -> Array:
    """``np.argsort(-values, axis=1, kind="stable")`` for (B, C) float32 ``values``: each row best first, ties
    in column order. One sort of unique 64-bit keys (the negated value's bits ordered as integers, then the
    column) instead of a stable sort of floats: the same permutation, several times faster. NaN falls back."""
    v = np.asarray(values)
    if v.dtype != np.float32 or v.ndim != 2 or v.shape[1] >= 2**31 or np.isnan(v).any():
        return np.argsort(-v, axis=1, kind="stable")
    key = np.empty(v.shape, np.int64)
    _descending_keys(v, key)
    key.sort(axis=1)
    key &= np.int64(0xFFFFFFFF)  # the column
    return key


@numba.njit(cache=True, nogil=True)
def _descending_keys(values: Array, key: Array) -> None:
    """``key[r, c]`` = (the bits of ``-values[r, c]`` as an int32 in float order) << 32 | c, so that keys sort as
    (-value, column); -0.0 and +0.0 (equal) get the same bits."""
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            x = -values[r, c] + np.float32(0.0)  # -0.0 -> +0.0
            i = np.int64(np.float32(x).view(np.int32))
            if i < 0:  # negative floats: larger magnitude = smaller value
                i ^= 0x7FFFFFFF
            key[r, c] = (i << 32) | c
