"""The learned models served in the pipeline: the two-tower retrieval index (stage 1), the learned
pre-ranker (stage 2) and the learned multi-task scorer (stage 3), with the per-slot item vectors they keep
up to date as the catalog changes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rankers.config import HEADS, PipelineConfig
from rankers.item_index import ip_search, new_ivf
from rankers.models import (
    KnownIds,
    ModelConfig,
    MultiTaskRanker,
    PreRanker,
    TwoTower,
    cross_features,
    ensemble_mean,
    ensemble_std,
    item_side_vectors,
    item_tower_embeddings,
    known_ids_of,
    raw_user_from_serving,
    user_features,
)
from rankers.types import Array, Catalog, distinct_ids, user_blocks
from rankers.user_model import UserView


@torch.no_grad()
def user_tower_query(model: TwoTower, users: Array, view: UserView) -> Array:
    """(B', emb_dim + out_dim) float32 user-tower vectors of the users ``users`` from the system's view."""
    model.eval()
    u = user_features(raw_user_from_serving(users, view), model.cfg)
    return model.user_vec(torch.from_numpy(np.ascontiguousarray(u, np.float32))).numpy()



def check_catalog(mc: ModelConfig, cat: Catalog, who: str) -> bool:
    """Raises ``ValueError`` naming the field if the catalog's item-feature dims differ from the model's."""
    for name, got, want in (("emb_dim", cat.emb.shape[1], mc.emb_dim), ("n_topics", cat.n_topics, mc.n_topics),
                            ("n_formats", cat.n_formats, mc.n_formats)):
        if got != want:
            raise ValueError(f"{who}: the catalog's {name} is {got}, the model was trained with {want}")
    return True


class ItemVectors:
    """Per-item vectors of a model's item side for every catalog slot, as a daily embedding job keeps them.

    The item side reads logged counters (impressions) and the new-creator flag, so every item's vector
    is recomputed each ``refresh_days`` world days; items uploaded since, and re-filled (recycled)
    slots, detected by their upload day, get theirs at the next :meth:`sync`. ``fn(catalog, ids)``
    returns the (len(ids), dim) vectors.
    """

    def __init__(self, fn: Callable[[Catalog, Array], Array], dim: int, catalog: Catalog,
                 refresh_days: float = 1.0) -> None:
        cap = catalog.emb.shape[0]
        self.fn = fn
        self.refresh_days = refresh_days
        self.vecs = np.zeros((cap, dim), np.float32)  # (N, dim) vectors of the filled slots
        self._upload_day = np.full(cap, np.nan, np.float32)  # upload day each slot's vector was made for
        self.n_indexed = 0
        self.n_item_vectors = 0  # vectors computed so far (refreshes included)
        self._epoch = self._epoch_of(catalog)
        self.fill(catalog, np.arange(catalog.n_items))

    def _epoch_of(self, cat: Catalog) -> int:
        return int(np.floor(cat.world_day / self.refresh_days))

    def fill(self, cat: Catalog, ids: Array) -> None:
        if ids.size:
            self.vecs[ids] = self.fn(cat, ids)
            self._upload_day[ids] = cat.upload_day[ids]
            self.n_item_vectors += ids.size
        self.n_indexed = cat.n_items

    def sync(self, catalog: Catalog) -> Array | None:
        """Brings the vectors up to date: None if all were recomputed (a new refresh epoch), else the ids
        of the new and re-filled slots recomputed (possibly none)."""
        n = catalog.n_items
        epoch = self._epoch_of(catalog)
        if epoch != self._epoch:
            self._epoch = epoch
            self.fill(catalog, np.arange(n))
            return None
        changed = np.flatnonzero(catalog.upload_day[:n] != self._upload_day[:n])  # NaN (never filled) differs
        self.fill(catalog, changed)
        return changed


class LearnedPreRanker:
    """Stage 2 with the trained :class:`~rankers.models.PreRanker` (a ``PreRankFn``): its logit of the
    item being completed; -inf for padding.

    The pre-ranker is a dual tower, so serving never runs a network per candidate: the item side
    (:meth:`PreRanker.item_side`) is kept per catalog slot by :class:`ItemVectors` (refreshed every
    ``refresh_days`` like the retrieval index), the user side is computed once per user, and a
    candidate's logit is one inner product plus its session-topic term. The object is the stage-2
    function (``PreRankFn``): calling it scores."""

    def __init__(self, model: PreRanker, catalog: Catalog | None = None, refresh_days: float = 1.0) -> None:
        if not isinstance(model, PreRanker):
            raise TypeError(f"LearnedPreRanker needs a PreRanker, got {type(model).__name__}")
        self.model = model.eval()
        self.refresh_days = refresh_days
        self.items: ItemVectors | None = None
        self._checked = False
        if catalog is not None:
            self.sync(catalog)

    def _item_side(self, cat: Catalog, ids: Array) -> Array:
        return item_side_vectors(self.model, self.model.item_side, cat, self.model.side_dim, ids)

    def sync(self, cat: Catalog) -> ItemVectors:
        """Brings the item sides up to date with ``cat`` (a full recomputation at each refresh epoch)."""
        if not self._checked:
            self._checked = check_catalog(self.model.cfg, cat, "LearnedPreRanker")
        if self.items is None:
            self.items = ItemVectors(self._item_side, self.model.side_dim, cat, self.refresh_days)
        else:
            self.items.sync(cat)
        return self.items

    @torch.no_grad()
    def score(self, users: Array, items: Array, view: UserView, cat: Catalog) -> Array:
        """(B', C) users' candidates (int32 item ids, -1 pads) -> (B', C) float32 logits. The item sides
        are made on first use; keeping them fresh is :meth:`sync`'s job (the pipeline runs it as a batch
        job before stage 1), not every request's."""
        b, c = items.shape
        if b * c == 0:
            return np.full((b, c), -np.inf, np.float32)
        vecs = (self.items or self.sync(cat)).vecs
        u = user_features(raw_user_from_serving(users, view), self.model.cfg)
        side = self.model.user_side(torch.from_numpy(np.ascontiguousarray(u, np.float32))).numpy()  # (B', D)
        safe = np.maximum(items, 0)
        logit = np.empty((b, c), np.float32)
        for sl in user_blocks(b, c):  # (b', C, D) gathered vectors per block: see rankers.types.ROW_BLOCK
            logit[sl] = np.einsum("bcd,bd->bc", vecs.take(safe[sl], axis=0), side[sl])
        topic = cat.topic.take(safe)
        se = np.log1p(np.maximum(np.take_along_axis(view.session_engaged[users], topic, axis=1), 0))
        ss = np.log1p(np.maximum(np.take_along_axis(view.session_skipped[users], topic, axis=1), 0))
        w_se, w_ss, bias = self.model.session_terms()
        logit += w_se * se + w_ss * ss + bias
        return np.where(items >= 0, logit, -np.inf).astype(np.float32)

    __call__ = score


class TwoTowerIndex:
    """The interest source's index over the two-tower model's vectors (an ``ItemIndex``).

    Queries are user-tower vectors of the system's view of the users (estimate, cold flag, session
    context, recent rates); items are the item tower's vectors of every catalog item, kept by
    :class:`ItemVectors` (recomputed every ``refresh_days`` world days, new and re-filled slots at
    each sync). ``kind="flat"`` searches them exactly (the blocked inner-product search of
    :class:`rankers.sourcing.EmbeddingIndex`); ``ivf`` with faiss ``IndexIVFFlat`` (ids = item ids),
    trained once on the first vectors.
    """

    def __init__(self, model: TwoTower, catalog: Catalog, kind: str = "flat", nlist: int = 256, nprobe: int = 8,
                 refresh_days: float = 1.0) -> None:
        if not isinstance(model, TwoTower):
            raise TypeError(f"TwoTowerIndex needs a TwoTower model, got {type(model).__name__}")
        check_catalog(model.cfg, catalog, "TwoTowerIndex")
        self.model = model.eval()
        self.kind = kind
        self.dim = model.cfg.emb_dim + model.cfg.out_dim
        self.catalog = catalog
        self.items = ItemVectors(lambda cat, ids: item_tower_embeddings(self.model, cat, ids=ids), self.dim, catalog,
                                 refresh_days)
        if kind == "ivf":
            self.index, self._quant = new_ivf(self.vecs[: catalog.n_items], nlist, nprobe)
            self._add(np.arange(catalog.n_items))

    @property
    def vecs(self) -> Array:
        return self.items.vecs

    @property
    def n_indexed(self) -> int:
        return self.items.n_indexed

    @property
    def n_item_vectors(self) -> int:
        return self.items.n_item_vectors

    def _add(self, ids: Array) -> None:
        if ids.size:
            self.index.add_with_ids(np.ascontiguousarray(self.vecs[ids]), ids.astype(np.int64))

    def sync(self, catalog: Catalog) -> None:
        """Brings the item vectors (and the faiss index) up to date with ``catalog``."""
        self.catalog = catalog
        n_before = self.items.n_indexed
        changed = self.items.sync(catalog)
        if self.kind != "ivf":
            return
        if changed is None:
            self.index.reset()
            self._add(np.arange(catalog.n_items))
        elif changed.size:
            # faiss's wrapper takes an int64 id array (it builds the IDSelectorBatch); its stub lists only the selector
            self.index.remove_ids(changed[changed < n_before].astype(np.int64))  # type: ignore[arg-type]
            self._add(changed)

    def query(self, users: Array, view: UserView) -> Array:
        """(B', E + out_dim) float32 user-tower vectors."""
        return user_tower_query(self.model, users, view)

    def search(self, query: Array, k: int) -> Array:
        """(B', D') queries -> (B', k) int32 item ids of the ``k`` best inner products, -1 pads
        (``ivf``: best first; ``flat``: a set in no particular order)."""
        return ip_search(query, k, self.index if self.kind == "ivf" else None, self.vecs[: self.n_indexed])


# ------------------------------------------------------------------------------------------------ scorer
class LearnedScorer:
    """Stage 3 with the trained :class:`~rankers.models.MultiTaskRanker` (implements ``Scorer``).

    Heads are the ensemble mean (probabilities in [0, 1], watch_time in ``watch_time_scale_s``
    units as trained). Uncertainty (B', C), all observable:
    ``std over ensemble members of the seed-weighted score + count_unc / sqrt(1 + impressions /
    cold_impressions)``: the members' disagreement where training data were scarce, plus a term
    from the item's logged impressions of the same form and size as the noisy-oracle scorer's (so
    ``uncertainty_threshold`` keeps its meaning). Padding gets zero heads and uncertainty.
    """

    def __init__(self, model: MultiTaskRanker, cfg: PipelineConfig, count_unc: float = 0.1) -> None:
        if not isinstance(model, MultiTaskRanker):
            raise TypeError(f"LearnedScorer needs a MultiTaskRanker, got {type(model).__name__}")
        self.model = model.eval()
        self.cfg = cfg
        self.count_unc = count_unc
        self.weights = [float(w) for w in cfg.ranking_weights]
        self._known = KnownIds(known_ids_of(model))
        self._checked = False

    def _weighted(self, act: torch.Tensor) -> torch.Tensor:
        """(..., K) head values -> (...) seed-weighted scores, added head by head (fixed bits, as
        :func:`~rankers.models.ensemble_mean`)."""
        total = act[..., 0] * self.weights[0]
        for k in range(1, act.shape[-1]):
            total += act[..., k] * self.weights[k]
        return total

    @torch.no_grad()
    def score(self, users: Array, items: Array, view: UserView, cat: Catalog) -> tuple[Array, Array]:
        if not self._checked:
            self._checked = check_catalog(self.model.cfg, cat, "LearnedScorer")
        b, c = items.shape
        if b * c == 0:
            return np.zeros((b, c, len(HEADS)), np.float32), np.zeros((b, c), np.float32)
        model, mc = self.model, self.model.cfg
        u = user_features(raw_user_from_serving(users, view), mc)
        ut = model.user_terms(torch.from_numpy(np.ascontiguousarray(u, np.float32)))  # once per user
        safe = np.maximum(items, 0)
        # once per distinct item of the batch, from the catalog as it is now: a popular video is a candidate
        # of many users (on `default` at B = 1024, 15-30 % of the rows are distinct items)
        ids, where = distinct_ids(safe, cat.n_items)
        it = torch.from_numpy(item_side_vectors(model, model.item_terms, cat, model.first_layer.out_features,
                                                ids, known=self._known))
        topic = cat.topic.take(safe)
        engaged = np.take_along_axis(view.session_engaged[users], topic, axis=1)
        skipped = np.take_along_axis(view.session_skipped[users], topic, axis=1)
        ue = view.emb[users]
        heads_t = torch.empty((b, c, len(HEADS)))
        score = torch.empty((mc.n_ensemble, b, c))
        for sl in user_blocks(b, c):  # block by block (rankers.types.ROW_BLOCK), the same bits as one pass
            cross = cross_features(ue[sl], cat.emb.take(safe[sl], axis=0), engaged[sl], skipped[sl])
            rows = torch.from_numpy(where[sl].reshape(-1))
            raw = model.combine(ut[sl], it.index_select(0, rows).view(*safe[sl].shape, -1), torch.from_numpy(cross))
            act = MultiTaskRanker.activate(raw)  # (M, b', C, K)
            heads_t[sl] = ensemble_mean(act)
            score[:, sl] = self._weighted(act)
        heads = heads_t.numpy()
        spread = ensemble_std(score).numpy()
        imp = cat.impressions.take(safe)
        unc = spread + self.count_unc / np.sqrt(1.0 + imp / self.cfg.cold_impressions)
        valid = items >= 0
        heads = np.where(valid[..., None], heads, 0.0).astype(np.float32)
        unc = np.where(valid, unc, 0.0).astype(np.float32)
        return heads, unc

