"""Offline evaluation of the learned models on logged impression rows: their predictions and the metrics
of a model report (AUC, calibration, recall and hit rate at k)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from rankers.config import HEADS
from rankers.models import (
    MultiTaskRanker,
    PreRanker,
    TwoTower,
    build_features,
    known_ids_of,
    model_config,
    raw_from_rows,
)
from rankers.types import Array


@torch.no_grad()
def predict_heads(model: MultiTaskRanker, raw: dict[str, Array], use_id: bool = True) -> tuple[Array, Array]:
    """(B, C, K) float32 mean head values over the ensemble and (B, C, K) their std."""
    model.eval()
    f = build_features(raw, model.cfg, known_ids_of(model))
    act = MultiTaskRanker.activate(model(f, use_id))  # (M, B, C, K)
    return act.mean(0).numpy(), act.std(0, unbiased=False).numpy()


@torch.no_grad()
def predict_rows(model: nn.Module, rows: dict[str, Array], idx: Array | None = None, use_id: bool = True,
                 batch: int = 8192) -> Array:
    """Predictions on logged rows: the ranker -> (I, K) head values; the pre-ranker -> (I,)
    probabilities; the two-tower -> (I,) cosine of user and item vectors."""
    model.eval()
    idx = np.arange(len(rows["user_id"])) if idx is None else np.asarray(idx)
    out = []
    for s in range(0, idx.size, batch):
        raw = raw_from_rows(rows, idx[s : s + batch])
        if isinstance(model, MultiTaskRanker):
            out.append(predict_heads(model, raw, use_id)[0][:, 0, :])
        else:
            f = build_features(raw, model_config(model), known_ids_of(model))
            if isinstance(model, PreRanker):
                out.append(torch.sigmoid(model(f, use_id))[:, 0].numpy())
            else:
                out.append((model(f, use_id)[:, 0] * model_config(model).temperature).numpy())
    if not out:
        return np.zeros((0, len(HEADS)) if isinstance(model, MultiTaskRanker) else 0, np.float32)
    return np.concatenate(out).astype(np.float32)




@torch.no_grad()
def user_tower_vectors(model: TwoTower, rows: dict[str, Array], idx: Array | None = None) -> Array:
    """(I, emb_dim + out_dim) float32 user-tower vectors of logged rows (the user's state at each row)."""
    model.eval()
    f = build_features(raw_from_rows(rows, idx), model.cfg, known_ids_of(model))
    return model.user_vec(f).numpy()



def auc(y: Array, p: Array) -> float:
    """ROC AUC of scores ``p`` for binary labels ``y``; NaN when ``y`` has one class only."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(p, np.float64)))


def expected_calibration_error(p: Array, y: Array, n_bins: int = 10) -> float:
    """ECE of probabilities ``p`` for binary labels ``y``: equal-width bins on [0, 1], the count-weighted
    mean of ``|mean(p) - mean(y)|`` per bin. NaN for no rows."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    y = np.asarray(y, np.float64)
    if p.size == 0:
        return float("nan")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    sp = np.bincount(b, p, minlength=n_bins)
    sy = np.bincount(b, y, minlength=n_bins)
    return float(np.abs(sp - sy).sum() / p.size)


def regression_calibration_error(pred: Array, y: Array, n_bins: int = 10) -> float:
    """Calibration of a regression head: ``pred`` split into quantile bins, the count-weighted mean
    of ``|mean(pred) - mean(y)|`` per bin divided by ``mean(y)`` (0 = calibrated)."""
    pred = np.asarray(pred, np.float64)
    y = np.asarray(y, np.float64)
    if pred.size == 0 or y.mean() <= 0:
        return float("nan")
    order = np.argsort(pred, kind="stable")
    err = sum(abs(pred[c].mean() - y[c].mean()) * c.size for c in np.array_split(order, n_bins) if c.size)
    return float(err / pred.size / y.mean())


def evaluate_heads(pred: Array, labels: Array) -> dict[str, dict[str, float]]:
    """Per-head metrics of predictions ``pred`` (I, K) against ``labels`` (I, K) (:func:`head_labels`).

    Probability heads: ``auc``, ``ece`` (:func:`expected_calibration_error`), ``rate`` (label mean),
    ``mean_pred``. watch_time: ``auc`` of the predicted watch time for "watched longer than the
    median of these rows", ``ece`` = :func:`regression_calibration_error`, ``rate`` and ``mean_pred``
    in scale units.
    """
    out: dict[str, dict[str, float]] = {}
    for k, h in enumerate(HEADS):
        p, y = pred[:, k], labels[:, k]
        if h == "watch_time":
            a = auc(y > np.median(y), p) if y.size else float("nan")
            e = regression_calibration_error(p, y)
        else:
            a, e = auc(y, p), expected_calibration_error(p, y)
        out[h] = {"auc": a, "ece": e, "rate": float(y.mean()) if y.size else float("nan"),
                  "mean_pred": float(p.mean()) if p.size else float("nan")}
    return out


def recall_at_k(retrieved: Array, relevant: Array) -> float:
    """Mean over rows of ``|retrieved ∩ relevant| / |relevant|`` (both (B, *) int ids, -1 ignored);
    rows with no relevant ids are skipped. NaN if none is left."""
    vals = []
    for r, t in zip(np.asarray(retrieved), np.asarray(relevant)):
        t = t[t >= 0]
        if t.size:
            vals.append(np.isin(t, r[r >= 0]).mean())
    return float(np.mean(vals)) if vals else float("nan")


def hit_rate_at_k(retrieved: Array, target: Array) -> float:
    """Share of rows whose single ``target`` (B,) id is among ``retrieved`` (B, k)."""
    if len(target) == 0:
        return float("nan")
    return float((np.asarray(retrieved) == np.asarray(target)[:, None]).any(axis=1).mean())

