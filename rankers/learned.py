"""Training, evaluation and checkpoints of the learned models, and the learned stage-3 scorer.

Training functions take *impression rows*: a dict of numpy arrays, one entry per logged impression
(I rows). Nothing here loads files of the offline-data package or touches the world: a script turns
its logs into rows (``scripts/train_rankers.py`` for the simulator's logs,
:func:`rankers.kuairand.load_kuairand` for KuaiRand-Pure). Row keys:

- ``user_id`` (I,) int64, ``step`` (I,) int (request index; orders rows in time);
- every key of the raw feature dict of :mod:`rankers.models` (:data:`ROW_FEATURE_KEYS`), one entry
  per row (``item_emb`` and ``user_emb`` (I, E)), as the system saw them when serving;
- labels ``watch_s``, ``watch_frac`` (I,) float and ``complete``, ``like``, ``share``, ``comment``,
  ``follow``, ``skip``, ``regret`` (I,) bool.

Reproducibility: every training function runs under :func:`torch.random.fork_rng` seeded with
``TrainConfig.seed`` (initialisation, dropout, id dropout) and draws batches from a seeded
``torch.Generator``: the same rows and seed give identical weights, and the caller's global torch
RNG is left untouched. Epochs are fixed (no early stopping).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from rankers.config import HEAD_INDEX, HEADS, PipelineConfig
from rankers.fileio import atomic_write_with
from rankers.models import (
    FEATURE_SCHEMA_VERSION,
    ITEM_KEYS,
    MODEL_KINDS,
    MODEL_VERSION,
    USER_KEYS,
    Features,
    KnownIds,
    ModelConfig,
    MultiTaskRanker,
    PreRanker,
    TwoTower,
    build_features,
    cross_features,
    ensemble_mean,
    ensemble_std,
    item_side_vectors,
    item_tower_embeddings,
    known_ids_of,
    make_model,
    model_config,
    raw_from_rows,
    raw_user_from_serving,
    set_known_ids,
    user_features,
)
from rankers.sourcing import ip_search, new_ivf
from rankers.types import Array, Catalog, distinct_ids, user_blocks
from rankers.user_model import UserView

ROW_FEATURE_KEYS: tuple[str, ...] = (*USER_KEYS, *ITEM_KEYS)
LABEL_KEYS: tuple[str, ...] = ("watch_s", "watch_frac", "complete", "like", "share", "comment", "follow", "skip",
                               "regret")
REQUIRED_ROW_KEYS: tuple[str, ...] = ("user_id", "step", *ROW_FEATURE_KEYS, *LABEL_KEYS)
#: Label of each head in :data:`HEADS` order (watch_time = watch_s / watch_time_scale_s).
HEAD_LABEL: dict[str, str] = {"p_complete": "complete", "p_like": "like", "p_share": "share", "p_comment": "comment",
                              "p_follow": "follow", "watch_time": "watch_s", "p_skip": "skip", "p_regret": "regret"}
CHECKPOINT_FORMAT = "feedgym.learned_model"
LogFn = Callable[[dict[str, float], int], None]


# ------------------------------------------------------------------------------------------------ rows
def validate_rows(rows: dict[str, Array]) -> int:
    """Checks that ``rows`` has every required key with one entry per row; returns I.

    Raises:
        ValueError: naming the missing keys, or the key whose length differs.
    """
    missing = [k for k in REQUIRED_ROW_KEYS if k not in rows]
    if missing:
        raise ValueError(f"impression rows lack required keys {missing}")
    n = len(rows["user_id"])
    for k in REQUIRED_ROW_KEYS:
        if len(rows[k]) != n:
            raise ValueError(f"impression rows key {k!r} has {len(rows[k])} entries, expected {n} (as user_id)")
    return n


def head_labels(rows: dict[str, Array], watch_time_scale_s: float) -> Array:
    """(I, K) float32 targets in :data:`HEADS` order; watch_time in ``watch_time_scale_s`` units."""
    y = np.stack([np.asarray(rows[HEAD_LABEL[h]], np.float32) for h in HEADS], axis=1)
    y[:, HEAD_INDEX["watch_time"]] /= watch_time_scale_s
    return y


def engaged_label(rows: dict[str, Array]) -> Array:
    """(I,) bool: the two-tower's positive engagement (complete, like, share, follow or > 50 % watched)."""
    return (np.asarray(rows["complete"], bool) | np.asarray(rows["like"], bool) | np.asarray(rows["share"], bool)
            | np.asarray(rows["follow"], bool) | (np.asarray(rows["watch_frac"]) > 0.5))


def split_rows_by_user(user_id: Array, val_fraction: float = 0.2, seed: int = 0) -> tuple[Array, Array]:
    """Row indices (train, val): a seeded ``val_fraction`` of the distinct users goes to val."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in (0, 1)")
    users = np.unique(np.asarray(user_id))
    rng = np.random.default_rng(seed)
    n_val = max(1, round(val_fraction * users.size)) if users.size > 1 else 0
    val_users = rng.choice(users, n_val, replace=False) if n_val else users[:0]
    val = np.isin(user_id, val_users)
    return np.flatnonzero(~val), np.flatnonzero(val)


def split_by_time(step: Array, val_fraction: float = 0.2) -> tuple[Array, Array]:
    """Row indices (train, val): rows at or after the ``1 - val_fraction`` quantile of ``step`` go to val
    (train on the past, evaluate on the future)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in (0, 1)")
    s = np.asarray(step)
    cut = np.quantile(s, 1.0 - val_fraction, method="higher")
    val = s >= cut
    return np.flatnonzero(~val), np.flatnonzero(val)


def session_counts(session_id: Array, step: Array, topic: Array, watch_frac: Array, engaged_frac: float = 0.5,
                   skipped_frac: float = 0.1) -> tuple[Array, Array, Array]:
    """Within-session counts each row's request saw, from rows of strictly earlier steps of the same session.

    Args:
        session_id: (I,) int, unique per (user, session).
        step: (I,) int request index (rows of one request share it).
        topic: (I,) int topic of the row's video.
        watch_frac: (I,) float watched fraction.

    Returns:
        ``(engaged, skipped, videos)`` (I,) float32: videos of the row's topic engaged (watch_frac >
        ``engaged_frac``) and skipped (< ``skipped_frac``) earlier in the session, and all videos
        shown earlier in the session: what :class:`~rankers.user_model.UserView` keeps when serving.
    """
    sid = np.asarray(session_id, np.int64)
    st = np.asarray(step, np.int64)
    tp = np.asarray(topic, np.int64)
    wf = np.asarray(watch_frac, np.float64)
    s_span = int(st.max(initial=0)) + 2

    def before(group: Array, value: Array) -> Array:
        _, g = np.unique(group, return_inverse=True)
        key = g.astype(np.int64) * s_span + st
        order = np.argsort(key, kind="stable")
        ks = key[order]
        cum = np.r_[0.0, np.cumsum(value[order])]
        lo = np.searchsorted(ks, g * s_span, side="left")
        hi = np.searchsorted(ks, key, side="left")  # rows of earlier steps only
        return (cum[hi] - cum[lo]).astype(np.float32)

    n_topics = int(tp.max(initial=0)) + 1
    st_key = sid * n_topics + tp
    eng = before(st_key, (wf > engaged_frac).astype(np.float64))
    skp = before(st_key, (wf < skipped_frac).astype(np.float64))
    vids = before(sid, np.ones_like(wf))
    return eng, skp, vids


# ------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by the three training loops."""

    epochs: int = 5
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-5
    seed: int = 0
    progress: bool = True
    """Show tqdm progress bars."""
    watch_time_scale_s: float = 30.0
    """watch_time targets are ``watch_s / watch_time_scale_s`` (as the pipeline's heads)."""
    head_loss_weights: tuple[float, ...] = (1.0,) * len(HEADS)
    """Weight of each head's loss, :data:`HEADS` order."""
    huber_delta: float = 1.0
    """watch_time loss: Huber with this delta (in scale units)."""
    bootstrap: bool = True
    """Ranker: each ensemble member weights rows by Poisson(1) draws (a bootstrap), so members disagree
    where data are scarce."""
    logq: bool = True
    """Two-tower: subtract log of each item's in-batch sampling probability (logQ correction)."""
    prerank_label: str = "complete"
    """Pre-ranker target: a boolean label key of the rows."""
    log_every: int = 20
    """Batches between two ``log`` calls."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"TrainConfig.{name}={v!r} is invalid: must be an int >= 1")
        if len(self.head_loss_weights) != len(HEADS):
            raise ValueError(f"TrainConfig.head_loss_weights has {len(self.head_loss_weights)} entries, "
                             f"expected {len(HEADS)} (one per head {HEADS})")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r} is invalid: must be > 0")


def take_features(f: Features, idx: torch.Tensor) -> Features:
    """Rows ``idx`` of every field."""
    return Features(**{k: getattr(f, k)[idx] for k in f.__dataclass_fields__})


def _prepare(model: nn.Module, rows: dict[str, Array], idx: Array | None, min_id_count: int) -> tuple[Features, Array]:
    validate_rows(rows)
    idx = np.arange(len(rows["user_id"])) if idx is None else np.asarray(idx)
    set_known_ids(model, np.asarray(rows["video_id"])[idx], min_id_count)
    f = build_features(raw_from_rows(rows, idx), model_config(model), known_ids_of(model))
    return f, idx


def _loop(model: nn.Module, n: int, tc: TrainConfig, name: str, loss_fn: Callable[[Array], tuple[torch.Tensor, dict]],
          log: LogFn | None) -> None:
    """Fixed-epoch minibatch Adam over ``n`` rows; ``loss_fn(batch_idx)`` -> (loss, named losses)."""
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    n_batches = max(1, -(-n // tc.batch_size))
    model.train()
    step = 0
    bar = tqdm(total=tc.epochs * n_batches, desc=f"train {name}", disable=not tc.progress, leave=False, unit="batch")
    for epoch in range(tc.epochs):
        perm = torch.randperm(n, generator=gen).numpy()
        for s in range(0, n, tc.batch_size):
            bi = perm[s : s + tc.batch_size]
            loss, parts = loss_fn(bi)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if log is not None and (step % tc.log_every == 0 or step == tc.epochs * n_batches):
                metrics = {f"losses/{name}_{k}": float(v) for k, v in parts.items()}
                metrics[f"losses/{name}"] = float(loss.detach())
                metrics[f"train/{name}_epoch"] = float(epoch)
                log(metrics, step)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    bar.close()
    model.eval()


def train_ranker(rows: dict[str, Array], model_cfg: ModelConfig, tc: TrainConfig | None = None,
                 idx: Array | None = None, log: LogFn | None = None) -> MultiTaskRanker:
    """Trains the multi-task ranker on rows ``idx`` (all if None): per-head BCE (Huber for watch_time),
    weighted by ``tc.head_loss_weights``, each ensemble member on its own bootstrap weights."""
    tc = tc or TrainConfig()
    if model_cfg.kind != "ranker":
        raise ValueError(f"train_ranker needs ModelConfig.kind='ranker', got {model_cfg.kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        model = MultiTaskRanker(model_cfg)
        f, idx = _prepare(model, rows, idx, model_cfg.min_id_count)
        y = torch.from_numpy(head_labels({k: np.asarray(rows[k])[idx] for k in HEAD_LABEL.values()},
                                         tc.watch_time_scale_s))
        m = model_cfg.n_ensemble
        gen = torch.Generator().manual_seed(tc.seed + 1)
        w_rows = (torch.poisson(torch.ones(m, idx.size), generator=gen) if tc.bootstrap and m > 1
                  else torch.ones(m, idx.size))
        hw = torch.tensor(tc.head_loss_weights, dtype=torch.float32)
        wt = HEAD_INDEX["watch_time"]
        prob = torch.tensor([k != wt for k in range(len(HEADS))])

        def loss_fn(bi: Array) -> tuple[torch.Tensor, dict]:
            t = torch.from_numpy(bi)
            raw = model(take_features(f, t))[:, :, 0, :]  # (M, b, K)
            yb = y[t].unsqueeze(0).expand_as(raw)
            wb = w_rows[:, t].unsqueeze(-1)  # (M, b, 1)
            bce = F.binary_cross_entropy_with_logits(raw, yb, reduction="none")
            hub = F.huber_loss(F.softplus(raw[..., wt]), yb[..., wt], delta=tc.huber_delta, reduction="none")
            per = torch.where(prob, bce, hub.unsqueeze(-1).expand_as(bce))
            per_head = (per * wb).sum(dim=(0, 1)) / wb.sum(dim=(0, 1)).clamp_min(1e-6)  # (K,)
            loss = (per_head * hw).sum()
            return loss, {h: per_head[i].detach() for i, h in enumerate(HEADS)}

        _loop(model, idx.size, tc, "ranker", loss_fn, log)
    return model


def train_preranker(rows: dict[str, Array], model_cfg: ModelConfig, tc: TrainConfig | None = None,
                    idx: Array | None = None, log: LogFn | None = None) -> PreRanker:
    """Trains the pre-ranker (BCE on ``tc.prerank_label``) on rows ``idx`` (all if None)."""
    tc = tc or TrainConfig()
    if model_cfg.kind != "preranker":
        raise ValueError(f"train_preranker needs ModelConfig.kind='preranker', got {model_cfg.kind!r}")
    if tc.prerank_label not in rows:
        raise ValueError(f"TrainConfig.prerank_label={tc.prerank_label!r} is not a key of the rows")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        model = PreRanker(model_cfg)
        f, idx = _prepare(model, rows, idx, model_cfg.min_id_count)
        y = torch.from_numpy(np.asarray(rows[tc.prerank_label], np.float32)[idx])

        def loss_fn(bi: Array) -> tuple[torch.Tensor, dict]:
            t = torch.from_numpy(bi)
            logit = model(take_features(f, t))[:, 0]
            loss = F.binary_cross_entropy_with_logits(logit, y[t])
            return loss, {}

        _loop(model, idx.size, tc, "preranker", loss_fn, log)
    return model


def train_two_tower(rows: dict[str, Array], model_cfg: ModelConfig, tc: TrainConfig | None = None,
                    idx: Array | None = None, log: LogFn | None = None) -> TwoTower:
    """Trains the two-tower model with in-batch negatives (sampled softmax) on the positive
    engagements (:func:`engaged_label`) among rows ``idx``. Other rows of the batch with the same
    video are masked (not negatives); with ``tc.logq`` the logits subtract ``log q(item)``, the
    item's share of the positives (popular items are over-sampled as negatives)."""
    tc = tc or TrainConfig()
    if model_cfg.kind != "two_tower":
        raise ValueError(f"train_two_tower needs ModelConfig.kind='two_tower', got {model_cfg.kind!r}")
    validate_rows(rows)
    idx = np.arange(len(rows["user_id"])) if idx is None else np.asarray(idx)
    pos = idx[engaged_label({k: np.asarray(rows[k])[idx] for k in ("complete", "like", "share", "follow",
                                                                       "watch_frac")})]
    if pos.size < 2:
        raise ValueError(f"train_two_tower needs at least 2 positive engagements, got {pos.size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        model = TwoTower(model_cfg)
        set_known_ids(model, np.asarray(rows["video_id"])[idx], model_cfg.min_id_count)
        f = build_features(raw_from_rows(rows, pos), model_cfg, known_ids_of(model))
        vid = np.asarray(rows["video_id"], np.int64)[pos]
        _, inv, cnt = np.unique(vid, return_inverse=True, return_counts=True)
        logq = torch.from_numpy(np.log(cnt[inv] / vid.size).astype(np.float32))
        vid_t = torch.from_numpy(vid)

        def loss_fn(bi: Array) -> tuple[torch.Tensor, dict]:
            t = torch.from_numpy(bi)
            fb = take_features(f, t)
            u = model.user_vec(fb)
            v = model.item_vec(fb)[:, 0, :]
            logits = u @ v.T / model_cfg.temperature
            if tc.logq:
                logits = logits - logq[t][None, :]
            same = vid_t[t][:, None] == vid_t[t][None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
            loss = F.cross_entropy(logits, torch.arange(t.numel()))
            return loss, {}

        _loop(model, pos.size, tc, "two_tower", loss_fn, log)
    return model


TRAINERS: dict[str, Callable[..., nn.Module]] = {"two_tower": train_two_tower, "preranker": train_preranker,
                                                 "ranker": train_ranker}


def train_models(rows: dict[str, Array], dims: dict[str, int], tc: TrainConfig, idx: Array | None = None,
                 hidden: int = 64, log: LogFn | None = None, kinds: tuple[str, ...] = MODEL_KINDS,
                 ) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Trains the pipeline's models of ``kinds`` on rows ``idx`` (all if None), in that order.

    Args:
        dims: the item-feature dims ``emb_dim``, ``n_topics``, ``n_formats`` of the catalog served.
        hidden: width of every model's hidden layers.
        log: metrics callback; each model's steps are offset by 100,000 so curves do not overlap.

    Returns:
        ``({kind: model in eval mode}, {kind: training seconds})``. The hashed id table has the
        smallest power of two >= max(1024, 2 x distinct video ids) rows.
    """
    id_buckets = int(2 ** np.ceil(np.log2(max(1024, 2 * np.unique(np.asarray(rows["video_id"])).size))))
    models: dict[str, nn.Module] = {}
    secs: dict[str, float] = {}
    for i, kind in enumerate(kinds):
        mc = ModelConfig(kind=kind, emb_dim=dims["emb_dim"], n_topics=dims["n_topics"], n_formats=dims["n_formats"],
                         hidden=hidden, id_buckets=id_buckets)
        step_log = None if log is None else (lambda m, step, off=100_000 * i: log(m, off + step))
        t0 = time.perf_counter()
        models[kind] = TRAINERS[kind](rows, mc, tc, idx=idx, log=step_log)
        secs[kind] = round(time.perf_counter() - t0, 2)
    return models, secs


def save_models(out: str | Path, models: dict[str, nn.Module], preset: str, **extra: Any) -> dict[str, Path]:
    """Writes each model to ``out/<kind>.pt`` (:func:`save_ranker`, meta of :func:`checkpoint_meta`
    with ``extra``); returns the paths."""
    out = Path(out)
    return {kind: save_ranker(out / f"{kind}.pt", m, checkpoint_meta(m, preset, **extra))
            for kind, m in models.items()}


def load_models(paths: dict[str, Path], expected_meta: dict[str, Any] | None = None) -> dict[str, nn.Module]:
    """Loads ``{kind: path}`` checkpoints, each checked for its kind and ``expected_meta``
    (:func:`load_ranker`; raises :class:`RankerCheckpointError` naming the field)."""
    return {kind: load_ranker(p, {"kind": kind, **(expected_meta or {})})[0] for kind, p in paths.items()}


# ------------------------------------------------------------------------------------------------ prediction
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
def user_tower_query(model: TwoTower, users: Array, view: UserView) -> Array:
    """(B', emb_dim + out_dim) float32 user-tower vectors of the users ``users`` from the system's view."""
    model.eval()
    u = user_features(raw_user_from_serving(users, view), model.cfg)
    return model.user_vec(torch.from_numpy(np.ascontiguousarray(u, np.float32))).numpy()


@torch.no_grad()
def user_tower_vectors(model: TwoTower, rows: dict[str, Array], idx: Array | None = None) -> Array:
    """(I, emb_dim + out_dim) float32 user-tower vectors of logged rows (the user's state at each row)."""
    model.eval()
    f = build_features(raw_from_rows(rows, idx), model.cfg, known_ids_of(model))
    return model.user_vec(f).numpy()


# ------------------------------------------------------------------------------------------------ evaluation
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


# ------------------------------------------------------------------------------------------------ checkpoints
class RankerCheckpointError(ValueError):
    """A checkpoint does not fit what the caller expects; the message names the field and both values."""


def checkpoint_meta(model: nn.Module, preset: str, **extra: Any) -> dict[str, Any]:
    """The meta a checkpoint records: kind, model config, feature schema version, preset, item-feature dims."""
    cfg = model_config(model)
    return {"format": CHECKPOINT_FORMAT, "model_version": MODEL_VERSION, "kind": cfg.kind,
            "model_config": cfg.to_dict(),
            "schema_version": FEATURE_SCHEMA_VERSION, "preset": preset,
            "item_feature_dims": {"emb_dim": cfg.emb_dim, "n_topics": cfg.n_topics, "n_formats": cfg.n_formats},
            **extra}


def save_ranker(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Writes ``{"meta", "state_dict"}`` atomically (:func:`rankers.fileio.atomic_write_with`)."""
    return atomic_write_with(path, lambda fh: torch.save({"meta": meta, "state_dict": model.state_dict()}, fh))


def _check(path: Path, name: str, got: Any, want: Any) -> None:
    if got != want:
        raise RankerCheckpointError(f"checkpoint {path}: {name} is {got!r}, expected {want!r}")


def load_ranker(path: str | Path, expected_meta: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Loads a checkpoint; returns (model in eval mode, meta).

    Always checks the format and that the feature schema version is this code's; then every field
    of ``expected_meta`` among ``kind``, ``preset``, ``schema_version`` and ``item_feature_dims``
    (and any other top-level key given).

    Raises:
        RankerCheckpointError: naming the mismatched field and both values.
    """
    path = Path(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
    _check(path, "format", meta.get("format"), CHECKPOINT_FORMAT)
    _check(path, "schema_version", meta.get("schema_version"), FEATURE_SCHEMA_VERSION)
    _check(path, "model_version", meta.get("model_version"), MODEL_VERSION)
    for k, want in (expected_meta or {}).items():
        _check(path, k, meta.get(k), want)
    cfg = ModelConfig(**meta["model_config"])
    model = make_model(cfg)
    known = blob["state_dict"].get("known_ids")
    if known is not None:
        model.known_ids = torch.zeros_like(known)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, meta


# ------------------------------------------------------------------------------------------------ serving
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
